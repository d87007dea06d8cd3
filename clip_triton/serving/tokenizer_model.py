"""Triton python model ``tokenizer``: UTF-8 text -> token ids equal to open_clip's tokenizer -> the text
encoder, called by this model (BLS) once per sequence-length bucket that the request's texts need.

Every text is embedded at the shortest bucket that holds it, whatever its neighbours in the request
(and in the other requests the dynamic batcher hands this model with it): a raw client's request of
fifteen short prompts and one caption no longer puts the prompts through 77 positions (issue 33:
2.7-3.2x the texts/s on mixed requests, measured with bench/raw_split.py). Exact: a causal, EOT-pooled
tower, or a masked one, embeds a text cut after its end token as the whole padded context."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from ..contract import EMBEDDING_OUTPUT, INPUT_IDS, STATUS_OUTPUT, TEXT_EMBEDS, TEXT_INPUT, TOKENS_OUTPUT
from ..tokenizer import TextError, cut_to_bucket, decode_utf8, is_refused, refused_row, row_lengths, text_tokenizer
from .common import Answer, answer_items, contract_from, end_with_server, items, parameters, respond


class TritonPythonModel:
    def initialize(self, args):
        end_with_server()
        params = parameters(args)
        contract = contract_from(params)
        self.spec = contract.tokenizer
        self.embed_dim = contract.embed_dim
        self.encoder = params.get("encoder", "")  # the text encoder this model calls (per served model)
        # A Hugging Face tokenizer's tokenizer.json lies in this model's version folder (`clip-triton repo`).
        folder = Path(args["model_repository"]) / str(args["model_version"])
        self.tokenizer = text_tokenizer(contract.tokenizer, folder, max_chars=int(params["max_text_chars"]))
        # A refused item's row: padding from the first id, which the text graph answers with NaN
        # (contract.REFUSED_PIXEL's comment); no text the tokenizer accepts starts with it.
        self.blank = refused_row(self.spec)

    def ids(self, item: bytes) -> np.ndarray:
        row = self.tokenizer.ids(decode_utf8(item))
        if is_refused(row, self.spec):  # e.g. SigLIP (no start token, EOT = padding) given only spaces
            raise TextError("text has no tokens")
        return row

    def answer(self, values: list[bytes]) -> Answer:
        answer = answer_items(values, self.ids, (TextError,), self.blank)
        if answer.rows is not None:
            # Counted before the cut, as the model encodes them: start/end tokens, no padding (a
            # refused row is padding: 0). The gateway's `usage` reads these (contract TOKENS_OUTPUT).
            counts = (answer.rows != self.spec.pad_token_id).sum(axis=1, dtype=np.int32).reshape(-1, 1)
            answer.extras[TOKENS_OUTPUT] = counts
            answer.rows = cut_to_bucket(answer.rows, self.spec)
        return answer

    async def execute(self, requests):
        if not self.encoder:  # a repository written before the split: its ensemble sends the ids on
            return respond(requests, TEXT_INPUT, INPUT_IDS, STATUS_OUTPUT, self.answer)
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415 (exists only inside the stub)

        answers = [self.answer(items(request, TEXT_INPUT)) for request in requests]
        groups = split_by_bucket([a.rows for a in answers], self.spec)
        calls = [
            pb_utils.InferenceRequest(
                model_name=self.encoder,
                requested_output_names=[TEXT_EMBEDS],
                inputs=[pb_utils.Tensor(INPUT_IDS, ids)],
            ).async_exec()
            for ids, _ in groups
        ]
        results = await asyncio.gather(*calls)
        failed = next((r.error().message() for r in results if r.has_error()), None)
        embeddings = [
            None if a.rows is None else np.full((len(a.rows), self.embed_dim), np.nan, np.float32) for a in answers
        ]
        if failed is None:
            for (_, places), result in zip(groups, results):
                vectors = pb_utils.get_output_tensor_by_name(result, TEXT_EMBEDS).as_numpy()
                for (request, row), vector in zip(places, vectors):
                    embeddings[request][row] = vector
        responses = []
        for answer, vectors in zip(answers, embeddings):
            error = answer.error or (failed and f"the text encoder failed: {failed}")
            if error:
                kind = pb_utils.TritonError.INVALID_ARG if answer.error else pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error, kind)))
                continue
            statuses = np.array(answer.statuses, dtype=object).reshape(-1, 1)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(INPUT_IDS, answer.rows),
                        pb_utils.Tensor(EMBEDDING_OUTPUT, vectors),
                        pb_utils.Tensor(STATUS_OUTPUT, statuses),
                        *(pb_utils.Tensor(name, values) for name, values in answer.extras.items()),
                    ]
                )
            )
        return responses


# A bucket's group is cut to its longest text rounded up to this many positions (at most the bucket):
# every length from 2 to the context is served (TensorRT profiles cover the lengths between buckets,
# clip_triton/profiles.py; ONNX Runtime and OpenVINO take any), and a step keeps the shapes few, so
# the encoder's batcher still merges equal shapes across calls. On bench/peers.py's mixed texts it
# computes 9-15% fewer positions than cutting every group at its bucket (docs/benchmarks.md).
LENGTH_STEP = 8


def split_by_bucket(requests: list[np.ndarray | None], spec) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
    """The rows of every request (``[n, L]`` ids, None for a request refused whole) grouped by the bucket
    each row needs on its own: per bucket, the rows cut to the group's longest row rounded up to
    :data:`LENGTH_STEP` (at most the bucket; a static graph keeps its whole context) and where each came
    from ``(request, row)``. Refused rows go nowhere (they are answered NaN). Pure: the fast tier tests it."""
    groups: dict[int, list[tuple[int, int, np.ndarray, int]]] = {}
    for index, rows in enumerate(requests):
        if rows is None:
            continue
        lengths = row_lengths(rows, spec)
        for row, length in enumerate(lengths):
            if length:
                groups.setdefault(spec.bucket(int(length)), []).append((index, row, rows[row], int(length)))
    out = []
    for bucket in sorted(groups):
        members = groups[bucket]
        longest = max(length for *_, length in members)
        cut = min(bucket, -(-longest // LENGTH_STEP) * LENGTH_STEP) if spec.dynamic else bucket
        ids = np.ascontiguousarray(np.stack([r[: min(cut, len(r))] for _, _, r, _ in members]))
        out.append((ids, [(index, row) for index, row, _, _ in members]))
    return out
