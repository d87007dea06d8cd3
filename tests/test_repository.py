"""The model repository: rendered from the contract through Triton's ModelConfig protobuf; the
committed `model_repository/` is exactly what the generator produces for the production default."""

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from clip_triton import contract as C
from clip_triton.errors import ClipTritonError
from clip_triton.repository import (
    MODELS,
    ExportFacts,
    RepoOptions,
    build_configs,
    parse,
    render,
    repository_files,
    served_models,
    write_repository,
)
from clip_triton.server import check_repository

COMMITTED = Path(__file__).resolve().parent.parent / "model_repository"


def committed_files() -> dict[str, str]:
    return {str(p.relative_to(COMMITTED)): p.read_text() for p in sorted(COMMITTED.rglob("*")) if p.is_file()}


def test_committed_repository_has_not_drifted_from_the_generator():
    expected = repository_files(ExportFacts.default(), RepoOptions(runtime="tensorrt"))
    assert committed_files() == expected, (
        "regenerate: clip-triton repo --runtime tensorrt --repo model_repository --force"
    )


def test_committed_configs_parse_as_model_config():
    contract = C.ModelContract.default()
    configs = {p.parent.name: parse(p.read_text()) for p in COMMITTED.glob("*/config.pbtxt")}
    assert set(configs) == set(served_models(RepoOptions(runtime="tensorrt"))) == {*MODELS, C.TEXT_CACHED}
    for name, config in configs.items():
        assert isinstance(config, pb.ModelConfig) and config.name == name
        assert config.max_batch_size == contract.batch.max  # = TensorRT profile max
    for name in (C.VISION_MODEL, C.TEXT_MODEL):
        assert configs[name].platform == "tensorrt_plan" and configs[name].default_model_filename == "model.plan"
        assert configs[name].instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        assert configs[name].model_warmup
    for config in configs.values():
        if config.platform != "ensemble":
            assert list(config.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    params = configs[C.IMAGE_ENSEMBLE].parameters
    assert params["model"].string_value == "ViT-bigG-14" and params["pretrained"].string_value == "laion2b_s39b_b160k"
    assert params["precision"].string_value == "fp16" and params["embed_dim"].string_value == "1280"
    assert float(params["logit_scale"].string_value) == 100.0
    assert "assumed" in params["logit_scale_source"].string_value


def test_ensemble_wiring_matches_the_contract():
    contract = C.ModelContract.default()
    configs = {p.parent.name: parse(p.read_text()) for p in COMMITTED.glob("*/config.pbtxt")}

    def io(model, kind):
        return {t.name: (t.data_type, tuple(t.dims)) for t in getattr(configs[model], kind)}

    for ensemble, first, second, source, middle, encoder_out in (
        (
            C.IMAGE_ENSEMBLE,
            C.PREPROCESS_MODEL,
            C.VISION_MODEL,
            contract.image_input,
            contract.pixels,
            contract.image_embeds,
        ),
        (
            C.TEXT_ENSEMBLE,
            C.TOKENIZER_MODEL,
            C.TEXT_MODEL,
            contract.text_input,
            contract.input_ids,
            contract.text_embeds,
        ),
    ):
        # A cached tower's pipeline is the inner ensemble, the public one's single step (naming both outputs).
        pipeline = ensemble + "_cached" if ensemble + "_cached" in configs else ensemble
        # the text pipeline also answers each item's token count (TOKENS), from its tokenizer
        counts = {C.TOKENS_OUTPUT: C.TOKENS_OUTPUT} if ensemble == C.TEXT_ENSEMBLE else {}
        if pipeline != ensemble:
            (only,) = configs[ensemble].ensemble_scheduling.step
            assert only.model_name == pipeline and dict(only.input_map) == {source.name: source.name}
            assert dict(only.output_map) == {
                C.EMBEDDING_OUTPUT: C.EMBEDDING_OUTPUT,
                C.STATUS_OUTPUT: C.STATUS_OUTPUT,
                **counts,
            }
            assert io(pipeline, "input") == io(ensemble, "input") and io(pipeline, "output") == io(ensemble, "output")
            assert configs[pipeline].response_cache.enable and not configs[ensemble].response_cache.enable
        steps = configs[pipeline].ensemble_scheduling.step
        assert dict(steps[0].input_map) == {source.name: source.name}
        if ensemble == C.TEXT_ENSEMBLE:
            # The tokenizer calls the encoder itself, once per length bucket (BLS: split_by_bucket) and
            # answers the embeddings; what it sends has the encoder's input name, dtype and shape.
            assert [s.model_name for s in steps] == [first]
            assert dict(steps[0].output_map) == {
                C.EMBEDDING_OUTPUT: C.EMBEDDING_OUTPUT,
                C.STATUS_OUTPUT: C.STATUS_OUTPUT,
                **counts,
            }
            assert configs[first].parameters["encoder"].string_value == second
            dtype = pb.DataType.Value(middle.config_type)
            assert io(first, "output")[middle.name] == io(second, "input")[middle.name] == (dtype, middle.shape)
            assert io(first, "output")[C.EMBEDDING_OUTPUT] == (pb.TYPE_FP32, (contract.embed_dim,))
        else:
            assert [s.model_name for s in steps] == [first, second]
            # the first step's per-item STATUS goes straight to the ensemble's output of the same name
            assert dict(steps[0].output_map) == {middle.name: middle.name, C.STATUS_OUTPUT: C.STATUS_OUTPUT}
            assert dict(steps[1].input_map) == {middle.name: middle.name}
            assert dict(steps[1].output_map) == {encoder_out.name: C.EMBEDDING_OUTPUT}
            # Each hand-over has one name, dtype and shape on both sides.
            dtype = pb.DataType.Value(middle.config_type)
            assert io(first, "output")[middle.name] == io(second, "input")[middle.name] == (dtype, middle.shape)
        assert io(ensemble, "input") == {source.name: (pb.TYPE_STRING, (1,))}
        assert io(ensemble, "output") == {
            C.EMBEDDING_OUTPUT: (pb.TYPE_FP32, (contract.embed_dim,)),
            C.STATUS_OUTPUT: (pb.TYPE_STRING, (1,)),
            **({C.TOKENS_OUTPUT: (pb.TYPE_INT32, (1,))} if counts else {}),
        }
        assert io(first, "output")[C.STATUS_OUTPUT] == (pb.TYPE_STRING, (1,))
        assert io(second, "output") == {encoder_out.name: (pb.TYPE_FP32, (contract.embed_dim,))}


RUNTIME_OPTIONS = {
    "tensorrt": RepoOptions(runtime="tensorrt"),
    "onnxruntime": RepoOptions(runtime="onnxruntime"),
    "openvino": RepoOptions(runtime="openvino", cpu_precision="bf16"),
    "python": RepoOptions(runtime="python"),
    "python-openvino": RepoOptions(runtime="python", cpu_runtime="openvino", cpu_precision="bf16"),
}


@pytest.mark.parametrize("runtime", sorted(RUNTIME_OPTIONS))
def test_all_runtimes_share_one_signature(runtime):
    options = RUNTIME_OPTIONS[runtime]
    configs = build_configs(ExportFacts.default(), options)
    reference = build_configs(ExportFacts.default(), RepoOptions(runtime="tensorrt"))

    def full(config, field):  # (name, dtype, dims with the batch dim): what the ensemble hands over
        batch = [-1] if config.max_batch_size else []
        return [(t.name, t.data_type, [*batch, *t.dims]) for t in getattr(config, field)]

    for name in (C.VISION_MODEL, C.TEXT_MODEL):
        for field in ("input", "output"):
            assert full(configs[name], field) == full(reference[name], field)
        if runtime != "openvino":  # the OpenVINO backend's encoders take the batch as a dim (issue 26)
            assert list(configs[name].input) == list(reference[name].input)
            assert configs[name].max_batch_size == reference[name].max_batch_size
    encoder = configs[C.VISION_MODEL]
    assert {
        "tensorrt": encoder.platform == "tensorrt_plan",
        "onnxruntime": encoder.platform == "onnxruntime_onnx",
        "openvino": encoder.backend == "openvino",
        "python": encoder.backend == "python",
        "python-openvino": encoder.backend == "python",
    }[runtime]
    for config in configs.values():
        assert parse(render(config)) == config  # renders and parses back unchanged
    ensemble = configs[C.IMAGE_ENSEMBLE].parameters
    # (the default --cpu-runtime auto is resolved per export: ONNX Runtime for an export without IR)
    assert ensemble["encoder_runtime"].string_value == options.resolved(ExportFacts.default()).encoder_runtime


def test_openvino_configs_carry_the_backends_own_keys():
    native = build_configs(
        ExportFacts.default(), RepoOptions(runtime="openvino", cpu_precision="bf16", encoder_threads=2)
    )[C.TEXT_MODEL]
    assert native.backend == "openvino" and native.default_model_filename == "model.onnx"
    assert native.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    params = {k: v.string_value for k, v in native.parameters.items()}
    # The keys Triton's OpenVINO backend reads (openvino_backend README): anything else is ignored.
    assert {k: params[k] for k in ("PERFORMANCE_HINT", "NUM_STREAMS", "HINT_BF16", "INFERENCE_NUM_THREADS")} == {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "HINT_BF16": "YES",
        "INFERENCE_NUM_THREADS": "2",
    }
    python = build_configs(ExportFacts.default(), RUNTIME_OPTIONS["python-openvino"])[C.VISION_MODEL]
    params = {k: v.string_value for k, v in python.parameters.items()}
    assert (params["cpu_runtime"], params["compute_precision"], params["threads"]) == ("openvino", "bf16", "0")
    # Instances share the backend's one compiled model: one stream each, or they take turns (issue 26).
    three = build_configs(
        ExportFacts.default(), RepoOptions(runtime="openvino", cpu_precision="bf16", encoder_instances=3)
    )
    assert three[C.VISION_MODEL].parameters["NUM_STREAMS"].string_value == "3"
    # The repository is written on one machine and served on some CPU node: it claims bf16 only where
    # the CPU has it.
    assert "else fp32" in three[C.TEXT_ENSEMBLE].parameters["encoder_runtime"].string_value


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(runtime="python", cpu_runtime="onnxruntime", cpu_precision="bf16"), "bf16 on the CPU needs OpenVINO"),
        (dict(runtime="openvino"), "cannot force fp32"),
        (dict(runtime="python", cpu_runtime="tvm"), "unknown CPU runtime"),
        (dict(runtime="python", cpu_precision="int8"), "unknown CPU precision"),
    ],
)
def test_impossible_cpu_settings_are_refused_with_the_next_step(options, fragment):
    with pytest.raises(ClipTritonError, match=fragment) as caught:
        RepoOptions(**options)
    assert caught.value.hint


def test_repo_says_why_auto_serves_onnx_runtime_and_how_to_get_openvino(monkeypatch):
    """``--cpu-runtime auto`` falls back to ONNX Runtime (fp32 16-image requests only tie a one-process
    PyTorch server) where OpenVINO is missing or the export has no IR: `repo` names the cause and the
    command that gets OpenVINO fp32. Nothing is said where OpenVINO serves, a runtime was named, or
    --no-openvino-ir kept the graphs on purpose."""
    from dataclasses import replace

    from clip_triton import cpuruntime

    with_ir = replace(ExportFacts.default(), has_openvino_ir=True)
    without_ir = ExportFacts.default()
    auto = RepoOptions(runtime="python")
    monkeypatch.setattr(cpuruntime, "openvino_installed", lambda: True)
    assert auto.resolved(with_ir).cpu_runtime == "openvino" and auto.runtime_note(with_ir) is None
    note = auto.runtime_note(without_ir)
    assert note and "no OpenVINO IR" in note and "export --openvino-ir" in note
    assert RepoOptions(runtime="python", openvino_ir=False).runtime_note(with_ir) is None
    assert RepoOptions(runtime="python", cpu_runtime="onnxruntime").runtime_note(without_ir) is None
    assert RepoOptions(runtime="tensorrt").runtime_note(without_ir) is None
    monkeypatch.setattr(cpuruntime, "openvino_installed", lambda: False)
    note = auto.runtime_note(with_ir)
    assert note and "OpenVINO is not installed" in note and "clip-triton[serve]" in note


def test_max_batch_size_zero_is_written_explicitly():
    config = pb.ModelConfig(name="unbatched", backend="python", max_batch_size=0)
    text = render(config)
    assert "max_batch_size: 0" in text
    assert parse(text).max_batch_size == 0


def test_tensorrt_batch_cannot_exceed_the_profile():
    with pytest.raises(ClipTritonError, match="exceeds the TensorRT profile maximum"):
        build_configs(ExportFacts.default(), RepoOptions(runtime="tensorrt", max_batch_size=128))


def test_python_repository_places_graphs(tiny_export, tmp_path):
    repo = write_repository(tmp_path / "repo", onnx_dir=tiny_export, options=RepoOptions(runtime="python"))
    assert (repo / C.VISION_MODEL / "1" / "model.onnx").is_file()
    assert (repo / C.TEXT_MODEL / "1" / "model.onnx").is_file()
    entry = (repo / C.PREPROCESS_MODEL / "1" / "model.py").read_text()
    assert (
        len(entry.splitlines()) < 20 and "from clip_triton.serving.preprocess_model import TritonPythonModel" in entry
    )
    assert sorted(check_repository(repo)) == sorted(served_models(RepoOptions(runtime="python")))


def test_repository_needs_an_export_and_refuses_failed_ones(tmp_path, tiny_export):
    import json
    import shutil

    with pytest.raises(ClipTritonError, match="manifest.json not found"):
        write_repository(tmp_path / "a", onnx_dir=tmp_path, options=RepoOptions(runtime="python"))
    failed = tmp_path / "failed"
    shutil.copytree(tiny_export, failed)
    manifest = json.loads((failed / "manifest.json").read_text())
    manifest["verification"]["passed"] = False
    (failed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ClipTritonError, match="verification failed"):
        write_repository(tmp_path / "b", onnx_dir=failed, options=RepoOptions(runtime="python"))
    with pytest.raises(ClipTritonError, match="exists and is not empty"):
        write_repository(COMMITTED, options=RepoOptions(runtime="tensorrt"))
    # An export from before NaN rows for refused items: its graphs would answer the fronts' marked rows
    # with numbers, so it is refused with the way out (and export does not reuse it: test_export).
    manifest["verification"]["passed"] = True
    manifest["format"] = 1
    (failed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ClipTritonError, match="format 1") as caught:
        write_repository(tmp_path / "c", onnx_dir=failed, options=RepoOptions(runtime="python"))
    assert "re-export" in caught.value.hint


def test_force_empties_the_folder_in_place(tmp_path, tiny_export):
    """--force keeps the folder itself (it may be a mounted volume) and replaces its content."""
    out = tmp_path / "mounted"
    out.mkdir()
    (out / "stale").mkdir()
    (out / "stale" / "old.txt").write_text("x")
    (out / "old-file").write_text("x")
    inode = out.stat().st_ino
    write_repository(out, onnx_dir=tiny_export, options=RepoOptions(runtime="python"), force=True)
    assert out.stat().st_ino == inode
    assert not (out / "stale").exists() and not (out / "old-file").exists()
    assert (out / "clip_image" / "config.pbtxt").is_file()


def test_facts_are_written_and_read_by_one_module():
    """What `repo` writes into the ensembles is exactly what the client reads back: one module spells
    the keys (clip_triton/facts.py)."""
    from google.protobuf import json_format

    from clip_triton.facts import ServerFacts

    options = RepoOptions(runtime="python", served_model_name="clip-big")
    facts = ExportFacts.default().server_facts(options)
    configs = build_configs(ExportFacts.default(), options)
    for tower in C.TOWERS:
        read = ServerFacts.from_config(
            json_format.MessageToDict(configs[tower.ensemble], preserving_proto_field_name=True)
        )
        assert read == facts.with_(max_batch_size=configs[tower.ensemble].max_batch_size, item_status=True)
        assert read.public_id == "clip-big" and read.encoder_runtime == "onnxruntime (python backend), fp32"


def test_encoder_configs_name_their_tower_and_carry_the_contract_only_where_read():
    for runtime in ("tensorrt", "onnxruntime", "python"):
        options = RUNTIME_OPTIONS.get(runtime) or RepoOptions(runtime=runtime)
        configs = build_configs(ExportFacts.default(), options)
        for tower in C.TOWERS:
            params = configs[tower.model].parameters
            assert params["tower"].string_value == tower.name
            assert ("contract" in params) == (runtime == "python"), runtime  # the python encoder reads it


@pytest.mark.parametrize(
    "setting, cached",
    [("text", {C.TEXT_CACHED}), ("all", {C.TEXT_CACHED, C.IMAGE_CACHED}), ("none", set())],
)
def test_response_cache_is_enabled_per_ensemble(setting, cached):
    configs = build_configs(ExportFacts.default(), RepoOptions(runtime="python", response_cache=setting))
    enabled = {name for name, config in configs.items() if config.response_cache.enable}
    assert enabled == cached  # only inner ensembles: their whole request (strings or image bytes) is the key
    assert set(configs) == set(served_models(RepoOptions(runtime="python", response_cache=setting)))
    with pytest.raises(ClipTritonError, match="response cache"):
        RepoOptions(response_cache="images")


def test_text_encoder_takes_every_bucket_and_is_warmed_at_each():
    configs = build_configs(ExportFacts.default(), RepoOptions(runtime="tensorrt"))
    contract = C.ModelContract.default()
    text, tokenizer = configs[C.TEXT_MODEL], configs[C.TOKENIZER_MODEL]
    assert list(text.input[0].dims) == [-1] and list(tokenizer.output[0].dims) == [-1]
    warmed = {(w.batch_size, tuple(w.inputs[C.INPUT_IDS].dims)) for w in text.model_warmup}
    assert warmed == {(b, (n,)) for b in (1, 16) for n in contract.tokenizer.lengths}
    vision = configs[C.VISION_MODEL]
    assert {tuple(w.inputs[C.PIXELS].dims) for w in vision.model_warmup} == {(3, 224, 224)}
