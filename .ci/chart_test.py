"""Chart tests for helm/tally, run by .ci/chart-test inside its venv.

Real Helm v4 (the Go SDK, through helm-python-sdk's libhelm_c) lints and renders the chart with
each values file in helm/tally/ci/; kubernetes-validate checks every rendered object against the
Kubernetes 1.34 OpenAPI schemas (strict: unknown fields fail); then the properties the chart
promises are asserted on the rendered YAML. Exits non-zero with a message on any failure.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tally"
CI_DIR = CHART / "ci"
KUBE_VERSION = os.environ.get("CHART_TEST_KUBE_VERSION", "1.34.0")
RELEASE = "tally"
NAMESPACE = "tally"
KV = Path(sys.executable).parent / "kubernetes-validate"

# Kinds validated elsewhere (CRDs have no schema in kubernetes-validate).
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
SELECTOR = {"app.kubernetes.io/name": "tally", "app.kubernetes.io/instance": RELEASE}
# gRPC TLS variables: paths of files in mounted Secrets (like the *_FILE variables).
TLS_ENV = ("TALLY_TLS_CERT", "TALLY_TLS_KEY", "TALLY_TLS_CLIENT_CA")

passed = 0
failures: list[str] = []


def check(cond: bool, what: str) -> None:
    """Record one assertion; failures are collected and reported together."""
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
        print(f"FAIL: {what}", flush=True)


def die(message: str) -> None:
    print(f"chart-test: FATAL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_file(path: Path) -> dict[str, Any]:
    # Parse values files as Helm does (helm_values_from_yaml), not only with PyYAML.
    data = helm.values_from_yaml(path.read_text())
    return data or {}


# ---------------------------------------------------------------------------------------------
# Rendering


class Rendered:
    """The objects of one render, with lookups."""

    def __init__(self, label: str, manifests: dict[str, str]):
        self.label = label
        self.files = manifests
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt") or not text.strip():
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc.setdefault("__template__", path)
                    self.objects.append(doc)
        self.notes = next((t for p, t in manifests.items() if p.endswith("NOTES.txt")), "")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of(kind) if name is None or o["metadata"]["name"] == name]
        if len(found) != 1:
            die(f"{self.label}: expected one {kind} {name or ''}, found {len(found)}")
        return found[0]


def render(chart: helm.Chart, values: dict[str, Any], label: str) -> Rendered:
    return Rendered(label, chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))


def expect_render_failure(chart: helm.Chart, values: dict[str, Any], needle: str, what: str) -> None:
    try:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as e:
        check(needle in str(e), f"{what}: render failed, but without {needle!r}: {e}")
        return
    check(False, f"{what}: render succeeded but must fail")


def write_manifests(r: Rendered, outdir: Path) -> tuple[list[Path], int, list[dict[str, Any]]]:
    """Writes Helm's output as `helm template --output-dir` does (one file per template, as
    rendered). Returns the files of core objects, their object count, and the custom objects."""
    core: list[Path] = []
    count = 0
    custom: list[dict[str, Any]] = []
    for tpl, text in sorted(r.files.items()):
        if tpl.endswith("NOTES.txt") or not text.strip():
            continue
        path = outdir / tpl
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"---\n# Source: {tpl}\n{text}")
        docs = [d for d in yaml.safe_load_all(text) if d]
        kinds = {(d["apiVersion"], d["kind"]) in CUSTOM_KINDS for d in docs}
        if kinds == {True}:
            custom.extend(docs)
        elif kinds == {False}:
            core.append(path)
            count += len(docs)
        else:
            die(f"{r.label}: {tpl} mixes custom and core objects")
    return core, count, custom


def kubernetes_validate(files: list[Path], objects: int, label: str) -> None:
    cmd = [str(KV), "--strict", "-k", KUBE_VERSION, *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    bad = [line for line in output.splitlines() if not line.startswith("INFO ")]
    passed_lines = [line for line in output.splitlines() if line.startswith("INFO ") and " passed " in line]
    if proc.returncode != 0 or bad or len(passed_lines) != objects:
        print("\n".join(bad) or output)
        check(False, f"{label}: kubernetes-validate --strict -k {KUBE_VERSION} failed (exit {proc.returncode})")
    else:
        check(True, "kubernetes-validate")


# ---------------------------------------------------------------------------------------------
# Property checks shared by every render


def pod_specs(r: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    out = []
    for o in r.of("Deployment") + r.of("Job"):
        out.append((o, o["spec"]["template"]))
    return out


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: dict[str, Any], name: str) -> str | None:
    e = env_of(container).get(name)
    return None if e is None else e.get("value")


def common_checks(r: Rendered, values: dict[str, Any]) -> None:
    L = r.label
    version = values.get("image", {}).get("tag") or "0.1.0"
    for o in r.objects:
        md = o["metadata"]
        labels = md.get("labels", {})
        what = f"{L}: {o['kind']}/{md['name']}"
        check(all(k in labels for k in STANDARD_LABELS), f"{what} lacks standard labels: {sorted(set(STANDARD_LABELS) - set(labels))}")
        check(labels.get("helm.sh/chart") == "tally-0.1.0", f"{what}: helm.sh/chart")
        check(labels.get("app.kubernetes.io/managed-by") == "Helm", f"{what}: managed-by")
        check(labels.get("app.kubernetes.io/instance") == RELEASE, f"{what}: instance")
        check(labels.get("app.kubernetes.io/name") == "tally", f"{what}: name")
        check(labels.get("app.kubernetes.io/version") == version, f"{what}: version label")
        check(md.get("namespace") == NAMESPACE, f"{what}: namespace")

    deps = r.of("Deployment")
    check(len(deps) == 1, f"{L}: one Deployment")
    dep = deps[0]
    check(dep["spec"]["selector"] == {"matchLabels": SELECTOR}, f"{L}: Deployment selector must be exactly name+instance: {dep['spec']['selector']}")
    for svc in r.of("Service"):
        check(svc["spec"]["selector"] == SELECTOR, f"{L}: Service {svc['metadata']['name']} selector is name+instance")
        for p in svc["spec"]["ports"]:
            check(isinstance(p["targetPort"], str), f"{L}: Service ports target named ports (keeps the migration Job's portless pods out)")
    for pdb in r.of("PodDisruptionBudget"):
        check(pdb["spec"]["selector"] == {"matchLabels": SELECTOR}, f"{L}: PDB selector")
    for np in r.of("NetworkPolicy"):
        check(np["spec"]["podSelector"] == {"matchLabels": SELECTOR}, f"{L}: NetworkPolicy podSelector")

    # Pods: labels, security, secrets as files.
    for owner, tmpl in pod_specs(r):
        what = f"{L}: {owner['kind']}/{owner['metadata']['name']}"
        tl = tmpl["metadata"]["labels"]
        check(all(k in tl for k in STANDARD_LABELS), f"{what}: pod template lacks standard labels")
        check(all(tl.get(k) == v for k, v in SELECTOR.items()), f"{what}: pod template carries the selector labels")
        spec = tmpl["spec"]
        psc = spec.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True, f"{what}: pod runAsNonRoot")
        check(spec.get("automountServiceAccountToken") is False, f"{what}: automountServiceAccountToken false")
        check(spec.get("enableServiceLinks") is False, f"{what}: enableServiceLinks false")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            cw = f"{what} container {c['name']}"
            check(sc.get("runAsNonRoot") is True, f"{cw}: runAsNonRoot")
            check(sc.get("runAsUser") == 65532, f"{cw}: runAsUser 65532")
            check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation false")
            check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
            check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cw}: capabilities drop ALL")
            check(not sc.get("capabilities", {}).get("add"), f"{cw}: no added capabilities")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            check(seccomp == "RuntimeDefault", f"{cw}: seccompProfile RuntimeDefault")
            res = c.get("resources", {})
            check(bool(res.get("requests")) and res.get("limits", {}).get("memory") == res.get("requests", {}).get("memory"), f"{cw}: memory limit = request")
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            check("/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{cw}: writable emptyDir at /tmp")
            for e in c.get("env", []):
                vf = e.get("valueFrom", {})
                check("secretKeyRef" not in vf, f"{cw}: env {e['name']} uses secretKeyRef (secrets must be files)")
            for ef in c.get("envFrom", []):
                check("secretRef" not in ef, f"{cw}: envFrom secretRef (secrets must be files)")
            # Every *_FILE (and TLS) variable names a file inside a mounted Secret, under its item path.
            for name, e in env_of(c).items():
                if not (name.endswith("_FILE") or name in TLS_ENV):
                    continue
                path = e.get("value", "")
                d, base = os.path.dirname(path), os.path.basename(path)
                m = mounts.get(d)
                check(m is not None, f"{cw}: {name}={path} has no volumeMount at {d}")
                if m is None:
                    continue
                vol = volumes.get(m["name"], {})
                items = [i["path"] for i in vol.get("secret", {}).get("items", [])]
                check("secret" in vol and base in items, f"{cw}: {name} is not a Secret item {base} ({vol})")
                check(m.get("readOnly") is True, f"{cw}: Secret mount {d} read-only")

    # Secrets never in ConfigMaps.
    secret_values: list[str] = []
    for s in r.of("Secret"):
        for v in (s.get("data") or {}).values():
            secret_values.append(base64.b64decode(v).decode())
        secret_values.extend((s.get("stringData") or {}).values())
    if values.get("database", {}).get("url"):
        secret_values.append(values["database"]["url"])
    for cm in r.of("ConfigMap"):
        blob = json.dumps(cm.get("data", {}))
        for sv in secret_values:
            check(sv not in blob, f"{L}: a Secret value appears in ConfigMap {cm['metadata']['name']}")
        check("postgres://" not in blob and "postgresql://" not in blob, f"{L}: a database URL in ConfigMap {cm['metadata']['name']}")
        for k in ("database_url", "stripe_api_key", "stripe_webhook_secret", "tls_cert", "tls_key", "tls_client_ca"):
            check(not re.search(rf"(?m)^\s*{k}\s*=", blob.replace("\\n", "\n")), f"{L}: {k} in ConfigMap")
        check("-----BEGIN" not in blob, f"{L}: PEM material in ConfigMap {cm['metadata']['name']}")
    for s in r.of("Secret"):
        check(s["type"] == "Opaque", f"{L}: Secret type")

    # The server container.
    c = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "tally")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports == {"grpc": 50051, "http": 8080, "metrics": 9090}, f"{L}: container ports {ports}")
    check(c.get("args") == ["serve"], f"{L}: container runs `tally serve`")
    tls = values.get("tls", {})
    tls_on = bool(tls.get("enabled"))
    mtls_on = tls_on and bool(tls.get("clientCa", {}).get("enabled"))
    if tls_on:
        # Kubelet gRPC probes cannot speak TLS: plaintext httpGet on the numeric metrics port.
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            p = c.get(probe, {})
            h = p.get("httpGet", {})
            check(isinstance(h.get("port"), int) and h.get("port") == ports["metrics"], f"{L}: {probe} is httpGet on the numeric metrics port: {p}")
            check(h.get("path") == path, f"{L}: {probe} path {path}: {p}")
            check(h.get("scheme", "HTTP") == "HTTP", f"{L}: {probe} plaintext HTTP")
            check(set(p) & {"grpc", "tcpSocket", "exec"} == set(), f"{L}: {probe} only httpGet (no gRPC probe with TLS)")
    else:
        for probe, svc in (("livenessProbe", "liveness"), ("readinessProbe", "readiness"), ("startupProbe", "liveness")):
            p = c.get(probe, {})
            g = p.get("grpc", {})
            check(isinstance(g.get("port"), int) and g.get("port") == ports["grpc"], f"{L}: {probe} is grpc on the numeric grpc port: {p}")
            check(g.get("service") == svc, f"{L}: {probe} service {svc}")
            check(set(p) & {"httpGet", "tcpSocket", "exec"} == set(), f"{L}: {probe} only grpc")
    tls_env = {k for k in TLS_ENV if k in env_of(c)}
    want_tls_env = set(TLS_ENV[:2]) | ({TLS_ENV[2]} if mtls_on else set()) if tls_on else set()
    check(tls_env == want_tls_env, f"{L}: TLS variables {sorted(tls_env)}, want {sorted(want_tls_env)}")
    for np in r.of("NetworkPolicy"):
        probe_ports = {pp for probe in ("livenessProbe", "readinessProbe", "startupProbe") for pp in [(c[probe].get("grpc") or c[probe].get("httpGet") or {}).get("port")]}
        rule_ports = {p["port"] for rule in np["spec"]["ingress"] for p in rule.get("ports", [])}
        check(probe_ports <= rule_ports, f"{L}: NetworkPolicy has an ingress rule for the probe port(s) {probe_ports}")
    sp = c["startupProbe"]
    check(sp["periodSeconds"] * sp["failureThreshold"] >= 60, f"{L}: startupProbe tolerates >= 60 s of slow start")
    env = {k: v.get("value") for k, v in env_of(c).items()}
    check(env.get("TALLY_LISTEN") == "0.0.0.0:50051", f"{L}: TALLY_LISTEN")
    check(env.get("TALLY_HTTP_LISTEN") == "0.0.0.0:8080", f"{L}: TALLY_HTTP_LISTEN")
    check(env.get("TALLY_METRICS_LISTEN") == "0.0.0.0:9090", f"{L}: TALLY_METRICS_LISTEN")
    check(env.get("TALLY_LOG_FORMAT") == "json", f"{L}: TALLY_LOG_FORMAT json")
    check(env.get("TALLY_CONFIG") == "/etc/tally/config/tally.toml", f"{L}: TALLY_CONFIG")
    check(env.get("TALLY_STRIPE_LIVEMODE") in ("true", "false"), f"{L}: TALLY_STRIPE_LIVEMODE")
    check(env.get("TALLY_AUTO_MIGRATE") in ("true", "false"), f"{L}: TALLY_AUTO_MIGRATE")
    check(("TALLY_DATABASE_URL" in env) != ("TALLY_DATABASE_URL_FILE" in env), f"{L}: exactly one of TALLY_DATABASE_URL / _FILE")
    check("TALLY_DATABASE_URL" not in env or env["TALLY_DATABASE_URL"].startswith("sqlite:"), f"{L}: only a SQLite URL may be an env value")
    check(("TALLY_CALLERS_FILE" in env) or env.get("TALLY_INSECURE") == "true", f"{L}: callers configured or TALLY_INSECURE=true")
    attrs = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    check("k8s.pod.name=$(POD_NAME)" in attrs and "k8s.namespace.name=$(POD_NAMESPACE)" in attrs, f"{L}: OTEL_RESOURCE_ATTRIBUTES")
    names = [e["name"] for e in c["env"]]
    check(names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES"), f"{L}: POD_NAME defined before use")
    check(env.get("OTEL_SERVICE_NAME"), f"{L}: OTEL_SERVICE_NAME")
    check(len(names) == len(set(names)), f"{L}: duplicate env names {names}")

    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    cfg_mount = mounts.get("/etc/tally/config")
    check(cfg_mount is not None, f"{L}: config mount")
    cm_name = volumes[cfg_mount["name"]]["configMap"]["name"]
    cm = r.one("ConfigMap", cm_name)
    toml_text = cm["data"]["tally.toml"]
    try:
        cfg = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        die(f"{L}: tally.toml does not parse: {e}\n{toml_text}")
    check("shutdown_grace" in cfg, f"{L}: tally.toml shutdown_grace")
    check(all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in cfg), f"{L}: tally.toml keys are option names")
    for k, v in values.get("config", {}).items():
        check(cfg.get(k) == v and type(cfg.get(k)) is type(v), f"{L}: tally.toml {k} = {cfg.get(k)!r}, want {v!r}")
    if "TALLY_CATALOG" in env:
        cat_mount = mounts.get(os.path.dirname(env["TALLY_CATALOG"]))
        check(cat_mount is not None, f"{L}: catalog mount")
        cat = r.one("ConfigMap", volumes[cat_mount["name"]]["configMap"]["name"])
        tomllib.loads(cat["data"]["catalog.toml"])
        check(cat["data"]["catalog.toml"].strip() == values["catalog"].strip(), f"{L}: catalog copied verbatim")
    else:
        check(not values.get("catalog"), f"{L}: TALLY_CATALOG set iff catalog given")

    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    check(re.fullmatch(r"[0-9a-f]{64}", ann.get("checksum/config", "")) is not None, f"{L}: checksum/config annotation")
    tgps = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = int(cfg["shutdown_grace"].rstrip("s"))
    check(tgps > pre + grace, f"{L}: terminationGracePeriodSeconds {tgps} > preStop {pre} + shutdown_grace {grace}")
    check(pre == values.get("lifecycle", {}).get("preStopSleepSeconds", 5), f"{L}: preStop sleep seconds")

    autoscale = values.get("autoscaling", {}).get("enabled", False)
    check(("replicas" in dep["spec"]) != autoscale, f"{L}: replicas omitted iff autoscaling")
    check(bool(r.of("HorizontalPodAutoscaler")) == autoscale, f"{L}: HPA iff autoscaling")
    multi = autoscale or values.get("replicaCount", 1) > 1
    pdbs = r.of("PodDisruptionBudget")
    check(bool(pdbs) == multi, f"{L}: PDB iff more than one replica")
    for pdb in pdbs:
        check(pdb["spec"].get("maxUnavailable") == 1 and pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", f"{L}: PDB maxUnavailable 1, AlwaysAllow")
    for sa in r.of("ServiceAccount"):
        check(sa.get("automountServiceAccountToken") is False, f"{L}: ServiceAccount automount false")
    check(dep["spec"]["template"]["spec"]["serviceAccountName"] in [s["metadata"]["name"] for s in r.of("ServiceAccount")] or not values.get("serviceAccount", {}).get("create", True), f"{L}: Deployment uses the chart's ServiceAccount")

    for ing in r.of("Ingress"):
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                check(p["backend"]["service"]["port"] == {"name": "http"}, f"{L}: Ingress routes only to the http port")
                check(p["path"] == "/stripe/webhook" or p["path"].startswith("/v1/"), f"{L}: Ingress path {p['path']}")


def custom_checks(objs: list[dict[str, Any]], r: Rendered) -> int:
    """ServiceMonitor: parses, has spec.endpoints and spec.selector, scrapes the Service's metrics port."""
    L = r.label
    for sm in objs:
        spec = sm.get("spec", {})
        check(isinstance(spec.get("endpoints"), list) and spec["endpoints"], f"{L}: ServiceMonitor spec.endpoints")
        check(isinstance(spec.get("selector"), dict) and spec["selector"].get("matchLabels") == SELECTOR, f"{L}: ServiceMonitor spec.selector")
        ep = spec["endpoints"][0]
        check(ep.get("port") == "metrics" and ep.get("path") == "/metrics", f"{L}: ServiceMonitor scrapes port metrics, /metrics")
        scraped = [s for s in r.of("Service") if s["spec"]["selector"] == SELECTOR and any(p["name"] == "metrics" for p in s["spec"]["ports"])]
        check(len(scraped) == 1, f"{L}: exactly one Service exposes the metrics port (no double scrape)")
    return len(objs)


def dep_container(r: Rendered) -> dict[str, Any]:
    return r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------------------------------------
# Per-values-file expectations


def expect_default(r: Rendered, values: dict[str, Any]) -> None:
    L = r.label
    c = dep_container(r)
    dep = r.one("Deployment")
    check(env_value(c, "TALLY_DATABASE_URL") == "sqlite:///data/tally.db", f"{L}: SQLite URL")
    check(env_value(c, "TALLY_AUTO_MIGRATE") == "true", f"{L}: SQLite migrates at start")
    check(env_value(c, "TALLY_INSECURE") == "true", f"{L}: TALLY_INSECURE")
    check(dep["spec"]["replicas"] == 1, f"{L}: one replica")
    check(dep["spec"]["strategy"] == {"type": "Recreate"}, f"{L}: Recreate for SQLite")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    check("/data" in mounts and "emptyDir" in vols[mounts["/data"]], f"{L}: /data emptyDir")
    check(not r.of("Job") and not r.of("Secret") and not r.of("PodDisruptionBudget"), f"{L}: no Job, Secret or PDB")


def expect_postgres(r: Rendered, values: dict[str, Any]) -> None:
    L = r.label
    c = dep_container(r)
    dep = r.one("Deployment")
    check(env_value(c, "TALLY_AUTO_MIGRATE") == "false", f"{L}: TALLY_AUTO_MIGRATE=false with the migration Job")
    check(env_value(c, "TALLY_DATABASE_URL_FILE") == "/var/run/secrets/tally/database-url", f"{L}: TALLY_DATABASE_URL_FILE")
    check(env_value(c, "TALLY_CALLERS_FILE") == "/var/run/secrets/tally-callers/callers.toml", f"{L}: TALLY_CALLERS_FILE")
    check("TALLY_INSECURE" not in env_of(c), f"{L}: no TALLY_INSECURE in production")
    check(dep["spec"]["replicas"] == 3, f"{L}: 3 replicas")
    check(dep["spec"]["strategy"]["type"] == "RollingUpdate" and dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, f"{L}: RollingUpdate maxUnavailable 0")
    check(not r.of("Secret"), f"{L}: existingSecret → no Secret object")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    check(vols["database"]["secret"]["secretName"] == "tally-database" and vols["database"]["secret"]["items"] == [{"key": "url", "path": "database-url"}], f"{L}: database volume from existingSecret/key")
    check("data" not in vols, f"{L}: no /data volume in Postgres mode")
    tsc = dep["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
    check(tsc.get("labelSelector") == {"matchLabels": SELECTOR}, f"{L}: topologySpreadConstraints get the selector")
    job = r.one("Job")
    a = job["metadata"]["annotations"]
    check(a.get("helm.sh/hook") == "pre-install,pre-upgrade", f"{L}: Job hook pre-install,pre-upgrade")
    check(a.get("helm.sh/hook-delete-policy") == "before-hook-creation,hook-succeeded", f"{L}: Job hook-delete-policy")
    check(re.fullmatch(r"-?\d+", a.get("helm.sh/hook-weight", "")) is not None, f"{L}: Job hook-weight")
    jspec = job["spec"]["template"]["spec"]
    jc = jspec["containers"][0]
    check(jc["args"] == ["migrate"], f"{L}: Job runs `tally migrate`")
    check(env_value(jc, "TALLY_DATABASE_URL_FILE") == "/var/run/secrets/tally/database-url", f"{L}: Job TALLY_DATABASE_URL_FILE")
    check(jspec["restartPolicy"] == "Never", f"{L}: Job restartPolicy Never")
    check("serviceAccountName" not in jspec, f"{L}: pre-install Job uses no chart-made ServiceAccount")
    check(all("configMap" not in v for v in jspec["volumes"]), f"{L}: pre-install Job uses no chart-made ConfigMap")
    jv = {v["name"]: v for v in jspec["volumes"]}
    check(jv["database"]["secret"]["secretName"] == "tally-database", f"{L}: Job reads the existingSecret")
    check(job["metadata"]["labels"]["app.kubernetes.io/component"] == "migrations", f"{L}: Job component label")
    check(not any(c.get("ports") for c in jspec["containers"]), f"{L}: Job containers expose no ports")


def expect_full(r: Rendered, values: dict[str, Any]) -> None:
    L = r.label
    c = dep_container(r)
    dep = r.one("Deployment")
    env = {k: v.get("value") for k, v in env_of(c).items()}
    check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == values["otel"]["endpoint"], f"{L}: OTEL endpoint")
    check(env.get("OTEL_SERVICE_NAME") == "tally", f"{L}: OTEL_SERVICE_NAME")
    check(env.get("TALLY_STRIPE_API_KEY_FILE") == "/var/run/secrets/tally-stripe/api-key", f"{L}: stripe api key file")
    check(env.get("TALLY_STRIPE_WEBHOOK_SECRET_FILE") == "/var/run/secrets/tally-stripe/webhook-secret", f"{L}: webhook secret file")
    check(env.get("TALLY_STRIPE_LIVEMODE") == "true", f"{L}: livemode")
    check(env.get("TALLY_CATALOG") == "/etc/tally/catalog/catalog.toml", f"{L}: TALLY_CATALOG")
    check(env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc", f"{L}: extraEnv passthrough")
    check(c.get("envFrom") == values["extraEnvFrom"], f"{L}: extraEnvFrom passthrough")
    check(c["image"] == f"{values['image']['repository']}@{values['image']['digest']}", f"{L}: image by digest")
    check(c["resources"] == values["resources"], f"{L}: resources")
    tmeta = dep["spec"]["template"]["metadata"]
    check(tmeta["annotations"].get("cluster-autoscaler.kubernetes.io/safe-to-evict") == "true", f"{L}: podAnnotations")
    check(tmeta["labels"].get("team") == "billing", f"{L}: podLabels")
    check("replicas" not in dep["spec"], f"{L}: no replicas with HPA")
    hpa = r.one("HorizontalPodAutoscaler")
    check(hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 12, f"{L}: HPA min/max")
    check(hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tally"}, f"{L}: HPA target")
    np = r.one("NetworkPolicy")
    check(np["spec"]["policyTypes"] == ["Ingress", "Egress"], f"{L}: NetworkPolicy types")
    ingress_ports = [rule["ports"][0]["port"] for rule in np["spec"]["ingress"]]
    check(ingress_ports == [50051, 8080, 9090], f"{L}: NetworkPolicy ingress per port: {ingress_ports}")
    grpc_from = np["spec"]["ingress"][0]["from"][0]
    check(grpc_from == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "jobs"}}, "podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "generator"}}}, f"{L}: grpc from namespace AND pod selector")
    eports = sorted({p["port"] for rule in np["spec"]["egress"] for p in rule["ports"]})
    check(eports == [53, 443, 4317, 5432], f"{L}: NetworkPolicy egress ports {eports}")
    sm = r.one("ServiceMonitor")
    check(sm["metadata"]["labels"].get("release") == "prometheus" and sm["spec"]["endpoints"][0]["interval"] == "15s", f"{L}: ServiceMonitor labels/interval")
    ing = r.one("Ingress")
    paths = [p["path"] for p in ing["spec"]["rules"][0]["http"]["paths"]]
    check(paths == ["/stripe/webhook", "/v1/checkout", "/v1/billing", "/v1/accounts"], f"{L}: Ingress paths {paths}")
    check(ing["spec"]["tls"][0]["secretName"] == "tally-tls", f"{L}: Ingress TLS")
    hl = r.one("Service", "tally-headless")
    check(hl["spec"]["clusterIP"] == "None" and [p["name"] for p in hl["spec"]["ports"]] == ["grpc"], f"{L}: headless Service (grpc only)")
    grpc_port = next(p for p in r.one("Service", "tally")["spec"]["ports"] if p["name"] == "grpc")
    check(grpc_port.get("appProtocol") == "grpc", f"{L}: appProtocol grpc")
    check(r.one("ServiceAccount")["metadata"]["name"] == "tally-server" and dep["spec"]["template"]["spec"]["serviceAccountName"] == "tally-server", f"{L}: named ServiceAccount")
    job = r.one("Job")
    check(job["metadata"]["annotations"]["helm.sh/hook-weight"] == "5", f"{L}: hookWeight")
    check(not r.of("Secret"), f"{L}: only existing Secrets referenced")


def expect_inline(r: Rendered, values: dict[str, Any]) -> None:
    L = r.label
    secrets = {s["metadata"]["name"]: s for s in r.of("Secret")}
    check(set(secrets) == {"tally-database", "tally-database-migrate"}, f"{L}: inline URL → release Secret + hook Secret: {sorted(secrets)}")
    main, hook = secrets["tally-database"], secrets["tally-database-migrate"]
    check("helm.sh/hook" not in main["metadata"].get("annotations", {}), f"{L}: the Deployment's Secret is a normal release object")
    job = r.one("Job")
    hw, jw = int(hook["metadata"]["annotations"]["helm.sh/hook-weight"]), int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    check(hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade" and hw < jw, f"{L}: hook Secret weight {hw} < Job weight {jw}")
    jv = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    check(jv["database"]["secret"]["secretName"] == "tally-database-migrate", f"{L}: Job reads the hook Secret")
    dv = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    check(dv["database"]["secret"]["secretName"] == "tally-database", f"{L}: Deployment reads the release Secret")
    ann = r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    check("checksum/secret" in ann, f"{L}: checksum/secret annotation for the inline Secret")
    check(base64.b64decode(main["data"]["database-url"]).decode() == values["database"]["url"], f"{L}: Secret holds the URL")
    check("inline" in r.notes, f"{L}: NOTES warns about the inline URL")


def expect_tls(r: Rendered, values: dict[str, Any]) -> None:
    L = r.label
    c = dep_container(r)
    dep = r.one("Deployment")
    env = {k: v.get("value") for k, v in env_of(c).items()}
    check(env.get("TALLY_TLS_CERT") == "/var/run/secrets/tally-tls/tls.crt", f"{L}: TALLY_TLS_CERT {env.get('TALLY_TLS_CERT')}")
    check(env.get("TALLY_TLS_KEY") == "/var/run/secrets/tally-tls/tls.key", f"{L}: TALLY_TLS_KEY {env.get('TALLY_TLS_KEY')}")
    check(env.get("TALLY_TLS_CLIENT_CA") == "/var/run/secrets/tally-tls-client-ca/ca.crt", f"{L}: TALLY_TLS_CLIENT_CA {env.get('TALLY_TLS_CLIENT_CA')}")
    check(env.get("TALLY_LISTEN") == "0.0.0.0:50051" and env.get("TALLY_METRICS_LISTEN") == "0.0.0.0:9090", f"{L}: listen addresses unchanged")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    m = mounts.get("/var/run/secrets/tally-tls")
    check(m is not None and m.get("readOnly") is True and "subPath" not in m, f"{L}: TLS Secret mounted read-only without subPath: {m}")
    check(vols.get("tls", {}).get("secret") == {"secretName": "tally-grpc-tls", "defaultMode": 0o440, "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}, f"{L}: tls volume: {vols.get('tls')}")
    m = mounts.get("/var/run/secrets/tally-tls-client-ca")
    check(m is not None and m.get("readOnly") is True, f"{L}: client CA Secret mounted read-only: {m}")
    check(vols.get("tls-client-ca", {}).get("secret") == {"secretName": "tally-client-ca", "defaultMode": 0o440, "items": [{"key": "ca.crt", "path": "ca.crt"}]}, f"{L}: tls-client-ca volume: {vols.get('tls-client-ca')}")
    probes = {p: c[p] for p in ("livenessProbe", "readinessProbe", "startupProbe")}
    check(all("grpc" not in p for p in probes.values()), f"{L}: no gRPC probe remains with TLS")
    check({k: (p["httpGet"]["port"], p["httpGet"]["path"]) for k, p in probes.items()} == {"livenessProbe": (9090, "/healthz"), "readinessProbe": (9090, "/readyz"), "startupProbe": (9090, "/healthz")}, f"{L}: probes httpGet 9090 /healthz, /readyz")
    # The Job migrates only; it serves nothing, so it gets no TLS material.
    job = r.one("Job")
    jc = job["spec"]["template"]["spec"]["containers"][0]
    check(not any(k in env_of(jc) for k in TLS_ENV) and all(v["name"] not in ("tls", "tls-client-ca") for v in job["spec"]["template"]["spec"]["volumes"]), f"{L}: migration Job has no TLS material")
    grpc_port = next(p for p in r.one("Service", "tally")["spec"]["ports"] if p["name"] == "grpc")
    check(grpc_port.get("appProtocol") == "grpc", f"{L}: appProtocol grpc with TLS")
    check(r.one("NetworkPolicy")["spec"]["ingress"][2]["ports"][0]["port"] == 9090, f"{L}: NetworkPolicy keeps the metrics (probe) port rule")
    check(not r.of("Secret"), f"{L}: only existing Secrets referenced")
    check("over TLS" in r.notes and "mTLS" in r.notes and "-plaintext" not in r.notes, f"{L}: NOTES describe TLS/mTLS")


EXPECT: dict[str, Callable[[Rendered, dict[str, Any]], None]] = {
    "default-values.yaml": expect_default,
    "postgres-values.yaml": expect_postgres,
    "full-values.yaml": expect_full,
    "inline-db-values.yaml": expect_inline,
    "tls-values.yaml": expect_tls,
}


# ---------------------------------------------------------------------------------------------
# Static checks on the chart's files


FREE_FORM = {"config"}  # maps whose keys are not chart values (documented as a whole)


def is_free_form(key: str, node: dict[str, Any]) -> bool:
    """Label maps and the tally.toml options map are leaves, not groups of values."""
    return key in FREE_FORM or any("/" in k or "." in k for k in node)


def values_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf value (empty maps, lists and free-form maps are leaves)."""
    out = []
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and not is_free_form(key, v):
            out.extend(values_keys(v, key))
        else:
            out.append(key)
    return out


def static_checks(chart: helm.Chart, defaults: dict[str, Any], schema: dict[str, Any]) -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    check(meta.get("apiVersion") == "v2" and meta.get("name") == "tally" and str(meta.get("version")) == "0.1.0" and str(meta.get("appVersion")) == "0.1.0", "Chart.yaml apiVersion/name/version/appVersion")
    # Every key in values.yaml is documented by a comment line right above it.
    lines = (CHART / "values.yaml").read_text().splitlines()
    prev = ""
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        # Label keys inside label maps (they contain "/") are data, not values.
        if re.match(r"^[A-Za-z0-9_.-]+:", stripped):
            check(prev.startswith("#"), f"values.yaml:{n}: {stripped!r} has no comment above it")
        if stripped:
            prev = stripped
    # camelCase top-level keys and group keys.
    for key in values_keys(defaults):
        for part in key.split("."):
            check(re.fullmatch(r"[a-z][A-Za-z0-9]*", part) is not None, f"values key {key}: camelCase")
    # The README's table names every value.
    readme = (CHART / "README.md").read_text()
    for key in values_keys(defaults):
        check(f"`{key}`" in readme, f"helm/tally/README.md does not document `{key}`")
    # The schema is a valid draft-07 schema, accepts the defaults and rejects typos.
    jsonschema.Draft7Validator.check_schema(schema)
    check(schema.get("additionalProperties") is False, "schema: additionalProperties false at the top level")
    for group in ("image", "database", "stripe", "auth", "migrations", "service", "ingress", "autoscaling", "networkPolicy", "serviceMonitor", "podDisruptionBudget", "otel", "persistence", "tls"):
        check(schema["properties"][group].get("additionalProperties") is False, f"schema: additionalProperties false in {group}")
    check(schema["properties"]["tls"]["properties"]["clientCa"].get("additionalProperties") is False, "schema: additionalProperties false in tls.clientCa")
    validator = jsonschema.Draft7Validator(schema)
    errs = list(validator.iter_errors(defaults))
    check(not errs, f"values.yaml does not validate against values.schema.json: {[e.message for e in errs]}")
    for bad, what in (
        ({"replicaCont": 2}, "top-level typo"),
        ({"database": {"existingSecrett": "x"}}, "typo in database"),
        ({"networkPolicy": {"egress": {"postgress": {}}}}, "typo in networkPolicy.egress"),
        ({"config": {"database_url": "postgres://u:p@h/db"}}, "a secret in config"),
        ({"config": {"auto_migrate": True}}, "a chart-managed option in config"),
        ({"config": {"nested_option": {"a": 1}}}, "a nested config value"),
        ({"replicaCount": "3"}, "a string replicaCount"),
        ({"logFormat": "xml"}, "an unknown logFormat"),
        ({"tls": {"enable": True}}, "typo in tls"),
        ({"tls": {"clientCa": {"secret": "x"}}}, "typo in tls.clientCa"),
        ({"tls": {"enabled": "true"}}, "a string tls.enabled"),
        ({"tls": {"keyKey": ""}}, "an empty tls.keyKey"),
        ({"config": {"tls_key": "/k.pem"}}, "a chart-managed TLS option in config"),
    ):
        merged = deep_merge(defaults, bad)
        check(any(True for _ in validator.iter_errors(merged)), f"jsonschema accepts {what}")
        try:
            chart.validate_schema(deep_merge({"auth": {"insecure": True}}, bad))
            check(False, f"Helm schema validation accepts {what}")
        except helm.HelmValuesError:
            check(True, what)


def main() -> int:
    print(f"chart-test: helm-python-sdk {helm.__version__} (libhelm_c {helm.helm_c_version()}, Helm SDK {helm.helm_sdk_version()}), kubernetes-validate against {KUBE_VERSION}", flush=True)
    if not KV.exists():
        die(f"{KV} is missing")
    schema = json.loads((CHART / "values.schema.json").read_text())
    keep = os.environ.get("CHART_TEST_KEEP") == "1"
    work = Path(tempfile.mkdtemp(prefix="tally-chart-", dir=os.environ.get("TMPDIR", "/tmp")))
    manifests = 0
    rendered = 0
    try:
        with helm.Chart.load(CHART) as chart:
            defaults = chart.values
            check(defaults == load_yaml_file(CHART / "values.yaml"), "chart.values equals values.yaml")
            static_checks(chart, defaults, schema)

            ci_files = sorted(CI_DIR.glob("*.yaml"))
            if set(p.name for p in ci_files) != set(EXPECT):
                die(f"helm/tally/ci has {sorted(p.name for p in ci_files)}; the test expects {sorted(EXPECT)}")
            for path in ci_files:
                label = path.name
                values = load_yaml_file(path)
                merged = deep_merge(defaults, values)
                errs = list(jsonschema.Draft7Validator(schema).iter_errors(merged))
                check(not errs, f"{label}: jsonschema: {[e.message for e in errs]}")
                chart.validate_schema(values)
                lint = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
                problems = [m for m in lint["messages"] if m["severity"] >= 2] + [{"error": e} for e in lint["errors"]]
                if problems:
                    for m in problems:
                        print(f"  lint: {m.get('path', '')}: {m['error']}")
                check(not problems, f"{label}: helm lint --strict")
                r = render(chart, values, label)
                rendered += 1
                core, count, custom = write_manifests(r, work / path.stem)
                kubernetes_validate(core, count, label)
                manifests += count + custom_checks(custom, r)
                common_checks(r, merged)
                EXPECT[label](r, merged)
                print(f"  {label}: {len(r.objects)} objects: " + ", ".join(sorted(f"{o['kind']}/{o['metadata']['name']}" for o in r.objects)), flush=True)

            # Variations and refusals.
            dev = {"auth": {"insecure": True}}
            expect_render_failure(chart, deep_merge(dev, {"replicaCount": 2}), "SQLite mode", "SQLite with replicaCount 2")
            expect_render_failure(chart, deep_merge(dev, {"autoscaling": {"enabled": True}}), "SQLite mode", "SQLite with autoscaling")
            expect_render_failure(chart, {}, "auth.existingSecret", "no callers and not insecure")
            expect_render_failure(chart, deep_merge(dev, {"terminationGracePeriodSeconds": 15}), "terminationGracePeriodSeconds", "grace period <= preStop + shutdownGrace")
            expect_render_failure(chart, deep_merge(dev, {"database": {"existingSecret": "a", "url": "postgres://u:p@h/d"}}), "not both", "existingSecret and url together")
            expect_render_failure(chart, deep_merge(dev, {"ingress": {"enabled": True, "tls": {"enabled": True}}}), "secretName", "TLS without a secret")
            expect_render_failure(chart, deep_merge(dev, {"tls": {"enabled": True}}), "tls.enabled needs tls.existingSecret", "gRPC TLS without tls.existingSecret")
            expect_render_failure(chart, deep_merge(dev, {"tls": {"clientCa": {"enabled": True, "existingSecret": "ca"}}}), "tls.clientCa.enabled (mTLS) needs tls.enabled", "mTLS without tls.enabled")

            pg = {"auth": {"insecure": True}, "database": {"existingSecret": "foo"}}
            r = render(chart, deep_merge(pg, {"migrations": {"enabled": False}}), "postgres without the Job")
            check(not r.of("Job") and env_value(dep_container(r), "TALLY_AUTO_MIGRATE") == "true", "migrations.enabled=false → no Job, TALLY_AUTO_MIGRATE=true")
            check(not r.of("Secret"), "existingSecret=foo → no Secret")
            vol = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}["database"]
            check(vol["secret"] == {"secretName": "foo", "defaultMode": 0o440, "items": [{"key": "database-url", "path": "database-url"}]}, f"existingSecret=foo → volume foo/database-url: {vol}")
            r = render(chart, deep_merge(dev, {"persistence": {"existingClaim": "tally-data"}, "lifecycle": {"preStopSleepSeconds": 0}}), "sqlite on a PVC")
            vol = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}["data"]
            check(vol == {"name": "data", "persistentVolumeClaim": {"claimName": "tally-data"}}, "persistence.existingClaim → PVC at /data")
            check("lifecycle" not in dep_container(r), "preStopSleepSeconds 0 → no preStop")
            r = render(chart, deep_merge(pg, {"replicaCount": 2, "podDisruptionBudget": {"enabled": False}}), "pdb off")
            check(not r.of("PodDisruptionBudget"), "podDisruptionBudget.enabled=false → no PDB")
            r = render(chart, deep_merge(dev, {"config": {"ratio": 0.5, "flag": True, "big": 1000000, "text": 'a "quoted" \\ value'}}), "config types")
            cfg = tomllib.loads(r.one("ConfigMap", "tally-config")["data"]["tally.toml"])
            check(cfg["ratio"] == 0.5 and cfg["flag"] is True and cfg["big"] == 1000000 and type(cfg["big"]) is int and cfg["text"] == 'a "quoted" \\ value', f"config scalar types survive TOML rendering: {cfg}")
            r = render(chart, deep_merge(pg, {"stripe": {"existingSecret": "s", "apiKeyKey": ""}}), "stripe webhook only")
            env = env_of(dep_container(r))
            check("TALLY_STRIPE_WEBHOOK_SECRET_FILE" in env and "TALLY_STRIPE_API_KEY_FILE" not in env, "stripe.apiKeyKey empty → only the webhook secret file")
            r = render(chart, deep_merge(dev, {"tls": {"enabled": True, "existingSecret": "srv", "certKey": "chain.pem", "keyKey": "key.pem", "clientCa": {"enabled": True}}}), "mTLS, CA from the server Secret")
            vols = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
            check(vols["tls"]["secret"]["items"] == [{"key": "chain.pem", "path": "tls.crt"}, {"key": "key.pem", "path": "tls.key"}], f"tls.certKey/keyKey → items: {vols['tls']}")
            check(vols["tls-client-ca"]["secret"]["secretName"] == "srv" and vols["tls-client-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], f"tls.clientCa.existingSecret empty → tls.existingSecret: {vols['tls-client-ca']}")
            common_checks(r, deep_merge(defaults, deep_merge(dev, {"tls": {"enabled": True, "existingSecret": "srv", "clientCa": {"enabled": True}}})))
            r = render(chart, deep_merge(dev, {"tls": {"enabled": True, "existingSecret": "srv"}}), "TLS without mTLS")
            c = dep_container(r)
            vols = {v["name"] for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
            check("TALLY_TLS_CERT" in env_of(c) and "TALLY_TLS_CLIENT_CA" not in env_of(c) and "tls" in vols and "tls-client-ca" not in vols, "tls without clientCa → no client CA variable or volume")
            check(c["readinessProbe"].get("httpGet", {}).get("path") == "/readyz" and "grpc" not in c["livenessProbe"], "tls without clientCa → httpGet probes")
            r = render(chart, deep_merge(dev, {"tls": {"existingSecret": "srv"}}), "TLS secret set, TLS off")
            c = dep_container(r)
            check(not any(k in env_of(c) for k in TLS_ENV) and all(v["name"] != "tls" for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]), "tls.enabled=false → no TLS variables or volume even with existingSecret")
            check(all(c[p].get("grpc", {}).get("port") == 50051 and "httpGet" not in c[p] for p in ("livenessProbe", "readinessProbe", "startupProbe")), "tls.enabled=false → grpc probes on the numeric grpc port")
            expect_render_failure(chart, deep_merge(dev, {"adminConsole": {"ingress": True}}), "adminConsole.ingress needs", "console on the Ingress while off")
            r = render(chart, deep_merge(pg, {"adminConsole": {"enabled": True, "existingSecret": "admin-key", "sessionTtl": "2h", "ingress": True}, "ingress": {"enabled": True}}), "admin console")
            c = dep_container(r)
            check(env_value(c, "TALLY_ADMIN_CONSOLE") == "true" and env_value(c, "TALLY_ADMIN_SESSION_TTL") == "2h" and env_value(c, "TALLY_ADMIN_SESSION_KEY_FILE") == "/var/run/secrets/tally-admin/session-key", "adminConsole → console variables, the key as a file")
            check("TALLY_ADMIN_SESSION_KEY" not in env_of(c), "the session key never in the environment")
            vols = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
            check(vols["admin-session"]["secret"] == {"secretName": "admin-key", "defaultMode": 0o440, "items": [{"key": "session-key", "path": "session-key"}]}, f"adminConsole.existingSecret → volume: {vols.get('admin-session')}")
            paths = [p["path"] for p in r.one("Ingress")["spec"]["rules"][0]["http"]["paths"]]
            check("/admin" in paths, f"adminConsole.ingress → /admin on the Ingress: {paths}")
            r = render(chart, deep_merge(pg, {"ingress": {"enabled": True}}), "console off")
            check("TALLY_ADMIN_CONSOLE" not in env_of(dep_container(r)) and "/admin" not in [p["path"] for p in r.one("Ingress")["spec"]["rules"][0]["http"]["paths"]], "adminConsole off → no console variables, no /admin route")
            r = render(chart, {**dev, "fullnameOverride": "credits"}, "fullnameOverride")
            check(r.one("Deployment")["metadata"]["name"] == "credits" and r.one("ConfigMap")["metadata"]["name"] == "credits-config", "fullnameOverride names objects")
    except helm.HelmError as e:
        die(f"Helm error: {type(e).__name__}: {e}")
    finally:
        if keep or failures:
            print(f"chart-test: rendered manifests kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"chart-test: {passed} passed, {len(failures)} failed")
    if failures:
        print("chart-test: FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"chart-test: {rendered} values files rendered, {manifests} manifests validated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
