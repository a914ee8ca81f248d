"""Bearer tokens after CNCF distribution's token specification (registry/auth/token).

A token is a JWT signed by a token server with an asymmetric key; the gateway holds only public
keys (``--auth-token-key``: PEM public keys or certificates, or a JWKS JSON file). A token is
accepted when its signature verifies with one of them (the one its ``kid`` names, when it names
one), with an algorithm that suits that key (RS*/PS* for RSA, ES* for the matching curve, EdDSA
for Ed25519/Ed448; never ``none``, never HS*), ``iss`` is the configured issuer, ``aud``
contains the configured audience, and ``exp`` (required) and ``nbf`` (when present) hold within
a small leeway.

Its ``access`` claim lists what it grants, as distribution writes it::

    "access": [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]},
               {"type": "registry", "name": "catalog", "actions": ["*"]}]

Repository names are exact (no globs in tokens); ``*`` as an action means pull, push and
delete. Unknown types and actions are ignored (a newer token server's), a malformed claim
refuses the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.auth.config import DEFAULT_LEEWAY

ACTIONS = frozenset({"pull", "push", "delete"})
# A token longer than this is refused before it is parsed.
MAX_TOKEN_LENGTH = 16 * 1024
# Tokens verified lately, remembered (by their SHA-256) until they expire: a client sends the
# same token on every call, and a signature check costs more than a small call itself.
VERIFIED_CACHE_SIZE = 4096

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


class TokenError(Exception):
    """A token that does not authenticate its bearer; the message says why (never the token)."""


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class VerificationKey:
    key: PublicKey
    # The key id a token's ``kid`` header names: the JWKS entry's ``kid``, else the key's
    # RFC 7638 JWK thumbprint (SHA-256, base64url).
    kid: str
    source: str  # the file it came from, for messages

    def algorithms(self) -> frozenset[str]:
        """The JWS algorithms this key may verify."""
        if isinstance(self.key, rsa.RSAPublicKey):
            return _RSA_ALGORITHMS
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            alg = _EC_ALGORITHMS.get(self.key.curve.name)
            return frozenset({alg}) if alg else frozenset()
        return frozenset({"EdDSA"})


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says of its bearer."""

    subject: str  # ``sub``; "" when the token server issued an anonymous token
    repositories: Mapping[str, frozenset[str]] = field(default_factory=dict)  # name -> actions
    catalog: bool = False


# --- keys -----------------------------------------------------------------------------------------


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def thumbprint(key: PublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256) of a public key, base64url without padding."""
    members: dict[str, str]
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        members = {"e": _b64(numbers.e), "kty": "RSA", "n": _b64(numbers.n)}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        pub = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(
            key.curve.name, key.curve.name
        )
        members = {
            "crv": crv,
            "kty": "EC",
            "x": base64.urlsafe_b64encode(pub.x.to_bytes(size, "big")).rstrip(b"=").decode(),
            "y": base64.urlsafe_b64encode(pub.y.to_bytes(size, "big")).rstrip(b"=").decode(),
        }
    else:
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        crv = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"
        members = {
            "crv": crv,
            "kty": "OKP",
            "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
        }
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def _checked(key: object, source: str) -> PublicKey:
    if isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return key
    raise KeyFileError(f"{source}: not an RSA, EC or EdDSA public key")


def _pem_keys(data: bytes, source: str) -> list[VerificationKey]:
    keys: list[VerificationKey] = []
    for block in _PEM_BLOCK.finditer(data):
        kind = block.group(1).decode()
        try:
            if kind == "CERTIFICATE":
                key: object = x509.load_pem_x509_certificate(block.group(0)).public_key()
            elif kind in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                key = serialization.load_pem_public_key(block.group(0))
            elif "PRIVATE KEY" in kind:
                raise KeyFileError(f"{source}: holds a private key; give the public key")
            else:
                continue
        except ValueError as exc:
            raise KeyFileError(f"{source}: unreadable {kind}: {exc}") from None
        public = _checked(key, source)
        keys.append(VerificationKey(public, thumbprint(public), source))
    return keys


def _jwks_keys(data: bytes, source: str) -> list[VerificationKey]:
    try:
        document = json.loads(data)
        entries = document["keys"] if isinstance(document, dict) and "keys" in document else None
        if not isinstance(entries, list):
            raise KeyFileError(f'{source}: a JWKS file needs a "keys" list')
        keys: list[VerificationKey] = []
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("kty") == "oct":
                raise KeyFileError(f"{source}: only RSA, EC and OKP public keys are accepted")
            if "d" in entry:
                raise KeyFileError(f"{source}: holds a private key; give the public key")
            jwk = jwt.PyJWK.from_dict(entry)
            public = _checked(jwk.key, source)
            keys.append(
                VerificationKey(public, str(entry.get("kid") or thumbprint(public)), source)
            )
        return keys
    except (ValueError, jwt.PyJWKError, jwt.InvalidKeyError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{source}: not a usable JWKS file: {exc}") from None


def load_keys(paths: Iterable[str]) -> list[VerificationKey]:
    """The public keys of ``paths`` (each PEM, with public keys and certificates, or a JWKS JSON
    file); KeyFileError when one is unreadable or holds none."""
    keys: list[VerificationKey] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
        found = _jwks_keys(data, path) if data.lstrip().startswith(b"{") else _pem_keys(data, path)
        if not found:
            raise KeyFileError(f"{path}: no public key or certificate in it")
        keys.extend(found)
    return keys


# --- tokens ---------------------------------------------------------------------------------------


def _access(claim: Any) -> tuple[dict[str, frozenset[str]], bool]:
    if claim is None:
        return {}, False
    if not isinstance(claim, list):
        raise TokenError("the token's access claim is not a list")
    repositories: dict[str, frozenset[str]] = {}
    catalog = False
    for entry in claim:
        if not isinstance(entry, dict):
            raise TokenError("the token's access claim holds a non-object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions", [])
        if not isinstance(name, str) or not isinstance(actions, list):
            raise TokenError("the token's access claim has an entry without name or actions")
        wanted = {a for a in actions if isinstance(a, str)}
        if kind == "repository":
            granted = ACTIONS if "*" in wanted else ACTIONS & wanted
            repositories[name] = repositories.get(name, frozenset()) | granted
        elif kind == "registry" and name == "catalog" and wanted & {"*", "pull"}:
            catalog = True
    return repositories, catalog


class TokenVerifier:
    def __init__(
        self,
        keys: list[VerificationKey],
        issuer: str,
        audience: str,
        leeway: float = DEFAULT_LEEWAY,
    ) -> None:
        if not keys:
            raise ValueError("a token verifier needs at least one key")
        if not issuer or not audience:
            raise ValueError("a token verifier needs an issuer and an audience")
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self._leeway = leeway
        # sha256(token) -> (claims, the time after which it is no longer accepted)
        self._verified: OrderedDict[bytes, tuple[TokenClaims, float]] = OrderedDict()

    def _candidates(self, header: Mapping[str, Any]) -> list[VerificationKey]:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg == "none" or alg.startswith("HS"):
            raise TokenError(f"the token's algorithm {str(alg)[:16]!r} is not accepted")
        usable = [k for k in self._keys if alg in k.algorithms()]
        if not usable:
            raise TokenError(f"no configured key verifies the token's algorithm {alg}")
        kid = header.get("kid")
        if isinstance(kid, str) and kid:
            named = [k for k in usable if k.kid == kid]
            if named:
                return named
        # No kid, or one that names no key by its id: every key that suits the algorithm
        # (a PEM key's id is its thumbprint, which a token server may not use as its kid).
        return usable

    def verify(self, token: str) -> TokenClaims:
        """The verified claims; TokenError saying why the token is refused."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenError("the token is too long")
        key = hashlib.sha256(token.encode()).digest()
        remembered = self._verified.get(key)
        if remembered is not None:
            if time.time() < remembered[1]:
                self._verified.move_to_end(key)
                return remembered[0]
            del self._verified[key]  # expired since: verified again, and refused as expired
        claims, expires = self._verify(token)
        self._verified[key] = (claims, expires + self._leeway)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims

    def _verify(self, token: str) -> tuple[TokenClaims, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenError("the token is not a well-formed JWT") from None
        candidates = self._candidates(header)
        alg = str(header["alg"])
        for candidate in candidates:
            try:
                claims = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=[alg],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self._leeway,
                    options={"require": ["exp", "iss", "aud"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise TokenError("the token has expired") from None
            except jwt.ImmatureSignatureError:
                raise TokenError("the token is not valid yet (nbf)") from None
            except jwt.InvalidAudienceError:
                raise TokenError(f"the token is not for audience {self.audience!r}") from None
            except jwt.InvalidIssuerError:
                raise TokenError(f"the token is not issued by {self.issuer!r}") from None
            except jwt.MissingRequiredClaimError as exc:
                raise TokenError(f"the token lacks the {exc.claim!r} claim") from None
            except jwt.InvalidTokenError as exc:
                raise TokenError(f"the token is invalid: {type(exc).__name__}") from None
            subject = claims.get("sub", "")
            if not isinstance(subject, str):
                raise TokenError("the token's sub claim is not a string")
            repositories, catalog = _access(claims.get("access"))
            # A token not valid yet was refused above (nbf), so only exp bounds its reuse.
            return TokenClaims(subject, repositories, catalog), float(claims["exp"])
        raise TokenError("the token's signature does not verify with any configured key")
