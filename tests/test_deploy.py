"""deploy/: the manifests protect every link, and the certificates make-certs.sh (or the
cert-manager component) makes are the ones they mount, with the identities the allow lists name.

The exec probe (deploy/probe.py) runs against a real gRPC server over real mTLS with those
certificates. Once the protection flags are in the tree, every container's arguments are parsed
by linkedblob's own command line, so a flag the manifest names and no service has fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests import deploy_helpers as d
from tests.deploy_helpers import CERT_MANAGER, DEPLOY

# The file-valued flags: each must point into a read-only mounted Secret or ConfigMap.
FILE_FLAGS = (
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--backend-tls-ca",
    "--backend-tls-cert",
    "--backend-tls-key",
    "--auth-token-key",
    "--auth-policy",
    "--grant-secret-file",
)
BACKEND_TLS = ("--backend-tls-ca", "--backend-tls-cert", "--backend-tls-key")
SERVER_TLS = ("--tls-cert", "--tls-key")
INTERNAL_SERVER = (*SERVER_TLS, "--tls-client-ca", "--allow-gateway", "--allow-collector")
AUTH = ("--auth-token-key", "--auth-token-issuer", "--auth-token-audience", "--auth-policy")
REQUIRED = {
    "blob": (*INTERNAL_SERVER, "--direct-port", "--grant-secret-file"),
    "link": INTERNAL_SERVER,
    "gateway": (*SERVER_TLS, *BACKEND_TLS, *AUTH, "--grant-secret-file"),
    "gc": (*BACKEND_TLS, "--grant-secret-file"),
}


@pytest.mark.parametrize("overlay", sorted(d.OVERLAYS))
def test_overlays_render_objects_of_known_kinds_once_each(overlay: str) -> None:
    docs = d.render(d.OVERLAYS[overlay])
    kinds = {doc["kind"] for doc in docs}
    assert kinds <= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Certificate",
        "Issuer",
    }
    assert len({(doc["kind"], doc["metadata"]["name"]) for doc in docs}) == len(docs)
    namespaced = [doc for doc in docs if doc["kind"] != "Namespace"]
    assert {doc["metadata"].get("namespace") for doc in namespaced} == {"linkedblob"}


def test_every_server_has_its_protection_flags_and_none_is_open() -> None:
    for kind, (_pod, c) in d.servers().items():
        for flag in REQUIRED[kind]:
            assert d.flag(c["args"], flag), (kind, flag)
    for pod in d.pod_specs():
        for c in pod["containers"]:
            assert "--open" not in c["args"]
            assert not any(e["name"] == "LINKEDBLOB_OPEN" for e in c.get("env", []))
    assert "LINKEDBLOB_OPEN" not in d.config()


def test_the_shared_environment_sets_no_limit() -> None:
    # Every service reads ConfigMap linkedblob, and the limits' defaults differ per service
    # (blobsvc and linksvc allow ten times the gateway's streams per connection).
    limits = ("MAX_", "IDLE_", "SESSION_", "READ_GRANT_", "GRANT_TTL")
    assert not [k for k in d.config() if k.removeprefix("LINKEDBLOB_").startswith(limits)]


def test_allow_lists_name_client_identities_notservers() -> None:
    servers = d.servers()
    for kind in ("blob", "link"):
        args = servers[kind][1]["args"]
        assert d.names(d.flag(args, "--allow-gateway")) == {"gateway.linkedblob.svc"}
        assert d.names(d.flag(args, "--allow-collector")) == {"collector.linkedblob.svc"}


def test_secrets_are_mounted_read_only_whole_and_hold_the_files_flags_name() -> None:
    auth = d.one("ConfigMap", "linkedblob-auth")["data"]
    for kind, (pod, c) in d.servers().items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in c.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "secret" in volume or "configMap" in volume:
                assert mount.get("readOnly") is True, (kind, mount)
                # subPath mounts never see the kubelet's updates: renewed certificates and a
                # rotated grant secret would not reach the service.
                assert "subPath" not in mount, (kind, mount)
            if "secret" in volume:
                assert volume["secret"].get("defaultMode") == 0o440, (kind, volume)
        for flag in FILE_FLAGS:
            if flag not in c["args"]:
                continue
            volume, key = d.mounted(pod, c, d.flag(c["args"], flag))
            if "configMap" in volume:
                # the example policy, or the token keys the operator makes (README)
                name = volume["configMap"]["name"]
                assert key in {"linkedblob-auth": auth, "linkedblob-token-keys": {"keys"}}[name]
            else:
                secret = volume["secret"]["secretName"]
                expected = {"linkedblob-grant": {"secret"}}.get(
                    secret, {"tls.crt", "tls.key", "ca.crt"}
                )
                assert key in expected, (kind, flag, secret, key)
        if "--auth-policy" in c["args"]:
            policy = tomllib.loads(auth[d.flag(c["args"], "--auth-policy").rsplit("/", 1)[1]])
            _check_policy(policy)


# The policy file's shape (gateway/auth/policy.py refuses unknown keys).
_RULE_KEYS = {"subjects", "certificates", "anonymous", "authenticated", "repositories"}
_RULE_KEYS |= {"actions", "catalog"}


def _check_policy(policy: dict[str, Any]) -> None:
    assert set(policy) == {"rule"}
    for rule in policy["rule"]:
        assert set(rule) <= _RULE_KEYS, rule
        assert set(rule.get("actions", [])) <= {"pull", "push", "delete", "*"}, rule
    assert any(r.get("anonymous") and r["actions"] == ["pull"] for r in policy["rule"])


def test_tls_servers_are_probed_over_tls_by_the_exec_probe() -> None:
    services = {"blob": "linkedblob-blobsvc", "link": "linkedblob-linksvc"}
    services["gateway"] = "linkedblob-gateway"
    for kind, (pod, c) in d.servers().items():
        for probe, service in (("readinessProbe", "readiness"), ("livenessProbe", "liveness")):
            if kind == "gc":  # its port serves health only, in plaintext
                assert c[probe]["grpc"] == {
                    "port": int(d.flag(c["args"], "--port")),
                    "service": service,
                }
                continue
            assert "grpc" not in c[probe]  # the kubelet's gRPC probe cannot do TLS
            command = c[probe]["exec"]["command"]
            assert command[:2] == ["python", "/app/deploy/probe.py"]
            assert d.flag(command, "--port") == d.flag(c["args"], "--port")
            assert d.flag(command, "--server-name") == services[kind]
            assert d.flag(command, "--service") == service
            assert d.flag(command, "--ca") == d.flag(c["args"], "--tls-cert").replace(
                "tls.crt", "ca.crt"
            )
            for flag in ("--ca", "--cert", "--key"):
                if flag in command:
                    d.mounted(pod, c, d.flag(command, flag))
            if "--tls-client-ca" in c["args"]:  # mTLS: the probe presents the pod's own
                assert d.flag(command, "--cert") == d.flag(c["args"], "--tls-cert")
                assert d.flag(command, "--key") == d.flag(c["args"], "--tls-key")


# --- the certificates --------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Runs make-certs.sh; {secret name: {"tls.crt": path, "tls.key": ..., "ca.crt": ...}}
    from the commands it prints, plus "linkedblob-grant": {"secret": path}."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    secrets = d.make_certs(
        tmp_path_factory.mktemp("certs") / "certs", GATEWAY_NAMES="registry.example.com"
    )
    for files in secrets.values():
        for path in files.values():
            assert path.is_file(), path
            assert path.stat().st_mode & 0o077 == 0  # keys and secrets for the owner only
    return secrets


def _sans(cert: Path) -> set[str]:
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(re.findall(r"DNS:([^,\s]+)", text))


def _verify(cert: Path, ca: Path, purpose: str) -> bool:
    run = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), "-purpose", purpose, str(cert)],
        capture_output=True,
        text=True,
    )
    return run.returncode == 0


def _secret_of(pod: dict[str, Any], c: dict[str, Any], flag: str) -> str:
    volume, _key = d.mounted(pod, c, d.flag(c["args"], flag))
    return str(volume["secret"]["secretName"])


@needs_openssl
def test_make_certs_makes_every_secret_the_manifest_mounts(certs: dict) -> None:
    mounted = {
        v["secret"]["secretName"]
        for pod in d.pod_specs()
        for v in pod.get("volumes", [])
        if "secret" in v
    }
    assert mounted == set(certs)
    cas = {files["ca.crt"].read_bytes() for name, files in certs.items() if "ca.crt" in files}
    assert len(cas) == 1  # one internal CA
    assert len(certs["linkedblob-grant"]["secret"].read_text().strip()) >= 32


@needs_openssl
def test_certificates_chain_to_the_ca_and_carry_the_names_the_manifest_uses(certs: dict) -> None:
    servers = d.servers()
    gateway = servers["gateway"][1]["args"]
    for kind, (pod, c) in servers.items():
        args = c["args"]
        if "--tls-cert" in args:  # the server's name as its clients dial it
            files = certs[_secret_of(pod, c, "--tls-cert")]
            assert _verify(files["tls.crt"], files["ca.crt"], "sslserver"), kind
            # the probe presents it to the pod's own mTLS port
            assert _verify(files["tls.crt"], files["ca.crt"], "sslclient"), kind
            names = _sans(files["tls.crt"])
            wanted = {
                "blob": {d.host(d.flag(gateway, "--blob-addr"))}
                | {d.host(d.flag(gateway, "--blob-public-addr"))},
                "link": {d.host(d.flag(gateway, "--link-addr"))},
                "gateway": {"linkedblob-gateway", "registry.example.com"},
            }[kind]
            assert wanted <= names, (kind, names)
        if "--backend-tls-cert" in args:  # the client's identity: in the allow lists
            files = certs[_secret_of(pod, c, "--backend-tls-cert")]
            assert _verify(files["tls.crt"], files["ca.crt"], "sslclient"), kind
            assert not _verify(files["tls.crt"], files["ca.crt"], "sslserver"), kind
            role = {"gateway": "--allow-gateway", "gc": "--allow-collector"}[kind]
            for backend in ("blob", "link"):
                allowed = d.names(d.flag(servers[backend][1]["args"], role))
                assert allowed & _sans(files["tls.crt"]), (kind, backend)
            # ...and in no other role's list
            other = {"gateway": "--allow-collector", "gc": "--allow-gateway"}[kind]
            for backend in ("blob", "link"):
                allowed = d.names(d.flag(servers[backend][1]["args"], other))
                assert not allowed & _sans(files["tls.crt"]), (kind, backend)


def test_cert_manager_issues_the_same_secrets_andnames() -> None:
    docs = d.load(CERT_MANAGER)
    issued = {
        d["spec"]["secretName"]: d["spec"]
        for d in docs
        if d["kind"] == "Certificate" and not d["spec"].get("isCA")
    }
    mounted = {
        v["secret"]["secretName"]
        for pod in d.pod_specs()
        for v in pod.get("volumes", [])
        if "secret" in v
    }
    assert set(issued) == mounted - {"linkedblob-grant"}
    servers = d.servers()
    for kind, role in (("gateway", "--allow-gateway"), ("gc", "--allow-collector")):
        pod, c = servers[kind]
        spec = issued[_secret_of(pod, c, "--backend-tls-cert")]
        assert "client auth" in spec["usages"] and "server auth" not in spec["usages"]
        for backend in ("blob", "link"):
            assert set(spec["dnsNames"]) == d.names(d.flag(servers[backend][1]["args"], role))
    blob = issued["linkedblob-blobsvc-tls"]["dnsNames"]
    link = issued["linkedblob-linksvc-tls"]["dnsNames"]
    for kind in ("gateway", "gc"):  # the names both clients dial
        args = servers[kind][1]["args"]
        assert d.host(d.flag(args, "--blob-addr")) in blob
        assert d.host(d.flag(args, "--link-addr")) in link
    assert d.host(d.flag(servers["gateway"][1]["args"], "--blob-public-addr")) in blob
    # the production overlay issues them with this component
    prod = {(o["kind"], o["metadata"]["name"]) for o in d.render(d.OVERLAYS["production"])}
    assert {(o["kind"], o["metadata"]["name"]) for o in docs} <= prod


# --- the exec probe, over real mTLS ------------------------------------------------------


@pytest.fixture
def mtls_server(certs: dict) -> Any:
    """A gRPC server with health, requiring client certificates of the internal CA, serving
    blobsvc's certificate: what the probe meets in blobsvc's pod."""
    files = certs["linkedblob-blobsvc-tls"]
    creds = grpc.ssl_server_credentials(
        [(files["tls.key"].read_bytes(), files["tls.crt"].read_bytes())],
        root_certificates=files["ca.crt"].read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield port, servicer
    server.stop(None)


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "probe.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_openssl
def test_probe_checks_health_over_mtls_with_the_pods_own_certificate(
    certs: dict, mtls_server: Any
) -> None:
    port, servicer = mtls_server
    files = certs["linkedblob-blobsvc-tls"]
    own = ["--ca", str(files["ca.crt"]), "--cert", str(files["tls.crt"])]
    own += ["--key", str(files["tls.key"]), "--server-name", "linkedblob-blobsvc"]
    ok = _probe("--port", str(port), *own)
    assert ok.returncode == 0, ok.stderr

    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    draining = _probe("--port", str(port), *own)
    assert draining.returncode == 1 and "NOT_SERVING" in draining.stderr


@needs_openssl
def test_probe_fails_without_a_client_certificate_or_under_the_wrong_name(
    certs: dict, mtls_server: Any, tmp_path: Path
) -> None:
    port, _servicer = mtls_server
    files = certs["linkedblob-blobsvc-tls"]
    no_cert = _probe(
        "--port", str(port), "--ca", str(files["ca.crt"]), "--server-name", "linkedblob-blobsvc"
    )
    assert no_cert.returncode == 1
    own = ["--ca", str(files["ca.crt"]), "--cert", str(files["tls.crt"])]
    own += ["--key", str(files["tls.key"])]
    wrong_name = _probe("--port", str(port), *own, "--server-name", "linkedblob-linksvc")
    assert wrong_name.returncode == 1
    # a certificate of another CA (make-certs.sh run again elsewhere) is refused
    other = tmp_path / "other"
    d.make_certs(other)
    stranger = _probe(
        "--port",
        str(port),
        "--ca",
        str(files["ca.crt"]),
        "--cert",
        str(other / "gateway-client.crt"),
        "--key",
        str(other / "gateway-client.key"),
        "--server-name",
        "linkedblob-blobsvc",
    )
    assert stranger.returncode == 1


# --- against linkedblob's own command line, once the protection flags exist ------------------


@pytest.mark.skipif(
    not d.has_protection_flags(), reason="the protection flags (issue 11) are not in this tree"
)
def test_every_container_parses_with_the_manifests_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = d.config()
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LINKEDBLOB_DB", "sqlite:///unused.db")
    from linkedblob.cli import build_parser

    parser = build_parser()  # reads the LINKEDBLOB_* defaults now: a bad value fails here
    for kind, (_pod, c) in d.servers().items():
        args = parser.parse_args(c["args"])
        assert not getattr(args, "open", False), kind
    read = set()
    for sub in d.serve_parsers().values():
        for action in sub._actions:
            read |= set(re.findall(r"\[env (LINKEDBLOB_\w+)\]", action.help or ""))
    assert set(config) <= read, set(config) - read  # a variable no service reads is a typo


def test_the_example_policy_loads_in_the_gateway(tmp_path: Path) -> None:
    policy = pytest.importorskip("gateway.auth.policy", reason="the gateway's policy (issue 11)")
    path = tmp_path / "policy.toml"
    path.write_text(d.one("ConfigMap", "linkedblob-auth")["data"]["policy.toml"])
    policy.load_policy(str(path))
