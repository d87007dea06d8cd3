"""deploy/k8s renders with `kubectl kustomize` (offline) and carries what a GPU deployment needs."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
TRITON = {"app.kubernetes.io/name": "clip-triton-triton"}
GATEWAY = {"app.kubernetes.io/name": "clip-triton-gateway"}


def render(target: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests (apt-get install kubectl)"
    out = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=["base", "overlays/production", "overlays/no-operators"])
def docs(request) -> dict:
    found = {}
    for doc in render(request.param):
        found[(doc["kind"], doc["metadata"]["name"].rsplit("-", 1)[0] if doc["kind"] == "ConfigMap"
               else doc["metadata"]["name"])] = doc
    found["_target"] = request.param
    return found


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
    assert docs[("PodDisruptionBudget", "clip-triton-triton")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs[("NetworkPolicy", "clip-triton-triton")]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    grpc = docs[("Service", "clip-triton-triton-grpc")]["spec"]
    assert grpc["clusterIP"] == "None" and [p["name"] for p in grpc["ports"]] == ["grpc"]
    http = docs[("Service", "clip-triton-triton")]["spec"]
    assert sorted(p["name"] for p in http["ports"]) == ["http", "metrics"]
    gateway = docs[("Deployment", "clip-triton-gateway")]
    assert docs[("Service", "clip-triton-gateway")]["spec"]["selector"].items() <= \
        gateway["spec"]["template"]["metadata"]["labels"].items()
    env = {e["name"]: e.get("value") for e in pod_spec(gateway)["containers"][0]["env"]}
    assert env["CLIP_TRITON_URL"] == "dns:///clip-triton-triton-grpc:8001"


def test_network_policy_admits_only_gateway_and_monitoring(docs):
    rules = docs[("NetworkPolicy", "clip-triton-triton")]["spec"]["ingress"]
    assert len(rules) == 2
    sources = [rule["from"][0] for rule in rules]
    assert sources[0]["podSelector"]["matchLabels"] == GATEWAY
    assert sources[1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert sorted(p["port"] for p in rules[0]["ports"]) == [8000, 8001] and rules[1]["ports"][0]["port"] == 8002


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
    claims = {v["persistentVolumeClaim"]["claimName"] for d in (job, deployment) for v in pod_spec(d)["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"clip-triton-models"}
    assert docs[("PersistentVolumeClaim", "clip-triton-models")]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_autoscaling_and_monitoring(docs):
    if docs["_target"] == "overlays/no-operators":
        assert ("ScaledObject", "clip-triton-triton") not in docs and ("PodMonitor", "clip-triton-triton") not in docs
        return
    scaled = docs[("ScaledObject", "clip-triton-triton")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "clip-triton-triton"
    assert "nv_inference_queue_duration_us" in scaled["triggers"][0]["metadata"]["query"]
    monitor = docs[("PodMonitor", "clip-triton-triton")]["spec"]
    assert monitor["selector"]["matchLabels"] == TRITON and monitor["podMetricsEndpoints"][0]["port"] == "metrics"


def test_production_overlay_pins_images_gpu_and_namespace():
    docs = render("overlays/production")
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "Job")
              for c in d["spec"]["template"]["spec"].get("containers", []) + d["spec"]["template"]["spec"].get("initContainers", [])}
    assert images and all(i.startswith("registry.example.com/") and not i.endswith(":latest") for i in images)
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"clip-triton"}
    selectors = {d["kind"]: d["spec"]["template"]["spec"]["nodeSelector"] for d in docs if d["kind"] in ("Job",)}
    assert selectors["Job"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
