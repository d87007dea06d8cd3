"""``python -m clip_triton.cli``: the ``clip-triton`` command."""

import sys

from . import main

sys.exit(main())
