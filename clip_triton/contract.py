"""The contract every part of clip-triton agrees on.

Export, the Triton model repository, the python-backend models, the client and the tests all import
this module instead of repeating tensor names, shapes, dtypes, image size, mean/std or context length.

A :class:`ModelContract` is derived from open_clip's own configuration for an architecture and a
pretrained tag by ``clip_triton.export.adapter.contract_from_open_clip`` (open_clip, no weights; this
module never imports open_clip), and is persisted as JSON (in the export manifest, in Triton config ``parameters``, and for the default model
as a snapshot shipped in this package) so that serving code and clients read it without torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any

from .errors import ClipTritonError

DEFAULT_MODEL = "ViT-bigG-14"
DEFAULT_PRETRAINED = "laion2b_s39b_b160k"

# ----------------------------------------------------------------------------------------------
# Names: Triton models and tensors. Encoders use descriptive lower-case names (they are also the
# ONNX graph's input/output names); the ensembles' public tensors are upper-case.
# ----------------------------------------------------------------------------------------------
PREPROCESS_MODEL = "preprocess"
TOKENIZER_MODEL = "tokenizer"
VISION_MODEL = "vision_encoder"
TEXT_MODEL = "text_encoder"
IMAGE_ENSEMBLE = "clip_image"
TEXT_ENSEMBLE = "clip_text"
# A tower whose answers Triton's response cache keeps is served as two ensembles: the public one
# (above, never cached) whose single step is the cached one (below), which runs the pipeline. Triton
# keys a cache entry on the model and its inputs only, and an ensemble's response holds just the outputs
# its request names: cached at the public ensemble, one request for EMBEDDING alone would leave an entry
# without STATUS for everyone (issue 25). A step request names every output of its step, so the cached
# ensemble's entries always hold both. Internal: a request sent to it directly must name both outputs.
IMAGE_CACHED = "clip_image_cached"
TEXT_CACHED = "clip_text_cached"

# Wire defaults, spelled once: Triton's ports (its own defaults), where clients look for its gRPC
# endpoint, the gateway's port, how long clients ride out a restarting server (a tritonserver restart
# takes ~60 s on a 2-core machine), and how Triton's python backend says a stub died ("Stub process
# '<model>_0_0' is not healthy.").
HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
GATEWAY_PORT = 8080
DEFAULT_URL = f"localhost:{GRPC_PORT}"
RETRY_SECONDS = 150.0
# Before a job: how long nothing may answer at the address before the client says so (a server that
# answers but is still loading its models is waited for longer: the CLI's --ready-timeout).
CONNECT_SECONDS = 10.0
STUB_NOT_HEALTHY = "is not healthy"

IMAGE_INPUT = "IMAGE"  # encoded image bytes, one item per batch row
TEXT_INPUT = "TEXT"  # UTF-8 text, one item per batch row
EMBEDDING_OUTPUT = "EMBEDDING"  # L2-normalised float32 embedding
# Per item: b"" when the item was embedded, else why it was refused ("item 3: empty text"). A request
# of several items is answered whole, every good row with its embedding and every bad row flagged
# here, its EMBEDDING row all NaN; a request of one bad item still fails INVALID_ARGUMENT.
STATUS_OUTPUT = "STATUS"
# A refused item's EMBEDDING row is NaN on every runtime, so no similarity computed from it can pass
# for a score (any product with it is NaN) even for a client that never reads STATUS. The encoder
# graphs do it themselves (clip_triton/export/graphs.py ``refusable``), from a mark the front step leaves in the
# refused row of the graph's own input, so no extra input and no extra model hop:
#   text: the row's first token is the padding id (every tokenization starts with a start token or
#         text; the tokenizer refuses a text whose first token would be padding);
#   image: the row's first value is REFUSED_PIXEL (no normalised image comes near it; finite, so fp16
#          holds it and the python encoder's finiteness check lets it through).
REFUSED_PIXEL = 1.0e4
# The export manifest's "format": 2 since the graphs answer refused rows with NaN. Older exports are
# re-exported (export's reuse check) or refused (repo), never served beside fronts that mark rows.
EXPORT_FORMAT = 2
REFUSED_PIXEL_FLOOR = REFUSED_PIXEL / 2  # the graph's test: first value >= this marks a refused row
# Text ensembles only, per item: how many tokens the model encodes for it (start and end tokens
# included, padding not; 0 for a refused item), counted by the server's own tokenizer, so that the
# gateway's `usage` needs no tokenizer files of its own (issue 30). Clients ask for it when they count.
TOKENS_OUTPUT = "TOKENS"
OUTPUT_DESCRIPTIONS = {
    EMBEDDING_OUTPUT: "L2-normalised float32 embedding per item; a refused item's row is all NaN (read STATUS "
    "for why, or drop rows where isnan)",
    STATUS_OUTPUT: 'per item: empty when embedded, else why it was refused ("item 3: empty text")',
    TOKENS_OUTPUT: "text only, per item: tokens the model encodes (start/end included, padding not; 0 if refused)",
}

PIXELS = "pixel_values"  # [B, 3, H, W], the vision graph's input
INPUT_IDS = "input_ids"  # [B, L] int32, the text graph's input: L one of the contract's text lengths
IMAGE_EMBEDS = "image_embeds"  # [B, D] float32, the vision graph's output
TEXT_EMBEDS = "text_embeds"  # [B, D] float32, the text graph's output

VISION_ONNX = "vision.onnx"
TEXT_ONNX = "text.onnx"
# OpenVINO IR converted from the PyTorch module (`export --openvino-ir`): NAME.xml beside NAME.bin.
VISION_IR = "vision.xml"
TEXT_IR = "text.xml"
MANIFEST = "manifest.json"
PLAN_FILE = "model.plan"  # a TensorRT engine inside an encoder's version folder
ENCODER_ONNX_FILE = "model.onnx"  # a graph inside an encoder's version folder (ONNX Runtime, OpenVINO, python)
ENCODER_IR_FILE = "model.xml"  # an OpenVINO IR there (with model.bin): Triton's OpenVINO backend's default name


@dataclass(frozen=True)
class Tower:
    """One encoder tower, declared once: its name, the Triton models around it and its files. Its
    tensors depend on the model and precision: :meth:`ModelContract.encoder`."""

    name: str  # "vision" | "text"
    model: str  # the Triton encoder model
    onnx_file: str  # its graph in an export folder
    ir_file: str  # its OpenVINO IR in an export folder (`export --openvino-ir`)
    ensemble: str  # the public ensemble that ends in it
    front: str  # the python model that feeds it (preprocess | tokenizer)
    kind: str  # what clients send: "image" | "text"
    cached: str  # the inner ensemble the response cache keys on, when the tower is cached


VISION = Tower("vision", VISION_MODEL, VISION_ONNX, VISION_IR, IMAGE_ENSEMBLE, PREPROCESS_MODEL, "image", IMAGE_CACHED)
TEXT = Tower("text", TEXT_MODEL, TEXT_ONNX, TEXT_IR, TEXT_ENSEMBLE, TOKENIZER_MODEL, "text", TEXT_CACHED)
TOWERS = (VISION, TEXT)


# Several served models in one repository (issue 30). A single-model repository keeps the names above
# (existing clients, perf_analyzer commands and dashboards go on working); in a repository of several,
# every model of every served model is named ``<name>__<slug>``: ``clip_image__ViT-B-32``,
# ``tokenizer__siglip2-b16``, where the slug is the served model name with each character outside
# ``[A-Za-z0-9_-]`` replaced by ``-`` (``laion/ViT-B-32:v2`` -> ``laion-ViT-B-32-v2``). Two served names
# with one slug are refused when the repository is written. Clients never rebuild the names: they
# list the ready models (an unnamed statistics request: the repository index is an admin API) and read
# each image ensemble's ``served_model_name`` (clip_triton/facts.py, clip_triton/client/core.py).
MODEL_SEPARATOR = "__"


def served_slug(served_model_name: str) -> str:
    """The suffix a served model's Triton models carry in a repository of several models."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", served_model_name)


@dataclass(frozen=True)
class ModelNames:
    """The Triton model names of one served model: the contract's own names (``slug`` empty: a
    single-model repository) or each of them ``<name>__<slug>``."""

    slug: str = ""

    def of(self, base: str) -> str:
        return f"{base}{MODEL_SEPARATOR}{self.slug}" if self.slug else base

    def ensemble(self, tower: Tower) -> str:
        return self.of(tower.ensemble)

    def cached(self, tower: Tower) -> str:
        return self.of(tower.cached)

    def front(self, tower: Tower) -> str:
        return self.of(tower.front)

    def encoder(self, tower: Tower) -> str:
        return self.of(tower.model)

    @property
    def image(self) -> str:
        return self.of(IMAGE_ENSEMBLE)

    @property
    def text(self) -> str:
        return self.of(TEXT_ENSEMBLE)

    @classmethod
    def for_served(cls, served_model_name: str | None) -> ModelNames:
        """The names in a repository of several models (None: the single-model names)."""
        return cls(served_slug(served_model_name) if served_model_name else "")

    @classmethod
    def served_in(cls, model_names: Iterable[str]) -> list[ModelNames]:
        """The served models among Triton model names (a server's ready models, a repository's folders):
        one per public image ensemble, in the order of their names."""
        found = {}
        for name in model_names:
            names = cls.of_ensemble(name)
            if names is not None and names.image == name:
                found[name] = names
        return [found[name] for name in sorted(found)]

    @classmethod
    def of_ensemble(cls, name: str) -> ModelNames | None:
        """The names of the served model whose public image or text ensemble is ``name``, else None."""
        for base in (IMAGE_ENSEMBLE, TEXT_ENSEMBLE):
            if name == base:
                return cls()
            if name.startswith(base + MODEL_SEPARATOR) and len(name) > len(base) + len(MODEL_SEPARATOR):
                return cls(name[len(base) + len(MODEL_SEPARATOR) :])
        return None


SINGLE = ModelNames()


def ensemble_tower(name: str) -> Tower | None:
    """The tower whose public ensemble is ``name`` (any served model's), else None."""
    names = ModelNames.of_ensemble(name)
    if names is None:
        return None
    return next((t for t in TOWERS if names.ensemble(t) == name), None)


def tower(name: str) -> Tower:
    """The tower named ``name`` (``vision``/``text``) or served by the Triton model ``name``."""
    for candidate in TOWERS:
        if name in (candidate.name, candidate.model):
            return candidate
    raise ValueError(f"no tower {name!r}: expected one of {[t.name for t in TOWERS]} or {[t.model for t in TOWERS]}")


PRECISIONS = ("fp32", "fp16")  # of the exported graphs
# The graph precision when none is given: fp32, exact on every runtime. GPU deployments export fp16
# explicitly (the shipped bigG snapshot and committed repository record it).
DEFAULT_PRECISION = "fp32"
# Encoder runtimes: tensorrt (GPU), onnxruntime (Triton's ORT backend), openvino (Triton's OpenVINO
# backend, CPU), python (python-backend models running the graphs with a CPU runtime, below).
RUNTIMES = ("tensorrt", "onnxruntime", "openvino", "python")
# Which ensembles Triton's response cache answers repeated requests for (`clip-triton repo --response-cache`).
RESPONSE_CACHE_CHOICES = ("none", "text", "all")
CPU_RUNTIMES = ("onnxruntime", "openvino")  # what --runtime python runs the graphs with
CPU_PRECISIONS = ("fp32", "bf16")  # compute precision on the CPU; bf16 needs OpenVINO

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Triton datatype names, keyed by the numpy-style dtype names used here.
_TRITON_TYPES = {
    "float32": ("TYPE_FP32", "FP32"),
    "float16": ("TYPE_FP16", "FP16"),
    "int32": ("TYPE_INT32", "INT32"),
    "int64": ("TYPE_INT64", "INT64"),
    "bytes": ("TYPE_STRING", "BYTES"),
}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor without its batch axis (Triton's ``dims`` convention)."""

    name: str
    dtype: str  # numpy-style: float32, float16, int32, bytes
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.dtype not in _TRITON_TYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r} for tensor {self.name!r}")

    @property
    def config_type(self) -> str:
        """Triton model-config data type, e.g. ``TYPE_FP32``."""
        return _TRITON_TYPES[self.dtype][0]

    @property
    def wire_type(self) -> str:
        """Triton inference-protocol data type, e.g. ``FP32``."""
        return _TRITON_TYPES[self.dtype][1]


# Numerical fidelity, per embedding of any exported graph or served path: cosine similarity to the reference, and max |difference| of its elements.
TOLERANCES = {
    "fp32": {"min_cosine": 0.99999, "max_abs_diff": 1e-4},
    "fp16": {"min_cosine": 0.9995, "max_abs_diff": 1e-2},  # against the fp32 PyTorch reference
    # bf16 compute (OpenVINO on the CPU) keeps 8 mantissa bits to fp16's 11.
    "bf16": {"min_cosine": 0.999, "max_abs_diff": 2e-2},
    # A TensorRT engine (fp16 kernels, its own tactics) against the fp32 PyTorch reference.
    "tensorrt": {"min_cosine": 0.999, "max_abs_diff": 2e-2},
}


# Compact encodings of an L2-normalised embedding (clip_triton/encodings.py defines each; the gateway's
# `embedding_type` and the client's take these names, Cohere's and sentence-transformers' values).
# name -> (numpy dtype of the encoded array, dimensions per element: 8 bits per byte for binary).
EMBEDDING_TYPES = {
    "float": ("<f4", 1),
    "float16": ("<f2", 1),
    "int8": ("i1", 1),
    "uint8": ("u1", 1),
    "binary": ("i1", 8),
    "ubinary": ("u1", 8),
}
DEFAULT_EMBEDDING_TYPE = "float"
# int8/uint8: one fixed scale for every L2-normalised D-dimensional vector, no calibration data needed:
# values in [-R, R] with R = INT8_RANGE_RMS / sqrt(D) (INT8_RANGE_RMS times a component's RMS of
# 1/sqrt(D)) map to [-127, 127]; larger ones clip. 8: recall@10 0.73-0.87 where 16 gave 0.53-0.75 and
# nothing clipped (CLIP-like embeddings reach 4.4 x RMS), `python bench/encodings.py`, docs/storage.md.
INT8_RANGE_RMS = 8.0


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder of one model: its tower, the graph's input and output, what clients send, and how
    close to open_clip PyTorch fp32 its embeddings must be (at the graph's precision)."""

    tower: Tower
    input: TensorSpec
    output: TensorSpec
    client_input: TensorSpec  # IMAGE bytes or TEXT strings, at the ensemble
    tolerance: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes one declaration hands to ONNX export, TensorRT profiles and Triton batching."""

    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self}")

    @property
    def preferred(self) -> tuple[int, ...]:
        """Preferred dynamic-batch sizes: powers of two from the optimum up to the maximum."""
        sizes, size = [], self.opt
        while size <= self.max:
            sizes.append(size)
            size *= 2
        if sizes[-1] != self.max:
            sizes.append(self.max)
        return tuple(sizes)


@dataclass(frozen=True)
class PreprocessSpec:
    """open_clip's inference transform for a model, as data."""

    image_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # bicubic | bilinear
    resize_mode: str = "shortest"  # shortest | squash
    fill_color: int = 0

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ClipTritonError(
                f"interpolation {self.interpolation!r} is not supported",
                "use a model whose preprocess_cfg uses bicubic or bilinear",
            )
        if self.resize_mode not in ("shortest", "squash"):
            raise ClipTritonError(
                f"resize_mode {self.resize_mode!r} is not supported by the server-side preprocessor",
                "supported: 'shortest' (all OpenAI/LAION CLIP models) and 'squash'",
            )


# Sequence-length buckets of the text tower (besides the context length itself). CLIP's text tower is
# causal and pools at the EOT token, so the first L tokens (L past the EOT) give exactly the embedding
# of all context_length tokens; the tokenizer gives each request the smallest bucket that holds its
# longest text, and the dynamic batcher groups requests of one bucket. Chosen from measurements
# (`python bench/text_lengths.py`, docs/benchmarks.md): prompts ("a photo of a cat.") need 6-12 tokens,
# ImageNet templates x class names 5-22, captions 12-30. More buckets pad less but split the batcher's
# queue into more shapes; each costs one TensorRT optimisation profile.
TEXT_BUCKETS = (8, 16, 32)
# Pooling types for which a text cut after its EOT is exact (with a causal mask): the pooled position
# lies inside the cut. ``last``/``first``-token pooling or a bidirectional tower would see the padding.
BUCKETABLE_POOLING = ("argmax", "eos")
# A Hugging Face text transformer (open_clip's HFTextEncoder: XLM-RoBERTa, RoBERTa, BERT, mT5, NLLB's
# encoder) is bidirectional, but open_clip masks its padding itself (the mask is ``ids != pad`` inside
# ``forward``, so the graph computes it from the ids: no input of its own), and these poolers read the
# real tokens only: a text cut after its last real token embeds exactly as the whole padded context
# (tests/test_hf_towers.py measures it per pooler). open_clip's ``max_pooler`` fails on its own mask.
MASKED_POOLING = ("mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler")


# Tokenizer kinds: open_clip's SimpleTokenizer (CLIP's byte-level BPE, shipped in this package), or a
# Hugging Face tokenizer (open_clip's HFTokenizer: SigLIP's Gemma/T5 SentencePiece, MetaCLIP 2's XLM-V),
# whose tokenizer.json the export copies and the server runs with the torch-free `tokenizers` library.
TOKENIZER_KINDS = ("clip-bpe", "hf")
HF_TOKENIZER_DIR = "tokenizer"  # in an export folder: the Hugging Face tokenizer as open_clip loaded it
HF_TOKENIZER_FILE = "tokenizer.json"  # the file the server's tokenizer model reads (next to its model.py)

# NLLB's tokenizer starts every text with a source-language code (``[fra_Latn] pieces </s>``). A request
# names it as a prefix of the text itself, ``>>fra_Latn<< un chat``: Triton's response cache keys on the
# input tensors only (request parameters are not in the key, core cache_manager.cc), every client (raw
# tritonclient, perf_analyzer, curl, the gateway) can send it, and a batch may mix languages. A text
# without the prefix takes the tokenizer's own default (``eng_Latn``, as open_clip tokenizes every text).
LANGUAGE_PREFIX = re.compile(r">>(\S*?)<<\s*")


def with_language(text: str, code: str | None) -> str:
    """``text`` marked with a source-language code (NLLB models; see :data:`LANGUAGE_PREFIX`)."""
    return f">>{code}<< {text}" if code else text


def split_language(text: str) -> tuple[str | None, str]:
    """(language code or None, the text without its prefix)."""
    match = LANGUAGE_PREFIX.match(text)
    return (match.group(1), text[match.end() :]) if match else (None, text)


@dataclass(frozen=True)
class TokenizerSpec:
    """open_clip's tokenizer settings for a model, and the lengths its text graph is served at.

    For a Hugging Face tokenizer the special ids are read from its files at export (-1 until then;
    ``sot_token_id`` stays -1 where the tokenizer adds no start token, as Gemma's and T5's)."""

    context_length: int = 77
    vocab_size: int = 49408
    sot_token_id: int = 49406
    eot_token_id: int = 49407
    clean: str = "lower"  # open_clip clean function: lower | whitespace | canonicalize
    pool_type: str = "argmax"  # how the text tower pools: the EOT position (highest id)
    # Shorter lengths than context_length the text graph accepts (a dynamic sequence axis); empty: the
    # graph takes exactly context_length tokens (a static graph, as exports before buckets).
    buckets: tuple[int, ...] = ()
    kind: str = "clip-bpe"  # one of TOKENIZER_KINDS
    hf_name: str = ""  # open_clip's hf_tokenizer_name: a hub id or a local folder
    pad_token_id: int = 0
    # Source-language codes the tokenizer starts a text with (NLLB: the 202 FLORES-200 codes; empty: none)
    # and the one it uses when a text names none (read from the tokenizer at export).
    languages: tuple[str, ...] = ()
    default_language: str = ""

    def __post_init__(self):
        object.__setattr__(self, "languages", tuple(self.languages))
        if self.kind not in TOKENIZER_KINDS:
            raise ClipTritonError(f"unknown tokenizer kind {self.kind!r}", f"one of {TOKENIZER_KINDS}")
        object.__setattr__(self, "buckets", tuple(sorted({int(b) for b in self.buckets} - {self.context_length})))
        if any(not 2 <= b < self.context_length for b in self.buckets):
            raise ClipTritonError(
                f"text buckets {list(self.buckets)} must lie in [2, {self.context_length})",
                "choose lengths between 2 and the context length (a text needs its start and end tokens)",
            )

    @property
    def resolved(self) -> bool:
        """Whether the special ids are known (always for CLIP's BPE; after export for a HF tokenizer)."""
        return self.kind == "clip-bpe" or min(self.eot_token_id, self.pad_token_id) >= 0

    @property
    def lengths(self) -> tuple[int, ...]:
        """Every sequence length the text graph is served at, shortest first (context_length last)."""
        return (*self.buckets, self.context_length)

    @property
    def dynamic(self) -> bool:
        """Whether the text graph has a dynamic sequence axis."""
        return bool(self.buckets)

    def bucket(self, needed: int) -> int:
        """The shortest served length that holds ``needed`` tokens (the longest row up to its EOT)."""
        for length in self.lengths:
            if needed <= length:
                return length
        return self.context_length


def as_tuple(value, n: int | None = None) -> tuple:
    if isinstance(value, (int, float)):
        value = (value,) * (n or 1)
    return tuple(value)


@dataclass(frozen=True)
class ModelContract:
    """What export, serving, client and tests must agree on for one model and precision."""

    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    embed_dim: int = 1280
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    precision: str = DEFAULT_PRECISION
    batch: BatchProfile = field(default_factory=BatchProfile)
    model_cfg: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ClipTritonError(f"unknown precision {self.precision!r}", f"choose one of {PRECISIONS}")

    @property
    def scoring(self) -> str:
        """How zero-shot scores come from cosines: ``sigmoid`` for models trained with a sigmoid loss and
        a learned ``logit_bias`` (SigLIP, SigLIP 2: one independent probability per prompt), else
        ``softmax`` over the prompts with ``logit_scale`` (CLIP)."""
        return "sigmoid" if "init_logit_bias" in self.model_cfg else "softmax"

    # -- tensors ---------------------------------------------------------------------------
    @property
    def pixel_dtype(self) -> str:
        return "float16" if self.precision == "fp16" else "float32"

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocess.image_size

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def pixels(self) -> TensorSpec:
        h, w = self.preprocess.image_size
        return TensorSpec(PIXELS, self.pixel_dtype, (3, h, w))

    @property
    def input_ids(self) -> TensorSpec:
        # int32: ONNX Runtime and TensorRT do not run ArgMax (EOT pooling) on int64. The sequence axis is
        # dynamic (-1, up to context_length) when the contract has text buckets.
        length = -1 if self.tokenizer.dynamic else self.tokenizer.context_length
        return TensorSpec(INPUT_IDS, "int32", (length,))

    @property
    def image_embeds(self) -> TensorSpec:
        return TensorSpec(IMAGE_EMBEDS, "float32", (self.embed_dim,))

    @property
    def text_embeds(self) -> TensorSpec:
        return TensorSpec(TEXT_EMBEDS, "float32", (self.embed_dim,))

    @property
    def image_input(self) -> TensorSpec:
        return TensorSpec(IMAGE_INPUT, "bytes", (1,))

    @property
    def text_input(self) -> TensorSpec:
        return TensorSpec(TEXT_INPUT, "bytes", (1,))

    @property
    def embedding(self) -> TensorSpec:
        return TensorSpec(EMBEDDING_OUTPUT, "float32", (self.embed_dim,))

    @property
    def status(self) -> TensorSpec:
        return TensorSpec(STATUS_OUTPUT, "bytes", (1,))

    def encoder(self, name: str) -> EncoderSpec:
        """The full spec of one encoder (by tower name or Triton model name)."""
        spec = tower(name)
        tolerance = TOLERANCES[self.precision]
        if spec is VISION:
            return EncoderSpec(spec, self.pixels, self.image_embeds, self.image_input, tolerance)
        return EncoderSpec(spec, self.input_ids, self.text_embeds, self.text_input, tolerance)

    def encoder_io(self, name: str) -> tuple[TensorSpec, TensorSpec]:
        """(input, output) of the ``vision`` or ``text`` encoder."""
        encoder = self.encoder(name)
        return encoder.input, encoder.output

    # -- variants and persistence ----------------------------------------------------------
    def with_(self, **changes) -> ModelContract:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocess"]["image_size"] = list(self.preprocess.image_size)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelContract:
        pre = dict(data.get("preprocess", {}))
        tok: dict[str, Any] = dict(data.get("tokenizer", {}))  # no "buckets": an export from before buckets (static)
        if "buckets" in tok:
            tok["buckets"] = tuple(tok["buckets"])
        if "image_size" in pre:
            pre["image_size"] = as_tuple(pre["image_size"], 2)
        for key in ("mean", "std"):
            if key in pre:
                pre[key] = as_tuple(pre[key], 3)
        return cls(
            model=data["model"],
            pretrained=data["pretrained"],
            embed_dim=int(data["embed_dim"]),
            preprocess=PreprocessSpec(**pre),
            tokenizer=TokenizerSpec(**tok),
            precision=data.get("precision", DEFAULT_PRECISION),
            batch=BatchProfile(**data.get("batch", {})),
            model_cfg=dict(data.get("model_cfg", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> ModelContract:
        return cls.from_dict(json.loads(text))

    @classmethod
    def default(cls) -> ModelContract:
        """ViT-bigG-14 / laion2b_s39b_b160k, fp16, from the snapshot shipped in this package.

        ``tests/test_contract.py`` checks the snapshot against open_clip's live config lookups.
        """
        text = resources.files("clip_triton").joinpath("assets", DEFAULT_SNAPSHOT).read_text()
        return cls.from_json(text)


DEFAULT_SNAPSHOT = f"contract-{DEFAULT_MODEL}-{DEFAULT_PRETRAINED}.json"


def normalise_pretrained(pretrained: str | None) -> str:
    """``None``, ``""`` and ``"none"`` all mean random weights."""
    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random"):
        return "none"
    return str(pretrained)


SERVED_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def check_served_model_name(name: str) -> str:
    """A public model id (``--served-model-name``): 1-128 of letters, digits and ``. _ - : /``."""
    if not SERVED_MODEL_NAME.fullmatch(name):
        raise ClipTritonError(
            f"--served-model-name {name!r} is not a model id",
            "use 1-128 letters, digits and . _ - : / , starting with a letter or digit",
        )
    return name
