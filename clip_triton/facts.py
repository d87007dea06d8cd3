"""What a deployment tells its clients, spelled once.

``clip-triton repo`` writes these facts into the ensembles' config ``parameters``
(:meth:`ServerFacts.parameters`); clients read them back from ``get_model_config``
(:meth:`ServerFacts.from_config`). Nothing else names the keys. No numpy, no tritonclient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from .contract import STATUS_OUTPUT

# The parameter for each field that travels as a config parameter (the rest come from the config itself).
KEYS = {
    "model": "model",
    "pretrained": "pretrained",
    "precision": "precision",  # of the exported graphs
    "embed_dim": "embed_dim",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
    "logit_scale_source": "logit_scale_source",
    "random_weights": "random_weights",
    "contract": "contract",  # the served ModelContract as JSON: tokenizer, preprocessing, tensor specs
    "served_model_name": "served_model_name",
    "encoder_runtime": "encoder_runtime",
    "token_counts": "token_counts",  # "true": the text ensemble answers TOKENS per item (issue 30)
    "text_split": "text_split",  # "true": the server runs each text at its own length bucket (issue 33)
}
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class ServerFacts:
    """A deployment's facts: model, weights, embedding size, scoring, and how it is served."""

    model: str
    pretrained: str
    embed_dim: int
    logit_scale: float
    logit_bias: float | None = None
    max_batch_size: int = 0  # the ensembles' own max_batch_size (not a parameter)
    random_weights: bool = False
    contract: str = ""
    item_status: bool = False  # the ensembles answer a batch with bad items whole, flagging them in STATUS
    served_model_name: str = ""  # the public model id (`repo --served-model-name`; "" on older repositories)
    encoder_runtime: str = ""  # what computes the embeddings, in words (e.g. "onnxruntime (python backend), fp32")
    precision: str = ""
    logit_scale_source: str = ""
    token_counts: bool = False  # the text ensemble counts each item's tokens (contract TOKENS_OUTPUT)
    # The server's tokenizer runs each text of a request at its own length bucket (one encoder call per
    # bucket): a client need not group texts by length itself. False on repositories written before.
    text_split: bool = False

    @cached_property
    def languages(self) -> tuple[str, ...]:
        """The source-language codes a text may name (``>>code<< text``: NLLB models; empty otherwise)."""
        if not self.contract:
            return ()
        from .contract import ModelContract  # noqa: PLC0415

        return ModelContract.from_json(self.contract).tokenizer.languages

    def language_problem(self, language: str | None) -> str | None:
        """Why ``language`` cannot be asked of this model (not one of its codes), or None where it can
        (or none is asked). A model without languages would read a ``>>code<<`` mark as text."""
        if language is None or language in self.languages:
            return None
        known = self.languages
        what = f"knows {len(known)}: {', '.join(sorted(known))}" if known else "has no language codes (NLLB models do)"
        return f"unknown language {language!r}: {self.public_id} {what}"

    @property
    def scoring(self) -> str:
        """``sigmoid`` where the model learned a ``logit_bias`` (SigLIP: one independent probability
        per prompt), else ``softmax`` over the prompts (CLIP): :func:`clip_triton.client.rank`."""
        return "softmax" if self.logit_bias is None else "sigmoid"

    # -- the world's view ----------------------------------------------------------------------
    @property
    def public_id(self) -> str:
        """The model id to show the world: the served name, else the architecture name (never a path)."""
        return self.served_model_name or self.model

    @property
    def public_pretrained(self) -> str:
        """The pretrained tag, or "local checkpoint" where the export read a file (its path stays private)."""
        tag = self.pretrained
        private = "/" in tag or "\\" in tag or tag.endswith(CHECKPOINT_SUFFIXES)
        return "local checkpoint" if private else tag

    def with_(self, **changes) -> ServerFacts:
        return replace(self, **changes)

    # -- to and from config parameters ---------------------------------------------------------
    def parameters(self) -> dict[str, str]:
        """The config ``parameters`` (string values) that carry these facts."""
        values = {
            "model": self.model,
            "pretrained": self.pretrained,
            "precision": self.precision,
            "embed_dim": str(self.embed_dim),
            "logit_scale": repr(float(self.logit_scale)),
            "logit_bias": "" if self.logit_bias is None else repr(float(self.logit_bias)),
            "logit_scale_source": self.logit_scale_source,
            "random_weights": "true" if self.random_weights else "false",
            "contract": self.contract,
            "served_model_name": self.served_model_name,
            "encoder_runtime": self.encoder_runtime,
            "token_counts": "true" if self.token_counts else "false",
            "text_split": "true" if self.text_split else "false",
        }
        return {KEYS[name]: value for name, value in values.items()}

    @classmethod
    def from_parameters(cls, params: dict[str, str], *, max_batch_size: int = 0, item_status: bool = False):
        """The facts in ``params`` (string values by key, as :meth:`parameters` writes them)."""
        get = {name: params.get(key, "") for name, key in KEYS.items()}
        return cls(
            model=get["model"],
            pretrained=get["pretrained"],
            embed_dim=int(get["embed_dim"]),
            logit_scale=float(get["logit_scale"]),
            logit_bias=float(get["logit_bias"]) if get["logit_bias"] else None,
            max_batch_size=max_batch_size,
            random_weights=get["random_weights"] == "true",
            contract=get["contract"],
            item_status=item_status,
            served_model_name=get["served_model_name"],
            encoder_runtime=get["encoder_runtime"],
            precision=get["precision"],
            logit_scale_source=get["logit_scale_source"],
            token_counts=get["token_counts"] == "true",
            text_split=get["text_split"] == "true",
        )

    @classmethod
    def from_config(cls, response: dict) -> ServerFacts:
        """The facts of an ensemble's ``get_model_config(..., as_json=True)`` answer."""
        config = response.get("config", response)
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        return cls.from_parameters(
            params,
            max_batch_size=int(config.get("max_batch_size", 1)),
            item_status=any(output.get("name") == STATUS_OUTPUT for output in config.get("output", [])),
        )


def resolve_alias(wanted: str, facts_by_name: dict[str, ServerFacts]) -> str | None:
    """The name of the one served model that ``wanted`` spells as ``ARCH/TAG`` (``ViT-B-32/laion2b_s34b_b79k``),
    among those served without a name of their own; None where no model, or more than one, answers to it.
    The clients and the gateway resolve a model they do not know by name with this one rule."""
    matches = [
        name
        for name, facts in facts_by_name.items()
        if facts.public_id == facts.model and wanted == f"{facts.model}/{facts.public_pretrained}"
    ]
    return matches[0] if len(matches) == 1 else None
