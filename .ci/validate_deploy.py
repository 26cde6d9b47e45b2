"""The checks of .ci/validate-deploy that need Python (YAML, TOML, Kubernetes schemas, PromQL and
SQL of the dashboards).

usage:
  validate_deploy.py checks FAILURES_FILE [DIR=RENDERED.yaml ...]
      every check over deploy/ and dashboards/; failures go to FAILURES_FILE (one per line), the
      count of passed checks to FAILURES_FILE.passed. The services' own contracts (their
      `--print-config-keys` and `--print-metrics` output) are read from $HYBRID_CONTRACTS.
  validate_deploy.py kubernetes-sd PROMETHEUS_YML
      for a promtool built without Kubernetes discovery: checks those blocks' fields here and
      rewrites the file with a static target in their place (exit 1 on a bad block).
"""

import sys


def kubernetes_sd(path):
    import yaml
    conf = yaml.safe_load(open(path))
    allowed = {"role", "namespaces", "selectors", "api_server", "kubeconfig_file", "attach_metadata",
               "basic_auth", "authorization", "oauth2", "tls_config", "proxy_url", "follow_redirects",
               "enable_http2", "bearer_token", "bearer_token_file"}
    roles = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
    errors = []
    for sc in conf.get("scrape_configs", []):
        for sd in sc.pop("kubernetes_sd_configs", None) or []:
            if set(sd) - allowed:
                errors.append(f"{sc['job_name']}: unknown kubernetes_sd_configs fields {sorted(set(sd) - allowed)}")
            if sd.get("role") not in roles:
                errors.append(f"{sc['job_name']}: kubernetes_sd_configs role must be one of {sorted(roles)}")
            ns = sd.get("namespaces", {})
            if ns and (set(ns) - {"names", "own_namespace"} or not all(isinstance(n, str) for n in ns.get("names", []))):
                errors.append(f"{sc['job_name']}: bad kubernetes_sd_configs namespaces")
            sc.setdefault("static_configs", []).append({"targets": ["kubernetes-pod.invalid:9180"]})
    yaml.safe_dump(conf, open(path, "w"), sort_keys=False)
    if errors:
        print("\n".join(errors))
    return 1 if errors else 0


if sys.argv[1:2] == ["kubernetes-sd"]:
    sys.exit(kubernetes_sd(sys.argv[2]))
if sys.argv[1:2] != ["checks"]:
    sys.exit(__doc__)

import functools, json, os, re, subprocess, sys, urllib.parse
from pathlib import Path

import yaml
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib
import kubernetes_validate.utils as kv

failures_file, rendered_args = sys.argv[2], sys.argv[3:]
CONTRACTS = Path(os.environ["HYBRID_CONTRACTS"])
failures, passed = [], [0]

def ok(msg):
    passed[0] += 1
    print(f"    ok: {msg}")

def bad(msg):
    failures.append(msg)
    print(f"    FAIL: {msg}")

def section(name, fn):
    """Runs one group of checks; a crash is a failure, and the other groups still run."""
    try:
        fn()
    except Exception as e:
        bad(f"{name}: check crashed: {type(e).__name__}: {e}")

ROOT = Path.cwd()

# ---- every YAML / JSON / TOML file parses --------------------------------------------------
def rel(p):
    return str(Path(p).relative_to(ROOT))

files = sorted(p for d in ("deploy", "dashboards") for p in (ROOT / d).rglob("*") if p.is_file())
def parse_all():
    global yaml_docs
    yaml_docs = {}
    for p in files:
        try:
            if p.suffix in (".yaml", ".yml"):
                yaml_docs[rel(p)] = list(yaml.safe_load_all(p.read_text()))
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".toml":
                tomllib.loads(p.read_text())
            else:
                continue
        except Exception as e:
            bad(f"{rel(p)} does not parse: {e}")
    ok(f"{len(files)} files under deploy/ and dashboards/ read; YAML, JSON and TOML parse "
       f"({sum(len(v) for v in yaml_docs.values())} YAML documents)")


section('parse_all', parse_all)

# ---- config files: known keys and types ------------------------------------------------------
# The keys each service accepts, with their types: what the service itself prints
# (`--print-config-keys`, from the settings type that refuses any other key).
TOML_TYPES = {"string": str, "integer": int, "boolean": bool, "array": list}

def contract(name):
    return json.loads((CONTRACTS / name).read_text())

def config_keys(service):
    keys = contract(f"{service}-config-keys.json")["keys"]
    return {k["key"]: TOML_TYPES.get(k["type"], object) for k in keys}

GATEWAY_KEYS = config_keys("gateway")
WORKER_KEYS = config_keys("worker")

def check_config(name, text, where):
    kind = "gateway" if name.startswith("gateway") else "worker" if name.startswith("worker") else None
    if kind is None:
        return None
    try:
        conf = tomllib.loads(text)
    except Exception as e:
        bad(f"{where}: {e}")
        return None
    known = GATEWAY_KEYS if kind == "gateway" else WORKER_KEYS
    problems = []
    for k, v in conf.items():
        if k not in known:
            problems.append(f"unknown key `{k}`")
        elif known[k] is object:
            pass
        elif known[k] is bool:
            if not isinstance(v, bool):
                problems.append(f"`{k}` should be true or false")
        elif not isinstance(v, known[k]) or isinstance(v, bool):
            problems.append(f"`{k}` should be a {known[k].__name__}")
        elif known[k] is int and v <= 0:
            problems.append(f"`{k}` should be positive")
        elif k.endswith("listen") and not re.fullmatch(r"[0-9.]+:\d+|\[[0-9a-fA-F:]+\]:\d+", v):
            problems.append(f"`{k}` should be HOST:PORT, got {v!r}")
        elif known[k] is list and not all(isinstance(x, str) and x for x in v):
            problems.append(f"`{k}` should be a list of strings")
    for url in conf.get("workers", []) if kind == "gateway" else []:
        u = urllib.parse.urlparse(url[len("dns+"):] if url.startswith("dns+") else url)
        if u.scheme not in ("http", "https") or not u.hostname or not u.port:
            problems.append(f"worker URL {url!r} should be [dns+]http(s)://HOST:PORT")
    if "database_url" in conf and re.search(r"://[^/@]*:[^/@]+@", conf["database_url"]):
        problems.append("database_url holds a password: give it as GATEWAY_DATABASE_URL from a secret")
    if problems:
        bad(f"{where}: " + "; ".join(problems))
    else:
        ok(f"{where}: {kind} configuration keys and types")
    return conf

def check_config_files():
    for p in files:
        if p.suffix == ".toml":
            check_config(p.name, p.read_text(), rel(p))


section('check_config_files', check_config_files)

# ---- Kubernetes: schemas and references on the rendered output ------------------------------
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)
K8S_VERSIONS = ["1.29.0", "1.37.0"]   # oldest and newest Kubernetes checked

def is_builtin(api_version):
    group = api_version.split("/")[0] if "/" in api_version else ""
    return "." not in group or group.endswith(".k8s.io")

def container_files(pod, container, by_kind):
    """Paths of the files that a container sees from ConfigMap, Secret and projected volumes,
    and the mount points of the other volumes (their content is not known here)."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    files, opaque = {}, []
    def add(mount, source_kind, name, items, sub=""):
        obj = by_kind.get((source_kind, name))
        keys = list((obj or {}).get("data", {}) or {}) + list((obj or {}).get("stringData", {}) or {})
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in keys]
        for key, path in pairs:
            files[os.path.normpath(os.path.join(mount, sub, path))] = (source_kind, name, key)
    for m in container.get("volumeMounts", []):
        v = vols.get(m["name"], {})
        mount = m["mountPath"]
        if "configMap" in v:
            add(mount, "ConfigMap", v["configMap"]["name"], v["configMap"].get("items"))
        elif "secret" in v:
            add(mount, "Secret", v["secret"]["secretName"], v["secret"].get("items"))
        elif "projected" in v:
            for s in v["projected"]["sources"]:
                if "configMap" in s:
                    add(mount, "ConfigMap", s["configMap"]["name"], s["configMap"].get("items"))
                elif "secret" in s:
                    add(mount, "Secret", s["secret"]["name"], s["secret"].get("items"))
        else:
            opaque.append(mount)
    return files, opaque

def check_rendered(label, path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    # Secrets that an operator in the render creates: CloudNativePG's <cluster>-app / -superuser.
    external = {f"{d['metadata']['name']}-{s}" for d in docs
                if d["apiVersion"].startswith("postgresql.cnpg.io/") and d["kind"] == "Cluster"
                for s in ("app", "superuser")}
    nbad = len(failures)
    # Schemas.
    for d in docs:
        ident = f"{label}: {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if not isinstance(d.get("metadata"), dict) or not d["metadata"].get("name"):
            bad(f"{ident}: no metadata.name")
            continue
        if not is_builtin(d["apiVersion"]):
            # A custom resource: no schema here (the operator's CRD is not bundled); parsed,
            # and its shape checked.
            if not isinstance(d.get("spec"), dict):
                bad(f"{ident}: custom resource without a spec mapping")
            else:
                print(f"    note: {ident} ({d['apiVersion']}): custom resource, schema check skipped")
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(x) for x in e.path)
                bad(f"{ident} against Kubernetes {version}: {where}: {e.message}")
            except kv.SchemaNotFoundError as e:
                bad(f"{ident}: {e.message}")
    # References and conventions.
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    def selects(selector, labels):
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
    for dep in deployments:
        name = dep["metadata"]["name"]
        tpl = dep["spec"]["template"]
        pod = tpl["spec"]
        ident = f"{label}: Deployment/{name}"
        if not selects(dep["spec"]["selector"].get("matchLabels", {}), tpl["metadata"].get("labels", {})):
            bad(f"{ident}: selector does not match the pod template's labels")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            bad(f"{ident}: pod securityContext.runAsNonRoot is not true")
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
        for c in claims:
            if ("PersistentVolumeClaim", c) not in by_kind:
                bad(f"{ident}: PersistentVolumeClaim {c} is not in the render")
        if pod.get("serviceAccountName") and ("ServiceAccount", pod["serviceAccountName"]) not in by_kind:
            bad(f"{ident}: ServiceAccount {pod['serviceAccountName']} is not in the render")
        for c in pod["containers"]:
            cid = f"{ident} container {c['name']}"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    bad(f"{cid}: no {probe}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    bad(f"{cid}: {probe} port {port} is not a named container port")
            req = c.get("resources", {}).get("requests", {})
            if "cpu" not in req or "memory" not in req:
                bad(f"{cid}: resources.requests needs cpu (for the HPA) and memory")
            if "memory" not in c.get("resources", {}).get("limits", {}):
                bad(f"{cid}: no memory limit")
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
                bad(f"{cid}: needs readOnlyRootFilesystem: true and allowPrivilegeEscalation: false")
            ann = tpl["metadata"].get("annotations", {})
            if ann.get("prometheus.io/scrape") == "true":
                if int(ann.get("prometheus.io/port", 0)) not in ports.values():
                    bad(f"{cid}: prometheus.io/port {ann.get('prometheus.io/port')} is not a container port")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef") or e.get("valueFrom", {}).get("configMapKeyRef")
                if not ref:
                    continue
                kind = "Secret" if "secretKeyRef" in e["valueFrom"] else "ConfigMap"
                if kind == "Secret" and ref["name"] in external:
                    continue
                obj = by_kind.get((kind, ref["name"]))
                if obj is None:
                    bad(f"{cid}: env {e['name']} refers to {kind} {ref['name']}, not in the render")
                elif ref["key"] not in {**(obj.get("data") or {}), **(obj.get("stringData") or {})}:
                    bad(f"{cid}: env {e['name']} refers to missing key {ref['key']} of {kind} {ref['name']}")
            files, opaque = container_files(pod, c, by_kind)
            for v in pod.get("volumes", []):
                for kind, src in (("ConfigMap", v.get("configMap")), ("Secret", v.get("secret"))):
                    if src and (kind, src.get("name") or src.get("secretName")) not in by_kind:
                        bad(f"{cid}: volume {v['name']} refers to {kind} {src.get('name') or src.get('secretName')}, not in the render")
                for s in v.get("projected", {}).get("sources", []):
                    for kind in ("ConfigMap", "Secret"):
                        src = s.get(kind[0].lower() + kind[1:])
                        if src and (kind, src["name"]) not in by_kind:
                            bad(f"{cid}: projected volume {v['name']} refers to {kind} {src['name']}, not in the render")
            for (kind, oname, key) in files.values():
                obj = by_kind.get((kind, oname))
                if obj is not None and key not in {**(obj.get("data") or {}), **(obj.get("stringData") or {})}:
                    bad(f"{cid}: mounts missing key {key} of {kind} {oname}")
            # --config FILE must be mounted, and the paths in that file too.
            argv = c.get("command", []) + c.get("args", [])
            for i, a in enumerate(argv[:-1]):
                if a != "--config":
                    continue
                cfg = os.path.normpath(argv[i + 1])
                if cfg not in files:
                    bad(f"{cid}: --config {cfg} is not a mounted file")
                    continue
                kind, oname, key = files[cfg]
                obj = by_kind[(kind, oname)]
                conf = check_config(os.path.basename(cfg), obj["data"][key], f"{cid}: {cfg}")
                for k, v in (conf or {}).items():
                    for s in (v if isinstance(v, list) else [v]):
                        if isinstance(s, str) and s.startswith("/"):
                            s = os.path.normpath(s)
                            if s not in files and not any(s.startswith(o.rstrip("/") + "/") for o in opaque):
                                bad(f"{cid}: {cfg}: `{k}` = {s} is not a mounted file")
    for svc in (d for d in docs if d["kind"] == "Service"):
        ident = f"{label}: Service/{svc['metadata']['name']}"
        pods = [dep["spec"]["template"] for dep in deployments
                if selects(svc["spec"].get("selector", {}), dep["spec"]["template"]["metadata"].get("labels", {}))]
        if not pods:
            bad(f"{ident}: selects no Deployment's pods")
        names = {p.get("name") for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names:
                bad(f"{ident}: targetPort {p['targetPort']} is not a named port of its pods")
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in by_kind:
            bad(f"{label}: HorizontalPodAutoscaler/{hpa['metadata']['name']} targets missing {ref['kind']}/{ref['name']}")
    for pdb in (d for d in docs if d["kind"] in ("PodDisruptionBudget", "NetworkPolicy")):
        sel = (pdb["spec"].get("selector") or pdb["spec"].get("podSelector") or {}).get("matchLabels", {})
        if not any(selects(sel, dep["spec"]["template"]["metadata"].get("labels", {})) for dep in deployments):
            bad(f"{label}: {pdb['kind']}/{pdb['metadata']['name']} selects no Deployment's pods")
    if len(failures) == nbad:
        ok(f"{label}: {len(docs)} objects valid against Kubernetes {' and '.join(v[:4] for v in K8S_VERSIONS)} schemas (strict); references, ports, probes, security settings and mounted config paths consistent")

def check_renders():
    for arg in rendered_args:
        label, path = arg.split("=", 1)
        check_rendered(label, path)


section('check_renders', check_renders)

# Every manifest under deploy/kubernetes is used by a kustomization.
def check_orphans():
    used = set()
    for k in (ROOT / "deploy/kubernetes").rglob("kustomization.yaml"):
        kz = yaml.safe_load(k.read_text())
        refs = list(kz.get("resources", [])) + list(kz.get("patchesStrategicMerge", []))
        refs += [p["path"] for p in kz.get("patches", []) if "path" in p]
        for g in kz.get("configMapGenerator", []) + kz.get("secretGenerator", []):
            refs += [f.split("=", 1)[-1] for f in g.get("files", [])] + list(g.get("envs", []))
        used |= {os.path.normpath(k.parent / r) for r in refs}
    orphans = [rel(p) for p in (ROOT / "deploy/kubernetes").rglob("*")
               if p.is_file() and p.name != "kustomization.yaml" and os.path.normpath(p) not in used]
    if orphans:
        bad("files under deploy/kubernetes used by no kustomization: " + ", ".join(sorted(orphans)))
    else:
        ok("every file under deploy/kubernetes is used by a kustomization")


section('check_orphans', check_orphans)

# ---- metrics: alerts and dashboards use only what the services export -----------------------
# What the services export: what they print themselves (`--print-metrics`).
EXPORTED = [m for s in ("gateway", "worker") for m in contract(f"{s}-metrics.json")["metrics"]]
HISTOGRAMS = {m["name"] for m in EXPORTED if m["type"] == "histogram"}
COUNTERS_GAUGES = {m["name"] for m in EXPORTED} - HISTOGRAMS
KNOWN = COUNTERS_GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
SYNTHETIC = {"up"}   # written by Prometheus itself for every target

def metric_names(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                    # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)                   # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\b((?:gateway|worker)_[a-z0-9_]+)\b", expr)) | \
        ({"up"} if re.search(r"\bup\s*[{\[]", expr) else set())

def check_exprs(where, exprs):
    unknown = set()
    for e in exprs:
        names = metric_names(e)
        if not names:
            bad(f"{where}: expression uses no known metric: {e.strip()[:80]}")
        unknown |= names - KNOWN - SYNTHETIC
        for h in HISTOGRAMS:
            if re.search(rf"\b{h}\b(?!_)", re.sub(r'"[^"]*"', "", e)):
                bad(f"{where}: histogram {h} used without _bucket/_sum/_count")
    if unknown:
        bad(f"{where}: unknown metric names: {', '.join(sorted(unknown))}")
    else:
        ok(f"{where}: {len(exprs)} expressions use only the services' metrics")

def check_alerts():
    if "deploy/prometheus/alerts.yml" not in yaml_docs:
        return   # does not parse: reported above
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    check_exprs("deploy/prometheus/alerts.yml", [r["expr"] for g in rules["groups"] for r in g["rules"]])


section('check_alerts', check_alerts)

# Metrics that no dashboard or alert uses (informational: not every metric needs a panel).
def note_unused():
    used = set()
    for p in (ROOT / "dashboards").glob("*.json"):
        used |= metric_names(p.read_text())
    used |= metric_names((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for n in sorted(COUNTERS_GAUGES | HISTOGRAMS):
        if n not in used and not any(u.startswith(n + "_") for u in used):
            print(f"    note: {n} is exported, but no dashboard or alert uses it")


section('note_unused', note_unused)

# ---- dashboards -------------------------------------------------------------------------------
ALLOWED_MACROS = {"$__unixEpochFrom()", "$__unixEpochTo()"}
DASHBOARDS = {
    "operator.json": ("hybrid-operator", "prometheus", "prometheus"),
    "usage.json": ("hybrid-usage", "grafana-postgresql-datasource", "ledger"),
}
sql_queries = []
def check_dashboards():
    for fname, (uid, ds_type, ds_uid) in DASHBOARDS.items():
        p = ROOT / "dashboards" / fname
        where = f"dashboards/{fname}"
        try:
            d = json.loads(p.read_text())
        except Exception as e:
            bad(f"{where}: {e}")
            continue
        nbad = len(failures)
        if d.get("uid") != uid:
            bad(f"{where}: uid should be {uid}, is {d.get('uid')}")
        if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
            bad(f"{where}: schemaVersion should be 36 or later")
        panels = d.get("panels", [])
        for r in [p for p in panels if p.get("type") == "row"]:
            panels = panels + r.get("panels", [])
        ids = [p.get("id") for p in panels]
        if len(ids) != len(set(ids)) or None in ids:
            bad(f"{where}: panel ids missing or not unique")
        exprs = []
        for pnl in panels:
            if pnl.get("type") == "row":
                continue
            pw = f"{where} panel {pnl.get('title')!r}"
            gp = pnl.get("gridPos", {})
            if not all(isinstance(gp.get(k), int) for k in "hwxy") or gp["x"] + gp["w"] > 24:
                bad(f"{pw}: bad gridPos {gp}")
            if not pnl.get("targets"):
                bad(f"{pw}: no query")
            for t in pnl.get("targets", []):
                ds = t.get("datasource") or pnl.get("datasource") or {}
                if ds.get("type") != ds_type or ds.get("uid") != ds_uid:
                    bad(f"{pw}: data source should be {{type: {ds_type}, uid: {ds_uid}}}, is {ds}")
                if ds_type == "prometheus":
                    if not t.get("expr"):
                        bad(f"{pw}: target {t.get('refId')} has no expr")
                    else:
                        exprs.append(t["expr"])
                else:
                    q = t.get("rawSql", "")
                    if not t.get("rawQuery") or not q.strip():
                        bad(f"{pw}: target {t.get('refId')} has no raw SQL")
                        continue
                    body = q.strip().rstrip(";")
                    if not re.match(r"(?is)^\s*select\b", body) or ";" in body:
                        bad(f"{pw}: SQL must be a single SELECT")
                    macros = set(re.findall(r"\$__\w+(?:\([^)]*\))?", q))
                    others = set(re.findall(r"\$\{?\w+", q)) - {m.split("(")[0] for m in ALLOWED_MACROS}
                    others = {o for o in others if not any(m.startswith(o) for m in macros)}
                    if macros - ALLOWED_MACROS or others:
                        bad(f"{pw}: SQL may use only $__unixEpochFrom() and $__unixEpochTo(), found {sorted((macros - ALLOWED_MACROS) | others)}")
                    if "$__unixepoch" in q.lower() and not re.search(r"\$__unixEpoch(From|To)\(\)(::bigint)?\s*\*\s*1000", q):
                        print(f"    note: {pw}: epoch macros are seconds, the ledger's columns milliseconds")
                    sql_queries.append((pw, q))
        if ds_type == "prometheus":
            check_exprs(where, exprs)
            # promtool parses the queries as recording rules (Grafana's range variables made concrete).
            grafana_vars = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
            def concrete(e):
                for k, v in grafana_vars.items():
                    e = e.replace(k, v)
                return e
            rules = {"groups": [{"name": fname, "rules": [
                {"record": f"dashboard:query_{i}", "expr": concrete(e)} for i, e in enumerate(exprs)]}]}
            with open(os.path.join(os.path.dirname(failures_file), f"{Path(fname).stem}.dashboard-rules.yml"), "w") as f:
                yaml.safe_dump(rules, f)
        if len(failures) == nbad:
            ok(f"{where}: uid {uid}, {len([p for p in panels if p.get('type') != 'row'])} panels on data source {ds_uid}")


section('check_dashboards', check_dashboards)

def check_provisioning():
    if "dashboards/provisioning/datasources.yaml" not in yaml_docs:
        return   # does not parse: reported above
    prov = yaml.safe_load((ROOT / "dashboards/provisioning/datasources.yaml").read_text())
    uids = {(ds.get("type"), ds.get("uid")) for ds in prov.get("datasources", [])}
    missing = {(t, u) for _, t, u in DASHBOARDS.values()} - uids
    if missing:
        bad(f"dashboards/provisioning/datasources.yaml: no data source {sorted(missing)}")
    else:
        ok("dashboards/provisioning/datasources.yaml provides the dashboards' data sources")


section('check_provisioning', check_provisioning)

# ---- the usage dashboard's SQL against a throw-away ledger database (when Postgres answers) --
url = os.environ.get("LEDGER_TEST_POSTGRES", "postgres://postgres:postgres@127.0.0.1:5432/postgres")
def psql(db_url, *args):
    cmd = ["psql", db_url, "-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", *args]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
def run_sql():
    have_pg = False
    try:
        have_pg = psql(url, "-c", "SELECT 1").returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass
    if not have_pg:
        print(f"    note: no Postgres server answers at {re.sub(r':[^:@/]*@', ':***@', url)}: the dashboard SQL was not run")
    else:
        db = f"validate_deploy_{os.getpid()}"
        base, _, _ = url.rpartition("/")
        dburl = f"{base}/{db}"
        r = psql(url, "-c", f"CREATE DATABASE {db}")
        if r.returncode != 0:
            print(f"    note: cannot create a throw-away database ({r.stderr.strip()}): the dashboard SQL was not run")
            return
        try:
            migrations = sorted((ROOT / "migrations").glob("*.sql"))
            for m in migrations:
                r = psql(dburl, "-f", str(m))
                if r.returncode != 0:
                    bad(f"{rel(m)} does not apply: {r.stderr.strip()}")
            rels = set(psql(dburl, "-At", "-c", "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").stdout.split())
            ran, skipped = 0, set()
            for pw, q in sql_queries:
                need = set(re.findall(r"(?i)(?<![$\w])(?:from|join)\s+([a-z_][a-z0-9_]*)\b(?!\s*\()", q))
                missing = need - rels
                if missing:
                    skipped |= missing
                    continue
                sql = q.replace("$__unixEpochFrom()", "1700000000").replace("$__unixEpochTo()", "1702592000")
                r = psql(dburl, "-c", sql)
                if r.returncode != 0:
                    bad(f"{pw}: SQL fails on the ledger schema: {r.stderr.strip()}")
                ran += 1
            if skipped:
                print(f"    note: not in the ledger schema of migrations/ yet, their panels' SQL was not run: {', '.join(sorted(skipped))}")
            ok(f"{ran} dashboard SQL queries run against a throw-away ledger database ({len(migrations)} migrations applied)")
        finally:
            psql(url, "-c", f"DROP DATABASE IF EXISTS {db}")


section('run_sql', run_sql)

with open(failures_file, "w") as f:
    f.write("\n".join(" ".join(m.split()) for m in failures))
with open(failures_file + ".passed", "w") as f:
    f.write(str(passed[0]))
