"""TLS on every server, mTLS with per-method authorization by peer certificate at blobsvc and
linksvc, certificate reload, TLS on the gateway's and the collector's channels, and the client's
and the CLI's TLS options: real servers, real TLS, certificates made here by trustme."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob import exitcodes, grants
from linkedblob.blob.v1 import blob_pb2, blob_pb2_grpc
from linkedblob.client import Client
from linkedblob.config import MiB
from linkedblob.errors import error_info
from linkedblob.grants import unverified_action
from linkedblob.link.v1 import link_pb2, link_pb2_grpc
from tests.services import ServiceProcess, running, spawn
from tests.stack import GRANT_SECRET_ENV, free_port, scrape

Code = grpc.StatusCode

GATEWAY_ID = "gateway.linkedblob.test"
COLLECTOR_ID = "collector.linkedblob.test"
STRANGER_ID = "stranger.linkedblob.test"
DIGEST = "sha256:" + "ab" * 32


@dataclass
class Pki:
    """Certificate files: a CA, the servers' certificate, the gateway's, the collector's and a
    stranger's client certificates, and a gateway certificate from another CA."""

    dir: Path
    ca: trustme.CA

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def issue(self, name: str, *identities: str, ca: trustme.CA | None = None) -> None:
        cert = (ca or self.ca).issue_cert(*identities)
        cert.cert_chain_pems[0].write_to_path(self.path(f"{name}.pem"))
        cert.private_key_pem.write_to_path(self.path(f"{name}.key"))

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def server_args(self, *, client_ca: bool = True) -> tuple[str, ...]:
        args = ("--tls-cert", self.path("server.pem"), "--tls-key", self.path("server.key"))
        return (*args, "--tls-client-ca", self.path("ca.pem")) if client_ca else args

    def credentials(self, client: str = "", *, ca: str = "ca.pem") -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.read(ca),
            self.read(f"{client}.key") if client else None,
            self.read(f"{client}.pem") if client else None,
        )

    def channel(self, address: str, client: str = "", *, ca: str = "ca.pem") -> grpc.Channel:
        return grpc.secure_channel(address, self.credentials(client, ca=ca))

    def backend_args(self, client: str) -> tuple[str, ...]:
        return (
            "--backend-tls-ca",
            self.path("ca.pem"),
            "--backend-tls-cert",
            self.path(f"{client}.pem"),
            "--backend-tls-key",
            self.path(f"{client}.key"),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"), trustme.CA())
    pki.ca.cert_pem.write_to_path(pki.path("ca.pem"))
    pki.issue("server", "localhost", "127.0.0.1")
    pki.issue("gateway", GATEWAY_ID)
    pki.issue("collector", COLLECTOR_ID)
    pki.issue("stranger", STRANGER_ID)
    other = trustme.CA()
    other.cert_pem.write_to_path(pki.path("other-ca.pem"))
    pki.issue("forged", GATEWAY_ID, ca=other)
    return pki


def allow_args() -> tuple[str, ...]:
    return ("--allow-gateway", GATEWAY_ID, "--allow-collector", f"{COLLECTOR_ID},spare.test")


def health(channel: grpc.Channel, timeout: float = 10) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status)


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def allowed(call: object) -> None:
    """The call passed the peer check: it succeeds, or fails for the service's own reasons
    (an unknown digest), not PERMISSION_DENIED or UNAUTHENTICATED."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        assert err.code() not in (Code.PERMISSION_DENIED, Code.UNAUTHENTICATED), err


def served_subject(address: str) -> str:
    host, port = address.rsplit(":", 1)
    pem = ssl.get_server_certificate((host, int(port)))
    return x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()


# --- (a) every server serves TLS ------------------------------------------------------------------


def test_every_server_serves_tls(pki: Pki, tmp_path: Path) -> None:
    tls = pki.server_args(client_ca=False)
    with (
        running("blob", "--storage", "memory", *tls) as blob,
        running("link", "--db", f"sqlite:///{tmp_path / 'l.db'}", "--migrate", *tls) as link,
        running(
            "gateway",
            "--blob-addr",
            blob.address,
            "--link-addr",
            link.address,
            *tls,
            # Its backends speak TLS too: without this it could reach neither, and is not ready.
            "--backend-tls-ca",
            pki.path("ca.pem"),
        ) as gateway,
    ):
        for svc in (blob, link, gateway):
            with pki.channel(svc.address) as channel:
                assert health(channel) == health_pb2.HealthCheckResponse.SERVING
            # Plaintext, or TLS that does not trust the CA: no connection.
            with grpc.insecure_channel(svc.address) as channel:
                assert refused(lambda c=channel: health(c, 3)).code() == Code.UNAVAILABLE
            with grpc.secure_channel(svc.address, grpc.ssl_channel_credentials()) as channel:
                assert refused(lambda c=channel: health(c, 3)).code() == Code.UNAVAILABLE


# --- (b) blobsvc and linksvc refuse callers without the right certificate -------------------------


@pytest.fixture(scope="module")
def guarded(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """blobsvc and linksvc with mTLS and allow lists, started without --open."""
    db = tmp_path_factory.mktemp("guarded") / "link.db"
    with (
        running("blob", "--storage", "memory", *pki.server_args(), *allow_args(), open_=False) as b,
        running(
            "link",
            "--db",
            f"sqlite:///{db}",
            "--migrate",
            *pki.server_args(),
            *allow_args(),
            open_=False,
        ) as link,
    ):
        yield b.address, link.address


def test_no_certificate_or_another_cas_fails_the_handshake(
    pki: Pki, guarded: tuple[str, str]
) -> None:
    for address in guarded:
        for client in ("", "forged"):
            with pki.channel(address, client) as channel:
                assert refused(lambda c=channel: health(c, 3)).code() == Code.UNAVAILABLE


def test_a_refused_peer_is_in_the_access_log(pki: Pki, tmp_path: Path) -> None:
    """The audit trail: a call the peer check refuses (before the servicer) still gets its
    access line, naming the certificate identity that was refused."""
    db = tmp_path / "link.db"
    args = ("--db", f"sqlite:///{db}", "--migrate", *pki.server_args(), *allow_args())
    with running("link", *args, open_=False) as link:
        request = link_pb2.LinkRequest(repository="victim/repo", digest=DIGEST, size=3)
        with pki.channel(link.address, "collector") as channel:
            stub = link_pb2_grpc.LinkServiceStub(channel)
            refused(lambda: stub.Link(request, timeout=10))
            stub.ListStaleSessions(link_pb2.ListStaleSessionsRequest(), timeout=10)
        deadline = time.monotonic() + 10
        while not any('"method": "ListStaleSessions"' in line for line in link.output):
            assert time.monotonic() < deadline, "".join(link.output)
            time.sleep(0.05)
    lines = [json.loads(line) for line in link.output if '"linkedblob.access"' in line]
    by_method = {line["method"]: line for line in lines}
    assert by_method["Link"]["code"] == "PERMISSION_DENIED"
    assert by_method["Link"]["reason"] == "DENIED"
    assert by_method["Link"]["caller"] == COLLECTOR_ID
    assert by_method["ListStaleSessions"]["code"] == "OK"
    assert by_method["ListStaleSessions"]["caller"] == COLLECTOR_ID


def assert_denied(err: grpc.RpcError, method: str, identity: str) -> None:
    assert err.code() == Code.PERMISSION_DENIED, err
    info = error_info(err)
    assert info is not None and info.reason == "DENIED"
    assert method in (err.details() or "") and identity in (err.details() or "")


def test_wrong_role_is_denied_and_the_right_role_allowed(
    pki: Pki, guarded: tuple[str, str]
) -> None:
    blob_addr, link_addr = guarded
    link_request = link_pb2.LinkRequest(repository="victim/repo", digest=DIGEST, size=3)
    with pki.channel(link_addr, "collector") as channel:
        links = link_pb2_grpc.LinkServiceStub(channel)
        assert_denied(refused(lambda: links.Link(link_request, timeout=10)), "Link", COLLECTOR_ID)
        # The collector's own calls pass.
        links.ListStaleSessions(link_pb2.ListStaleSessionsRequest(), timeout=10)
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    with pki.channel(link_addr, "gateway") as channel:
        links = link_pb2_grpc.LinkServiceStub(channel)
        listed = link_pb2.ListStaleSessionsRequest()
        assert_denied(
            refused(lambda: links.ListStaleSessions(listed, timeout=10)),
            "ListStaleSessions",
            GATEWAY_ID,
        )
        # The refused Link changed nothing.
        victim = link_pb2.ListLinksRequest(repository="victim/repo")
        assert not links.ListLinks(victim, timeout=10).blobs
        links.ListRepositories(link_pb2.ListRepositoriesRequest(), timeout=10)
        # Link is the gateway's: the refusal now is linksvc's own (no lease), not the peer's.
        err = refused(lambda: links.Link(link_request, timeout=10))
        assert err.code() != Code.PERMISSION_DENIED
    delete = blob_pb2.DeleteRequest(digest=DIGEST)
    with pki.channel(blob_addr, "gateway") as channel:
        blobs = blob_pb2_grpc.BlobServiceStub(channel)
        assert_denied(refused(lambda: blobs.Delete(delete, timeout=10)), "Delete", GATEWAY_ID)
        allowed(lambda: blobs.Stat(blob_pb2.StatRequest(digest=DIGEST), timeout=10))
    with pki.channel(blob_addr, "collector") as channel:
        blobs = blob_pb2_grpc.BlobServiceStub(channel)
        put = blob_pb2.PutRequest(data=b"abc")
        assert_denied(refused(lambda: blobs.Put(put, timeout=10)), "Put", COLLECTOR_ID)
        allowed(lambda: blobs.Delete(delete, timeout=10))
    # A certificate the CA signed, in no allow list: health yes, the service no.
    with pki.channel(link_addr, "stranger") as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        links = link_pb2_grpc.LinkServiceStub(channel)
        repos = link_pb2.ListRepositoriesRequest()
        assert_denied(
            refused(lambda: links.ListRepositories(repos, timeout=10)),
            "ListRepositories",
            STRANGER_ID,
        )


# --- (f) starting secured, and refusing allow lists without a CA ----------------------------------


def refused_start(kind: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`linkedblob serve KIND --port 0 ARGS...` run to its end: a server that refuses its flags
    exits at once (a server that starts would run into the timeout)."""
    return subprocess.run(
        [sys.executable, "-m", "linkedblob.cli", "serve", kind, "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_allow_lists_without_a_client_ca_refuse_to_start(pki: Pki, tmp_path: Path) -> None:
    for kind, extra in (("link", ("--db", f"sqlite:///{tmp_path / 'l.db'}")), ("blob", ())):
        done = refused_start(
            kind, *extra, *pki.server_args(client_ca=False), "--allow-gateway", GATEWAY_ID
        )
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "--tls-client-ca" in lines[0], done.stderr
    memory = ("--open", "--storage", "memory")
    # A key without its certificate: one line, exit 2.
    done = refused_start("blob", *memory, "--tls-key", pki.path("server.key"))
    assert (
        done.returncode == 2
        and done.stderr.strip() == "linkedblob blob: --tls-key needs --tls-cert"
    )
    missing = ("--tls-cert", pki.path("missing.pem"), "--tls-key", pki.path("server.key"))
    done = refused_start("blob", *memory, *missing)
    assert done.returncode == 2 and "missing.pem" in done.stderr, done
    # A direct port needs mTLS with allow lists (else every call there would pass unchecked).
    done = refused_start("blob", *memory, *pki.server_args(client_ca=False), "--direct-port", "0")
    assert done.returncode == 2 and "--direct-port" in done.stderr, done


# --- (d) certificate reload -----------------------------------------------------------------------


def test_a_renewed_certificate_serves_new_connections(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def install(common_name: str) -> None:
        issued = pki.ca.issue_cert("localhost", "127.0.0.1", common_name=common_name)
        # As cert-manager or a Secret update: each file replaced whole.
        issued.cert_chain_pems[0].write_to_path(str(tmp_path / "new.crt"))
        issued.private_key_pem.write_to_path(str(tmp_path / "new.key"))
        os.replace(tmp_path / "new.key", key)
        os.replace(tmp_path / "new.crt", cert)

    install("first")
    args = ("--db", f"sqlite:///{tmp_path / 'l.db'}", "--migrate")
    with running("link", *args, "--tls-cert", str(cert), "--tls-key", str(key)) as link:
        assert "CN=first" in served_subject(link.address)
        old = pki.channel(link.address)
        assert health(old) == health_pb2.HealthCheckResponse.SERVING
        install("second")
        assert "CN=second" in served_subject(link.address)
        with pki.channel(link.address) as new:
            assert health(new) == health_pb2.HealthCheckResponse.SERVING
        assert health(old) == health_pb2.HealthCheckResponse.SERVING  # still connected
        old.close()
        # Caught between its two writes (a certificate whose key is not there yet): the
        # server keeps the last good pair, and takes the new one once it is whole.
        third = pki.ca.issue_cert("localhost", "127.0.0.1", common_name="third")
        third.cert_chain_pems[0].write_to_path(str(tmp_path / "new.crt"))
        os.replace(tmp_path / "new.crt", cert)
        assert "CN=second" in served_subject(link.address)
        third.private_key_pem.write_to_path(str(tmp_path / "new.key"))
        os.replace(tmp_path / "new.key", key)
        assert "CN=third" in served_subject(link.address)


# --- (c) the whole stack with mTLS, (e) the CLI ---------------------------------------------------


@dataclass
class SecureStack:
    blob: ServiceProcess
    link: ServiceProcess
    gateway: ServiceProcess
    direct_address: str
    gateway_metrics: int
    secret: str


@pytest.fixture(scope="module")
def stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    data = tmp_path_factory.mktemp("secure-stack")
    secret = secrets.token_urlsafe(32)
    env = {GRANT_SECRET_ENV: secret}
    guard = (*pki.server_args(), *allow_args())
    direct_port = free_port()
    blob = spawn(
        "blob",
        "--data",
        str(data / "blobs"),
        *guard,
        "--direct-port",
        str(direct_port),
        env=env,
        open_=False,
    )
    link = None
    gateway = None
    try:
        direct_lines = [line for line in blob.output if line.startswith("linkedblob direct ")]
        assert direct_lines == [f"linkedblob direct listening on 127.0.0.1:{direct_port}\n"]
        link = spawn(
            "link", "--db", f"sqlite:///{data / 'link.db'}", "--migrate", *guard, open_=False
        )
        metrics_port = free_port()
        gateway = spawn(
            "gateway",
            "--blob-addr",
            blob.address.replace("127.0.0.1", "localhost"),
            "--link-addr",
            link.address,
            "--blob-public-addr",
            f"localhost:{direct_port}",
            "--enable-delete",
            "--metrics-port",
            str(metrics_port),
            *pki.backend_args("gateway"),
            *pki.server_args(client_ca=False),
            env=env,
        )
        yield SecureStack(blob, link, gateway, f"127.0.0.1:{direct_port}", metrics_port, secret)
    finally:
        for svc in (gateway, link, blob):
            if svc is not None:
                svc.stop()


def relayed(stack: SecureStack) -> float:
    return sum(
        value
        for name, value in scrape(stack.gateway_metrics).items()
        if name.startswith(("linkedblob_bytes_received_total", "linkedblob_bytes_sent_total"))
    )


def test_push_pull_and_uploads_through_the_secured_stack(
    pki: Pki, stack: SecureStack, tmp_path: Path
) -> None:
    small = secrets.token_bytes(1000)
    big = secrets.token_bytes(3 * MiB)
    with Client(stack.gateway.address, tls=True, ca=pki.path("ca.pem"), direct=False) as client:
        desc = client.put("tls/app", small)
        assert client.get("tls/app", desc.digest) == small
        source = tmp_path / "big"
        source.write_bytes(big)
        desc = client.push("tls/app", source, resumable=True)
        assert desc.digest == "sha256:" + hashlib.sha256(big).hexdigest()
        client.pull("tls/app", desc.digest, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == big
    # The direct path: bytes straight to and from blobsvc's direct port, over TLS.
    with Client(stack.gateway.address, tls=True, ca=pki.path("ca.pem")) as client:
        before = relayed(stack)
        assert before >= 3 * MiB  # the pushes above went through the gateway
        other = secrets.token_bytes(3 * MiB)
        pushed = client.push("tls/direct", other)
        assert client.get("tls/direct", pushed.digest) == other
        _, grant = client.locate("tls/direct", pushed.digest)
        assert grant.address == f"localhost:{stack.direct_address.rsplit(':', 1)[1]}"
        upload = client.start_upload("tls/direct", direct=True)
        upload = client.append(upload, 0, [other[:MiB], other[MiB:]])
        assert upload.offset == len(other)
        client.commit_upload("tls/direct", upload.id, pushed.digest)
        assert relayed(stack) == before  # nothing went through the gateway


def test_the_direct_port_takes_only_read_and_write_grants(pki: Pki, stack: SecureStack) -> None:
    signer = grants.Signer(stack.secret)
    with pki.channel(stack.direct_address) as channel:  # TLS, no client certificate
        blobs = blob_pb2_grpc.BlobServiceStub(channel)
        stat = blob_pb2.StatRequest(digest=DIGEST)
        err = refused(lambda: blobs.UploadStatus(blob_pb2.UploadStatusRequest(upload_id="u1")))
        assert err.code() == Code.UNAUTHENTICATED and error_info(err).reason == "UNAUTHORIZED"
        internal = ((grants.METADATA_KEY, signer.sign(grants.INTERNAL)),)
        assert unverified_action(internal[0][1]) == "internal"
        err = refused(
            lambda: blobs.UploadStatus(
                blob_pb2.UploadStatusRequest(upload_id="u1"), metadata=internal, timeout=10
            )
        )
        assert err.code() == Code.PERMISSION_DENIED and error_info(err).reason == "DENIED"
        # Not a direct method: needs a certificate, whatever the grant.
        err = refused(lambda: blobs.Stat(stat, metadata=internal, timeout=10))
        assert err.code() == Code.UNAUTHENTICATED
        delete = blob_pb2.DeleteRequest(digest=DIGEST)
        err = refused(lambda: blobs.Delete(delete, metadata=internal, timeout=10))
        assert err.code() == Code.UNAUTHENTICATED
        # A write grant passes the port's check; the servicer then judges the grant.
        write = ((grants.METADATA_KEY, signer.sign(grants.WRITE, "u1")),)
        err = refused(
            lambda: blobs.UploadStatus(
                blob_pb2.UploadStatusRequest(upload_id="u1"), metadata=write, timeout=10
            )
        )
        assert err.code() not in (Code.PERMISSION_DENIED, Code.UNAUTHENTICATED), err


def test_the_collector_runs_with_its_certificate(pki: Pki, stack: SecureStack) -> None:
    base = [
        sys.executable,
        "-m",
        "linkedblob.cli",
        "gc",
        "--link-addr",
        stack.link.address,
        "--blob-addr",
        stack.blob.address,
    ]
    env = {**os.environ, GRANT_SECRET_ENV: stack.secret}
    done = subprocess.run(
        [*base, *pki.backend_args("collector")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # The gateway's certificate may not run the collector.
    done = subprocess.run(
        [*base, *pki.backend_args("gateway")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "PERMISSION_DENIED" in done.stderr + done.stdout, done


def test_cli_over_tls(pki: Pki, stack: SecureStack, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"hello over tls")
    cli = [sys.executable, "-m", "linkedblob.cli"]
    addr = ["--addr", stack.gateway.address]
    done = subprocess.run(
        [*cli, "push", "tls/cli", str(payload), *addr, "--tls", "--ca", pki.path("ca.pem")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    digest = done.stdout.strip()
    # The same through the environment.
    env = {**os.environ, "LINKEDBLOB_TLS": "1", "LINKEDBLOB_CA": pki.path("ca.pem")}
    done = subprocess.run(
        [*cli, "pull", "tls/cli", digest, "-o", "-", *addr],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == b"hello over tls", done.stderr
    # Without the CA the gateway's certificate is not trusted.
    done = subprocess.run(
        [*cli, "stat", "tls/cli", digest, *addr, "--tls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == exitcodes.RETRY and "UNAVAILABLE" in done.stderr, done
    assert "pass --tls" not in done.stderr  # it did ask for TLS
    # Plaintext to a TLS gateway: a closed socket, and a hint.
    done = subprocess.run(
        [*cli, "stat", "tls/cli", digest, *addr], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == exitcodes.RETRY and "UNAVAILABLE" in done.stderr, done
    assert "serves TLS, pass --tls and --ca" in done.stderr


def test_a_token_travels_only_over_tls_or_loopback() -> None:
    with pytest.raises(ValueError, match="only over TLS"):
        Client("gateway.example:50051", token="t0ken")
    Client("127.0.0.1:1", token="t0ken").close()  # plaintext to loopback: allowed


def test_a_client_key_without_its_certificate_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="certificate"):
        Client("127.0.0.1:1", tls=True, key=pki.path("gateway.key"))
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", ca=pki.path("nope.pem"))


class _MetadataRecorder(grpc.GenericRpcHandler):
    """A stand-in gateway that records each call's metadata and answers StatBlob."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        from linkedblob.v1 import registry_pb2

        def stat(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.seen.append({k: v for k, v in context.invocation_metadata()})  # type: ignore[misc]
            return registry_pb2.Descriptor(digest=DIGEST, size=1).SerializeToString()

        return grpc.unary_unary_rpc_method_handler(stat)


@pytest.mark.parametrize("over_tls", [True, False])
def test_the_token_is_sent_as_bearer_authorization(pki: Pki, over_tls: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    recorder = _MetadataRecorder()
    server = grpc.server(ThreadPoolExecutor(2), handlers=[recorder])
    if over_tls:
        creds = grpc.ssl_server_credentials([(pki.read("server.key"), pki.read("server.pem"))])
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        options = {"tls": True, "ca": pki.path("ca.pem")} if over_tls else {}
        with Client(f"127.0.0.1:{port}", token="t0ken", **options) as client:  # type: ignore[arg-type]
            assert client.stat("any/repo", DIGEST).size == 1
        assert recorder.seen[-1].get("authorization") == "Bearer t0ken"
    finally:
        server.stop(None)


def test_grpcurl_over_tls_and_mtls(pki: Pki, stack: SecureStack) -> None:
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    ca = ["-cacert", pki.path("ca.pem")]
    listed = subprocess.run(
        [grpcurl, *ca, "-H", "authorization: Bearer t0ken", stack.gateway.address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and "linkedblob.v1.Registry" in listed.stdout, listed
    mtls = [*ca, "-cert", pki.path("gateway.pem"), "-key", pki.path("gateway.key")]
    listed = subprocess.run(
        [grpcurl, *mtls, stack.link.address, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and "linkedblob.link.v1.LinkService" in listed.stdout, listed
    # No client certificate, no handshake. (With a connect timeout grpcurl gives up at the
    # refused handshake; without one it would retry it for its 10 s default.)
    listed = subprocess.run(
        [grpcurl, *ca, "-connect-timeout", "5", stack.link.address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode != 0 and "Failed to dial" in listed.stderr, listed


def test_every_method_of_blobsvc_and_linksvc_has_its_roles() -> None:
    """A method missing from a role table is allowed to nobody under mTLS: a new RPC must be
    given its roles, on purpose."""
    from blobsvc import roles as blob_roles
    from linkedblob.blob.v1 import blob_pb2
    from linksvc import roles as link_roles

    for table, service in (
        (blob_roles.TABLE, blob_pb2.DESCRIPTOR.services_by_name["BlobService"]),
        (link_roles.TABLE, link_pb2.DESCRIPTOR.services_by_name["LinkService"]),
    ):
        assert set(table.roles) == {m.name for m in service.methods}, table.service
