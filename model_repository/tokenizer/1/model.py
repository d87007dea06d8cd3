"""Triton python-backend entry point, written by `clip-triton repo`. The logic lives in clip_triton.serving.tokenizer_model."""

import os
import site
import sys

# Triton's python stub starts without PYTHONPATH on sys.path; `clip-triton serve` points it at this
# package's environment. addsitedir also runs .pth files (editable installs). Added paths go first.
_known = set(sys.path)
for _path in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(_path)
sys.path.sort(key=lambda path: path in _known)

from clip_triton.serving.tokenizer_model import TritonPythonModel  # noqa: E402,F401
