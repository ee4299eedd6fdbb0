"""deploy/: the container image definition and the Kubernetes manifests (kustomize base + overlays).

- `kubectl kustomize` renders every overlay, and an overlay with the optional OpenAI component,
  without a warning;
- every rendered object of a built-in kind validates offline against the Kubernetes 1.32 schemas
  with kubernetes-validate in strict mode (an unknown field is an error), warnings counted as
  failures; the only other kind is the PodMonitor, checked by structure like the prometheus-adapter
  rule (no schema for either there);
- against a real `facert serve` (the tiny model): the probe paths and the metrics path answer on the
  ports the container's own arguments bind, and the series the HPA scales on (through the adapter
  rule) is one the server exports, with the label the HPA selects;
- every container that runs facert parses with facert's own command line; the GPUs a replica gets
  are the ranks the build Job splits the LLM into; the Dockerfile's Triton release is the server
  facert pins.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from serving_fixtures import served_tiny  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUBERNETES_VERSION = "1.32.0"
SCHEMALESS = {("monitoring.coreos.com/v1", "PodMonitor")}  # a CRD: checked by structure below

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (with its kustomize)")


def kustomize(path: Path) -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    assert proc.stderr.strip() == "", f"kubectl kustomize {path} warned:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def server_container(docs: list[dict]) -> dict:
    return next(c for c in pod_spec(one(docs, "Deployment"))["containers"] if c["name"] == "facert")


def validate(docs: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "-k", KUBERNETES_VERSION, "--strict", str(path)],
        capture_output=True, text=True, timeout=120)


def facert_args(container: dict):
    """The container's facert command line parsed by facert's own parser ($(VAR) expanded from its env,
    as the kubelet does); SystemExit if facert would refuse it."""
    from runtime.cli import build_parser

    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a)
            for a in container["command"][1:] + container.get("args", [])]
    return build_parser().parse_args(argv)


def port_number(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_overlays_exist():
    assert set(OVERLAYS) == {"cpu-demo", "gpu-native", "gpu-native-tp2"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    want = ["Deployment", "HorizontalPodAutoscaler", "PodMonitor", "Service"]
    if overlay.startswith("gpu"):
        want += ["Job", "PersistentVolumeClaim"]
    assert kinds == sorted(want)
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in SCHEMALESS]
    proc = validate(builtin, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WARN" not in out and "ERROR" not in out, out
    assert out.count(f"passed for resource") == len(builtin), out
    assert all(f"against version {KUBERNETES_VERSION[:4]}" in line for line in out.splitlines() if "passed" in line)


def test_strict_validation_catches_an_unknown_field(rendered, tmp_path):
    """The validation can fail: a misspelt field (livenessprobe) that Kubernetes would drop in silence."""
    deployment = copy.deepcopy(one(rendered["cpu-demo"], "Deployment"))  # the fixture's objects stay as rendered
    container = pod_spec(deployment)["containers"][0]
    container["livenessprobe"] = container.pop("livenessProbe")
    proc = validate([deployment], tmp_path)
    assert proc.returncode != 0 and "livenessprobe" in proc.stdout, proc.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_container_runs_facert_serve_as_a_pod_needs(rendered, overlay):
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    spec = pod_spec(deployment)
    c = server_container(docs)
    args = facert_args(c)
    assert args.func.__name__ == "cmd_serve"
    assert args.host == "0.0.0.0"  # facert serve binds 127.0.0.1 by default: unreachable in a pod
    assert (args.http_port, args.grpc_port, args.metrics_port) == tuple(
        port_number(c, n) for n in ("http", "grpc", "metrics"))
    assert args.tritonserver == "/opt/tritonserver/bin/tritonserver"  # NVIDIA's image
    # the repository is on a volume mounted read-only
    mount = next(m for m in c["volumeMounts"] if args.model_repository.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True
    assert any(v["name"] == mount["name"] for v in spec["volumes"])
    # non-root, no privilege escalation, resource limits
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    for container in spec["containers"] + spec.get("initContainers", []):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["name"]
    gpus = c["resources"]["limits"].get("nvidia.com/gpu", 0)
    assert (gpus > 0) == overlay.startswith("gpu")
    # the Service reaches the pods' named ports
    service, labels = one(docs, "Service"), deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in c["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_repository_is_made_where_the_server_reads_it(rendered, overlay):
    """cpu-demo: an init container renders it with `facert repo` onto the same volume (writable there);
    gpu: the build Job builds engines and repository into the shared volume, split over as many GPUs
    as each replica gets, and the replicas wait for it."""
    docs = rendered[overlay]
    spec = pod_spec(one(docs, "Deployment"))
    serve = facert_args(server_container(docs))
    inits = {c["name"]: c for c in spec.get("initContainers", [])}
    if overlay == "cpu-demo":
        repo = facert_args(inits["model-repository"])
        assert repo.func.__name__ == "cmd_repo" and repo.out == serve.model_repository
        assert repo.engines == "/opt/facert/models/engines/demo"  # built into the image (deploy/Dockerfile)
        mount = inits["model-repository"]["volumeMounts"][0]
        assert mount["name"] == "model-repository" and not mount.get("readOnly")
        return
    job = one(docs, "Job")
    job_spec = pod_spec(job)
    build = facert_args(job_spec["initContainers"][0])
    repo = facert_args(job_spec["containers"][0])
    assert build.func.__name__ == "cmd_build" and build.backend == "tensorrt-llm"
    assert repo.func.__name__ == "cmd_repo" and repo.target == "native" and repo.engines == build.out
    assert repo.out == serve.model_repository
    claim = next(v for v in job_spec["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]
    served = next(v for v in spec["volumes"] if v["name"] == "model-repository")["persistentVolumeClaim"]
    assert served == {"claimName": claim["claimName"], "readOnly": True}
    assert one(docs, "PersistentVolumeClaim")["metadata"]["name"] == claim["claimName"]
    ranks = (build.tp or 1) * (build.pp or 1)
    assert job_spec["initContainers"][0]["resources"]["limits"]["nvidia.com/gpu"] == ranks
    assert server_container(docs)["resources"]["limits"]["nvidia.com/gpu"] == ranks
    assert ranks == (2 if overlay.endswith("tp2") else 1)
    assert "wait-for-repository" in inits


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_metrics_and_autoscaling_signal_are_what_facert_serves(rendered, overlay, served_tiny):  # noqa: F811
    """Probe and scrape paths, fetched from a running facert serve on the port the manifests name;
    the HPA's series, through the adapter rule, read from that server's /metrics."""
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    c = server_container(docs)
    args = facert_args(c)
    server = served_tiny.server
    live_port = {args.http_port: server.http_port, args.grpc_port: server.grpc_port,
                 args.metrics_port: server.metrics_port}  # manifest port -> the test server's
    probes = {k: c[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/ready"
    for probe in probes.values():
        port = port_number(c, probe["port"]) if isinstance(probe["port"], str) else probe["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{live_port[port]}{probe['path']}", timeout=10) as r:
            assert r.status == 200, probe

    monitor = one(docs, "PodMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert port_number(c, endpoint["port"]) == args.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{live_port[args.metrics_port]}{endpoint['path']}", timeout=10) as r:
        metrics = r.read().decode()

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name, selector = metric["pods"]["metric"]["name"], metric["pods"]["metric"]["selector"]["matchLabels"]

    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series) and rule["name"].get("as", series) == name
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert all(p in rule["metricsQuery"] for p in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"))
    for key, value in selector.items():
        assert f'{key}="{value}"' in rule["seriesQuery"]
    # the series exists on a running server, with the labels the HPA selects
    lines = [ln for ln in metrics.splitlines() if ln.startswith(series + "{")]
    assert any(all(f'{k}="{v}"' in ln for k, v in selector.items()) for ln in lines), \
        f"{series} with {selector} is not in facert's /metrics:\n" + "\n".join(lines)
    assert f"# TYPE {series} gauge" in metrics  # a gauge: the rule takes it as it is, no rate()


def test_openai_component(tmp_path):
    """The optional component adds --openai-port and port 9000 (container and Service) to any overlay."""
    overlay = tmp_path / "with-openai"
    overlay.mkdir()
    rel = os.path.relpath(K8S, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {rel}/overlays/cpu-demo\ncomponents:\n  - {rel}/components/openai\n")
    docs = kustomize(overlay)
    c = server_container(docs)
    assert port_number(c, "openai") == 9000 and "--openai-port=9000" in c["args"]
    assert {"name": "openai", "port": 9000, "targetPort": "openai"} in one(docs, "Service")["spec"]["ports"]
    try:
        args = facert_args(c)
    except SystemExit:
        pytest.skip("this facert's `facert serve` has no --openai-port yet: the component is for a facert that has")
    assert args.openai_port == 9000


def test_dockerfile_matches_the_pinned_server_and_the_manifests(rendered):
    """FROM NVIDIA's Triton images: for the CPU demo (python + torch flavour) the release whose
    tritonserver facert runs and is tested against (release YY.MM ships 2.(51 + months since 24.10));
    for native the TensorRT-LLM container runtime/cli/serve.py names for the native target.
    The image's default command is a facert serve a pod can reach."""
    import runtime.cli.serve
    from runtime.serving.native import EXECUTOR_WORKER
    from runtime.serving.server import SERVER_VERSION

    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    yy, mm = (int(x) for x in args["TRITON_RELEASE"].split("."))
    assert f"2.{51 + (yy - 24) * 12 + (mm - 10)}.0" == SERVER_VERSION
    named = re.search(r"nvcr\.io/nvidia/tritonserver:(\S+)-trtllm-python-py3", runtime.cli.serve.__doc__).group(1)
    assert args["TRITON_NATIVE_RELEASE"] == named
    stages = dict((target, image) for image, target in
                  re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M))
    assert stages == {"native": "nvcr.io/nvidia/tritonserver:${TRITON_NATIVE_RELEASE}-trtllm-python-py3",
                      "cpu-demo": "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-pyt-python-py3"}
    import json

    from runtime.cli import build_parser

    for cmd in re.findall(r"^CMD (\[.*\])$", text, re.M):
        serve = build_parser().parse_args(json.loads(cmd)[1:])
        assert serve.func.__name__ == "cmd_serve" and serve.host == "0.0.0.0"
        assert serve.model_repository == facert_args(server_container(rendered["cpu-demo"])).model_repository
    # the demo engines the cpu-demo overlay renders its repository from are built into that image
    assert "--out /opt/facert/models/engines/demo" in text
    assert Path(EXECUTOR_WORKER).parts[:3] == ("/", "opt", "tritonserver")  # inside NVIDIA's image
    assert (DEPLOY / "install-facert.sh").is_file()
