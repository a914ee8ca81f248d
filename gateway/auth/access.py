"""The gateway's decision for one call: who is calling (authenticate) and whether they may
(require).

A gateway configured with a token key, a policy, or both is secured: every call is
authenticated (a bearer token in ``authorization: Bearer <token>`` call metadata, verified by
gateway.auth.tokens; a client certificate's identities when the connection has one; otherwise
the caller is anonymous) and every method requires an action on a repository, granted by the
token's access claim or by the policy's rules that apply to the caller (grants add up; see
gateway.auth.policy). Without either (``--open``) every caller may do everything, as before
authentication existed.

Refusals: a token that does not verify is UNAUTHENTICATED / UNAUTHORIZED whatever the call
(the message says why; the token is never echoed); an anonymous caller refused an action is
UNAUTHENTICATED / UNAUTHORIZED too (authenticating may help); an authenticated one
PERMISSION_DENIED / DENIED. Both carry ErrorInfo metadata ``scope``
(``repository:NAME:ACTION`` as distribution's token server takes it) and, with tokens, ``service``
(the audience a token must name), which is what a WWW-Authenticate challenge would say. A refusal
never depends on whether the repository or blob exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import grpc

from gateway.auth.policy import Policy, Rule, glob_match
from gateway.auth.tokens import TokenError, TokenVerifier
from linkedblob.caller import peer_identities, set_caller
from linkedblob.errors import LinkedBlobError, Reason

ANONYMOUS = "anonymous"


class Action(StrEnum):
    PULL = "pull"
    PUSH = "push"
    DELETE = "delete"


@dataclass(frozen=True)
class Caller:
    """An authenticated call's caller and everything it was granted."""

    identity: str  # the token's subject, else the certificate's identity, else "anonymous"
    authenticated: bool  # a verified token or a client certificate
    unrestricted: bool = False  # an open gateway: everything is allowed
    token_repositories: Mapping[str, frozenset[str]] = field(default_factory=dict)
    token_catalog: bool = False
    rules: tuple[Rule, ...] = ()

    def may(self, action: Action | str, repository: str) -> bool:
        if self.unrestricted or action in self.token_repositories.get(repository, ()):
            return True
        return any(
            action in rule.actions and any(glob_match(p, repository) for p in rule.repositories)
            for rule in self.rules
        )

    def may_pull(self, repository: str) -> bool:
        return self.may(Action.PULL, repository)

    def pulls_everything(self) -> bool:
        """Whether the caller may pull every repository (an open gateway, or a ``**`` rule)."""
        return self.unrestricted or any(
            Action.PULL in rule.actions and rule.everywhere() for rule in self.rules
        )

    def catalog(self) -> bool:
        """Whether the caller may list every repository."""
        return self.unrestricted or self.token_catalog or any(r.catalog for r in self.rules)

    def has_grants(self) -> bool:
        return self.catalog() or bool(self.token_repositories) or bool(self.rules)


OPEN_CALLER = Caller(identity="", authenticated=False, unrestricted=True)


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    """The bearer token of the call's metadata; None without an authorization entry."""
    values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise unauthenticated("more than one authorization entry in the call metadata")
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthenticated("the authorization metadata must be 'Bearer <token>'")
    return token.strip()


def unauthenticated(message: str, **metadata: str) -> LinkedBlobError:
    return LinkedBlobError(grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHORIZED, message, metadata)


class Access:
    def __init__(self, verifier: TokenVerifier | None = None, policy: Policy | None = None) -> None:
        self._verifier = verifier
        self._policy = policy

    @property
    def secured(self) -> bool:
        return self._verifier is not None or self._policy is not None

    def authenticate(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller of this call (and it is named for the access log); UNAUTHENTICATED /
        UNAUTHORIZED for a token that does not verify."""
        if not self.secured:
            return OPEN_CALLER
        token = _bearer(context)
        certificates = peer_identities(context)
        subject: str | None = None
        repositories: Mapping[str, frozenset[str]] = {}
        catalog = False
        if token is not None:
            if self._verifier is None:
                raise unauthenticated("this gateway does not accept bearer tokens")
            try:
                claims = self._verifier.verify(token)
            except TokenError as exc:
                raise unauthenticated(f"invalid bearer token: {exc}", **self._challenge()) from None
            subject, repositories, catalog = claims.subject, claims.repositories, claims.catalog
        authenticated = token is not None or bool(certificates)
        identity = subject or (certificates[0] if certificates else ANONYMOUS)
        rules = (
            self._policy.applicable(subject, certificates, authenticated) if self._policy else ()
        )
        set_caller(identity)
        return Caller(identity, authenticated, False, repositories, catalog, rules)

    def _challenge(self, scope: str = "") -> dict[str, str]:
        hint = {"scope": scope} if scope else {}
        if self._verifier is not None:
            hint["service"] = self._verifier.audience
        return hint

    def require(self, caller: Caller, action: Action, repository: str) -> None:
        """Nothing when ``caller`` may ``action`` ``repository``; otherwise UNAUTHENTICATED /
        UNAUTHORIZED (an anonymous caller) or PERMISSION_DENIED / DENIED."""
        if caller.may(action, repository):
            return
        scope = f"repository:{repository}:{action}"
        if not caller.authenticated:
            raise unauthenticated(
                f"authentication required to {action} repository {repository}",
                **self._challenge(scope),
            )
        raise LinkedBlobError(
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.DENIED,
            f"{caller.identity} may not {action} repository {repository}",
            self._challenge(scope),
        )

    def require_some_grant(self, caller: Caller) -> None:
        """For the catalog: an anonymous caller granted nothing at all is asked to
        authenticate rather than answered an empty list."""
        if not caller.has_grants() and not caller.authenticated:
            raise unauthenticated(
                "authentication required to list repositories",
                **self._challenge("registry:catalog:*"),
            )
