"""Should the server split a raw client's mixed-length text request by bucket? Measured, not assumed.

    python bench/raw_split.py [--model ViT-B-32] [--concurrency 1,4,16] [--seconds 8]

A raw ``tritonclient`` request of texts of mixed lengths is cut to the bucket of its longest text, so
fifteen short prompts pay for one caption's 77 positions. ``ClipClient`` groups texts by bucket on the
client (issue 33); a raw client cannot. This bench adds to the served repository a python model,
``clip_text_split`` (written here, not shipped), that does the grouping on the server through BLS: the
tokenizer model is asked for the ids and each text's token count, the rows are grouped by the bucket
each text needs, and every group goes to ``text_encoder`` at its own length, all groups in flight at
once (``async_exec``), rows back in request order; queued requests reach it together (its own dynamic
batcher) and their groups go out together, so the encoder's batcher can merge them. Same load generator, one run, no response cache:

- ``ensemble``: ``clip_text`` as raw clients call it today (the request cut to its longest text);
- ``split (BLS)``: the same requests to ``clip_text_split``;
- ``ClipClient``: the client's own grouping (several requests per call), for reference.

Rows: 16 mixed texts per request (bench/peers.py ``mixed_texts``: prompts and captions), 16 short
prompts, and single mixed texts (what the split costs where there is nothing to split). Parity: the
split's embeddings against the ensemble's, every text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import prepared_export  # bench/common.py
from peers import load, mixed_texts  # the load generator and texts of bench/peers.py

SPLIT_MODEL = "clip_text_split"
MODEL_PY = """
import asyncio
import json
import os
import site
import sys

# As the shims `clip-triton repo` writes: the stub starts without PYTHONPATH; `TritonServer` sets it.
_known = set(sys.path)
for _path in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(_path)
sys.path.sort(key=lambda path: path in _known)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.lengths = [int(n) for n in params["lengths"]["string_value"].split(",")]

    def bucket(self, needed):
        return next((n for n in self.lengths if needed <= n), self.lengths[-1])

    async def execute(self, requests):
        return list(await asyncio.gather(*(self.one(request) for request in requests)))

    async def one(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "TEXT")
        tokenized = await pb_utils.InferenceRequest(
            model_name="tokenizer", requested_output_names=["input_ids", "STATUS", "TOKENS"], inputs=[text]
        ).async_exec()
        if tokenized.has_error():
            return pb_utils.InferenceResponse(error=tokenized.error())
        ids = pb_utils.get_output_tensor_by_name(tokenized, "input_ids").as_numpy()
        status = pb_utils.get_output_tensor_by_name(tokenized, "STATUS").as_numpy()
        tokens = pb_utils.get_output_tensor_by_name(tokenized, "TOKENS").as_numpy().reshape(-1)
        groups = {}
        for row, count in enumerate(tokens):
            groups.setdefault(min(self.bucket(int(count)), ids.shape[1]), []).append(row)
        calls = [
            pb_utils.InferenceRequest(
                model_name="text_encoder",
                requested_output_names=["text_embeds"],
                inputs=[pb_utils.Tensor("input_ids", np.ascontiguousarray(ids[rows, :length]))],
            ).async_exec()
            for length, rows in groups.items()
        ]
        answers = await asyncio.gather(*calls)
        out = None
        for (length, rows), answer in zip(groups.items(), answers):
            if answer.has_error():
                return pb_utils.InferenceResponse(error=answer.error())
            part = pb_utils.get_output_tensor_by_name(answer, "text_embeds").as_numpy()
            if out is None:
                out = np.empty((len(tokens), part.shape[1]), dtype=np.float32)
            out[rows] = part
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("EMBEDDING", out), pb_utils.Tensor("STATUS", status)]
        )
"""
CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }}
output {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: [ {dim} ] }}
output {{ name: "STATUS" data_type: TYPE_STRING dims: [ 1 ] }}
instance_group {{ count: 2 kind: KIND_CPU }}
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
parameters {{ key: "lengths" value {{ string_value: "{lengths}" }} }}
"""


def add_split_model(repo: Path, contract) -> None:
    folder = repo / SPLIT_MODEL
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.py").write_text(MODEL_PY)
    (folder / "config.pbtxt").write_text(
        CONFIG.format(
            name=SPLIT_MODEL,
            max_batch=contract.batch.max,
            dim=contract.embed_dim,
            lengths=",".join(map(str, contract.tokenizer.lengths)),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workdir", default=".clip-triton/bench")
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args()

    import numpy as np
    import tritonclient.grpc as grpcclient

    from clip_triton.client import ClipClient
    from clip_triton.contract import EMBEDDING_OUTPUT, STATUS_OUTPUT, TEXT_ENSEMBLE, TEXT_INPUT, ModelContract
    from clip_triton.repository import RepoOptions, write_repository
    from clip_triton.samples import BENCH_PROMPTS
    from clip_triton.server import TritonServer

    work = Path(args.workdir)
    onnx_dir = prepared_export(args.model, work)
    contract = ModelContract.from_dict(json.loads((onnx_dir / "manifest.json").read_text())["contract"])
    if not contract.tokenizer.dynamic:
        raise SystemExit(f"{args.model} serves one text length: there is nothing to split")
    repo = write_repository(
        work / "raw-split-repo",
        onnx_dir=onnx_dir,
        options=RepoOptions(runtime="python", response_cache="none"),
        force=True,
    )
    add_split_model(repo, contract)
    mixed, prompts = mixed_texts(256), list(BENCH_PROMPTS)
    workloads = {
        "16 mixed": [[mixed[(i * 16 + k) % len(mixed)] for k in range(16)] for i in range(16)],
        "16 prompts": [[prompts[(i * 16 + k) % len(prompts)] for k in range(16)] for i in range(16)],
        "1 mixed": [[mixed[i]] for i in range(64)],
    }
    rows: list[dict] = []
    with TritonServer(repo, log_file=work / "raw-split-triton.log", response_cache_mib=0) as server:

        def raw(model: str):
            def make():
                grpc = grpcclient.InferenceServerClient(server.grpc_url)

                def send(texts: list[str]) -> int:
                    tensor = grpcclient.InferInput(TEXT_INPUT, [len(texts), 1], "BYTES")
                    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
                    return len(grpc.infer(model, [tensor]).as_numpy(EMBEDDING_OUTPUT))

                return send

            return make

        def grouped():
            client = ClipClient(server.grpc_url)
            return lambda texts: len(client.embed_texts(texts))

        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        worst = 0.0
        for texts in workloads["16 mixed"]:
            tensor = grpcclient.InferInput(TEXT_INPUT, [len(texts), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
            ensemble = grpc.infer(TEXT_ENSEMBLE, [tensor])
            split = grpc.infer(SPLIT_MODEL, [tensor])
            assert (split.as_numpy(STATUS_OUTPUT) == ensemble.as_numpy(STATUS_OUTPUT)).all()
            worst = max(
                worst, float(np.abs(split.as_numpy(EMBEDDING_OUTPUT) - ensemble.as_numpy(EMBEDDING_OUTPUT)).max())
            )
        grpc.close()
        print(f"[raw_split] split vs ensemble, 256 mixed texts: max |diff| {worst:.2e}", flush=True)
        senders = {"ensemble": raw(TEXT_ENSEMBLE), "split (BLS)": raw(SPLIT_MODEL), "ClipClient": grouped}
        for workload, bodies in workloads.items():
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                row = {"workload": workload, "concurrency": concurrency}
                for name, make in senders.items():
                    row[name] = load(make, bodies, concurrency, args.seconds)["items_per_s"]
                rows.append(row)
                print(
                    f"[raw_split] {workload} c{concurrency}: "
                    + "  ".join(f"{name} {row[name]:.1f}/s" for name in senders),
                    flush=True,
                )
    print("\n| request | concurrency | ensemble (raw today) | split (BLS) | ClipClient grouping | split ÷ ensemble |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['workload']} | {r['concurrency']} | {r['ensemble']:.1f} | {r['split (BLS)']:.1f} | "
            f"{r['ClipClient']:.1f} | {r['split (BLS)'] / r['ensemble']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"max_abs_diff": worst, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
