"""GPU-less twins of the GPU stages (helpers for tests/test_gpu_twin.py and tests/test_gpu_path.py).

Nothing here pretends to be a GPU beyond the narrowest boundary: Polygraphy's own host-side code runs
with only the device copy substituted, the Dockerfile's own install lines build each stage's
environment, and the real tritonserver loads the TensorRT repository with python stand-ins of
identical I/O.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shlex
import subprocess
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# The python of each NGC image of the pinned release (25.10: Ubuntu 24.04, Python 3.12) and of the
# python:3.11 images; pyenv has these here.
PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
BASE_IMAGE_PACKAGES = ".base-image-packages.json"
TWIN_CACHE = Path(os.environ.get("CLIP_TRITON_TWIN_CACHE", Path.home() / ".cache" / "clip-triton-twin"))


# ---------------------------------------------------------------------------------------------
# Engine runner: Polygraphy's host-copy path, device copy substituted
# ---------------------------------------------------------------------------------------------
class _HostMemcpy:
    """Stands in for Polygraphy's CUDA wrapper: "device" memory is host memory, cudaMemcpy is memmove."""

    def memcpy(self, dst, src, nbytes, kind, stream_ptr=None):
        ctypes.memmove(dst, src, nbytes)


class _Stream:
    ptr = 0

    def synchronize(self):
        pass


class PolygraphyHostTwin:
    """TrtRunner's output path with the GPU substituted.

    ``compute(feed)`` plays the engine (its result is the "device" output buffer). The copy to the host
    and the view handed back are Polygraphy's own code (``_get_array_on_cpu`` into the runner's
    persistent ``host_output_buffers``, then ``util.array.view``), so outputs alias the same host
    buffer from one ``infer`` to the next exactly as they do on a GPU.
    """

    def __init__(self, compute: Callable[[dict], np.ndarray], output_name: str = "embedding"):
        self.compute, self.output_name = compute, output_name
        self.host_output_buffers: dict = {}
        self.profile = 0  # TrtRunner's active optimisation profile (its default: the first)
        self.profiles_used: list[tuple[int, tuple[int, ...]]] = []  # (profile, input shape) per infer
        self._device = None
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        from unittest import mock

        from polygraphy import cuda

        self._stack.enter_context(mock.patch.object(cuda, "wrapper", lambda: _HostMemcpy()))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def set_profile(self, index: int) -> None:
        """``TrtRunner.set_profile``: which optimisation profile the next ``infer`` runs in."""
        self.profile = index

    def infer(self, feed_dict: dict) -> OrderedDict:
        from polygraphy import cuda, util

        self.profiles_used.append((self.profile, next(iter(feed_dict.values())).shape))
        from polygraphy.backend.trt import runner
        from polygraphy.datatype import DataType

        out = np.ascontiguousarray(self.compute(feed_dict), dtype=np.float32)
        self._device = out  # the output allocator's device buffer, alive until the next call
        view = cuda.DeviceView(out.ctypes.data, (out.nbytes,), DataType.UINT8)
        raw = runner._get_array_on_cpu(
            view, self.output_name, self.host_output_buffers, _Stream(), out.nbytes, use_torch=False
        )
        return OrderedDict({self.output_name: util.array.view(raw, DataType.FLOAT32, out.shape)})


def fake_gpu_env(
    folder: Path, gpu: str = "NVIDIA H200", capability: str = "9.0", tensorrt: str = "10.13.3.9"
) -> dict[str, str]:
    """Environment of a GPU host as clip-triton sees it: ``nvidia-smi`` answers for one GPU (a script
    printing its CSV query, the GPU boundary) and ``TRT_VERSION`` is set as in NGC TensorRT images."""
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{gpu}, {capability}'\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "TRT_VERSION": tensorrt}


# ---------------------------------------------------------------------------------------------
# Image stages: each Dockerfile stage's environment, built from the Dockerfile's own install lines
# ---------------------------------------------------------------------------------------------
# What a base image already holds before our lines run, from Triton's own image recipes at v2.62.0
# (release 25.10): build.py installs "numpy<2" and virtualenv for the python backend into the
# tritonserver image (dockerfile_prepare_container_linux); Dockerfile.sdk installs "numpy<2", pillow,
# attrdict, "grpcio<1.68", the release's tritonclient[all] wheel, then genai-perf (unpinned there:
# 0.0.16, the last release, here). Our install lines must work on top of exactly that, and leave every
# preinstalled package's requirements met (test_gpu_twin: `pip check`). What this cannot model: the
# versions pip resolved on the image's build day (the twin resolves today's within the same specs), and
# the TensorRT image's own Python packages (the TensorRT bindings and their CUDA libraries: gigabytes,
# and the twin's engines stage never imports tensorrt).
PREINSTALLED = {  # one pip run per RUN line of the recipe, in its order (genai-perf then lifts numpy)
    "triton": (("numpy<2", "virtualenv"),),
    "sdk": (("grpcio<1.68",), ("numpy<2", "pillow", "attrdict", "tritonclient[all]==2.62.0"), ("genai-perf==0.0.16",)),
}
SOURCE = "/opt/clip-triton"  # where the `source` stage puts the package in every image


class Stage:
    def __init__(self, name: str, base: str):
        self.name, self.base, self.runs, self.env = name, base, [], {}

    @property
    def python(self) -> str:
        """The Python of the base image: NGC 25.10 images are Ubuntu 24.04 (3.12); python:X.Y-* is X.Y."""
        if self.base.startswith("nvcr.io/nvidia/"):
            return "3.12"
        found = re.match(r"python:(\d+\.\d+)", self.base)
        assert found, f"unknown base image {self.base}"
        return found.group(1)

    def pip_installs(self) -> list[list[str]]:
        """Every `pip install` of the stage's RUN lines, as argv, with the package path mapped to here."""
        found = []
        for run in self.runs:
            for part in run.split("&&"):
                argv = shlex.split(part)
                if argv[:2] in (["pip", "install"], ["pip3", "install"]):
                    found.append([a.replace(SOURCE, str(ROOT)) for a in argv])
        return found

    def other_commands(self) -> list[str]:
        return [
            part.strip()
            for run in self.runs
            for part in run.split("&&")
            if shlex.split(part)[:2] not in (["pip", "install"], ["pip3", "install"])
        ]

    def constraints(self) -> list[Path]:
        return [Path(argv[argv.index("-c") + 1]) for argv in self.pip_installs() if "-c" in argv]


def dockerfile_stages(text: str | None = None) -> dict[str, Stage]:
    text = text if text is not None else DOCKERFILE.read_text()
    joined = re.sub(r"\\\n", " ", text)  # continuation lines
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", joined, flags=re.M))
    stages: dict[str, Stage] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            _, base, _, name = line.split()
            for key, value in args.items():
                base = base.replace("${" + key + "}", value)
            current = stages[name] = Stage(name, base)
        elif line.startswith("RUN ") and current is not None:
            current.runs.append(line[4:].strip())
        elif line.startswith("ENV ") and current is not None:
            key, _, value = line[4:].partition("=")
            current.env[key.strip()] = value.strip()
    return stages


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
    return digest.hexdigest()[:16]


def stage_python_binary(version: str) -> Path:
    candidates = sorted(PYENV.glob(f"{version}.*"))
    if not candidates:
        raise FileNotFoundError(f"no Python {version} under {PYENV} (pyenv install {version})")
    return candidates[-1] / "bin" / "python3"


def stage_environment(stage: Stage, log=print) -> Path:
    """A virtualenv on the stage's Python holding what the image would: the base image's packages,
    then the stage's own `pip install` lines, run as written (the package path mapped to this checkout).

    Cached by everything that decides its contents except the package's own source, which is
    reinstalled (without dependencies) on every call so the twin tests the code in this checkout.
    """
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    key = _digest(
        stage.python,
        PREINSTALLED.get(stage.name, ()),
        stage.pip_installs(),
        pyproject,
        *(path.read_bytes() for path in stage.constraints()),
    )
    venv = TWIN_CACHE / f"{stage.name}-py{stage.python}-{key}"
    python = venv / "bin" / "python"
    env = {**os.environ, **stage.env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if not (venv / ".complete").is_file():
        log(f"[twin] building the {stage.name} stage's environment (Python {stage.python}) in {venv}")
        subprocess.run(["rm", "-rf", str(venv)], check=True)
        subprocess.run([str(stage_python_binary(stage.python)), "-m", "venv", str(venv)], check=True)
        for line in PREINSTALLED.get(stage.name, ()):
            subprocess.run([str(python), "-m", "pip", "install", "-q", *line], check=True, env=env)
        (venv / BASE_IMAGE_PACKAGES).write_text(json.dumps(installed(venv)))
        for argv in stage.pip_installs():
            subprocess.run([str(python), "-m", *argv], check=True, env=env, cwd=ROOT)
        (venv / ".complete").write_text("\n".join(" ".join(argv) for argv in stage.pip_installs()) + "\n")
    else:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)],
            check=True,
            env=env,
            cwd=ROOT,
        )
    return venv


def installed(venv: Path) -> dict[str, str]:
    """{normalised name: version} of what a stage environment holds."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        name, _, version = line.partition("==")
        found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


NOT_PINNED = {"pip", "setuptools", "wheel", "clip-triton"}


def added_by_stage(venv: Path) -> dict[str, str]:
    """What the stage's own lines installed or changed on top of the base image's packages."""
    before = json.loads((venv / BASE_IMAGE_PACKAGES).read_text())
    return {
        name: version
        for name, version in installed(venv).items()
        if before.get(name) != version and name not in NOT_PINNED
    }


def read_constraints(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def write_stage_constraints(stage: Stage) -> Path:
    """Regenerate requirements/docker/<stage>.txt from what the stage's lines install (a maintainer's
    step after changing dependencies: `python -m tests.gpu_twin`; the drift test says when)."""
    venv = stage_environment(stage)
    path = ROOT / "requirements" / "docker" / f"{stage.name}.txt"
    header = (
        f"# Constraints of the `{stage.name}` image ({stage.base}, Python {stage.python}): what its pip line\n"
        "# installs on top of the base image, resolved by tests/gpu_twin.py (python -m tests.gpu_twin).\n"
    )
    pins = sorted(f"{name}=={version}" for name, version in added_by_stage(venv).items())
    path.write_text(header + "\n".join(pins) + "\n")
    return path


def run_in(venv: Path, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command with only that environment on PATH first (as the image's shell would)."""
    env = {**kwargs.pop("env", os.environ), "VIRTUAL_ENV": str(venv)}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    # A neutral working directory, as in the image: from this checkout's root, `python -c` would import
    # the source tree's clip_triton instead of the installed package.
    kwargs.setdefault("cwd", venv)
    return subprocess.run(argv, capture_output=True, text=True, env=env, **kwargs)


if __name__ == "__main__":  # pragma: no cover - maintainer's tool
    for _name, _stage in dockerfile_stages().items():
        if _stage.base.startswith("nvcr.io/") and any("requirements/docker" in str(c) for c in _stage.constraints()):
            print(write_stage_constraints(_stage))


# ---------------------------------------------------------------------------------------------
# Triton: the TensorRT repository with each engine swapped for a stand-in of identical I/O
# ---------------------------------------------------------------------------------------------
def standin_repository(trt_repo: Path, onnx_dir: Path, out: Path) -> Path:
    """Copy a TensorRT repository and replace each ``tensorrt_plan`` encoder by a python-backend model
    with the identical config I/O (inputs, outputs, dtypes, dims, max_batch_size, batching), running
    the export's graph with ONNX Runtime. Only the engine is substituted: the ensembles, preprocess
    and tokenizer models, parameters and folder layout are the repository's own. The GPU instance
    group becomes CPU (the pip tritonserver has no GPU)."""
    import shutil

    from clip_triton.contract import ENCODER_ONNX_FILE, TOWERS, ModelContract
    from clip_triton.export.engines import ENGINE_MANIFEST, recorded_profiles
    from clip_triton.repository import _place_graph, parse, python_entry_point, render

    from .twin_standin import PROFILES_PARAMETER

    shutil.copytree(trt_repo, out)
    contract = parse((out / TOWERS[0].front / "config.pbtxt").read_text()).parameters["contract"].string_value
    for tower in TOWERS:
        name, graph = tower.model, tower.onnx_file
        config = parse((out / name / "config.pbtxt").read_text())
        assert config.platform == "tensorrt_plan", f"{name} is not a TensorRT model in {trt_repo}"
        config.platform, config.default_model_filename, config.backend = "", "", "python"
        # The engine's profiles (its engine.json, or what build-engines would record) and the ones the
        # instance group lists: the stand-in serves only those, as the TensorRT backend does. Triton
        # refuses a `profile` list on any other platform, so it travels as a parameter.
        record = trt_repo / name / "1" / ENGINE_MANIFEST
        profiles = (
            json.loads(record.read_text())["profiles"]
            if record.is_file()
            else recorded_profiles(ModelContract.from_json(contract), tower.name)
        )
        listed = [p for group in config.instance_group for p in group.profile]
        config.parameters[PROFILES_PARAMETER].string_value = json.dumps({"profiles": profiles, "listed": listed})
        for key, value in {
            "graph_file": ENCODER_ONNX_FILE,
            "contract": contract,  # a python-backend encoder reads it (a TensorRT one does not carry it)
            "cpu_runtime": "onnxruntime",
            "compute_precision": "fp32",
            "threads": "1",
        }.items():
            config.parameters[key].string_value = value
        for group in config.instance_group:
            group.kind = group.KIND_CPU
            del group.profile[:]
        (out / name / "config.pbtxt").write_text(render(config))
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "1" / "model.py").write_text(python_entry_point("tests.twin_standin"))
        _place_graph(onnx_dir, graph, out / name / "1")
    return out


def io_signature(config) -> dict:
    """What clients and the ensembles see of a model: the part a stand-in must keep identical."""
    from google.protobuf import json_format

    return {
        "max_batch_size": config.max_batch_size,
        "input": [json_format.MessageToDict(t) for t in config.input],
        "output": [json_format.MessageToDict(t) for t in config.output],
        "dynamic_batching": json_format.MessageToDict(config.dynamic_batching),
    }


def validate_export_through_twin(export_dir: Path, transform=None) -> dict:
    """build-engines' validation step (``validate_plan``) on an export's references, each tower's
    "engine" computed by ONNX Runtime from the export's own graphs through :class:`PolygraphyHostTwin`
    (its output passed through ``transform`` when given: an engine that computes something else).
    Returns ``{tower: (checks, profiles, twin)}``; the caller asserts."""
    import onnxruntime as ort

    from clip_triton.contract import ModelContract
    from clip_triton.export import engines
    from clip_triton.export.pipeline import REFERENCES, load_references, read_manifest

    contract = ModelContract.from_dict(read_manifest(export_dir)["contract"])
    references = load_references(Path(export_dir) / REFERENCES)
    results = {}
    for tower in ("vision", "text"):
        session = ort.InferenceSession(str(Path(export_dir) / f"{tower}.onnx"), providers=["CPUExecutionProvider"])
        profiles = engines.profiles_for(contract, tower)
        twin = PolygraphyHostTwin(lambda feed, s=session: (transform or (lambda out: out))(s.run(None, feed)[0]))
        checks = engines.validate_plan(tower, Path("unused.plan"), profiles, contract, references[tower], runner=twin)
        results[tower] = (checks, profiles, twin)
    return results


def openvino_standin_repository(ov_repo: Path, onnx_dir: Path, out: Path) -> Path:
    """Copy an OpenVINO repository (`clip-triton repo --runtime openvino`) and replace each ``openvino``
    encoder by tests/twin_openvino.py's stand-in with the identical config (max_batch_size, dims,
    batching, warm-ups, the backend's own parameters), running the export's ONNX graph."""
    import shutil

    from clip_triton.contract import ENCODER_ONNX_FILE, TOWERS
    from clip_triton.repository import _place_graph, parse, python_entry_point, render

    shutil.copytree(ov_repo, out)
    contract = parse((out / TOWERS[0].front / "config.pbtxt").read_text()).parameters["contract"].string_value
    for tower in TOWERS:
        config = parse((out / tower.model / "config.pbtxt").read_text())
        assert config.backend == "openvino", f"{tower.model} is not an OpenVINO model in {ov_repo}"
        config.backend, config.default_model_filename = "python", ""
        for key, value in {
            "graph_file": ENCODER_ONNX_FILE,
            "contract": contract,
            "cpu_runtime": "onnxruntime",
            "compute_precision": "fp32",
            "threads": "1",
        }.items():
            config.parameters[key].string_value = value
        (out / tower.model / "config.pbtxt").write_text(render(config))
        version = out / tower.model / "1"
        for stale in version.iterdir():
            stale.unlink()
        (version / "model.py").write_text(python_entry_point("tests.twin_openvino"))
        _place_graph(onnx_dir, tower.onnx_file, version)
    return out
