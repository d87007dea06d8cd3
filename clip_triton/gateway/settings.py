"""The gateway's settings: one dataclass, read by ``clip-triton gateway`` from flags and environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..contract import DEFAULT_URL, check_served_model_name
from ..errors import ClipTritonError
from ..tokenizer import DEFAULT_MAX_TEXT_CHARS
from .fetch import FetchPolicy


@dataclass
class GatewaySettings:
    triton_url: str = DEFAULT_URL
    api_keys: tuple[str, ...] = ()
    auth: bool = True  # False only when explicitly disabled for local use
    max_body_bytes: int = 64 * 1024 * 1024
    max_items: int = 256
    triton_timeout_s: float = 60.0
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    max_urls_per_request: int = 16  # image URLs fetched for one request
    max_concurrent_fetches: int = 8  # image URLs being fetched at once, all requests together
    max_templates: int = 64
    max_template_chars: int = 1000
    max_template_texts: int = 256  # prompts x templates encoded for one /v1/classify request
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS  # one text, as encoded (a prompt in its template)
    prompt_cache_entries: int = 256
    docs: bool = False  # /docs, /redoc, /openapi.json: off unless asked for
    served_model_name: str | None = None  # public model id; default: the repository's, else the architecture
    # Folder holding the served model's tokenizer.json, for models with a Hugging Face tokenizer (SigLIP,
    # MetaCLIP 2): the gateway counts `usage` tokens with it. The repository's `tokenizer/1` is one.
    tokenizer_dir: str | None = None

    def __post_init__(self):
        if self.served_model_name is not None:
            check_served_model_name(self.served_model_name)
        if self.auth and not self.api_keys:
            raise ClipTritonError(
                "no API keys configured for the gateway",
                "set CLIP_TRITON_API_KEYS=key1,key2, or pass --no-auth for local use only",
            )
