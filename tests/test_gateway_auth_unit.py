"""The gateway's authentication pieces on their own: key files, token verification, the policy
file and its globs, the decision for a caller (certificate identities included, which the
end-to-end tests cannot present without TLS), the catalog's filtering over linksvc's pages,
and linksvc's ListLinkingRepositories."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from gateway import registry as registry_module
from gateway.auth.access import Access, Action
from gateway.auth.policy import PolicyError, glob_match, parse_policy
from gateway.auth.tokens import KeyFileError, TokenError, TokenVerifier, load_keys, thumbprint
from gateway.fakes import FakeBlobBackend, FakeLinkBackend
from gateway.registry import Registry
from linkedblob import caller as caller_module
from linkedblob.errors import LinkedBlobError
from linkedblob.link.v1 import link_pb2, link_pb2_grpc
from tests.services import running

ISS, AUD = "https://issuer.test", "gw.test"


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "s", "exp": now + 60, "nbf": now - 5}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT made by hand (PyJWT refuses a PEM key as an HMAC secret, as it should)."""

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(payload).encode())
    mac = hmac.new(secret, signing, hashlib.sha256).digest()
    return (signing + b"." + b64(mac)).decode()


# --- keys ---------------------------------------------------------------------------------------


def test_pem_keys_and_certificates_load_with_their_thumbprints(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ec_key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-signer")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
        .sign(ec_key, hashes.SHA384())
    )
    bundle = tmp_path / "keys.pem"
    bundle.write_bytes(pem(rsa_key) + pem(ed_key) + cert.public_bytes(serialization.Encoding.PEM))
    keys = load_keys([str(bundle)])
    assert [sorted(k.algorithms()) for k in keys] == [
        ["PS256", "PS384", "PS512", "RS256", "RS384", "RS512"],
        ["EdDSA"],
        ["ES384"],
    ]
    # The RFC 7638 thumbprint, as PyJWK computes the JWK and a JWKS would carry it.
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    assert keys[0].kid == thumbprint(rsa_key.public_key())
    assert {"kty", "n", "e"} <= set(rsa_jwk)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "no public key"),
        (b"hello", "no public key"),
        (b'{"keys": 1}', "keys"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "only RSA, EC and OKP"),
    ],
)
def test_unusable_key_files_are_refused(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=words):
        load_keys([str(path)])


def test_a_private_key_file_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "private.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="private key"):
        load_keys([str(path)])
    with pytest.raises(KeyFileError, match="missing"):
        load_keys([str(tmp_path / "missing")])


# --- tokens -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def verifier(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> TokenVerifier:
    path = tmp_path / "k.pem"
    path.write_bytes(pem(rsa_key))
    return TokenVerifier(load_keys([str(path)]), ISS, AUD, leeway=5)


def test_a_token_grants_its_access_claim(verifier: TokenVerifier, rsa_key: Any) -> None:
    token = jwt.encode(
        claims(
            access=[
                {"type": "repository", "name": "a/b", "actions": ["pull", "push", "fly"]},
                {"type": "repository", "name": "c", "actions": ["*"]},
                {"type": "registry", "name": "catalog", "actions": ["*"]},
                {"type": "repository(plugin)", "name": "x", "actions": ["pull"]},
            ]
        ),
        rsa_key,
        algorithm="RS512",
    )
    got = verifier.verify(token)
    assert got.subject == "s"
    assert got.repositories == {
        "a/b": frozenset({"pull", "push"}),
        "c": frozenset({"pull", "push", "delete"}),
    }
    assert got.catalog


@pytest.mark.parametrize(
    "over, words",
    [
        # Times relative to now are resolved in the test (collection may be minutes earlier).
        ({"exp": -60}, "expired"),
        ({"nbf": +60}, "not valid yet"),
        ({"aud": ["x", "y"]}, "audience"),
        ({"iss": "https://other"}, "issued by"),
        ({"exp": None}, "'exp'"),
        ({"access": "pull"}, "access claim"),
        ({"access": [{"type": "repository", "actions": ["pull"]}]}, "without name"),
    ],
)
def test_tokens_refused_say_why(
    verifier: TokenVerifier, rsa_key: Any, over: dict[str, Any], words: str
) -> None:
    now = int(time.time())
    over = {
        k: now + v if k in ("exp", "nbf") and isinstance(v, int) else v for k, v in over.items()
    }
    with pytest.raises(TokenError, match=words):
        verifier.verify(jwt.encode(claims(**over), rsa_key, algorithm="RS256"))


def test_within_the_leeway_a_token_is_still_valid(verifier: TokenVerifier, rsa_key: Any) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 2), rsa_key, algorithm="RS256")
    assert verifier.verify(token).subject == "s"


def test_a_remembered_token_is_refused_once_it_expires(rsa_key: Any, tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(pem(rsa_key))
    verifier = TokenVerifier(load_keys([str(path)]), ISS, AUD, leeway=0)
    expires = int(time.time()) + 2
    token = jwt.encode(claims(exp=expires, nbf=None), rsa_key, algorithm="RS256")
    assert verifier.verify(token).subject == "s"
    assert verifier.verify(token).subject == "s"  # remembered
    while time.time() < expires + 0.1:
        time.sleep(0.1)
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(token)
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(token)  # a refusal is never remembered as valid


def test_algorithms_that_do_not_suit_the_key_are_refused(
    verifier: TokenVerifier, rsa_key: Any
) -> None:
    public = pem(rsa_key)
    # The classic confusion: HS256 with the public key's PEM as the secret.
    forged = hs256(claims(), public)
    with pytest.raises(TokenError, match="not accepted"):
        verifier.verify(forged)
    unsigned = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(TokenError, match="not accepted"):
        verifier.verify(unsigned)
    ec_token = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    with pytest.raises(TokenError, match="no configured key"):
        verifier.verify(ec_token)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TokenError, match="signature"):
        verifier.verify(jwt.encode(claims(), other, algorithm="RS256"))
    with pytest.raises(TokenError, match="well-formed"):
        verifier.verify("abc")


def test_the_kid_picks_the_key(tmp_path: Path) -> None:
    one, two = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    entries = []
    for kid, key in (("one", one), ("two", two)):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        entries.append({**jwk, "kid": kid})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": entries}))
    verifier = TokenVerifier(load_keys([str(path)]), ISS, AUD)
    assert verifier.verify(jwt.encode(claims(), two, "ES256", headers={"kid": "two"}))
    with pytest.raises(TokenError, match="signature"):
        verifier.verify(jwt.encode(claims(), two, "ES256", headers={"kid": "one"}))


# --- the policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, name, matches",
    [
        ("public/*", "public/a", True),
        ("public/*", "public", False),
        ("public/*", "public/a/b", False),
        ("public/**", "public", True),
        ("public/**", "public/a/b/c", True),
        ("public/**", "publicity/a", False),
        ("**", "anything/at/all", True),
        ("*/releases", "team/releases", True),
        ("*/releases", "a/b/releases", False),
        ("**/releases", "a/b/releases", True),
        ("team-?", "team-a", True),
        ("team-[ab]/x", "team-c/x", False),
        ("Team/*", "team/x", False),
    ],
)
def test_globs_match_whole_segments(pattern: str, name: str, matches: bool) -> None:
    assert glob_match(pattern, name) is matches


@pytest.mark.parametrize(
    "text, words",
    [
        ("rule = 1", "array of tables"),
        ("[[rule]]\nrepositories=['a']\nactions=['pull']", "names nobody"),
        ("[[rule]]\nanonymous=true\nrepositories=['a']\nactions=['fly']", "unknown action"),
        ("[[rule]]\nanonymous=true\nrepo=['a']", "unknown key 'repo'"),
        ("[[rule]]\nanonymous=true\nrepositories=['a']", "go together"),
        ("[[rule]]\nanonymous=true", "grants nothing"),
        ("[[rule]]\nanonymous='yes'\ncatalog=true", "true or false"),
        ("[[rule]]\nsubjects='alice'\ncatalog=true", "list of non-empty strings"),
        ("[rules]", "unknown key 'rules'"),
        ("[[rule]\n", "not valid TOML"),
    ],
)
def test_bad_policies_are_refused(text: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        parse_policy(text)


class Context:
    """What Access reads of a call: its metadata and its peer's certificate identities."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), peers: tuple[str, ...] = ()):
        self._metadata = metadata
        self._peers = peers

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer_identities(self) -> list[bytes] | None:
        return [p.encode() for p in self._peers] or None


POLICY = """
[[rule]]
certificates = ["ci.example.internal"]
repositories = ["*/releases"]
actions = ["*"]

[[rule]]
authenticated = true
catalog = true

[[rule]]
anonymous = true
repositories = ["public/*"]
actions = ["pull"]
"""


def test_a_client_certificate_identity_is_a_policy_identity() -> None:
    access = Access(None, parse_policy(POLICY))
    assert access.secured
    ci = access.authenticate(Context(peers=("ci.example.internal",)))  # type: ignore[arg-type]
    assert caller_module.caller() == "ci.example.internal"
    assert ci.authenticated and ci.catalog()
    assert ci.may(Action.DELETE, "team/releases") and not ci.may(Action.PUSH, "team/app")
    assert ci.may(Action.PULL, "public/x")  # anonymous rules apply to everyone
    access.require(ci, Action.PUSH, "x/releases")
    with pytest.raises(LinkedBlobError) as exc:
        access.require(ci, Action.PUSH, "team/app")
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED

    other = access.authenticate(Context(peers=("someone.else",)))  # type: ignore[arg-type]
    assert other.catalog() and not other.may(Action.PULL, "a/releases")
    anonymous = access.authenticate(Context())  # type: ignore[arg-type]
    assert caller_module.caller() == "anonymous"
    assert not anonymous.catalog() and anonymous.may(Action.PULL, "public/x")
    with pytest.raises(LinkedBlobError) as exc:
        access.require(anonymous, Action.PULL, "a/releases")
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert exc.value.metadata["scope"] == "repository:a/releases:pull"
    # A policy-only gateway takes no bearer token.
    with pytest.raises(LinkedBlobError, match="does not accept bearer tokens"):
        access.authenticate(Context((("authorization", "Bearer x.y.z"),)))  # type: ignore[arg-type]
    with pytest.raises(LinkedBlobError, match="Bearer <token>"):
        access.authenticate(Context((("authorization", "Basic abc"),)))  # type: ignore[arg-type]


def test_an_open_gateway_allows_everything() -> None:
    access = Access()
    caller = access.authenticate(Context())  # type: ignore[arg-type]
    assert not access.secured and caller.pulls_everything() and caller.catalog()
    access.require(caller, Action.DELETE, "any/thing")


# --- the domain: the catalog's filtering and the source of a link without bytes ------------------


def test_the_filtered_catalog_bounds_its_work_and_its_tokens_stay_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small linksvc pages, so that the bounds are reached with a few repositories.
    monkeypatch.setattr(registry_module, "CATALOG_PAGE_SIZE", 3)
    monkeypatch.setattr(registry_module, "CATALOG_PAGES", 2)

    async def scenario() -> None:
        links = FakeLinkBackend()
        registry = Registry(FakeBlobBackend(), links)
        digest = "sha256:" + "a" * 64
        links.recorded[digest] = 1
        names = [f"r{i:02d}" for i in range(20)]
        for name in names:
            links.links[name, digest] = ""
        readable = {"r01", "r02", "r03", "r17", "r19"}
        pages = []
        token = ""
        while True:
            page = await registry.list_repositories(2, token, readable.__contains__)
            pages.append(page.items)
            token = page.next_page_token
            if not token:
                break
        # Every readable name once, in order; some pages empty (bounded work per call).
        assert [n for p in pages for n in p] == sorted(readable)
        assert [] in pages
        assert all(len(p) <= 2 for p in pages)
        # The source of a link without bytes: the first readable repository that links it.
        assert await registry.readable_source(digest, {"r17"}.__contains__) == "r17"
        assert await registry.readable_source(digest, set().__contains__) is None

    asyncio.run(scenario())


# --- linksvc's ListLinkingRepositories ---------------------------------------------------------


def test_linksvc_lists_the_repositories_linking_a_digest(db_url: str) -> None:
    with running("link", "--db", db_url, "--migrate") as link:
        stub = link_pb2_grpc.LinkServiceStub(link.channel())  # type: ignore[no-untyped-call]
        digest = "sha256:" + secrets.token_hex(32)
        lease = stub.Lease(link_pb2.LeaseRequest(digest=digest, ttl_seconds=60))
        names = [f"team/r{i}" for i in range(5)]
        for i, name in enumerate(names):
            stub.Link(
                link_pb2.LinkRequest(
                    repository=name,
                    digest=digest,
                    size=3,
                    lease_id=lease.lease_id if i == 0 else "",
                )
            )
        seen: list[str] = []
        token = ""
        while True:
            page = stub.ListLinkingRepositories(
                link_pb2.ListLinkingRepositoriesRequest(
                    digest=digest, page_size=2, page_token=token
                )
            )
            seen.extend(page.repositories)
            token = page.next_page_token
            if not token:
                break
        assert seen == names
        unknown = "sha256:" + secrets.token_hex(32)
        empty = stub.ListLinkingRepositories(
            link_pb2.ListLinkingRepositoriesRequest(digest=unknown)
        )
        assert list(empty.repositories) == [] and empty.next_page_token == ""
        first = stub.ListLinkingRepositories(
            link_pb2.ListLinkingRepositoriesRequest(digest=digest, page_size=1)
        )
        with pytest.raises(grpc.RpcError) as exc:  # a token of another digest
            stub.ListLinkingRepositories(
                link_pb2.ListLinkingRepositoriesRequest(
                    digest=unknown, page_token=first.next_page_token
                )
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_only_a_gateway_loads_the_token_libraries() -> None:
    """Every `linkedblob` command builds every service's flags; PyJWT and cryptography (~10 MiB
    resident) load only when a gateway builds its access, not in blobsvc, linksvc or a client."""
    import subprocess
    import sys

    code = (
        "import sys; from linkedblob import cli; cli.build_parser(); "
        "import blobsvc.server, linksvc.server; "
        "print(sorted(m for m in ('jwt', 'cryptography') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
