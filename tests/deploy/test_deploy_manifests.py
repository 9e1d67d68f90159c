#!/usr/bin/env python3
"""deploy/kubernetes, deploy/libvirt and YAML lint of deploy/.
- yamllint (Debian yamllint) over deploy/ with tests/deploy/yamllint.yml;
- Kubernetes: every document has apiVersion/kind/metadata.name; the core
  objects (DaemonSet, Service, Namespace, ServiceAccount) are checked field by
  field against the Kubernetes API models of Debian's python3-kubernetes
  (unknown field or wrong type = error); the DaemonSet is not privileged, drops
  ALL and adds exactly BPF, PERFMON, DAC_READ_SEARCH, mounts tracefs, bpffs and
  BTF, exposes 9470 like deploy/prometheus/prometheus.yml and the Service /
  ServiceMonitor; scrape annotations present; Service named "vkickd" (job label);
- libvirt: the domain fragment is well-formed XML, declares the qemu namespace
  and passes -qmp unix:...,server=on,wait=off.
"""
import os, re, shutil, subprocess, sys
import xml.etree.ElementTree as ET

SRC = os.environ.get("VKICK_SOURCE_DIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
fails = []
# Debian's python3-yaml / python3-kubernetes, also when python3 is another build.
if os.path.isdir("/usr/lib/python3/dist-packages") and "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")
try:
    import yaml
except ImportError:
    print("SKIP: python3-yaml missing")
    sys.exit(77)


def check_model(obj, model_cls, where):
    """Walks obj against a python3-kubernetes model class's openapi_types."""
    import kubernetes.client.models as M
    inv = {v: k for k, v in model_cls.attribute_map.items()}
    for key, val in obj.items():
        if key not in inv:
            fails.append(f"{where}: unknown field '{key}' for {model_cls.__name__}")
            continue
        check_type(val, model_cls.openapi_types[inv[key]], f"{where}.{key}", M)


def check_type(val, t, where, M):
    if t.startswith("list["):
        if not isinstance(val, list):
            fails.append(f"{where}: want a list"); return
        for i, v in enumerate(val):
            check_type(v, t[5:-1], f"{where}[{i}]", M)
    elif t.startswith("dict("):
        if not isinstance(val, dict):
            fails.append(f"{where}: want a map")
    elif t in ("str", "int", "bool", "float", "object", "datetime"):
        ok = {"str": str, "int": int, "bool": bool, "float": (int, float)}.get(t, object)
        if t == "int" and isinstance(val, bool) or not isinstance(val, ok):
            fails.append(f"{where}: want {t}, got {val!r}")
    else:
        cls = getattr(M, t, None)
        if cls is None:
            return
        if t == "IntOrString" or not isinstance(val, dict):
            if not isinstance(val, dict) and not t.endswith("IntOrString"):
                fails.append(f"{where}: want an object {t}")
            return
        check_model(val, cls, where)


def main():
    if shutil.which("yamllint"):
        r = subprocess.run(["yamllint", "-f", "parsable", "-c", os.path.join(SRC, "tests/deploy/yamllint.yml"),
                            os.path.join(SRC, "deploy")], capture_output=True, text=True)
        print("yamllint:", r.returncode, r.stdout.strip())
        if r.returncode:
            fails.append("yamllint")
    else:
        print("note: yamllint missing (Debian yamllint), lint skipped")
    try:
        import kubernetes.client.models as M
    except ImportError:
        M = None
        print("note: python3-kubernetes missing, field-level API check skipped")
    docs = []
    kdir = os.path.join(SRC, "deploy/kubernetes")
    for f in sorted(os.listdir(kdir)):
        if f.endswith((".yaml", ".yml")):
            docs += [(f, d) for d in yaml.safe_load_all(open(os.path.join(kdir, f))) if d]
    kinds = {}
    for f, d in docs:
        for k in ("apiVersion", "kind", "metadata"):
            if k not in d:
                fails.append(f"{f}: document without {k}")
        if not d.get("metadata", {}).get("name"):
            fails.append(f"{f}: {d.get('kind')} without metadata.name")
        kinds[d.get("kind")] = d
        models = {("apps/v1", "DaemonSet"): "V1DaemonSet", ("v1", "Service"): "V1Service",
                  ("v1", "Namespace"): "V1Namespace", ("v1", "ServiceAccount"): "V1ServiceAccount"}
        m = models.get((d.get("apiVersion"), d.get("kind")))
        if M is not None and m:
            check_model(d, getattr(M, m), f"{f}:{d['kind']}")
    for k in ("DaemonSet", "Service", "ServiceMonitor"):
        if k not in kinds:
            fails.append(f"no {k}")
    ds = kinds.get("DaemonSet", {})
    pod = ds.get("spec", {}).get("template", {}).get("spec", {})
    ann = ds.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != "9470":
        fails.append("DaemonSet pods lack prometheus.io/scrape / port 9470 annotations")
    if pod.get("hostNetwork"):
        fails.append("hostNetwork is not needed")
    for c in pod.get("containers", []):
        sc = c.get("securityContext", {})
        if sc.get("privileged") is not False or sc.get("allowPrivilegeEscalation") is not False:
            fails.append(f"container {c['name']}: must set privileged: false, allowPrivilegeEscalation: false")
        caps = sc.get("capabilities", {})
        if caps.get("drop") != ["ALL"] or set(caps.get("add", [])) != {"BPF", "PERFMON", "DAC_READ_SEARCH"}:
            fails.append(f"container {c['name']}: capabilities {caps}")
        ports = [p.get("containerPort") for p in c.get("ports", [])]
        if 9470 not in ports:
            fails.append(f"container {c['name']}: no containerPort 9470")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        for p in ("/sys/kernel/tracing", "/sys/fs/bpf", "/sys/kernel/btf"):
            if p not in mounts:
                fails.append(f"container {c['name']}: {p} not mounted")
    svc = kinds.get("Service", {})
    if svc.get("metadata", {}).get("name") != "vkickd" or \
            [p.get("port") for p in svc.get("spec", {}).get("ports", [])] != [9470]:
        fails.append("Service must be 'vkickd' on port 9470 (the alert rules select job=\"vkickd\")")
    sm = kinds.get("ServiceMonitor", {})
    if sm.get("apiVersion") != "monitoring.coreos.com/v1" or \
            [e.get("port") for e in sm.get("spec", {}).get("endpoints", [])] != ["metrics"] or \
            sm.get("spec", {}).get("selector", {}).get("matchLabels") != svc.get("spec", {}).get("selector"):
        fails.append("ServiceMonitor must select the Service and scrape its 'metrics' port")
    prom = yaml.safe_load(open(os.path.join(SRC, "deploy/prometheus/prometheus.yml")))
    job = [j for j in prom["scrape_configs"] if j["job_name"] == "vkickd"]
    if not job or job[0]["static_configs"][0]["targets"] != ["127.0.0.1:9470"]:
        fails.append("prometheus.yml: job vkickd must scrape 127.0.0.1:9470")

    # libvirt
    x = os.path.join(SRC, "deploy/libvirt/vkick-qmp-domain-fragment.xml")
    raw = open(x).read()
    try:
        root = ET.fromstring(raw)
        ns = "http://libvirt.org/schemas/domain/qemu/1.0"
        if 'xmlns:qemu="%s"' % ns not in raw:
            fails.append("libvirt: xmlns:qemu namespace not declared")
        args = [a.get("value") for a in root.iter(f"{{{ns}}}arg")]
        i = args.index("-qmp") if "-qmp" in args else -1
        if i < 0 or i + 1 >= len(args) or not re.fullmatch(r"unix:/run/vkick-qmp/[^,]+\.sock,server=on,wait=off",
                                                           args[i + 1]):
            fails.append(f"libvirt: no '-qmp unix:/run/vkick-qmp/<dom>.sock,server=on,wait=off' in {args}")
    except ET.ParseError as e:
        fails.append(f"libvirt fragment is not well-formed XML: {e}")

    if fails:
        print("FAIL:", *fails, sep="\n  ")
        return 1
    print(f"OK: {len(docs)} Kubernetes documents, libvirt fragment, YAML lint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
