"""The gateway's authentication flags, and the Access they configure."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from linkedblob.config import add_option, parse_duration

if TYPE_CHECKING:
    from gateway.auth.access import Access
    from gateway.auth.policy import Policy
    from gateway.auth.tokens import TokenVerifier

# Seconds of clock skew allowed on a token's exp and nbf.
DEFAULT_LEEWAY = 30.0


class AuthConfigError(Exception):
    """A configuration the gateway cannot start with; one line, naming the flag."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--auth-token-key",
        default="",
        help="files (comma-separated) of the public keys that verify bearer tokens: PEM public "
        "keys or certificates, or JWKS JSON files; set, every call is authenticated and "
        "authorized (needs --auth-token-issuer and --auth-token-audience)",
    )
    add_option(parser, "--auth-token-issuer", default="", help="the iss a bearer token must carry")
    add_option(
        parser,
        "--auth-token-audience",
        default="",
        help="the audience a bearer token's aud must contain (this gateway's service name)",
    )
    add_option(
        parser,
        "--auth-token-leeway",
        type=parse_duration,
        default=DEFAULT_LEEWAY,
        help="clock skew allowed on a token's exp and nbf",
    )
    add_option(
        parser,
        "--auth-policy",
        default="",
        help="TOML file of static rules: identities (token subjects, client certificates, "
        "anonymous), repository globs and actions (see the README); set, every call is "
        "authenticated and authorized",
    )


def build_access(args: argparse.Namespace) -> Access:
    """The Access the flags describe (open when neither a key nor a policy is given)."""
    # Imported here: every `linkedblob` command builds the gateway's flags, and only a gateway
    # needs PyJWT and cryptography (~10 MiB resident in each process that loads them).
    from gateway.auth.access import Access
    from gateway.auth.policy import PolicyError, load_policy
    from gateway.auth.tokens import KeyFileError, TokenVerifier, load_keys

    verifier: TokenVerifier | None = None
    paths = [p.strip() for p in args.auth_token_key.split(",") if p.strip()]
    if paths:
        if not args.auth_token_issuer or not args.auth_token_audience:
            raise AuthConfigError(
                "--auth-token-key needs --auth-token-issuer and --auth-token-audience"
            )
        if args.auth_token_leeway < 0:
            raise AuthConfigError("--auth-token-leeway must be >= 0")
        try:
            keys = load_keys(paths)
        except KeyFileError as exc:
            raise AuthConfigError(f"--auth-token-key: {exc}") from None
        verifier = TokenVerifier(
            keys, args.auth_token_issuer, args.auth_token_audience, args.auth_token_leeway
        )
    elif args.auth_token_issuer or args.auth_token_audience:
        raise AuthConfigError("--auth-token-issuer and --auth-token-audience need --auth-token-key")
    policy: Policy | None = None
    if args.auth_policy:
        try:
            policy = load_policy(args.auth_policy)
        except PolicyError as exc:
            raise AuthConfigError(f"--auth-policy: {exc}") from None
    return Access(verifier, policy)
