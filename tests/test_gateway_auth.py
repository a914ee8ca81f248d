"""Authentication and authorization at the gateway, end to end: real blobsvc and linksvc, an
open gateway the test uses as its administrator (to set things up and to see that a refusal
changed nothing), and secured gateways (bearer tokens signed in the test, a policy file).

The matrix: every Registry method x every kind of caller (no token, tokens that do not verify,
tokens granting pull, push, delete or the catalog, a token for another repository). Then the
policy file, the catalog's filtering across pages, and the oracle: a caller who may not pull a
blob cannot have it linked without sending its bytes, nor learn its size.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from linkedblob.errors import error_info
from linkedblob.v1 import registry_pb2 as pb
from linkedblob.v1 import registry_pb2_grpc
from tests.services import ServiceProcess, spawn
from tests.stack import GRANT_SECRET_ENV, Stack, registry, running_stack

Code = grpc.StatusCode
Stub = registry_pb2_grpc.RegistryStub
Metadata = tuple[tuple[str, str], ...]

ISSUER = "https://auth.test"
AUDIENCE = "linkedblob.test"
REPO = "matrix/app"  # the repository the matrix acts on
SOURCE = "matrix/source"  # where MountBlob's source lives
OTHER = "elsewhere/app"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- keys and tokens --------------------------------------------------------------------------


class Signer:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(
        self,
        access: list[dict[str, Any]] | None = None,
        *,
        sub: str = "alice",
        aud: str = AUDIENCE,
        iss: str = ISSUER,
        exp_in: float = 300,
        nbf_in: float = -10,
        **headers: str,
    ) -> str:
        now = time.time()
        claims: dict[str, Any] = {
            "iss": iss,
            "sub": sub,
            "aud": aud,
            "exp": int(now + exp_in),
            "nbf": int(now + nbf_in),
            "iat": int(now),
            "jti": secrets.token_hex(8),
            "access": access or [],
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers or None)


def repo_access(name: str, *actions: str) -> dict[str, Any]:
    return {"type": "repository", "name": name, "actions": list(actions)}


CATALOG = {"type": "registry", "name": "catalog", "actions": ["*"]}


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


# --- the stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("auth")) as s:
        yield s


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Stub:
    """The open gateway: sets things up, and sees what a refusal left."""
    return registry(stack.address)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


@pytest.fixture(scope="module")
def keyfile(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "token.pem"
    path.write_bytes(signer.public_pem())
    return path


def secured_gateway(stack: Stack, *args: str) -> ServiceProcess:
    gateway = spawn(
        "gateway",
        "--blob-addr",
        stack.blob.address,
        "--link-addr",
        stack.link.address,
        "--enable-delete",
        "--log-level",
        "WARNING",
        *args,
        env={GRANT_SECRET_ENV: stack.grant_secret},
        open_=False,
    )
    stack.extra.append(gateway)  # stopped with the stack
    return gateway


def token_args(keyfile: Path) -> tuple[str, ...]:
    return (
        "--auth-token-key",
        str(keyfile),
        "--auth-token-issuer",
        ISSUER,
        "--auth-token-audience",
        AUDIENCE,
    )


@pytest.fixture(scope="module")
def gateway(stack: Stack, keyfile: Path) -> Stub:
    return registry(secured_gateway(stack, *token_args(keyfile)).address)


def put(stub: Stub, repo: str, data: bytes, md: Metadata | None = None) -> pb.Descriptor:
    return stub.PutBlob(pb.PutBlobRequest(repository=repo, data=data), metadata=md)


def push(
    stub: Stub,
    repo: str,
    data: bytes | None,
    digest: str = "",
    size: int | None = None,
    md: Metadata | None = None,
) -> pb.Descriptor:
    header = pb.PushBlobRequest(
        header=pb.PushBlobRequest.Header(repository=repo, digest=digest, size=size)
    )
    messages = [header] + ([pb.PushBlobRequest(data=data)] if data else [])
    return stub.PushBlob(iter(messages), metadata=md)


def state(admin: Stub) -> tuple[object, ...]:
    """What a refusal must leave as it was: the repositories and the links of the matrix's."""
    repos = tuple(admin.ListRepositories(pb.ListRepositoriesRequest(page_size=1000)).repositories)
    links = tuple(
        tuple(
            d.digest
            for d in admin.ListBlobs(pb.ListBlobsRequest(repository=r, page_size=1000)).blobs
        )
        for r in (REPO, SOURCE, OTHER)
    )
    return repos, links


def failure(call: Callable[[], object]) -> tuple[Code, str] | None:
    """None when ``call`` succeeds, else its code and ErrorInfo reason."""
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as err:
        info = error_info(err)
        return err.code(), info.reason if info else ""  # type: ignore[attr-defined]
    return None


# --- the matrix ----------------------------------------------------------------------------------

PULL_METHODS = ("StatBlob", "ReadBlob", "LocateBlob", "ListBlobs")
PUSH_METHODS = (
    "PutBlob",
    "PushBlob",
    "StartUpload",
    "WriteUpload",
    "GetUpload",
    "CommitUpload",
    "CancelUpload",
    "MountBlob",
    "ListUploads",
)
METHODS = (*PULL_METHODS, *PUSH_METHODS, "DeleteBlob", "ListRepositories")


def assert_every_method_covered() -> None:
    names = {m.name for m in pb.DESCRIPTOR.services_by_name["Registry"].methods}
    assert names == set(METHODS)


class Fixture:
    """A blob linked in REPO and SOURCE, and an upload in REPO, made fresh per call."""

    def __init__(self, admin: Stub) -> None:
        self.data = secrets.token_bytes(64)
        self.digest = put(admin, REPO, self.data).digest
        put(admin, SOURCE, self.data)
        self.upload = admin.StartUpload(pb.StartUploadRequest(repository=REPO)).id
        self.new_data = secrets.token_bytes(32)


def call(method: str, stub: Stub, f: Fixture, md: Metadata) -> Callable[[], object]:
    blob = pb.DeleteBlobRequest(repository=REPO, digest=f.digest)
    calls: dict[str, Callable[[], object]] = {
        "StatBlob": lambda: stub.StatBlob(
            pb.StatBlobRequest(repository=REPO, digest=f.digest), metadata=md
        ),
        "ReadBlob": lambda: stub.ReadBlob(
            pb.ReadBlobRequest(repository=REPO, digest=f.digest), metadata=md
        ),
        "LocateBlob": lambda: stub.LocateBlob(
            pb.LocateBlobRequest(repository=REPO, digest=f.digest), metadata=md
        ),
        "ListBlobs": lambda: stub.ListBlobs(pb.ListBlobsRequest(repository=REPO), metadata=md),
        "PutBlob": lambda: put(stub, REPO, f.new_data, md),
        "PushBlob": lambda: push(stub, REPO, f.new_data, md=md),
        "StartUpload": lambda: stub.StartUpload(
            pb.StartUploadRequest(repository=REPO), metadata=md
        ),
        "WriteUpload": lambda: stub.WriteUpload(
            iter([pb.WriteUploadRequest(repository=REPO, upload_id=f.upload, data=b"x")]),
            metadata=md,
        ),
        "GetUpload": lambda: stub.GetUpload(
            pb.GetUploadRequest(repository=REPO, upload_id=f.upload), metadata=md
        ),
        "CommitUpload": lambda: stub.CommitUpload(
            pb.CommitUploadRequest(
                repository=REPO, upload_id=f.upload, digest=digest_of(f.new_data), data=f.new_data
            ),
            metadata=md,
        ),
        "CancelUpload": lambda: stub.CancelUpload(
            pb.CancelUploadRequest(repository=REPO, upload_id=f.upload), metadata=md
        ),
        "MountBlob": lambda: stub.MountBlob(
            pb.MountBlobRequest(repository=REPO, from_repository=SOURCE, digest=f.digest),
            metadata=md,
        ),
        "ListUploads": lambda: stub.ListUploads(
            pb.ListUploadsRequest(repository=REPO), metadata=md
        ),
        "DeleteBlob": lambda: stub.DeleteBlob(blob, metadata=md),
        "ListRepositories": lambda: stub.ListRepositories(
            pb.ListRepositoriesRequest(), metadata=md
        ),
    }
    return calls[method]


UNAUTH = (Code.UNAUTHENTICATED, "UNAUTHORIZED")
DENIED = (Code.PERMISSION_DENIED, "DENIED")


def tokens(signer: Signer) -> dict[str, str | None]:
    full = [repo_access(REPO, "*"), repo_access(SOURCE, "*")]
    return {
        "no token": None,
        "wrong audience": signer.token(full, aud="someone.else"),
        "wrong issuer": signer.token(full, iss="https://evil.test"),
        "expired": signer.token(full, exp_in=-120),
        "not yet valid": signer.token(full, nbf_in=120),
        "bad signature": Signer().token(full),
        "pull": signer.token([repo_access(REPO, "pull")]),
        "push": signer.token([repo_access(REPO, "push")]),
        "pull+push": signer.token([repo_access(REPO, "pull", "push"), repo_access(SOURCE, "pull")]),
        "delete": signer.token([repo_access(REPO, "delete")]),
        "catalog": signer.token([CATALOG]),
        "other repository": signer.token([repo_access(OTHER, "*")]),
    }


def expected(kind: str, method: str) -> tuple[Code, str] | None:
    if kind in ("no token", "wrong audience", "wrong issuer", "expired", "not yet valid"):
        return UNAUTH
    if kind == "bad signature":
        return UNAUTH
    if method == "ListRepositories":
        return None  # every authenticated caller gets a list: of what it may pull
    allowed = {
        "pull": PULL_METHODS,
        "push": PUSH_METHODS,
        "pull+push": (*PULL_METHODS, *PUSH_METHODS),
        "delete": ("DeleteBlob",),
    }.get(kind, ())
    if method == "MountBlob" and kind == "push":
        return DENIED  # push on the target, but no pull on the source
    return None if method in allowed else DENIED


def test_every_method_by_every_kind_of_caller(admin: Stub, gateway: Stub, signer: Signer) -> None:
    assert_every_method_covered()
    outcomes: dict[tuple[str, str], object] = {}
    for kind, token in tokens(signer).items():
        md: Metadata = bearer(token) if token else ()
        for method in METHODS:
            f = Fixture(admin)
            before = state(admin)
            got = failure(call(method, gateway, f, md))
            want = expected(kind, method)
            outcomes[kind, method] = got
            assert got == want, (kind, method, got)
            if got is not None:
                assert state(admin) == before, (kind, method)
                # The upload is as it was too.
                status = admin.GetUpload(pb.GetUploadRequest(repository=REPO, upload_id=f.upload))
                assert status.offset == 0, (kind, method)


def test_refusals_say_why_and_never_echo_the_token(gateway: Stub, signer: Signer) -> None:
    stat = pb.StatBlobRequest(repository=REPO, digest=digest_of(b"x"))
    cases = {
        "expired": (signer.token(exp_in=-120), "expired"),
        "not valid yet": (signer.token(nbf_in=120), "not valid yet"),
        "audience": (signer.token(aud="x"), "audience"),
        "signature": (Signer().token(), "signature"),
        "garbage": ("not.a.jwt", "well-formed"),
    }
    for name, (token, words) in cases.items():
        with pytest.raises(grpc.RpcError) as exc:
            gateway.StatBlob(stat, metadata=bearer(token))
        err = exc.value
        assert err.code() == Code.UNAUTHENTICATED, name  # type: ignore[attr-defined]
        details = err.details() or ""  # type: ignore[attr-defined]
        assert words in details, (name, details)
        assert token not in details
        info = error_info(err)
        assert info is not None and info.metadata["service"] == AUDIENCE
    # An anonymous caller refused is told what to ask a token server for.
    with pytest.raises(grpc.RpcError) as exc:
        gateway.StatBlob(stat)
    info = error_info(exc.value)
    assert info is not None and info.metadata["scope"] == f"repository:{REPO}:pull"
    # An HS256 token made with the public key as its secret is refused.
    forged = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
        secrets.token_bytes(32),
        algorithm="HS256",
    )
    with pytest.raises(grpc.RpcError) as exc:
        gateway.StatBlob(stat, metadata=bearer(forged))
    assert exc.value.code() == Code.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_a_pull_refusal_does_not_depend_on_existence(
    admin: Stub, gateway: Stub, signer: Signer
) -> None:
    data = secrets.token_bytes(40)
    existing = put(admin, "hidden/repo", data).digest
    md = bearer(signer.token([repo_access(OTHER, "*")]))
    answers = []
    for repo, digest in (
        ("hidden/repo", existing),
        ("hidden/repo", digest_of(b"never")),
        ("hidden/none", existing),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            gateway.StatBlob(pb.StatBlobRequest(repository=repo, digest=digest), metadata=md)
        answers.append(
            (exc.value.code(), (exc.value.details() or "").replace(digest, "D"))  # type: ignore[attr-defined]
        )
    assert answers[0] == answers[1]
    assert answers[0][0] == Code.PERMISSION_DENIED


# --- the oracle -----------------------------------------------------------------------------------


def normalized(err: grpc.RpcError, digest: str) -> tuple[object, ...]:
    info = error_info(err)
    metadata = dict(info.metadata) if info else {}
    return (
        err.code(),  # type: ignore[attr-defined]
        info.reason if info else "",
        # (Upload ids are random: a one-shot push's is named in some messages.)
        re.sub(r"push-[\w-]+", "push-ID", (err.details() or "").replace(digest, "D")),  # type: ignore[attr-defined]
        sorted(metadata.items()),
    )


def test_a_declared_digest_links_without_bytes_only_for_a_caller_who_may_pull_it(
    admin: Stub, gateway: Stub, signer: Signer
) -> None:
    secret = secrets.token_bytes(1000)
    digest = put(admin, "secret/vault", secret).digest
    unknown = digest_of(secrets.token_bytes(1000))
    mine = f"mine/{secrets.token_hex(4)}"
    pusher = bearer(signer.token([repo_access(mine, "push", "pull")]))

    # Header only, declaring the digest: the bytes must be sent, as for an unknown digest.
    answers = []
    for d in (digest, unknown):
        with pytest.raises(grpc.RpcError) as exc:
            push(gateway, mine, None, digest=d, md=pusher)
        answers.append(normalized(exc.value, d))
    assert answers[0] == answers[1]
    # A wrong declared size reveals nothing either (the real size is 1000).
    sized = []
    for d in (digest, unknown):
        with pytest.raises(grpc.RpcError) as exc:
            push(gateway, mine, None, digest=d, size=7, md=pusher)
        sized.append(normalized(exc.value, d))
        assert "1000" not in str(sized[-1])
    assert sized[0] == sized[1]
    assert admin.ListBlobs(pb.ListBlobsRequest(repository=mine)).blobs == []

    # Sending the bytes works, as it always did.
    assert push(gateway, mine, secret, digest=digest, md=pusher).digest == digest

    # A caller who may pull the blob somewhere links it without sending it.
    reader = bearer(
        signer.token([repo_access("secret/vault", "pull"), repo_access("mine/other", "push")])
    )
    linked = push(gateway, "mine/other", None, digest=digest, md=reader)
    assert (linked.digest, linked.size) == (digest, 1000)


def test_a_mount_without_source_needs_a_source_the_caller_may_pull(
    admin: Stub, gateway: Stub, signer: Signer
) -> None:
    digest = put(admin, "secret/mount", secrets.token_bytes(500)).digest
    unknown = digest_of(secrets.token_bytes(500))
    target = f"mine/{secrets.token_hex(4)}"
    pusher = bearer(signer.token([repo_access(target, "push")]))
    answers = []
    for d in (digest, unknown):
        with pytest.raises(grpc.RpcError) as exc:
            gateway.MountBlob(pb.MountBlobRequest(repository=target, digest=d), metadata=pusher)
        assert exc.value.code() == Code.NOT_FOUND  # type: ignore[attr-defined]
        answers.append(normalized(exc.value, d))
    assert answers[0] == answers[1]
    assert admin.ListBlobs(pb.ListBlobsRequest(repository=target)).blobs == []

    reader = bearer(
        signer.token([repo_access(target, "push"), repo_access("secret/mount", "pull")])
    )
    mounted = gateway.MountBlob(
        pb.MountBlobRequest(repository=target, digest=digest), metadata=reader
    )
    assert mounted.digest == digest


# --- the policy file ---------------------------------------------------------------------------

POLICY = """
[[rule]]
anonymous = true
repositories = ["public/*"]
actions = ["pull"]

[[rule]]
subjects = ["alice"]
repositories = ["team/**"]
actions = ["pull", "push"]

[[rule]]
subjects = ["root"]
repositories = ["**"]
actions = ["pull"]
"""


@pytest.fixture(scope="module")
def policy_gateway(stack: Stack, keyfile: Path, tmp_path_factory: pytest.TempPathFactory) -> Stub:
    path = tmp_path_factory.mktemp("policy") / "policy.toml"
    path.write_text(POLICY)
    return registry(
        secured_gateway(stack, *token_args(keyfile), "--auth-policy", str(path)).address
    )


def test_policy_globs_anonymous_pull_and_subjects(
    admin: Stub, policy_gateway: Stub, signer: Signer
) -> None:
    data = secrets.token_bytes(30)
    digest = put(admin, "public/img", data).digest
    put(admin, "public/deep/img", data)
    stat = lambda repo, md=(): policy_gateway.StatBlob(  # noqa: E731
        pb.StatBlobRequest(repository=repo, digest=digest), metadata=md
    )
    assert stat("public/img").size == 30  # anonymous pull of public/*
    assert failure(lambda: stat("public/deep/img")) == UNAUTH  # * is one segment
    assert failure(lambda: put(policy_gateway, "public/img", b"x")) == UNAUTH

    alice = bearer(signer.token(sub="alice"))
    bob = bearer(signer.token(sub="bob"))
    assert put(policy_gateway, "team/a/b/c", b"alice's", alice).size == 7  # ** any depth
    assert failure(lambda: put(policy_gateway, "team/a", b"bob's", bob)) == DENIED
    assert failure(lambda: put(policy_gateway, "teams/a", b"alice's", alice)) == DENIED
    assert stat("public/img", bob).size == 30  # anonymous rules apply to everyone

    # Pull on ** links a declared digest without its bytes.
    root = bearer(signer.token([repo_access("root/own", "push")], sub="root"))
    assert push(policy_gateway, "root/own", None, digest=digest, md=root).size == 30


def test_the_catalog_lists_what_the_caller_may_pull_across_pages(
    admin: Stub, policy_gateway: Stub, signer: Signer
) -> None:
    tag = secrets.token_hex(3)
    readable = []
    for i in range(7):
        put(admin, f"public/c{tag}{i}", b"p")
        put(admin, f"private/c{tag}{i}", b"p")
        readable.append(f"public/c{tag}{i}")

    def listing(md: Metadata, page_size: int) -> list[str]:
        names: list[str] = []
        token = ""
        for _ in range(1000):
            page = policy_gateway.ListRepositories(
                pb.ListRepositoriesRequest(page_size=page_size, page_token=token), metadata=md
            )
            names.extend(page.repositories)
            token = page.next_page_token
            if not token:
                return names
        raise AssertionError("endless listing")

    anonymous = listing((), 2)
    assert set(readable) <= set(anonymous)
    assert all(n.startswith("public/") and n.count("/") == 1 for n in anonymous)
    assert anonymous == sorted(anonymous) and len(set(anonymous)) == len(anonymous)
    everything = set(
        admin.ListRepositories(pb.ListRepositoriesRequest(page_size=1000)).repositories
    )
    assert set(listing(bearer(signer.token([CATALOG], sub="cat")), 3)) == everything


# --- startup -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (
            (
                "--auth-token-key",
                "/nonexistent.pem",
                "--auth-token-issuer",
                "i",
                "--auth-token-audience",
                "a",
            ),
            "/nonexistent.pem",
        ),
        (("--auth-policy", "BAD"), "--auth-policy"),
        (("--auth-token-issuer", "i"), "--auth-token-key"),
        ((), "--open"),
    ],
)
def test_a_bad_auth_configuration_exits_2_with_one_line(
    stack: Stack, tmp_path: Path, args: tuple[str, ...], words: str
) -> None:
    if "BAD" in args:
        bad = tmp_path / "bad.toml"
        bad.write_text('[[rule]]\nsubjects = ["a"]\nrepositories = ["x"]\nactions = ["fly"]\n')
        args = ("--auth-policy", str(bad))
    with pytest.raises(RuntimeError) as exc:
        secured_gateway(stack, *args)
    output = str(exc.value)
    assert "exited with 2" in output
    assert "Traceback" not in output
    assert words in output


def test_keys_from_a_jwks_file(stack: Stack, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    stub = registry(
        secured_gateway(
            stack,
            "--auth-token-key",
            str(path),
            "--auth-token-issuer",
            ISSUER,
            "--auth-token-audience",
            AUDIENCE,
        ).address
    )
    claims = {
        "iss": ISSUER,
        "aud": [AUDIENCE, "other"],
        "sub": "ec",
        "exp": int(time.time()) + 60,
        "access": [repo_access("jwks/repo", "push")],
    }
    good = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})
    assert put(stub, "jwks/repo", b"ec", bearer(good)).size == 2
    unknown_kid = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    assert failure(lambda: put(stub, "jwks/repo", b"ec", bearer(unknown_kid))) == UNAUTH
