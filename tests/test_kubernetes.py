"""deploy/k8s renders with `kubectl kustomize` (offline) and carries what a GPU deployment needs.

The manifest checks read the committed renders (tests/k8s_rendered, in-process: the fast tier); one
integration test re-renders them with kubectl and fails on drift (`python -m tests.k8s_render`)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .k8s_render import TARGETS, kustomize, rendered_path

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
TRITON = {"app.kubernetes.io/name": "clip-triton-triton"}
GATEWAY = {"app.kubernetes.io/name": "clip-triton-gateway"}


def render(target: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered_path(target).read_text()) if doc]


@pytest.mark.integration
@pytest.mark.parametrize("target", TARGETS)
def test_committed_renders_are_what_kubectl_renders(target):
    assert rendered_path(target).read_text() == kustomize(target), (
        f"deploy/k8s changed: run `python -m tests.k8s_render` and commit {rendered_path(target).name}"
    )


def by_kind_and_name(target: str) -> dict:
    found = {}
    for doc in render(target):
        found[
            (
                doc["kind"],
                doc["metadata"]["name"].rsplit("-", 1)[0] if doc["kind"] == "ConfigMap" else doc["metadata"]["name"],
            )
        ] = doc
    found["_target"] = target
    return found


@pytest.fixture(scope="module", params=TARGETS)
def docs(request) -> dict:
    return by_kind_and_name(request.param)


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def triton(docs) -> dict:
    return pod_spec(docs[("Deployment", "clip-triton-triton")])["containers"][0]


def test_triton_requests_a_gpu_and_resources(docs):
    resources = triton(docs)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    tolerations = pod_spec(docs[("Deployment", "clip-triton-triton")])["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_shared_memory_is_memory_backed(docs):
    spec = pod_spec(docs[("Deployment", "clip-triton-triton")])
    dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton(docs)["volumeMounts"]


def test_probes_and_termination(docs):
    container = triton(docs)
    startup, ready, live = container["startupProbe"], container["readinessProbe"], container["livenessProbe"]
    assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == "/v2/health/ready"
    assert live["exec"]["command"][:2] == ["clip-triton", "health"]  # canary: a dead python stub fails it
    # ... and busy is not dead: the probe reads the success counters when the canary is slow.
    assert "--metrics-url=http://localhost:8002/metrics" in live["exec"]["command"]
    assert live["timeoutSeconds"] > 10  # the canary's own deadline plus the metrics reads
    assert "--url=localhost:8001" in live["exec"]["command"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # multi-GB engines load
    spec = pod_spec(docs[("Deployment", "clip-triton-triton")])
    assert spec["terminationGracePeriodSeconds"] >= 30
    assert container["lifecycle"]["preStop"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_ports_match_the_triton_command_line(docs):
    container = triton(docs)
    command = " ".join(container["args"])
    flags = {name: int(port) for name, port in re.findall(r"--(http|grpc|metrics)-port=(\d+)", command)}
    assert flags == {p["name"]: p["containerPort"] for p in container["ports"]}
    assert "--model-control-mode=none" in command
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    for service in ("clip-triton-triton", "clip-triton-triton-grpc"):
        for port in docs[("Service", service)]["spec"]["ports"]:
            assert port["targetPort"] in by_name and by_name[port["targetPort"]] == port["port"]


def test_services_and_selectors_match_pod_labels(docs):
    labels = docs[("Deployment", "clip-triton-triton")]["spec"]["template"]["metadata"]["labels"]
    assert docs[("Deployment", "clip-triton-triton")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind, name in (("Service", "clip-triton-triton"), ("Service", "clip-triton-triton-grpc")):
        assert docs[(kind, name)]["spec"]["selector"].items() <= labels.items()
    assert (
        docs[("PodDisruptionBudget", "clip-triton-triton")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    )
    assert docs[("NetworkPolicy", "clip-triton-triton")]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    grpc = docs[("Service", "clip-triton-triton-grpc")]["spec"]
    assert grpc["clusterIP"] == "None" and [p["name"] for p in grpc["ports"]] == ["grpc"]
    http = docs[("Service", "clip-triton-triton")]["spec"]
    assert sorted(p["name"] for p in http["ports"]) == ["http", "metrics"]
    gateway = docs[("Deployment", "clip-triton-gateway")]
    assert (
        docs[("Service", "clip-triton-gateway")]["spec"]["selector"].items()
        <= gateway["spec"]["template"]["metadata"]["labels"].items()
    )
    env = {e["name"]: e.get("value") for e in pod_spec(gateway)["containers"][0]["env"]}
    assert env["CLIP_TRITON_URL"] == "dns:///clip-triton-triton-grpc:8001"


def test_network_policy_admits_only_gateway_labelled_clients_and_monitoring(docs):
    """The gateway and pods labelled as clients reach gRPC (docs tell in-cluster clients to dial
    dns:///clip-triton-triton-grpc:8001, which the policy refused before issue 26); monitoring, metrics."""
    rules = docs[("NetworkPolicy", "clip-triton-triton")]["spec"]["ingress"]
    assert len(rules) == 3
    sources = [rule["from"][0] for rule in rules]
    assert sources[0]["podSelector"]["matchLabels"] == GATEWAY
    assert sources[1] == {"namespaceSelector": {}, "podSelector": {"matchLabels": {"clip-triton.io/client": "true"}}}
    assert sources[2]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert [sorted(p["port"] for p in rule["ports"]) for rule in rules] == [[8001], [8001], [8002]]
    assert "clip-triton.io/client" in (ROOT / "docs" / "kubernetes.md").read_text()


def test_gateway_egress_reaches_only_triton_dns_and_public_web(docs):
    policy = docs[("NetworkPolicy", "clip-triton-gateway")]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    to_triton, dns, web = policy["egress"]
    assert to_triton["to"][0]["podSelector"]["matchLabels"] == TRITON and to_triton["ports"] == [
        {"protocol": "TCP", "port": 8001}
    ]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert sorted(p["port"] for p in web["ports"]) == [80, 443]
    v4 = web["to"][0]["ipBlock"]
    assert v4["cidr"] == "0.0.0.0/0" and {
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "127.0.0.0/8",
    } <= set(v4["except"])
    assert {"fc00::/7", "fe80::/10"} <= set(web["to"][1]["ipBlock"]["except"])


def test_every_pod_is_hardened(docs):
    """Non-root, no privilege escalation, no capabilities, read-only root filesystem, the runtime's
    seccomp profile, and no service-account token (nothing here talks to the Kubernetes API)."""
    for kind, name in (
        ("Deployment", "clip-triton-triton"),
        ("Deployment", "clip-triton-gateway"),
        ("Job", "clip-triton-build"),
        ("Job", "clip-triton-export"),
    ):
        spec = pod_spec(docs[(kind, name)])
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], (name, container["name"])


def test_triton_admin_apis_are_restricted_as_serve_restricts_them(docs):
    from clip_triton.server import ADMIN_APIS, ADMIN_HEADER

    command = " ".join(triton(docs)["args"])
    rule = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}=$ADMIN_KEY"
    assert f"--http-restricted-api={rule}" in command and f"--grpc-restricted-protocol={rule}" in command
    env = {e["name"]: e for e in triton(docs)["env"]}
    assert env["CLIP_TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_build_job_writes_what_triton_serves_on_the_same_gpu(docs):
    job, deployment = docs[("Job", "clip-triton-build")], docs[("Deployment", "clip-triton-triton")]
    builder = pod_spec(job)["containers"][0]
    assert builder["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--repo=/models/$(ENGINE_TAG)" in " ".join(builder["args"])
    assert "--model-repository=/models/$(ENGINE_TAG)" in " ".join(triton(docs)["args"])
    assert pod_spec(job)["nodeSelector"] == pod_spec(deployment)["nodeSelector"]  # engines are GPU-specific
    configmap = docs[("ConfigMap", "clip-triton-engine")]["metadata"]["name"]
    for container in (builder, triton(docs)):
        assert container["envFrom"][0]["configMapRef"]["name"] == configmap  # hashed name: rollouts follow it
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for d in (job, deployment)
        for v in pod_spec(d)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"clip-triton-models", "clip-triton-exports"}
    assert docs[("PersistentVolumeClaim", "clip-triton-models")]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_export_holds_no_gpu_and_keeps_its_work_on_a_volume(docs):
    """Issue 26: the export ran as the GPU Job's init container, holding a GPU for the hour bigG takes
    on the CPU, and its /exports and Hugging Face cache were emptyDir, so every rerun downloaded ~10 GB
    and exported again. Now it is its own Job on any node, writing to a ReadWriteMany volume that the
    build Job reads; the build Job waits for it between tries, not in a pod."""
    export, build = docs[("Job", "clip-triton-export")], docs[("Job", "clip-triton-build")]
    spec = pod_spec(export)
    (container,) = spec["containers"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"]) and "nodeSelector" not in spec
    assert "tolerations" not in spec
    assert "--onnx-dir=/exports/$(ENGINE_TAG) --reuse" in " ".join(container["args"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HOME"].startswith("/exports/")  # the weights stay on the volume
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["exports"]["persistentVolumeClaim"]["claimName"] == "clip-triton-exports"
    assert "initContainers" not in pod_spec(build)
    build_volumes = {v["name"]: v for v in pod_spec(build)["volumes"]}
    assert build_volumes["exports"]["persistentVolumeClaim"] == {"claimName": "clip-triton-exports", "readOnly": True}
    assert docs[("PersistentVolumeClaim", "clip-triton-exports")]["spec"]["accessModes"] == ["ReadWriteMany"]
    # Waiting for the export: exit 75 and Kubernetes' backoff (no pod, no GPU between tries); any other
    # failure fails the Job at once instead of rebuilding bigG on the GPU again.
    assert build["spec"]["backoffLimit"] >= 20
    (rule,) = build["spec"]["podFailurePolicy"]["rules"]
    assert rule == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "engines", "operator": "NotIn", "values": [75]},
    }
    # The first install applies the build resources alone first (docs/kubernetes.md): all carry the label.
    for key in (("Job", "clip-triton-export"), ("Job", "clip-triton-build"), ("ConfigMap", "clip-triton-engine")):
        assert docs[key]["metadata"]["labels"]["app.kubernetes.io/component"] == "build", key
    for claim in ("clip-triton-models", "clip-triton-exports"):
        assert docs[("PersistentVolumeClaim", claim)]["metadata"]["labels"]["app.kubernetes.io/component"] == "build"
    assert "app.kubernetes.io/component" not in docs[("Deployment", "clip-triton-triton")]["metadata"].get("labels", {})


def test_autoscaling_and_monitoring(docs):
    if docs["_target"] == "overlays/no-operators":
        assert ("ScaledObject", "clip-triton-triton") not in docs and ("PodMonitor", "clip-triton-triton") not in docs
        return
    scaled = docs[("ScaledObject", "clip-triton-triton")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "clip-triton-triton"
    assert "nv_inference_queue_duration_us" in scaled["triggers"][0]["metadata"]["query"]
    monitor = docs[("PodMonitor", "clip-triton-triton")]["spec"]
    assert monitor["selector"]["matchLabels"] == TRITON and monitor["podMetricsEndpoints"][0]["port"] == "metrics"
    # kube-prometheus-stack's default Prometheus selects PodMonitors by `release: <Helm release>`:
    # without the label this one is ignored and KEDA sees no metric (issue 26)
    assert docs[("PodMonitor", "clip-triton-triton")]["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_podmonitor_release_label_is_set_in_one_documented_place():
    overlay = (K8S / "overlays" / "production" / "kustomization.yaml").read_text()
    assert "path: /metadata/labels/release" in overlay and "helm list -A" in overlay
    assert "release: <" in (ROOT / "docs" / "kubernetes.md").read_text()


def test_production_overlay_pins_images_gpu_and_namespace():
    docs = render("overlays/production")
    images = {
        c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
        for c in d["spec"]["template"]["spec"].get("containers", [])
        + d["spec"]["template"]["spec"].get("initContainers", [])
    }
    assert images and all(i.startswith("registry.example.com/") and not i.endswith(":latest") for i in images)
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"clip-triton"}
    selectors = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"].get("nodeSelector", {})
        for d in docs
        if d["kind"] in ("Job", "Deployment")
    }
    for name in ("clip-triton-build", "clip-triton-triton"):  # engines built on the GPU product that serves them
        assert selectors[name]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3", name
    assert "nvidia.com/gpu.product" not in selectors["clip-triton-export"]  # the export runs on any node


def _container(docs, kind: str, name: str) -> dict:
    return pod_spec(docs[(kind, name)])["containers"][0]


def test_ngc_containers_keep_the_image_entrypoint(docs):
    """`command` would replace /opt/nvidia/nvidia_entrypoint.sh (CUDA forward compatibility): the NGC
    images get their shell command as args only."""
    for kind, name in (("Deployment", "clip-triton-triton"), ("Job", "clip-triton-build")):
        container = _container(docs, kind, name)
        assert "command" not in container, name
        assert container["args"][:2] == ["sh", "-c"]


def test_keda_scales_on_the_value_of_an_average(docs):
    if docs["_target"] == "overlays/no-operators":
        assert not any(key[0] in ("ScaledObject", "PodMonitor") for key in docs if key != "_target")
        return
    trigger = docs[("ScaledObject", "clip-triton-triton")]["spec"]["triggers"][0]
    # The query is one cluster-wide average: Value makes the HPA scale current replicas by
    # value/target; the default AverageValue would ignore how many pods already run.
    assert trigger["metricType"] == "Value"
    assert "/ clamp_min(sum(rate(nv_inference_request_success" in trigger["metadata"]["query"]


KUBERNETES_VERSION = "1.31.0"


def test_manifests_pass_strict_schema_validation(docs):
    import kubernetes_validate

    passed, failures = [], []
    for key, doc in docs.items():
        if key == "_target":
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            passed.append(doc["metadata"]["name"])
        except kubernetes_validate.SchemaNotFoundError:
            continue  # a custom resource: checked against its CRD below
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{doc['kind']} {doc['metadata']['name']}: {exc.message}")
    assert not failures, failures
    builtin = [
        d
        for k, d in docs.items()
        if k != "_target"
        and "." not in d["apiVersion"].split("/")[0]
        or k != "_target"
        and d["apiVersion"].split("/")[0].endswith("k8s.io")
    ]
    assert len(passed) == len(builtin) and len(passed) >= 8, passed
    broken = json.loads(json.dumps(docs[("Deployment", "clip-triton-triton")]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"] = "8001"  # the validator can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.integration
def test_custom_resources_pass_their_crd_schemas(docs):
    """KEDA's ScaledObject and the Prometheus Operator's PodMonitor, against schemas generated from
    their CRDs (tests/crd: @kubernetes-models, pinned by package-lock.json; dev.sh installs them)."""
    crd = ROOT / "tests" / "crd"
    assert (crd / "node_modules").is_dir() and shutil.which("node"), "run `bash dev.sh install` (npm ci in tests/crd)"
    custom = [
        d
        for k, d in docs.items()
        if k != "_target" and d["apiVersion"].split("/")[0] in ("keda.sh", "monitoring.coreos.com")
    ]
    result = subprocess.run(
        ["node", str(crd / "validate.mjs")], input=yaml.safe_dump_all(custom), capture_output=True, text=True
    )
    verdicts = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and all(v["passed"] for v in verdicts), result.stdout + result.stderr
    assert len(verdicts) == len(custom) == (0 if docs["_target"] == "overlays/no-operators" else 2)


@pytest.mark.integration
def test_crd_validation_rejects_a_broken_scaled_object():
    broken = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": 5}, "triggers": "prometheus"},
    }
    result = subprocess.run(
        ["node", str(ROOT / "tests" / "crd" / "validate.mjs")],
        input=yaml.safe_dump(broken),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "must be" in result.stdout


# -- the build Job's script, run for real -------------------------------------------------------
BUILD_SHIM = '''#!{python}
"""clip-triton with `build-engines` standing in for the GPU step (TensorRT needs a GPU): it writes what
a successful build leaves behind. Every other subcommand is the real CLI."""
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
from clip_triton.cli import build_parser, check_combinations, main
if args[:1] != ["build-engines"]:
    sys.exit(main(args))
parser = build_parser()
check_combinations(parser, parser.parse_args(args))  # the Job's build-engines line, as the shell expanded it
if os.environ.get("SHIM_BUILD_FAILS"):
    print("engine validation failed", file=sys.stderr)
    sys.exit(3)
values = lambda flag: [a.split("=", 1)[1] for a in args[1:] if a.startswith(flag + "=")]
from clip_triton import contract as C
from clip_triton.export import engines as E
from clip_triton.repository import served_exports
platform = E.Platform(os.environ["TRT_VERSION"], "NVIDIA H200", "9.0")
dirs, names = values("--onnx-dir"), values("--served-model-name")
for served in served_exports(list(zip(dirs, names or [None] * len(dirs)))):
  for tower in C.TOWERS:
    folder = Path(values("--repo")[0]) / served.names.encoder(tower) / "1"
    (folder / C.PLAN_FILE).write_bytes(b"engine")
    (folder / E.ENGINE_MANIFEST).write_text(json.dumps({{
        "platform": {{"tensorrt": platform.tensorrt, "gpu": platform.gpu, "compute_capability": "9.0"}},
        "onnx": E.graph_identity(served.onnx_dir, tower.name),
        "profiles": E.recorded_profiles(served.facts.contract, tower.name),
        "validation": {{"passed": True, "checks": [{{"min_cosine": 0.9999, "passed": True}}]}}}}))
print("built", values("--repo")[0])
'''


def _job_script(docs, tmp_path: Path) -> tuple[str, str]:
    builder = _container(docs, "Job", "clip-triton-build")
    tag = docs[("ConfigMap", "clip-triton-engine")]["data"]["ENGINE_TAG"]
    script = builder["args"][2].replace("$(ENGINE_TAG)", tag)  # the kubelet expands $(VAR) in args
    return script.replace("/models/", f"{tmp_path}/models/").replace("/exports/", f"{tmp_path}/exports/"), tag


def test_build_job_is_idempotent_and_swaps_in_only_validated_engines(tiny_export, tmp_path):
    from .gpu_twin import fake_gpu_env

    script, tag = _job_script(by_kind_and_name("base"), tmp_path)
    shutil.copytree(tiny_export, tmp_path / "exports" / tag)
    (tmp_path / "models").mkdir()
    env = fake_gpu_env(tmp_path / "bin")
    shim = tmp_path / "bin" / "clip-triton"
    shim.write_text(BUILD_SHIM.format(python=sys.executable))
    shim.chmod(0o755)

    def run(**extra):
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={**env, **extra}, timeout=300)

    live = tmp_path / "models" / tag
    first = run()
    assert first.returncode == 0, first.stderr
    plan = live / "vision_encoder" / "1" / "model.plan"
    assert plan.is_file() and sorted(p.name for p in (tmp_path / "models").iterdir()) == [tag]
    before = plan.stat().st_ino, plan.stat().st_mtime_ns
    second = run()  # re-applying the kustomization: same graphs, TensorRT and GPU
    assert second.returncode == 0 and "are current: nothing to rebuild" in second.stdout, second.stderr
    assert (plan.stat().st_ino, plan.stat().st_mtime_ns) == before  # the live folder was not touched
    shutil.move(tmp_path / "exports" / tag, tmp_path / "exports" / "aside")  # no export (yet): exit 75, untouched
    waiting = run()
    assert waiting.returncode == 75 and "no export for" in waiting.stderr
    assert (plan.stat().st_ino, plan.stat().st_mtime_ns) == before
    shutil.move(tmp_path / "exports" / "aside", tmp_path / "exports" / tag)
    failed = run(TRT_VERSION="10.14.1.48", SHIM_BUILD_FAILS="1")  # a new TensorRT, and its build fails
    assert failed.returncode == 3 and "engine validation failed" in failed.stderr
    assert (plan.stat().st_ino, plan.stat().st_mtime_ns) == before  # still serving the old, validated engines
    rebuilt = run(TRT_VERSION="10.14.1.48")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [tag]  # no staging or previous left
    manifest = json.loads((live / "vision_encoder" / "1" / "engine.json").read_text())
    assert manifest["platform"]["tensorrt"] == "10.14.1.48"


def test_build_job_builds_one_repository_of_several_models(tiny_export, tmp_path):
    """CLIP_MODELS set: the export Job's folders /exports/TAG/NAME become one repository of several
    served models (each model's Triton models named <name>__<served name>), checked as current on the
    next run; a missing export of any of them waits (exit 75)."""
    from .gpu_twin import fake_gpu_env

    docs = by_kind_and_name("base")
    script, tag = _job_script(docs, tmp_path)
    assert docs[("ConfigMap", "clip-triton-engine")]["data"]["CLIP_MODELS"] == ""  # one model by default
    for name in ("small", "other"):
        shutil.copytree(tiny_export, tmp_path / "exports" / tag / name)
    (tmp_path / "models").mkdir()
    env = fake_gpu_env(tmp_path / "bin")
    shim = tmp_path / "bin" / "clip-triton"
    shim.write_text(BUILD_SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    env["CLIP_MODELS"] = "small=clip-triton-tiny@none other=clip-triton-tiny@none"

    def run():
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)

    first = run()
    assert first.returncode == 0, first.stderr
    live = tmp_path / "models" / tag
    for name in ("small", "other"):
        assert (live / f"vision_encoder__{name}" / "1" / "model.plan").is_file()
        assert f'string_value: "{name}"' in (live / f"clip_image__{name}" / "config.pbtxt").read_text()
    assert not (live / "clip_image").exists()
    second = run()
    assert second.returncode == 0 and "are current: nothing to rebuild" in second.stdout, second.stderr
    shutil.rmtree(tmp_path / "exports" / tag / "other")
    waiting = run()
    assert waiting.returncode == 75 and "no export for" in waiting.stderr


def test_the_replica_count_has_one_owner(docs):
    """KEDA's ScaledObject drives an HPA: a `replicas` field on the Deployment (base or overlay) would
    reset the count on every apply, fighting the autoscaler (issue 26). Without KEDA the Deployment's
    default of 1 holds and `kubectl scale` changes it."""
    deployment = docs[("Deployment", "clip-triton-triton")]["spec"]
    assert "replicas" not in deployment
    if docs["_target"] == "overlays/production":
        assert docs[("ScaledObject", "clip-triton-triton")]["spec"]["minReplicaCount"] == 2
