"""The GPU stack proven on its GPU-less twin (README "What was verified, and where").

No GPU, TensorRT, Docker engine or NGC image exists here. Each GPU stage is run instead with only the
part that needs them substituted:

* images: one virtualenv per Dockerfile stage on that image's Python, built from the Dockerfile's own
  `pip install` lines (tests/gpu_twin.py parses them), then the stage's own commands run in it;
* compose: Debian's docker-compose renders docker-compose.yml with each documented command's
  environment;
* Triton: the real tritonserver loads the TensorRT repositories with each engine replaced by a
  python-backend stand-in of identical I/O, and the triton image's healthcheck runs against it.

The stage environments are cached (~/.cache/clip-triton-twin) by everything that decides their
contents; the package itself is reinstalled from this checkout on every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from clip_triton import children
from clip_triton import contract as C
from clip_triton.export import engines as E
from clip_triton.export.verify import TOLERANCES
from clip_triton.repository import RepoOptions, parse, write_repository

from .gpu_twin import (
    PREINSTALLED,
    ROOT,
    added_by_stage,
    dockerfile_stages,
    fake_gpu_env,
    installed,
    io_signature,
    read_constraints,
    run_in,
    stage_environment,
    standin_repository,
)
from .helpers import SEED, TINY_CONFIG, cos, export_for_tests, open_clip_reference_for, settled

pytestmark = pytest.mark.integration

STAGES = dockerfile_stages()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
BIGG_IO_CONFIG = ROOT / "tests" / "configs" / "clip-triton-tiny-bigG-io.json"
PROMPTS = ["a photo of a cat", "a photo of a dog", "an astronaut on the moon", "a cup of coffee"]
NGC = {name for name, stage in STAGES.items() if stage.base.startswith("nvcr.io/")}

_envs: dict[str, Path] = {}


def stage_env(name: str) -> Path:
    if name not in _envs:
        _envs[name] = stage_environment(STAGES[name], log=lambda line: print(line, file=sys.stderr))
    return _envs[name]


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def test_dockerfile_has_the_expected_stages_and_pythons():
    assert set(STAGES) == {"source", "triton", "engines", "export", "sdk", "gateway"}
    assert {"triton", "engines", "sdk"} == NGC
    assert {STAGES[n].python for n in NGC} == {"3.12"}  # NGC 25.10 is Ubuntu 24.04
    # The python:3.11 stages install CI's own environment: CI runs on that Python.
    assert STAGES["export"].python == STAGES["gateway"].python == f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_every_stage_installs_against_its_own_constraints_file():
    for name, stage in STAGES.items():
        if name == "source":
            continue
        installs = stage.pip_installs()
        assert installs, f"{name} installs nothing"
        for argv in installs:
            assert "-c" in argv, f"{name}: {' '.join(argv)} has no constraints file"
        expected = (
            ROOT / "requirements" / "docker" / f"{name}.txt"
            if name in NGC
            else ROOT / "requirements" / "constraints.txt"
        )
        assert stage.constraints() == [expected] * len(installs), name
        assert expected.is_file()
    # The only RUN commands that are not installs: both TensorRT images' version check, and the
    # gateway's user.
    others = {name: stage.other_commands() for name, stage in STAGES.items() if stage.other_commands()}
    assert {name: len(commands) for name, commands in others.items()} == {"engines": 1, "triton": 1, "gateway": 1}
    assert others["engines"] == others["triton"] and "require_tensorrt" in others["triton"][0]
    assert others["gateway"][0].startswith("useradd")


@pytest.mark.parametrize("name", ["triton", "engines"])
def test_tensorrt_images_refuse_to_build_on_another_tensorrt(name, tmp_path):
    """The stage's own check, run in its environment: the pinned TensorRT passes, another fails the
    build with both versions named (the triton image's libnvinfer reports major.minor.patch only; here
    TRT_VERSION plays the library, as in NGC's TensorRT images)."""
    (command,) = STAGES[name].other_commands()
    argv = shlex.split(command.replace("${TENSORRT_VERSION}", E.TENSORRT_PIN))
    assert argv[:2] == ["python3", "-c"]
    for version, ok in ((E.TENSORRT_PIN, True), ("10.13.3", True), ("10.14.1.48", False)):
        result = run_in(stage_env(name), ["python", "-c", argv[2]], env={**os.environ, "TRT_VERSION": version})
        assert (result.returncode == 0) == ok, (version, result.stdout + result.stderr)
        if not ok:
            assert f"TensorRT {version} in this image, clip-triton pins {E.TENSORRT_PIN}" in result.stderr


def test_ngc_stages_keep_nvidias_entrypoint():
    """NGC images start through /opt/nvidia/nvidia_entrypoint.sh (CUDA forward compatibility):
    no stage may replace it, and compose passes commands as arguments to it."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert not re.search(r"^\s*ENTRYPOINT", text, flags=re.M)
    for name, service in COMPOSE["services"].items():
        assert "entrypoint" not in service, name


@pytest.mark.parametrize("name", ["triton", "engines", "sdk", "gateway"])
def test_stage_environment_is_what_its_constraints_pin(name):
    venv = stage_env(name)
    pins = read_constraints(STAGES[name].constraints()[0])
    if name in NGC:
        # The stage's own file pins exactly what its line adds to the base image: no drift either way
        # (regenerate with `python -m tests.gpu_twin` after changing dependencies).
        assert added_by_stage(venv) == pins
    else:
        have = installed(venv)
        loose = {
            n: v for n, v in have.items() if n not in {"pip", "setuptools", "wheel", "clip-triton"} and pins.get(n) != v
        }
        assert not loose, f"installed but not pinned by requirements/constraints.txt: {loose}"


@pytest.mark.parametrize("name", ["triton", "sdk"])
def test_stage_lines_leave_the_base_images_packages_working(name):
    """Our install line on top of what the NGC recipe put there (numpy<2 and virtualenv for the python
    backend; the SDK's tritonclient, attrdict and genai-perf): every installed package's requirements
    still hold (`pip check`), so genai-perf and the python backend keep working."""
    from .gpu_twin import PREINSTALLED

    assert any("virtualenv" in line for line in PREINSTALLED["triton"])
    assert any(pkg.startswith("genai-perf") for line in PREINSTALLED["sdk"] for pkg in line)
    result = run_in(stage_env(name), ["python", "-m", "pip", "check"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_sdk_stage_keeps_the_images_own_tritonclient():
    have = installed(stage_env("sdk"))
    (image_client,) = [
        pkg.split("==")[1] for line in PREINSTALLED["sdk"] for pkg in line if pkg.startswith("tritonclient")
    ]
    assert have["tritonclient"] == image_client  # the 2.51 wheel (CUDA 12 perf_analyzer) never goes in
    assert "tritonclient" not in read_constraints(ROOT / "requirements" / "docker" / "sdk.txt")  # never ours
    for argv in (["python", "-m", "clip_triton.gpucheck", "--help"], ["clip-triton", "classify", "--help"]):
        result = run_in(stage_env("sdk"), argv)
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory) -> Path:
    """An fp16 export, as compose's export service writes for the engines stage."""
    return export_for_tests(tmp_path_factory, "tiny-fp16", precision="fp16")


@pytest.fixture(scope="module")
def bigg_io_export(tmp_path_factory) -> Path:
    """An fp16 export of a tiny model whose encoders have bigG's exact I/O (224 px, 77 tokens, 1280-d):
    the graph behind the committed repository's stand-ins."""
    return export_for_tests(tmp_path_factory, "tiny-bigG-io-fp16", config=BIGG_IO_CONFIG, precision="fp16")


def _passed_manifest(onnx_dir: Path, tower: str, platform: E.Platform) -> dict:
    return {
        "platform": {
            "tensorrt": platform.tensorrt,
            "gpu": platform.gpu,
            "compute_capability": platform.compute_capability,
        },
        "onnx": E.graph_identity(onnx_dir, tower),
        "profiles": E.recorded_profiles(
            C.ModelContract.from_dict(json.loads((onnx_dir / C.MANIFEST).read_text())["contract"]), tower
        ),
        "validation": {
            "min_cosine": E.MIN_ENGINE_COSINE,
            "passed": True,
            "checks": [{"inputs": "references", "batch": 4, "min_cosine": 0.9999, "passed": True}],
        },
    }


def _place_engines(repo: Path, onnx_dir: Path) -> None:
    """What build-engines leaves behind on a GPU host: a plan and its passed engine.json per encoder."""
    platform = E.Platform("10.13.3.9", "NVIDIA H200", "9.0")
    for tower, model in ((t.name, t.model) for t in C.TOWERS):
        (repo / model / "1" / C.PLAN_FILE).write_bytes(b"serialized engine (GPU boundary)")
        (repo / model / "1" / E.ENGINE_MANIFEST).write_text(json.dumps(_passed_manifest(onnx_dir, tower, platform)))


def test_engines_stage_writes_the_repository_and_checks_engines(fp16_export, tmp_path):
    """The engines service's own commands, in the engines image's environment."""
    venv, env = stage_env("engines"), fake_gpu_env(tmp_path / "gpu")
    repo = tmp_path / "models"
    result = run_in(
        venv,
        [
            "clip-triton",
            "repo",
            "--runtime",
            "tensorrt",
            "--onnx-dir",
            str(fp16_export),
            "--repo",
            str(repo),
            "--force",
        ],
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert parse((repo / "vision_encoder" / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    result = run_in(venv, ["python", "-c", "import onnx, polygraphy.backend.trt, clip_triton.export.engines"], env=env)
    assert result.returncode == 0, result.stderr
    _place_engines(repo, fp16_export)
    for stage in ("engines", "triton"):  # the build Job's check, and the triton service's first command
        result = run_in(
            stage_env(stage),
            ["clip-triton", "check-engines", "--repo", str(repo), "--onnx-dir", str(fp16_export)],
            env=env,
        )
        assert result.returncode == 0, (stage, result.stderr)
        assert result.stdout.count("passed validation and matches this TensorRT and GPU") == 2


def test_python_models_import_with_only_the_triton_stage_packages(tmp_path):
    """Each python-backend model.py of a TensorRT repository imports in the triton image's environment."""
    repos = [ROOT / "model_repository", write_repository(tmp_path / "written", options=RepoOptions(runtime="tensorrt"))]
    models = [path for repo in repos for path in sorted(repo.glob("*/1/model.py"))]
    assert {path.parent.parent.name for path in models} == {"preprocess", "tokenizer"}
    for path in models:
        code = f"import runpy; runpy.run_path({str(path)!r}, run_name='model')"
        result = run_in(stage_env("triton"), ["python", "-c", code])
        assert result.returncode == 0, (path, result.stderr)


# ---------------------------------------------------------------------------------------------
# Compose: rendered by a real Compose implementation with each documented command's environment
# ---------------------------------------------------------------------------------------------
def _compose_binary() -> str:
    found = shutil.which("docker-compose")
    assert found, "Debian's docker-compose renders the compose twin: apt-get install docker-compose (dev.sh does)"
    return found


def documented_compose_commands() -> list[str]:
    """Every `docker compose ...` line of the docs' shell blocks (README, docs/) and of deploy/gpu-check.sh."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S)]
    section = "\n".join(blocks)
    text = section.replace("\\\n", " ") + "\n" + (ROOT / "deploy" / "gpu-check.sh").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if "docker compose " in line and not line.startswith(("#", "echo")):
            start = line.index("docker compose ")
            prefix = line[:start].split()
            env = [word for word in prefix if re.fullmatch(r"[A-Z_]+=\S+", word)]
            commands.append(" ".join([*env, line[start:]]).split(")", 1)[0].split('"', 1)[0].strip())
    return commands


def test_documented_compose_commands_are_found():
    commands = documented_compose_commands()
    verbs = {shlex.split(c.split("docker compose ", 1)[1])[0] for c in commands}
    assert {"build", "up", "run", "ps", "logs"} <= verbs
    assert any("--profile gateway" in c for c in commands)


@pytest.mark.parametrize("command", documented_compose_commands())
def test_compose_renders_for_each_documented_command(command, tmp_path):
    """`docker compose` interpolates the whole file before choosing services: a mandatory variable the
    command does not set breaks every command. Render with exactly the command's environment."""
    assignments = dict(word.split("=", 1) for word in command.split("docker compose ", 1)[0].split())
    argv = shlex.split(command.split("docker compose ", 1)[1])
    profiles = [argv[i + 1] for i, word in enumerate(argv) if word == "--profile"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIP_", "COMPOSE_"))}
    env.update({k: "value-from-the-command" for k in assignments})
    base = [_compose_binary(), "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
    base += [f"--profile={p}" for p in profiles]
    result = subprocess.run([*base, "config"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    services = subprocess.run(
        [*base, "config", "--services"], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    ).stdout.split()
    verb_args = [a for a in argv[argv.index(next(a for a in argv if not a.startswith("-") and a not in profiles)) :]]
    named = [a for a in verb_args[1:] if a in COMPOSE["services"]]
    assert set(named) <= set(services), f"{command}: {named} not rendered ({services})"


def test_compose_without_keys_leaves_the_gateway_to_refuse(tmp_path):
    """No key set: the gateway's environment renders empty, and the gateway itself refuses to start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
    rendered = subprocess.run(
        [
            _compose_binary(),
            "--project-directory",
            str(ROOT),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--profile=gateway",
            "config",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    gateway = yaml.safe_load(rendered)["services"]["gateway"]
    assert gateway["environment"]["CLIP_TRITON_API_KEYS"] == ""
    result = run_in(
        stage_env("gateway"),
        gateway["command"][:2] + ["--port", "1", "--url", "127.0.0.1:1"],
        env={**env, "CLIP_TRITON_API_KEYS": ""},
        timeout=120,
    )
    assert result.returncode == 2 and "API key" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# Triton: the TensorRT repositories on the real tritonserver, engines swapped for stand-ins
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_standins(trt_repo: Path, onnx_dir: Path, config: Path, tmp: Path):
    """The real tritonserver on a TensorRT repository whose engines are ONNX Runtime stand-ins, with the
    open_clip reference of the exported model."""
    from clip_triton.export.weights import load_model
    from clip_triton.server import TritonServer

    repo = standin_repository(trt_repo, onnx_dir, tmp / "standin")
    reference = open_clip_reference_for(config, load_model(str(config), "none", seed=SEED).model)
    server = TritonServer(repo, log_file=tmp / "tritonserver.log")
    try:
        server.start(timeout=300)
        yield trt_repo, repo, onnx_dir, server, reference
    finally:
        server.stop()


@pytest.fixture(scope="module")
def committed_standins(bigg_io_export, tmp_path_factory):
    """The committed model_repository/ (bigG's contract), its engines replaced by stand-ins running a
    tiny model with bigG's exact encoder I/O."""
    with serve_standins(
        ROOT / "model_repository", bigg_io_export, BIGG_IO_CONFIG, tmp_path_factory.mktemp("standin-committed")
    ) as served:
        yield served


@pytest.fixture(scope="module")
def written_standins(fp16_export, tmp_path_factory):
    """What `clip-triton repo --runtime tensorrt` writes from an fp16 export, engines replaced by stand-ins."""
    tmp = tmp_path_factory.mktemp("standin-written")
    trt_repo = write_repository(tmp / "trt", onnx_dir=fp16_export, options=RepoOptions(runtime="tensorrt"))
    with serve_standins(trt_repo, fp16_export, TINY_CONFIG, tmp) as served:
        yield served


@pytest.fixture(params=["committed", "written"])
def standin_server(request):
    return request.getfixturevalue(f"{request.param}_standins")


def test_a_text_encoder_without_its_profile_list_fails_to_load_in_the_twin(fp16_export, tmp_path):
    """The config before issue 26: no `profile` list, so Triton's TensorRT backend serves profile 0
    (lengths 2-8) alone; the warm-ups at the other buckets fail and so does the load, as on a GPU host.
    The stand-in refuses what the backend refuses (tests/twin_standin.py)."""
    from clip_triton.errors import ClipTritonError
    from clip_triton.repository import render
    from clip_triton.server import TritonServer

    trt_repo = write_repository(tmp_path / "trt", onnx_dir=fp16_export, options=RepoOptions(runtime="tensorrt"))
    path = trt_repo / C.TEXT_MODEL / "config.pbtxt"
    config = parse(path.read_text())
    assert len(config.instance_group[0].profile) == 4
    del config.instance_group[0].profile[:]
    path.write_text(render(config))
    repo = standin_repository(trt_repo, fp16_export, tmp_path / "standin")
    # Every start must fail. About half of the starts in one clean clone ended ~1.5 s into loading with
    # no error logged (tritonserver gone before the text encoder's warm-ups ran; cause not found yet):
    # so up to three starts, and the refusal must be in a log. The old stand-in never wrote it.
    logs = []
    for attempt in range(3):
        server = TritonServer(repo, log_file=tmp_path / f"t{attempt}.log")
        with pytest.raises(ClipTritonError, match="exited"):
            server.start(timeout=300)
        logs.append((tmp_path / f"t{attempt}.log").read_text())
        if "request specifies invalid shape" in logs[-1]:
            break
    assert "request specifies invalid shape for input 'input_ids'" in logs[-1], f"{len(logs)} starts, none refused"
    assert "[1, 2]..[64, 8]" in logs[-1]


def test_standins_serve_every_bucket_through_the_listed_profiles(standin_server):
    """With the list, every bucket's profile is available: a text of each bucket's length is served."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    trt_repo, repo, _, server, _ = standin_server
    contract = C.ModelContract.from_json(
        parse((repo / C.TOKENIZER_MODEL / "config.pbtxt").read_text()).parameters["contract"].string_value
    )
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for length in contract.tokenizer.lengths:
            ids = grpcclient.InferInput(C.INPUT_IDS, [1, length], "INT32")
            ids.set_data_from_numpy(np.ones((1, length), np.int32))
            output = contract.encoder_io("text")[1].name
            assert client.infer(C.TEXT_MODEL, [ids]).as_numpy(output).shape[0] == 1, length
    listed = parse((trt_repo / C.TEXT_MODEL / "config.pbtxt").read_text()).instance_group[0].profile
    assert list(listed) == [str(i) for i in range(len(contract.tokenizer.lengths))]


def test_standins_keep_the_engines_io(standin_server):
    trt_repo, repo, onnx_dir, _, _ = standin_server
    for model in (t.model for t in C.TOWERS):
        original = parse((trt_repo / model / "config.pbtxt").read_text())
        standin = parse((repo / model / "config.pbtxt").read_text())
        assert original.platform == "tensorrt_plan" and standin.backend == "python"
        assert io_signature(standin) == io_signature(original)
    contract = C.ModelContract.from_json(
        parse((repo / "vision_encoder" / "config.pbtxt").read_text()).parameters["contract"].string_value
    )
    exported = C.ModelContract.from_dict(json.loads((onnx_dir / C.MANIFEST).read_text())["contract"])
    for tower in ("vision", "text"):
        assert contract.encoder_io(tower) == exported.encoder_io(tower)  # the graph fits the config exactly
    assert contract.pixels.dtype == "float16" and contract.input_ids.dtype == "int32"
    assert contract.preprocess == exported.preprocess and contract.context_length == exported.context_length


def test_triton_stage_healthcheck_passes_on_the_served_repository(standin_server):
    """compose's healthcheck command, as written, run with the triton image's packages only."""
    *_, server, _ = standin_server
    command = COMPOSE["services"]["triton"]["healthcheck"]["test"][1]
    mapped = command
    for port, actual in ((8000, server.http_port), (8001, server.grpc_port), (8002, server.metrics_port)):
        mapped = mapped.replace(f"localhost:{port}", f"127.0.0.1:{actual}")
    assert mapped != command
    result = run_in(stage_env("triton"), ["sh", "-c", mapped], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_served_embeddings_match_open_clip_within_fp16_tolerance(standin_server, photos):
    from clip_triton.client import ClipClient

    *_, server, reference = standin_server
    tol = TOLERANCES["fp16"]
    with ClipClient(server.grpc_url) as client:
        images = client.embed_images(list(photos.values()))
        texts = client.embed_texts(PROMPTS)
    for served, ref in ((images, reference.images(list(photos.values()))), (texts, reference.texts(PROMPTS))):
        assert served.shape == ref.shape
        assert float(cos(served, ref).min()) >= tol["min_cosine"]
        assert float(np.abs(served - ref).max()) <= tol["max_abs_diff"]
    # A raw client asking for EMBEDDING alone: the refused item's row is NaN through the engine's graph.
    import tritonclient.grpc as grpcclient

    for model, name, items in (
        (C.IMAGE_ENSEMBLE, C.IMAGE_INPUT, [photos["cat"], b"not an image at all", photos["cat"]]),
        (C.TEXT_ENSEMBLE, C.TEXT_INPUT, [b"a cat", b"\xff", b"a dog"]),
    ):
        tensor = grpcclient.InferInput(name, [3, 1], "BYTES")
        tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            rows = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(C.EMBEDDING_OUTPUT)])
        rows = rows.as_numpy(C.EMBEDDING_OUTPUT)
        assert np.isnan(rows[1]).all() and not np.isnan(rows[[0, 2]]).any(), model


def test_gateway_stage_serves_in_front_of_the_twin(written_standins):
    """The gateway image's environment runs the gateway; compose's healthcheck for it passes."""
    from clip_triton.server import free_port

    *_, server, _ = written_standins
    port = free_port()
    argv = [*COMPOSE["services"]["gateway"]["command"]]
    argv = [a for a in argv if not a.startswith(("--host", "--port", "--url"))]
    argv += ["--host=127.0.0.1", f"--port={port}", f"--url={server.grpc_url}"]
    venv = stage_env("gateway")
    env = {**os.environ, "CLIP_TRITON_API_KEYS": "twin-key", "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    process = children.spawn(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        assert process.poll() is None, process.stderr.read().decode()
        check = COMPOSE["services"]["gateway"]["healthcheck"]["test"]
        assert check[0] == "CMD"
        result = run_in(venv, [c.replace("localhost:8080", f"127.0.0.1:{port}") for c in check[1:]], timeout=60)
        assert result.returncode == 0, result.stderr
    finally:
        os.killpg(process.pid, 9)
        process.wait()


def _triton_script(where: str) -> tuple[str, str]:
    """The Triton container's shell command as compose or the kubelet hands it to the shell (compose's
    $$ escaping undone; the kubelet's $(ENGINE_TAG) expanded), its check-engines step (run by the
    engines twin above) cut off, and the repository path it serves."""
    if where == "compose":
        command = COMPOSE["services"]["triton"]["command"]
        script, repo = command[2].replace("$$", "$"), "/models/current"
        assert script.startswith(f"clip-triton check-engines --repo {repo} &&")
    else:
        from .test_kubernetes import _container, by_kind_and_name

        docs = by_kind_and_name("overlays/production")
        command = _container(docs, "Deployment", "clip-triton-triton")["args"]
        tag = docs[("ConfigMap", "clip-triton-engine")]["data"]["ENGINE_TAG"]
        script, repo = command[2].replace("$(ENGINE_TAG)", tag), f"/models/{tag}"
        assert script.startswith(f"clip-triton check-engines --repo={repo} &&")
    assert command[:2] == ["sh", "-c"]
    return script.split("&&", 1)[1], repo


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_triton_service_command_runs_on_the_real_tritonserver(written_standins, tmp_path, where):
    """compose's triton command and the Kubernetes Deployment's, after compose's interpolation or the
    kubelet's, run by a shell with the real tritonserver (2.51, pip) on the stand-in repository: every
    flag parses, the admin APIs answer only with the key from CLIP_TRITON_ADMIN_KEY, inference stays
    open, the response cache answers a repeat."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from clip_triton.server import backend_directory, free_ports, pytriton_root

    _, repo, *_ = written_standins
    script, served = _triton_script(where)
    ports = free_ports(3)
    for default, port in zip((8000, 8001, 8002), ports):
        script = script.replace(f"-port={default}", f"-port={port}")
    script = script.replace(f"--model-repository={served}", f"--model-repository={repo}")
    # The command removes a killed predecessor's shared memory before it starts: a stand-in leftover under
    # a prefix of this test's own (so that the real rm cannot touch another server's regions here).
    from clip_triton.server import CONTAINER_SHM_PREFIX, SHM_DIR, release_shm, shm_regions

    prefix = f"{CONTAINER_SHM_PREFIX}{os.getpid()}{uuid.uuid4().hex[:8]}_"
    assert script.count(CONTAINER_SHM_PREFIX) == 2
    script = script.replace(CONTAINER_SHM_PREFIX, prefix)
    leftover = SHM_DIR / f"{prefix}left-by-a-killed-server"
    leftover.write_bytes(b"\0" * 4096)
    # The pip build needs its backend and cache folders named (the NGC image has them where Triton
    # looks by default: /opt/tritonserver/backends, /opt/tritonserver/caches/local).
    shim = tmp_path / "bin" / "tritonserver"
    shim.parent.mkdir()
    root = pytriton_root()
    shim.write_text(
        f"#!/bin/sh\nexport LD_LIBRARY_PATH={root.parent.parent / 'nvidia_pytriton.libs'}\n"
        f"exec {root / 'bin' / 'tritonserver'} --backend-directory={backend_directory()} "
        f"--cache-directory={root / 'caches'} "
        '--http-address=127.0.0.1 --grpc-address=127.0.0.1 --metrics-address=127.0.0.1 "$@"\n'
    )
    shim.chmod(0o755)
    from clip_triton.server import stub_pythonpath

    env = {
        **os.environ,
        "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
        "CLIP_TRITON_ADMIN_KEY": "k3y",
        "PYTHONPATH": stub_pythonpath(),
    }
    process = children.spawn(
        ["sh", "-c", script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 (not listening yet)
                pass
            time.sleep(0.5)
        assert process.poll() is None, "tritonserver refused compose's command line"
        with pytest.raises(InferenceServerException, match="(?i)restricted"):
            client.get_model_repository_index()
        assert client.get_model_repository_index(headers={"clip-triton-admin": "k3y"})
        assert client.is_model_ready("clip_image")
        # The response cache the command sizes (--cache-config) answers clip_text's repeated request.
        import numpy as np

        text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"a photo of a cat"]], dtype=object))
        first, second = (client.infer("clip_text", [text]).as_numpy("EMBEDDING") for _ in range(2))

        def hits() -> int:
            stats = client.get_inference_statistics(C.TEXT_CACHED)["model_stats"][0]["inference_stats"]
            return stats.get("cache_hit", {}).get("count", 0)

        assert settled(hits, 1) == 1 and np.array_equal(first, second)
        assert not leftover.exists() and shm_regions(prefix)  # removed; the server's own are named alike
    finally:
        client.close()
        with contextlib.suppress(ProcessLookupError):  # it may have exited: the assertion above says so
            os.killpg(process.pid, 9)
        process.wait()
        leftover.unlink(missing_ok=True)
        release_shm(prefix)  # what the next container start would do


def test_compose_up_twice_keeps_and_reuses_the_engines(fp16_export, tmp_path, monkeypatch):
    """The engines service's own command, run a second time in the engines image's environment: the
    validated engines of the first run are kept as they are (no TensorRT build, which this twin could
    not do), and Triton's /models/current still points at them."""
    from .gpu_twin import fake_gpu_env
    from .test_gpu_path import _fake_build

    env = fake_gpu_env(tmp_path / "gpu")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("TRT_VERSION", env["TRT_VERSION"])
    root = tmp_path / "models"
    E.deploy_engines(fp16_export, root, build=_fake_build([]))  # the first `up`, its GPU build stood in for
    served = (root / "current").resolve()
    command = COMPOSE["services"]["engines"]["command"]
    assert command[:2] == ["sh", "-c"]
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "current").symlink_to(fp16_export)  # the export service's folder for one model
    script = command[2].replace("$$", "$")  # as compose hands it to the container
    script = script.replace("/exports/", f"{tmp_path}/exports/").replace("--root /models", f"--root {root}")
    script = script.replace("/trt-cache/", f"{tmp_path}/")
    env = {k: v for k, v in env.items() if k != "CLIP_MODELS"}
    result = run_in(stage_env("engines"), ["sh", "-c", script], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reusing" in result.stdout + result.stderr
    assert (root / "current").resolve() == served and [p.name for p in (root / "builds").iterdir()] == [served.name]


def _openvino_repo(export: Path, out: Path) -> Path:
    return write_repository(out, onnx_dir=export, options=RepoOptions(runtime="openvino", cpu_precision="bf16"))


def test_the_openvino_repository_serves_under_the_backends_batching_rules(
    tiny_export, tmp_path, photos, open_clip_reference
):
    """Issue 26, section 4: what `clip-triton repo --runtime openvino` writes, each encoder swapped for
    a stand-in of Triton's OpenVINO backend that refuses what it refuses (tests/twin_openvino.py),
    loads in the real tritonserver and serves batches of every size and texts of every bucket."""
    import tritonclient.grpc as grpcclient

    from clip_triton.server import TritonServer

    from .gpu_twin import openvino_standin_repository
    from .helpers import cos

    ov = _openvino_repo(tiny_export, tmp_path / "ov")
    for tower in C.TOWERS:
        config = parse((ov / tower.model / "config.pbtxt").read_text())
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert list(config.input[0].dims)[0] == -1 and list(config.output[0].dims)[0] == -1
        assert all(w.batch_size == 1 for w in config.model_warmup)
    repo = openvino_standin_repository(ov, tiny_export, tmp_path / "standin")
    texts = ["a cat", "a photo of a dog on a sofa " * 5, "x " * 60]  # buckets 8, 32 and 77
    with (
        TritonServer(repo, log_file=tmp_path / "ov.log") as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        for model, name, items, reference in (
            (C.IMAGE_ENSEMBLE, C.IMAGE_INPUT, [photos["cat"]], open_clip_reference.images([photos["cat"]])),
            (C.IMAGE_ENSEMBLE, C.IMAGE_INPUT, list(photos.values()), open_clip_reference.images(list(photos.values()))),
            (C.TEXT_ENSEMBLE, C.TEXT_INPUT, [t.encode() for t in texts], open_clip_reference.texts(texts)),
        ):
            tensor = grpcclient.InferInput(name, [len(items), 1], "BYTES")
            tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
            rows = client.infer(model, [tensor]).as_numpy(C.EMBEDDING_OUTPUT)
            assert cos(rows, reference).min() >= 0.9999, model


def test_the_old_openvino_config_fails_to_load_in_the_twin(tiny_export, tmp_path):
    """The config before issue 26 (the encoders batching, max_batch_size 64, dynamic batching, warm-ups
    at batch 1 and 16): the backend compiles the model for 64 rows and refuses the warm-up of 1, so the
    load fails, as on a CPU node with the NGC image."""
    from clip_triton.errors import ClipTritonError
    from clip_triton.repository import render
    from clip_triton.server import TritonServer

    from .gpu_twin import openvino_standin_repository

    ov = _openvino_repo(tiny_export, tmp_path / "ov")
    for tower in C.TOWERS:
        path = ov / tower.model / "config.pbtxt"
        config = parse(path.read_text())
        config.max_batch_size = 64
        for field in (config.input, config.output):
            dims = list(field[0].dims)[1:]
            del field[0].dims[:]
            field[0].dims.extend(dims)
        config.dynamic_batching.preferred_batch_size.extend([16, 32, 64])
        for warm in config.model_warmup:
            (data,) = warm.inputs.values()
            warm.batch_size = data.dims[0]
            dims = list(data.dims)[1:]
            del data.dims[:]
            data.dims.extend(dims)
        path.write_text(render(config))
    repo = openvino_standin_repository(ov, tiny_export, tmp_path / "standin")
    # Up to three starts, as for the TensorRT twin's old config: tritonserver can exit (-11) before it
    # logs the refused warm-up; the stand-in writes its refusal to the same file first (twin_standin.said).
    for attempt in range(3):
        log = tmp_path / f"old{attempt}.log"
        with pytest.raises(ClipTritonError, match="exited") as caught:
            TritonServer(repo, log_file=log).start(timeout=300)
        if "expected requests with batch size" in log.read_text():
            break
    assert "expected requests with batch size '64', got '1'" in log.read_text(), str(caught.value)
