"""Fakes at the project's own seams, for the fast tier.

``FakeClipClient`` stands where :class:`~clip_triton.client.AsyncClipClient` stands in the gateway (its
``client_factory``): the gateway's tests run in-process against it, as infinity tests its API against
a dummy engine. It is not a second implementation of the server: items are decided by the very python
models Triton loads (``preprocess``, ``tokenizer``: the real decoder and tokenizer refuse the same items
with the same reasons); only the encoders are replaced, by a deterministic unit vector per item. What
only Triton can show (parity with open_clip, batching, the cache) stays in the integration tests.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np

from clip_triton import contract as C
from clip_triton.client import ItemErrors
from clip_triton.client.core import item_reason
from clip_triton.client.scoring import ensemble_templates, template_texts
from clip_triton.facts import ServerFacts


def front_models(contract: C.ModelContract, folder: Path, logit_scale: float = 100.0) -> dict:
    """{ensemble: the python model in front of its encoder}, initialised in-process from the configs
    `clip-triton repo --runtime python` writes for ``contract``."""
    from google.protobuf.json_format import MessageToJson

    from clip_triton.repository import ExportFacts, RepoOptions, build_configs
    from clip_triton.serving import preprocess_model, tokenizer_model

    configs = build_configs(ExportFacts(contract=contract, logit_scale=logit_scale), RepoOptions(runtime="python"))
    models = {}
    for ensemble, name, module in (
        (C.IMAGE_ENSEMBLE, C.PREPROCESS_MODEL, preprocess_model),
        (C.TEXT_ENSEMBLE, C.TOKENIZER_MODEL, tokenizer_model),
    ):
        model = module.TritonPythonModel()
        (folder / name).mkdir(parents=True, exist_ok=True)
        model.initialize(
            {
                "model_config": MessageToJson(configs[name], preserving_proto_field_name=True),
                "model_repository": str(folder / name),
                "model_version": "1",
            }
        )
        models[ensemble] = model
    return models


def fake_embedding(item: bytes, dim: int) -> np.ndarray:
    """A unit vector that only this item's bytes give (the fake encoders' answer)."""
    seed = int.from_bytes(hashlib.sha256(item).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


class ClientSeam:
    """The gateway's client seam (:class:`~clip_triton.client.AsyncClipClient`'s coroutines), its
    model-catalogue and counting parts derived from ``get_facts``, ``embed_texts`` and
    ``prompt_embeddings``: a fake of one served model defines those (and what else its test needs)."""

    async def served_models(self) -> dict:
        facts = await self.get_facts()
        return {facts.public_id: facts}

    def for_model(self, model: str):
        return self

    async def embed_texts_counted(self, texts, *, language=None):
        return await self.embed_texts([C.with_language(t, language) for t in texts]), None

    async def prompt_embeddings_counted(self, prompts, templates=None, *, language=None):
        if language is not None:
            texts = template_texts(prompts, templates) if templates else list(prompts)
            vectors = await self.embed_texts([C.with_language(t, language) for t in texts])
            return (ensemble_templates(vectors, len(prompts), len(templates)) if templates else vectors), None
        return await self.prompt_embeddings(prompts, templates), None

    async def is_ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class FakeClipClient(ClientSeam):
    """AsyncClipClient's coroutines, answered in-process (see the module's docstring)."""

    def __init__(self, facts: ServerFacts, models: dict, *, ready: bool = True, others: dict | None = None):
        """``others``: further served models, {public id: FakeClipClient} (a multi-model server)."""
        self.facts, self.models, self.ready = facts, models, ready
        self.others = others or {}
        self.closed = False

    async def get_facts(self) -> ServerFacts:
        return self.facts

    async def served_models(self) -> dict:
        return {self.facts.public_id: self.facts, **{name: other.facts for name, other in self.others.items()}}

    def for_model(self, model: str):
        return self if model == self.facts.public_id else self.others[model]

    async def is_ready(self) -> bool:
        return self.ready

    def _embed(self, ensemble: str, items: list[bytes], counts: np.ndarray | None = None) -> np.ndarray:
        out = np.full((len(items), self.facts.embed_dim), np.nan, dtype=np.float32)
        errors = {}
        for index, item in enumerate(items):
            answer = self.models[ensemble].answer([item])
            if answer.error is not None:
                errors[index] = item_reason(answer.error)
            else:
                out[index] = fake_embedding(item, self.facts.embed_dim)
                if counts is not None:  # the tokenizer model's own count (its TOKENS output)
                    counts[index] = int(answer.extras[C.TOKENS_OUTPUT].sum())
        if errors:
            raise ItemErrors(errors, out)
        return out

    # Off the event loop, as the real client's work is (it happens in Triton).
    async def embed_images(self, images) -> np.ndarray:
        return await asyncio.to_thread(self._embed, C.IMAGE_ENSEMBLE, [bytes(image) for image in images])

    async def embed_texts(self, texts) -> np.ndarray:
        return await asyncio.to_thread(self._embed, C.TEXT_ENSEMBLE, [text.encode("utf-8") for text in texts])

    async def embed_texts_counted(self, texts, *, language=None):
        texts = [C.with_language(t, language) for t in texts]
        if not self.facts.token_counts:
            return await self.embed_texts(texts), None
        counts = np.zeros(len(texts), dtype=np.int64)
        encoded = [text.encode("utf-8") for text in texts]
        vectors = await asyncio.to_thread(self._embed, C.TEXT_ENSEMBLE, encoded, counts)
        return vectors, counts

    async def prompt_embeddings_counted(self, prompts, templates=None, *, language=None):
        texts = template_texts(prompts, templates) if templates else list(prompts)
        vectors, counts = await self.embed_texts_counted(texts, language=language)
        emb = ensemble_templates(vectors, len(prompts), len(templates)) if templates else vectors
        return emb, None if counts is None else int(counts.sum())

    async def prompt_embeddings(self, prompts, templates=None) -> np.ndarray:
        return (await self.prompt_embeddings_counted(prompts, templates))[0]

    async def close(self) -> None:
        self.closed = True


def tiny_facts() -> ServerFacts:
    """The facts the suite's tiny repository publishes (tests/configs/clip-triton-tiny.json, random
    weights), derived the way `clip-triton repo` derives them."""
    from clip_triton.export.adapter import contract_from_open_clip
    from clip_triton.repository import ExportFacts, RepoOptions

    from .helpers import TINY_CONFIG

    contract = contract_from_open_clip(str(TINY_CONFIG), "none")
    facts = ExportFacts(contract=contract, logit_scale=100.0, random_weights=True)
    return facts.server_facts(RepoOptions(runtime="python")).with_(max_batch_size=contract.batch.max, item_status=True)


class FakeEngine:
    """What the fake encoders answer, synchronously: the expected side of a fast gateway test."""

    def __init__(self, dim: int):
        self.dim = dim

    def embed_texts(self, texts) -> np.ndarray:
        return np.stack([fake_embedding(text.encode("utf-8"), self.dim) for text in texts])

    def embed_images(self, images) -> np.ndarray:
        return np.stack([fake_embedding(bytes(image), self.dim) for image in images])


# -- Triton's gRPC client, faked at tritonclient's InferenceServerClient ------------------------------
class FakeResult:
    def __init__(self, outputs: dict[str, np.ndarray]):
        self.outputs = outputs

    def as_numpy(self, name: str):
        return self.outputs.get(name)


class FakeCall:
    def __init__(self):
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def status_error(status: str, message: str = "fake"):
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(message, status=f"StatusCode.{status}")


class FakeTriton:
    """A scripted Triton behind the real ClipClient and AsyncClipClient (``install``): its ensembles
    answer ``fake_embedding`` of each item, refuse items in ``bad`` (flagged in STATUS, or the whole
    request with INVALID_ARGUMENT where ``item_status`` is off, as an older repository does), and fail
    requests with the statuses queued in ``failures`` (one per request, in order; ``forever`` repeats
    the last). Every request's items are recorded in ``requests``."""

    def __init__(self, embed_dim: int = 8, max_batch_size: int = 8, item_status: bool = True):
        self.facts = ServerFacts(
            model="fake-clip",
            pretrained="none",
            embed_dim=embed_dim,
            logit_scale=100.0,
            max_batch_size=max_batch_size,
            item_status=item_status,
        )
        self.bad: dict[bytes, str] = {}
        self.failures: list = []
        self.forever = False
        self.requests: list[list[bytes]] = []
        self.live = True
        self.listening = True  # False: nothing answers at the address (connection refused)
        self.loading_polls = 0  # readiness polls answered "not ready" before the models are
        self.connections = 0
        self.index = [C.IMAGE_ENSEMBLE, C.TEXT_ENSEMBLE, C.PREPROCESS_MODEL, C.TOKENIZER_MODEL]
        self.served: dict[str, ServerFacts] = {}  # ensemble -> facts (serve_models)
        self.called: list[str] = []  # the model each request went to

    def statistics(self) -> dict:
        """An unnamed statistics request: every ready model (as Triton answers it)."""
        if not self.listening:
            raise status_error("UNAVAILABLE", "failed to connect to all addresses; Connection refused")
        return {"model_stats": [{"name": name, "version": "1"} for name in self.index]}

    @staticmethod
    def repository_index():
        """Restricted on every clip-triton deployment (clip_triton/server.py ADMIN_APIS), as here."""
        raise status_error(
            "UNAVAILABLE", "This protocol is restricted, expecting header 'triton-grpc-protocol-clip-triton-admin'"
        )

    def config(self, name: str = C.IMAGE_ENSEMBLE) -> dict:
        """An ensemble's config: ``self.facts``, or ``served[name]``'s facts on a multi-model fake."""
        facts = self.served.get(name, self.facts)
        outputs = [{"name": C.EMBEDDING_OUTPUT}] + ([{"name": C.STATUS_OUTPUT}] if facts.item_status else [])
        params = {key: {"string_value": value} for key, value in facts.parameters().items()}
        return {"config": {"max_batch_size": facts.max_batch_size, "parameters": params, "output": outputs}}

    def serve_models(self, *facts: ServerFacts) -> FakeTriton:
        """Serve several models, each under its multi-model names (contract ModelNames)."""
        self.index = []
        for one in facts:
            names = C.ModelNames.for_served(one.public_id)
            self.served[names.image] = self.served[names.text] = one
            self.index += [names.image, names.text, names.front(C.VISION), names.front(C.TEXT)]
        return self

    def infer(self, model: str, inputs, outputs=None):
        from tritonclient.utils import deserialize_bytes_tensor

        items = [bytes(x) for x in deserialize_bytes_tensor(inputs[0]._raw_content)]  # what went on the wire
        self.requests.append(items)
        self.called.append(model)
        facts = self.served.get(model, self.facts)
        if self.served and model not in self.served:
            raise status_error("NOT_FOUND", f"Request for unknown model: '{model}' is not found")
        if self.failures:
            failure = self.failures[0] if (self.forever and len(self.failures) == 1) else self.failures.pop(0)
            raise failure
        if len(items) > facts.max_batch_size:
            raise status_error("INVALID_ARGUMENT", f"batch of {len(items)} over max_batch_size")
        bad = {i: self.bad[item] for i, item in enumerate(items) if item in self.bad}
        if bad and (len(items) == 1 or not facts.item_status):
            index, reason = next(iter(bad.items()))
            raise status_error("INVALID_ARGUMENT", f"[request id: <id_unknown>] item {index}: {reason}")
        rows = np.stack(
            [
                np.full(facts.embed_dim, np.nan, np.float32) if i in bad else fake_embedding(item, facts.embed_dim)
                for i, item in enumerate(items)
            ]
        )
        names = [o.name() for o in outputs] if outputs else [C.EMBEDDING_OUTPUT, C.STATUS_OUTPUT]
        result = {C.EMBEDDING_OUTPUT: rows}
        if facts.item_status and C.STATUS_OUTPUT in names:
            statuses = [f"item {i}: {bad[i]}".encode() if i in bad else b"" for i in range(len(items))]
            result[C.STATUS_OUTPUT] = np.array(statuses, dtype=object).reshape(-1, 1)
        if facts.token_counts and C.TOKENS_OUTPUT in names:  # a stand-in count: one per UTF-8 byte
            result[C.TOKENS_OUTPUT] = np.array([[0 if i in bad else len(x)] for i, x in enumerate(items)], np.int32)
        return FakeResult({k: v for k, v in result.items() if k in names})

    def install(self, monkeypatch) -> FakeTriton:
        """Make tritonclient's gRPC clients (sync and asyncio) talk to this fake."""
        import tritonclient.grpc
        import tritonclient.grpc.aio

        triton = self

        class SyncClient:
            def __init__(self, url, channel_args=None, **kwargs):
                self.url = url
                triton.connections += 1

            def is_server_live(self):
                if not triton.listening:
                    raise status_error("UNAVAILABLE", "failed to connect to all addresses; Connection refused")
                return triton.live

            def is_model_ready(self, name):
                if triton.loading_polls > 0:
                    triton.loading_polls -= 1
                    return False
                return triton.live

            def get_model_config(self, name, as_json=False):
                return triton.config(name)

            def get_model_repository_index(self, as_json=False):
                return triton.repository_index()

            def get_inference_statistics(self, model_name="", as_json=False):
                return triton.statistics()

            def async_infer(self, model, inputs, callback, outputs=None, client_timeout=None):
                call = FakeCall()
                try:
                    callback(triton.infer(model, inputs, outputs), None)
                except Exception as exc:  # noqa: BLE001 (handed to the callback, as tritonclient does)
                    callback(None, exc)
                return call

            def close(self):
                pass

        class AsyncClient:
            def __init__(self, url, channel_args=None, **kwargs):
                self.url = url

            async def is_model_ready(self, name):
                return triton.live

            async def get_model_config(self, name, as_json=False):
                return triton.config(name)

            async def get_model_repository_index(self, as_json=False):
                return triton.repository_index()

            async def get_inference_statistics(self, model_name="", as_json=False):
                return triton.statistics()

            async def infer(self, model, inputs, outputs=None, client_timeout=None):
                return triton.infer(model, inputs, outputs)

            async def close(self):
                pass

        monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", SyncClient)
        monkeypatch.setattr(tritonclient.grpc.aio, "InferenceServerClient", AsyncClient)
        return self
