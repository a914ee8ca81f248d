"""Per-method authorization by the peer's certificate, for blobsvc and linksvc.

With mTLS (``--tls-client-ca``) every caller presents a certificate the CA signed; its
identities (DNS or URI SANs, else the CN: :func:`linkedblob.caller.peer_identities`) are
matched against the allow lists of the roles (``--allow-gateway``, ``--allow-collector``), and
each method of the service is allowed to certain roles (the table each service keeps:
``blobsvc/roles.py``, ``linksvc/roles.py``). Only the gateway writes links, sessions and staged
bytes; only the collector deletes bytes. A caller in no list allowed for the method gets
PERMISSION_DENIED / DENIED naming the method and the identity, and nothing changes.

blobsvc's direct port (``--direct-port``) takes calls without a client certificate: those are
allowed only for the direct methods (what linkedblob.client.direct calls) and only with a read
or write grant, never an ``internal`` one; the servicer then verifies the grant's signature.

Other services on the same server (health, reflection) are not checked: a kubelet probe that
completes the handshake may call them.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import grpc

from linkedblob.caller import peer_identities, set_caller
from linkedblob.config import add_option
from linkedblob.errors import LinkedBlobError, Reason
from linkedblob.grants import METADATA_KEY, token_from, unverified_action

GATEWAY = "gateway"
COLLECTOR = "collector"
ROLES = (GATEWAY, COLLECTOR)

# The grant actions a caller without a certificate may hold (linkedblob.grants' READ, WRITE).
DIRECT_ACTIONS = frozenset({"read", "write"})


@dataclass(frozen=True)
class MethodTable:
    """Which roles may call each method of one gRPC service; a method not listed is allowed to
    no role. ``direct``: the methods a caller without a certificate may call with a grant."""

    service: str  # full service name, e.g. linkedblob.link.v1.LinkService
    roles: Mapping[str, frozenset[str]]
    direct: frozenset[str] = frozenset()


def parse_names(text: str) -> frozenset[str]:
    return frozenset(name.strip() for name in text.split(",") if name.strip())


@dataclass
class PeerAuthorizer(grpc.aio.ServerInterceptor):
    """The server interceptor that checks each call of ``table.service``."""

    table: MethodTable
    allowed: Mapping[str, frozenset[str]]  # role -> identities
    direct: bool = False  # whether calls without a certificate may use the direct methods
    _prefix: str = field(init=False)

    def __post_init__(self) -> None:
        self._prefix = f"/{self.table.service}/"

    def check(self, method: str, context: grpc.aio.ServicerContext) -> str:
        """The identity the call is authorized as; a LinkedBlobError when it is not."""
        identities = peer_identities(context)
        if not identities:
            if not (self.direct and method in self.table.direct):
                raise LinkedBlobError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    Reason.UNAUTHORIZED,
                    f"{method} needs a client certificate",
                )
            action = unverified_action(token_from(context))
            if not action:
                raise LinkedBlobError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    Reason.UNAUTHORIZED,
                    f"{method} without a client certificate needs a grant in the "
                    f"{METADATA_KEY!r} metadata",
                )
            if action not in DIRECT_ACTIONS:
                raise LinkedBlobError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    Reason.DENIED,
                    f"{method}: a {action!r} grant is not accepted without a client certificate",
                )
            return f"grant:{action}"
        roles = self.table.roles.get(method, frozenset())
        for role in roles:
            names = self.allowed.get(role, frozenset())
            for identity in identities:
                if identity in names:
                    return identity
        raise LinkedBlobError(
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.DENIED,
            f"{method} is not allowed to {identities[0]!r}",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not full.startswith(self._prefix):
            return handler  # health, reflection, or unknown (UNIMPLEMENTED)
        return _guarded(handler, full[len(self._prefix) :], self.check)


def _guarded(
    handler: Any, method: str, check: Callable[[str, grpc.aio.ServicerContext], str]
) -> grpc.RpcMethodHandler:
    """The handler with its behavior preceded by ``check`` (abort on refusal, else record the
    caller)."""
    # Here, not at the top: the CLI imports this module for its flags, and linkedblob.rpc
    # brings prometheus_client, which a client-only install (no [server] extra) lacks.
    from linkedblob.rpc import log_access

    kind = (
        "unary_unary"
        if handler.unary_unary
        else "unary_stream"
        if handler.unary_stream
        else "stream_unary"
        if handler.stream_unary
        else "stream_stream"
    )
    behavior = getattr(handler, kind)

    async def admit(context: Any) -> None:
        started = perf_counter()
        try:
            identity = check(method, context)
        except LinkedBlobError as exc:
            # Refused before the servicer: the access line names who was refused.
            set_caller(",".join(peer_identities(context)))
            log_access(method, exc.code, exc.reason, started, context)
            await context.abort_with_status(exc.to_status())
        set_caller(identity)

    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            async for item in behavior(request, context):
                yield item

        return handler._replace(**{kind: streaming})  # type: ignore[no-any-return]

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context)
        return await behavior(request, context)

    return handler._replace(**{kind: unary})  # type: ignore[no-any-return]


# --- flags ---------------------------------------------------------------------------------------


def add_peer_options(parser: argparse.ArgumentParser) -> None:
    """``--allow-gateway``, ``--allow-collector`` (blobsvc and linksvc)."""
    for role in ROLES:
        add_option(
            parser,
            f"--allow-{role}",
            default="",
            help=f"comma-separated certificate identities (DNS/URI SAN, else CN) of the {role}; "
            "needs --tls-client-ca",
        )


class PeerConfigError(ValueError):
    """Allow lists that cannot work as given; one line."""


def authorizer_from_args(
    args: argparse.Namespace, table: MethodTable, *, direct: bool = False
) -> PeerAuthorizer | None:
    """The authorizer the flags ask for (None without allow lists)."""
    allowed = {role: parse_names(getattr(args, f"allow_{role}", "") or "") for role in ROLES}
    if not any(allowed.values()):
        if direct:
            raise PeerConfigError("--direct-port needs --tls-client-ca and an --allow-* list")
        return None
    if not getattr(args, "tls_client_ca", ""):
        raise PeerConfigError(
            "--allow-gateway/--allow-collector need --tls-client-ca (and --tls-cert, --tls-key): "
            "peers are known by their certificates"
        )
    return PeerAuthorizer(table, allowed, direct=direct)
