"""deploy/'s containers (the single-node overlay as kustomize renders it) run: each `serve`
container's arguments, with its mounted files replaced by the ones make-certs.sh and the
ConfigMaps make, start the real services on this machine, protected, and together they answer
over mTLS.

- linksvc's initContainer (`linkedblob migrate`) migrates the database, and again changes
  nothing; linksvc then starts on it without --migrate.
- Every service starts with the manifest's flags and the ConfigMap's environment (no --open).
- The manifest's exec probes (deploy/probe.py), readiness and liveness, pass against them, and
  the collector answers its gRPC probes' services in plaintext.
- linksvc answers the gateway's certificate and refuses a certificate of the same CA that no
  allow list names, and refuses the gateway what only the collector may call.
- The gateway serves TLS, lets anyone pull from public/ (the example policy) and asks a caller
  without a token elsewhere to authenticate; a token's subject the policy names pushes, links a
  blob it may pull by digest alone (linksvc answers the gateway's no-oracle question), a
  stranger declaring the digest gets no link, and a read grant reads at blobsvc's direct port.

Skipped until the protection flags (issue 11) are in the tree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.errors import error_info
from linkedblob.link.v1 import link_pb2, link_pb2_grpc
from linkedblob.v1 import registry_pb2, registry_pb2_grpc
from tests import deploy_helpers as d
from tests.services import ServiceProcess, spawn

pytestmark = pytest.mark.skipif(
    not d.has_protection_flags(), reason="the protection flags (issue 11) are not in this tree"
)

# The manifest's values this machine cannot use, replaced (ports are picked free, files are
# the local copies, addresses are localhost: the certificates name it).
_REPLACED: tuple[str, ...] = ("--port", "--direct-port", "--data", "--grace", "--blob-public-addr")
_REPLACED += ("--blob-addr", "--link-addr")  # the headless Services' dns:/// targets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_files(
    pod: d.Pod, secrets: d.Secrets, configmaps: dict[str, dict[str, Path]]
) -> dict[str, Any]:
    """{volume name: {file key: local path}} for the pod's Secret and ConfigMap volumes."""
    files: dict[str, Any] = {}
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            files[volume["name"]] = secrets[volume["secret"]["secretName"]]
        elif "configMap" in volume:
            files[volume["name"]] = configmaps[volume["configMap"]["name"]]
    return files


def _localize(args: list[str], pod: d.Pod, c: d.Container, files: dict[str, Any]) -> list[str]:
    """``args`` with every path into a mounted volume replaced by the local file."""
    out = []
    for arg in args:
        for mount in c.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            if arg.startswith(prefix) and mount["name"] in files:
                arg = str(files[mount["name"]][arg[len(prefix) :]])
        out.append(arg)
    return out


def _without(args: list[str], flags: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return out


class Stack:
    def __init__(self, secrets: d.Secrets, tmp: Path) -> None:
        self.secrets = secrets
        self.tmp = tmp
        self.procs: dict[str, ServiceProcess] = {}
        self.direct_port = _free_port()
        self.db = f"sqlite:///{tmp / 'links.db'}"
        key, pub = str(tmp / "token.key"), str(tmp / "token.pub")
        ec = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
        subprocess.run(["openssl", "genpkey", *ec, "-out", key], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True
        )
        auth = {}
        for key, text in d.one("ConfigMap", "linkedblob-auth")["data"].items():
            (tmp / key).write_text(text)
            auth[key] = tmp / key
        # the token keys are the operator's ConfigMap: this key signs the tokens here
        self.configmaps = {"linkedblob-auth": auth, "linkedblob-token-keys": {"keys": Path(pub)}}

    def args(self, kind: str) -> list[str]:
        pod, c = d.servers()[kind]
        files = _local_files(pod, self.secrets, self.configmaps)
        # the collector's --grace is its grace period, not the servers' drain time: kept
        replaced = _REPLACED if kind != "gc" else tuple(f for f in _REPLACED if f != "--grace")
        args = _localize(_without(c["args"][2:], replaced), pod, c, files)
        blob = self.procs.get("blob")
        link = self.procs.get("link")
        extra = {
            "blob": ["--data", str(self.tmp / "blobs"), "--direct-port", str(self.direct_port)],
            # migrated by the pod's initContainer (migrate_as_the_init_container)
            "link": ["--db", self.db],
            "gateway": [f"--blob-public-addr=localhost:{self.direct_port}"],
            "gc": [],
        }[kind]
        if kind in ("gateway", "gc"):
            assert blob and link
            # dns:/// targets as the manifests name them (TLS checks the name, localhost here)
            extra += [f"--blob-addr=dns:///localhost:{blob.port}"]
            extra += [f"--link-addr=dns:///localhost:{link.port}"]
        return [*args, *extra, "--grace", "1"] if kind != "gc" else [*args, *extra]

    def migrate_as_the_init_container(self) -> None:
        """Runs linksvc's initContainer as the pod does, twice (a restarted pod runs it again;
        at head it changes nothing)."""
        pod, _c = d.servers()["link"]
        (init,) = pod["initContainers"]
        (env,) = init["env"]
        for _ in range(2):
            subprocess.run(
                [sys.executable, "-m", "linkedblob.cli", *init["args"]],
                env={**os.environ, env["name"]: self.db},
                check=True,
                capture_output=True,
                timeout=120,
            )

    def probe(self, kind: str, which: str = "readinessProbe") -> subprocess.CompletedProcess[str]:
        pod, c = d.servers()[kind]
        command = c[which]["exec"]["command"]
        files = _local_files(pod, self.secrets, self.configmaps)
        args = _localize(_without(command[2:], ("--port",)), pod, c, files)
        port = str(self.procs[kind].port)
        return subprocess.run(
            [sys.executable, str(d.DEPLOY / "probe.py"), "--port", port, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def channel(self, kind: str, secret: str | None) -> grpc.Channel:
        """A TLS channel to the service, presenting the certificate of Secret ``secret``."""
        ca = self.secrets["linkedblob-gateway-tls"]["ca.crt"].read_bytes()
        cert = self.secrets[secret] if secret else None
        creds = grpc.ssl_channel_credentials(
            ca,
            cert["tls.key"].read_bytes() if cert else None,
            cert["tls.crt"].read_bytes() if cert else None,
        )
        return grpc.secure_channel(f"localhost:{self.procs[kind].port}", creds)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("live")
    secrets = d.make_certs(
        tmp / "certs", GATEWAY_NAMES="localhost", BLOB_NAMES="localhost", LINK_NAMES="localhost"
    )
    s = Stack(secrets, tmp)
    env = {k: v for k, v in d.config().items() if not k.endswith(("_ADDR", "_HOST", "_PORT"))}
    try:
        s.migrate_as_the_init_container()
        for kind in ("blob", "link", "gateway", "gc"):
            s.procs[kind] = spawn(kind, *s.args(kind), env=env, open_=False)
        yield s
    finally:
        for proc in reversed(list(s.procs.values())):
            proc.stop()


def test_every_service_starts_protected_and_its_probe_passes(stack: Stack) -> None:
    for kind in ("blob", "link", "gateway"):
        for which in ("readinessProbe", "livenessProbe"):
            run = stack.probe(kind, which)
            assert run.returncode == 0, (kind, which, run.stderr)
    assert stack.procs["gc"].proc.poll() is None
    # the collector's port: the kubelet's own gRPC probe, plaintext, with the probe's service
    _pod, gc = d.servers()["gc"]
    with grpc.insecure_channel(f"127.0.0.1:{stack.procs['gc'].port}") as ch:
        for which in ("readinessProbe", "livenessProbe"):
            service = gc[which]["grpc"]["service"]
            answer = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def test_linksvc_answers_the_gateway_and_refuses_other_certificates(stack: Stack) -> None:
    request = link_pb2.ListRepositoriesRequest()
    with stack.channel("link", "linkedblob-gateway-client") as ch:
        link_pb2_grpc.LinkServiceStub(ch).ListRepositories(request, timeout=10)
        with pytest.raises(grpc.RpcError) as only_collector:
            link_pb2_grpc.LinkServiceStub(ch).ListStaleSessions(
                link_pb2.ListStaleSessionsRequest(), timeout=10
            )
        assert only_collector.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # a certificate of the same CA that no allow list names (blobsvc's own)
    with (
        stack.channel("link", "linkedblob-blobsvc-tls") as ch,
        pytest.raises(grpc.RpcError) as refused,
    ):
        link_pb2_grpc.LinkServiceStub(ch).ListRepositories(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(refused.value).reason == "DENIED"  # type: ignore[union-attr]
    with stack.channel("link", None) as ch, pytest.raises(grpc.RpcError) as no_cert:
        link_pb2_grpc.LinkServiceStub(ch).ListRepositories(request, timeout=10)
    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails


def test_the_gateway_serves_tls_and_its_example_policy(stack: Stack) -> None:
    digest = "sha256:" + "0" * 64
    with stack.channel("gateway", None) as ch:
        registry = registry_pb2_grpc.RegistryStub(ch)
        with pytest.raises(grpc.RpcError) as public:
            registry.StatBlob(
                registry_pb2.StatBlobRequest(repository="public/app", digest=digest), timeout=10
            )
        assert public.value.code() == grpc.StatusCode.NOT_FOUND  # anonymous pull: allowed
        with pytest.raises(grpc.RpcError) as private:
            registry.StatBlob(
                registry_pb2.StatBlobRequest(repository="myteam/app", digest=digest), timeout=10
            )
        assert private.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _token(stack: Stack, subject: str, access: list[dict[str, Any]] | None = None) -> str:
    """A token as the manifest's gateway accepts it (its issuer and audience), signed by the key
    standing in for the JWKS."""
    jwt = pytest.importorskip("jwt")
    args = d.servers()["gateway"][1]["args"]
    now = int(time.time())
    claims = {
        "iss": d.flag(args, "--auth-token-issuer"),
        "aud": d.flag(args, "--auth-token-audience"),
        "sub": subject,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "access": access or [],
    }
    return str(jwt.encode(claims, (stack.tmp / "token.key").read_text(), algorithm="ES256"))


def test_tokens_the_policy_the_no_oracle_rule_and_the_direct_port(stack: Stack) -> None:
    """The CI of the example policy pushes, and links a blob it may pull by its digest alone;
    a stranger declaring that digest gets no link; a read grant reads through blobsvc's direct
    port over TLS."""
    ci = [("authorization", f"Bearer {_token(stack, 'ci@example.com')}")]
    stranger_access = [{"type": "repository", "name": "stranger/x", "actions": ["pull", "push"]}]
    stranger = [("authorization", f"Bearer {_token(stack, 'stranger', stranger_access)}")]
    with stack.channel("gateway", None) as ch:
        registry = registry_pb2_grpc.RegistryStub(ch)
        put = registry.PutBlob(
            registry_pb2.PutBlobRequest(repository="myteam/app", data=b"hello"),
            metadata=ci,
            timeout=30,
        )
        header = registry_pb2.PushBlobRequest.Header(repository="myteam/other", digest=put.digest)
        linked = registry.PushBlob(
            iter([registry_pb2.PushBlobRequest(header=header)]), metadata=ci, timeout=30
        )
        assert (linked.digest, linked.size) == (put.digest, 5)

        header = registry_pb2.PushBlobRequest.Header(repository="stranger/x", digest=put.digest)
        with pytest.raises(grpc.RpcError):  # no bytes sent: nothing to link
            registry.PushBlob(
                iter([registry_pb2.PushBlobRequest(header=header)]), metadata=stranger, timeout=30
            )
        with pytest.raises(grpc.RpcError) as unknown:
            registry.StatBlob(
                registry_pb2.StatBlobRequest(repository="stranger/x", digest=put.digest),
                metadata=stranger,
                timeout=30,
            )
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        located = registry.LocateBlob(
            registry_pb2.LocateBlobRequest(repository="myteam/app", digest=put.digest),
            metadata=ci,
            timeout=30,
        )
    assert located.direct.address == f"localhost:{stack.direct_port}"
    ca = stack.secrets["linkedblob-blobsvc-tls"]["ca.crt"].read_bytes()
    with grpc.secure_channel(located.direct.address, grpc.ssl_channel_credentials(ca)) as ch:
        chunks = blob_pb2_grpc.BlobServiceStub(ch).Read(
            blob_pb2.ReadRequest(digest=put.digest),
            metadata=[("linkedblob-grant", located.direct.grant)],
            timeout=30,
        )
        assert b"".join(c.data for c in chunks) == b"hello"


def test_linksvc_replicas_starting_together_migrate_postgresql_once(pg_database_url: str) -> None:
    """Production's linksvc replicas start together: each pod's initContainer runs the migration
    at once on one PostgreSQL database. Every one succeeds (the advisory lock serializes them;
    the later ones find the schema at head) and the schema ends at head."""
    import sqlalchemy as sa

    from linksvc.migrate import schema_status

    pod = d.servers(d.render(d.OVERLAYS["production"]))["link"][0]
    (init,) = pod["initContainers"]
    (env,) = init["env"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "linkedblob.cli", *init["args"]],
            env={**os.environ, env["name"]: pg_database_url},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0, out
    engine = sa.create_engine(pg_database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            assert schema_status(connection).at_head
    finally:
        engine.dispose()
