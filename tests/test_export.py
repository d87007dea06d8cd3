"""`clip-triton export`: the real exporter on a tiny open_clip ViT, verified against PyTorch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from clip_triton.contract import ModelContract
from clip_triton.export import export_model
from clip_triton.export.graphs import float32_islands
from clip_triton.export.verify import TOLERANCES
from clip_triton.ortutil import make_session

from .helpers import SEED, TINY_CONFIG

pytestmark = pytest.mark.integration


def cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "clip_triton.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def run_graph(folder: Path, tower: str, x: np.ndarray) -> np.ndarray:
    name = "pixel_values" if tower == "vision" else "input_ids"
    return make_session(folder / f"{tower}.onnx").run(None, {name: x})[0]


def test_manifest_records_everything(tiny_export):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert manifest["model"] == "clip-triton-tiny" and manifest["pretrained"] == "none"
    assert manifest["random_weights"] is True and manifest["seed"] == SEED
    assert manifest["precision"] == "fp32" and 17 <= manifest["opset"] <= 20
    assert manifest["embed_dim"] == 32
    assert manifest["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)  # open_clip's initial value
    contract = ModelContract.from_dict(manifest["contract"])
    assert contract.preprocess.mean == (0.48145466, 0.4578275, 0.40821073)
    assert set(manifest["versions"]) >= {"torch", "open_clip", "onnx", "onnxruntime"}
    verification = manifest["verification"]
    assert verification["performed"] and verification["passed"]
    assert verification["tolerance"] == TOLERANCES["fp32"]
    checks = verification["checks"]
    assert {c["batch"] for c in checks} >= {1, 3, 8}
    # Text at every served length (random rows, and the real prompts in the buckets they fall in).
    lengths = contract.tokenizer.lengths
    assert lengths == (8, 16, 32, 77)
    assert {c["inputs"] for c in checks if c["tower"] == "vision"} == {"random", "photos", "refused"}
    assert {c["inputs"] for c in checks if c["tower"] == "text"} == {
        f"{kind}@{n}"
        for n in lengths
        for kind in (
            "random",
            "prompts",  # the sample prompts happen to fall in every bucket
        )
    } | {"refused"}
    assert all(c["min_cosine"] >= 0.99999 and c["max_abs_diff"] <= 1e-4 for c in checks)
    # Issue 25: a batch with a refused row (the fronts' mark) gives NaN there, the other rows bit for bit.
    assert all(c["max_abs_diff"] == 0.0 for c in checks if c["inputs"] == "refused")


def test_graphs_follow_the_contract(tiny_export):
    for tower, (name_in, dtype_in, name_out) in {
        "vision": ("pixel_values", onnx.TensorProto.FLOAT, "image_embeds"),
        "text": ("input_ids", onnx.TensorProto.INT32, "text_embeds"),
    }.items():
        graph = onnx.load(str(tiny_export / f"{tower}.onnx"), load_external_data=False)
        assert 17 <= graph.opset_import[0].version <= 20
        (inp,), (out,) = graph.graph.input, graph.graph.output
        assert (inp.name, inp.type.tensor_type.elem_type) == (name_in, dtype_in)
        assert out.name == name_out and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
        assert any(n.op_type == "LayerNormalization" for n in graph.graph.node)  # one op, opset >= 17
        assert not any(i.name.startswith("input.") for i in graph.graph.input)
    assert not list(tiny_export.glob("*.data"))  # small graphs stay in one file


def test_dynamic_batch_and_normalised_outputs(tiny_export, reference_model):
    import torch

    rng = np.random.default_rng(0)
    for batch in (1, 2, 5, 17):
        pixels = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        out = run_graph(tiny_export, "vision", pixels)
        assert out.shape == (batch, 32)
        assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
        with torch.no_grad():
            ref = reference_model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
        assert np.abs(out - ref).max() < 1e-4


def test_text_pools_at_end_of_text_with_int32_ids(tiny_export, reference_model):
    """EOT pooling (ArgMax over int32 ids) picks the same position as open_clip's int64 path."""
    import open_clip
    import torch

    texts = ["a cat", "a much longer caption about a dog in a park", "x " * 200]
    ids64 = open_clip.get_tokenizer("ViT-B-32")(texts)
    out = run_graph(tiny_export, "text", ids64.numpy().astype(np.int32))
    with torch.no_grad():
        ref = reference_model.encode_text(ids64, normalize=True).numpy()
    assert np.abs(out - ref).max() < 1e-4


def test_external_data_path(tmp_path):
    """With a lowered threshold, weights go to one .data file beside each graph; the checker and
    ONNX Runtime load them by path, and verification still passes."""
    manifest = export_model(
        str(TINY_CONFIG),
        "none",
        tmp_path,
        precision="fp32",
        seed=SEED,
        external_threshold=0,
        verify_batches=(1, 3),
        openvino_ir=False,
    )
    for tower in ("vision", "text"):
        data = tmp_path / f"{tower}.onnx.data"
        assert data.is_file()
        graph = onnx.load(str(tmp_path / f"{tower}.onnx"), load_external_data=False).graph
        external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert max(graph.initializer, key=lambda t: np.prod(t.dims)) in external  # the weights live in .data
        assert sum(np.prod(t.dims) for t in external) * 4 >= 0.9 * data.stat().st_size
        assert manifest["graphs"][tower]["external_data"] == data.name
        onnx.checker.check_model(str(tmp_path / f"{tower}.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "references.npz",
        "text.onnx",
        "text.onnx.data",
        "vision.onnx",
        "vision.onnx.data",
    ]
    assert manifest["verification"]["passed"]


def test_fp16_keeps_layernorm_and_softmax_in_float32(tmp_path):
    manifest = export_model(str(TINY_CONFIG), "none", tmp_path, precision="fp16", seed=SEED, verify_batches=(1, 3))
    assert manifest["verification"]["passed"]
    assert all(c["min_cosine"] >= TOLERANCES["fp16"]["min_cosine"] for c in manifest["verification"]["checks"])
    for tower in ("vision", "text"):
        islands = float32_islands(tmp_path / f"{tower}.onnx")
        assert islands["LayerNormalization"] and islands["Softmax"]
        assert set(islands["LayerNormalization"]) == {"FLOAT"} and set(islands["Softmax"]) == {"FLOAT"}
    graph = onnx.load(str(tmp_path / "vision.onnx"), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)


def test_local_checkpoint_is_reloaded_and_matched(tmp_path, tiny_export, reference_model):
    """A saved checkpoint file exports to the same graphs as the model it came from."""
    import torch

    from clip_triton.export.weights import sha256_file

    checkpoint = tmp_path / "tiny.pt"
    torch.save(reference_model.state_dict(), checkpoint)
    out = tmp_path / "from-file"
    manifest = export_model(
        str(TINY_CONFIG), str(checkpoint), out, precision="fp32", verify_batches=(1,), openvino_ir=False
    )
    assert manifest["random_weights"] is False and manifest["seed"] is None
    assert manifest["checkpoint"] == {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)}
    ids = np.zeros((2, 77), dtype=np.int32)
    ids[:, 0], ids[0, 1:4], ids[1, 1] = 49406, [320, 1125, 49407], 49407
    assert np.abs(run_graph(out, "text", ids) - run_graph(tiny_export, "text", ids)).max() < 1e-6


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "ViT-Nope-99", "--pretrained", "none"], "unknown open_clip architecture"),
        (["--model", "ViT-B-32", "--pretrained", "no_such_tag"], "unknown pretrained tag"),
        (
            ["--model", "ViT-B-32", "--pretrained", "/nonexistent/weights.bin"],
            "checkpoint file /nonexistent/weights.bin not found",
        ),
        (["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"], "not in the Hugging Face cache"),
    ],
)
def test_cli_errors_are_one_line_with_next_step(tmp_path, args, fragment):
    # HF_HUB_OFFLINE makes "no network for a hub tag" fail at once instead of after retries.
    result = cli("export", *args, "--out", str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "(" in lines[0]  # the hint
    assert not (tmp_path / "out" / "vision.onnx").exists()


def test_cli_export_writes_graphs_manifest_and_table(tmp_path):
    """The default fp32 export on a host with OpenVINO (the suite installs the cpu extra) also writes
    the IR that --cpu-runtime auto serves, verified like the graphs; --no-openvino-ir leaves it out."""
    result = cli("export", "--model", str(TINY_CONFIG), "--pretrained", "none", "--out", str(tmp_path / "default"))
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr and "--no-openvino-ir skips it" in result.stderr
    table = result.stdout.splitlines()
    assert any(line.startswith("tower") for line in table)
    # per runtime (ONNX Runtime on the graphs, OpenVINO on the IR): vision 3+1 and a refused row; text 4
    # lengths x (3+1) and a refused row
    assert sum(line.rstrip().endswith("ok") for line in table) == 2 * (4 + 1 + 4 * 4 + 1)
    graphs = {"vision.onnx", "text.onnx", "manifest.json", "references.npz"}
    assert {p.name for p in (tmp_path / "default").iterdir()} == graphs | {
        "vision.xml",
        "vision.bin",
        "text.xml",
        "text.bin",
    }
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert set(manifest["openvino_ir"]) == {"vision", "text"} and manifest["openvino_ir_skipped"] is None

    result = cli(
        "export", "--model", str(TINY_CONFIG), "--pretrained", "none", "--out", str(tmp_path / "no-ir"),
        "--no-openvino-ir", "--verify-batches", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "OpenVINO IR" not in result.stderr
    assert {p.name for p in (tmp_path / "no-ir").iterdir()} == graphs


def _in_process_child(monkeypatch):
    """Run the export's PyTorch stage in this process (a spawned child would not see monkeypatches)."""
    import queue

    from clip_triton.export import pipeline

    def run_here(job, steps, write_line):
        events = queue.Queue()
        monkeypatch.setattr(pipeline, "_EVENTS", events, raising=False)
        facts = pipeline._export_stage(job)
        while not events.empty():  # the child's log lines, as _run_child relays them
            kind, line = events.get()
            if kind == "log":
                child_lines.append(line)
        return facts

    child_lines: list[str] = []
    monkeypatch.setattr(pipeline, "_run_child", run_here)
    return pipeline, child_lines


def test_an_ir_openvino_cannot_convert_is_left_out_by_default_and_fails_when_asked(tmp_path, monkeypatch):
    """By default the IR is an extra: a tower OpenVINO's frontend cannot convert leaves the export
    without IR (recorded, with a warning; the verified ONNX graphs serve, and --reuse keeps it);
    --openvino-ir asked for it, so there it fails the export."""
    from clip_triton.export.pipeline import current_export
    from clip_triton.progress import Progress

    pipeline, child_lines = _in_process_child(monkeypatch)
    real = pipeline.export_openvino_ir

    def convert(model, contract, tower, out_dir):
        if tower == "vision":  # converted second: the text IR already written must go too
            raise RuntimeError("Check 'is_conversion_supported' failed: aten::frobnicate")
        return real(model, contract, tower, out_dir)

    monkeypatch.setattr(pipeline, "export_openvino_ir", convert)
    lines: list[str] = []
    out = tmp_path / "default"
    manifest = export_model(
        str(TINY_CONFIG), "none", out, seed=SEED, verify_batches=(1,), log=Progress("export", sink=lines.append)
    )
    lines += child_lines
    assert manifest["verification"]["passed"] and manifest["openvino_ir"] is None
    assert "could not convert the vision tower" in manifest["openvino_ir_skipped"]
    assert any("WARNING: OpenVINO could not convert the vision tower" in line for line in lines)
    assert not list(out.glob("*.xml")) and not list(out.glob("*.bin"))
    assert current_export(out, str(TINY_CONFIG), "none", seed=SEED, openvino_ir=None) is not None  # no retry loop
    assert current_export(out, str(TINY_CONFIG), "none", seed=SEED, openvino_ir=True) is None

    with pytest.raises(RuntimeError, match="frobnicate"):
        export_model(str(TINY_CONFIG), "none", tmp_path / "asked", seed=SEED, verify_batches=(1,), openvino_ir=True)
    assert not (tmp_path / "asked").exists()


def test_an_ir_that_fails_verification_is_removed_by_default_and_fails_when_asked(tmp_path, monkeypatch):
    """An IR whose outputs miss open_clip's is never served: by default it is deleted (the ONNX graphs,
    which passed, serve); with --openvino-ir the export fails and says so."""
    import dataclasses

    from clip_triton.errors import VerificationError
    from clip_triton.progress import Progress

    pipeline, child_lines = _in_process_child(monkeypatch)
    real = pipeline.check_graphs

    def check(*args, graph="onnx", **kwargs):
        checks = real(*args, graph=graph, **kwargs)
        if graph != "ir":
            return checks
        return [dataclasses.replace(c, passed=False) if c.tower.startswith("text") else c for c in checks]

    monkeypatch.setattr(pipeline, "check_graphs", check)
    lines: list[str] = []
    out = tmp_path / "default"
    manifest = export_model(
        str(TINY_CONFIG), "none", out, seed=SEED, verify_batches=(1,), log=Progress("export", sink=lines.append)
    )
    assert manifest["verification"]["passed"] and manifest["openvino_ir"] is None
    assert manifest["openvino_ir_skipped"] == "the OpenVINO IR of text failed verification"
    assert any("failed verification against open_clip; it is removed" in line for line in lines)
    assert not list(out.glob("*.xml")) and not list(out.glob("*.bin"))

    with pytest.raises(VerificationError):
        export_model(str(TINY_CONFIG), "none", tmp_path / "asked", seed=SEED, verify_batches=(1,), openvino_ir=True)


def test_the_ir_is_written_by_default_only_where_it_would_be_served(monkeypatch):
    """fp32 with OpenVINO installed: yes; fp16 (TensorRT's export) or no OpenVINO: no; asked: as asked."""
    import importlib.util

    from clip_triton.export.pipeline import wants_openvino_ir

    assert importlib.util.find_spec("openvino") is not None  # the suite installs the cpu extra
    assert wants_openvino_ir(None, "fp32") and not wants_openvino_ir(None, "fp16")
    assert wants_openvino_ir(True, "fp16") and not wants_openvino_ir(False, "fp32")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert not wants_openvino_ir(None, "fp32")


def test_verify_fails_on_a_corrupted_graph(tmp_path, tiny_export):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_export, folder)
    model = onnx.load(str(folder / "vision.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = onnx.numpy_helper.to_array(biggest).copy()
    weights *= 1.5  # a silently wrong weight: the graph still loads and runs
    biggest.CopyFrom(onnx.numpy_helper.from_array(weights, biggest.name))
    onnx.save(model, str(folder / "vision.onnx"))
    result = cli("verify", str(folder))
    assert result.returncode == 3, result.stderr
    assert "verification checks failed" in result.stderr and "FAIL" in result.stdout

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_export, truncated)
    data = (truncated / "text.onnx").read_bytes()
    (truncated / "text.onnx").write_bytes(data[: len(data) // 3])
    result = cli("verify", str(truncated))
    assert result.returncode != 0 and "error:" in result.stderr


def test_verify_fails_against_a_wrong_reference(tiny_export):
    assert cli("verify", str(tiny_export)).returncode == 0
    wrong = cli("verify", str(tiny_export), "--seed", "1")  # a different model as the reference
    assert wrong.returncode == 3 and "verification checks failed" in wrong.stderr


def test_verify_auto_checks_what_auto_serves(tiny_export, tiny_ir_export):
    """`verify --cpu-runtime auto` (the default) resolves from the export's manifest, as the repository
    does: an export with IR is checked on OpenVINO fp32, graphs and IR; one without, on ONNX Runtime."""
    from clip_triton.export import verify_export

    with_ir = verify_export(tiny_ir_export, runtime="auto")
    assert {c.tower for c in with_ir} == {"text", "vision", "text ir", "vision ir"}
    assert all(c.passed for c in with_ir)
    without = verify_export(tiny_export, runtime="auto")
    assert {c.tower for c in without} == {"text", "vision"} and all(c.passed for c in without)


def test_openvino_runs_the_graphs_within_the_stated_tolerances(tiny_export):
    """The CPU's other engine, OpenVINO, on the same graphs against the same open_clip references:
    fp32 to fp32's tolerance, bf16 to bf16's, and bf16 really computes in bf16 where the CPU has it."""
    from clip_triton.cpuruntime import cpu_supports_bf16
    from clip_triton.export import verify_export

    fp32 = verify_export(tiny_export, runtime="openvino", cpu_precision="fp32")
    assert fp32 and all(c.passed for c in fp32)
    assert min(c.min_cosine for c in fp32) >= TOLERANCES["fp32"]["min_cosine"]
    assert {c.inputs for c in fp32 if c.tower == "text"} >= {"random@8", "random@16", "random@32", "random@77"}
    bf16 = verify_export(tiny_export, runtime="openvino", cpu_precision="bf16")
    assert all(c.passed for c in bf16) and len(bf16) == len(fp32)
    if cpu_supports_bf16():  # bf16 rounding shows: fp32 lands within ~1e-7 of PyTorch
        assert max(c.max_abs_diff for c in bf16) > 1e-5


def test_cli_verify_with_openvino_bf16_passes_and_still_catches_a_wrong_reference(tiny_export):
    ok = cli("verify", str(tiny_export), "--cpu-engine", "openvino", "--cpu-precision", "bf16")
    assert ok.returncode == 0, ok.stderr
    assert "CPU runtime: openvino bf16" in ok.stdout and "cosine >= 0.999," in ok.stdout
    wrong = cli("verify", str(tiny_export), "--cpu-engine", "openvino", "--cpu-precision", "bf16", "--seed", "1")
    assert wrong.returncode == 3 and "verification checks failed" in wrong.stderr
