"""The server splits a raw client's mixed-length text request by bucket: what it gains, measured.

    python bench/raw_split.py [--model ViT-B-32] [--concurrency 1,4,16] [--seconds 8]

A raw ``tritonclient`` request of texts of mixed lengths used to be cut to the bucket of its longest
text, so fifteen short prompts paid for one caption's 77 positions. The tokenizer model now calls the
text encoder itself, once per bucket the request's texts need (BLS, clip_triton/serving/tokenizer_model.py).
For the comparison in one run, this bench adds a python model, ``clip_text_unsplit`` (written here, not
shipped), that does what the served path did before: tokenize (the same code), cut the request to its
longest text's bucket, one call to ``text_encoder``. Same load generator, one run, no response cache:

- ``one length per request``: ``clip_text_unsplit``, the design before;
- ``clip_text``: the served ensemble, split by the tokenizer model;
- ``ClipClient``: the client's own grouping (several requests per call), for reference.

Rows: 16 mixed texts per request (bench/peers.py ``mixed_texts``: prompts and captions), 16 short
prompts, and single mixed texts (what the split costs where there is nothing to split). Parity: every
text's embedding from both, compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import bench_repo_options, prepared_export  # bench/common.py
from peers import load, mixed_texts  # the load generator and texts of bench/peers.py

UNSPLIT_MODEL = "clip_text_unsplit"
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
        from clip_triton.contract import ModelContract
        from clip_triton.tokenizer import text_tokenizer

        params = json.loads(args["model_config"])["parameters"]
        self.spec = ModelContract.from_json(params["contract"]["string_value"]).tokenizer
        self.tokenizer = text_tokenizer(self.spec, params["tokenizer_dir"]["string_value"])

    async def execute(self, requests):
        return list(await asyncio.gather(*(self.one(request) for request in requests)))

    async def one(self, request):
        from clip_triton.tokenizer import cut_to_bucket

        texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        ids = cut_to_bucket(self.tokenizer([bytes(t).decode() for t in texts]), self.spec)
        answer = await pb_utils.InferenceRequest(
            model_name="text_encoder",
            requested_output_names=["text_embeds"],
            inputs=[pb_utils.Tensor("input_ids", ids)],
        ).async_exec()
        if answer.has_error():
            return pb_utils.InferenceResponse(error=answer.error())
        out = pb_utils.get_output_tensor_by_name(answer, "text_embeds").as_numpy()
        status = np.array([b""] * len(texts), dtype=object).reshape(-1, 1)
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
parameters {{ key: "contract" value {{ string_value: {contract} }} }}
parameters {{ key: "tokenizer_dir" value {{ string_value: "{tokenizer_dir}" }} }}
"""


def add_unsplit_model(repo: Path, contract) -> None:
    folder = repo / UNSPLIT_MODEL
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.py").write_text(MODEL_PY)
    (folder / "config.pbtxt").write_text(
        CONFIG.format(
            name=UNSPLIT_MODEL,
            max_batch=contract.batch.max,
            dim=contract.embed_dim,
            contract=json.dumps(contract.to_json()),
            tokenizer_dir=repo / "tokenizer" / "1",
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
    from clip_triton.repository import write_repository
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
        options=bench_repo_options(),
        force=True,
    )
    add_unsplit_model(repo, contract)
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
            client = ClipClient(server.grpc_url, group_by_length=True)
            return lambda texts: len(client.embed_texts(texts))

        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        worst = 0.0
        for texts in workloads["16 mixed"]:
            tensor = grpcclient.InferInput(TEXT_INPUT, [len(texts), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
            split = grpc.infer(TEXT_ENSEMBLE, [tensor])
            unsplit = grpc.infer(UNSPLIT_MODEL, [tensor])
            assert (split.as_numpy(STATUS_OUTPUT) == b"").all()
            worst = max(
                worst, float(np.abs(split.as_numpy(EMBEDDING_OUTPUT) - unsplit.as_numpy(EMBEDDING_OUTPUT)).max())
            )
        grpc.close()
        print(f"[raw_split] split vs one length per request, 256 mixed texts: max |diff| {worst:.2e}", flush=True)
        senders = {"unsplit": raw(UNSPLIT_MODEL), "clip_text": raw(TEXT_ENSEMBLE), "ClipClient": grouped}
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
    print(
        "\n| request | concurrency | one length per request (before) | clip_text (split by the tokenizer model) "
        "| ClipClient grouping | split ÷ before |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['workload']} | {r['concurrency']} | {r['unsplit']:.1f} | {r['clip_text']:.1f} | "
            f"{r['ClipClient']:.1f} | {r['clip_text'] / r['unsplit']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"max_abs_diff": worst, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
