"""Grants the gateway hands out (direct access to blobsvc) and the one it uses itself.

With a grant secret (shared with blobsvc), the gateway, having checked access through the link
or the upload session, gives the client blobsvc's public address and a short-lived grant to
read one digest or write one upload there, so the bytes cross one hop (linkedblob.grants). It
also signs itself an ``internal`` grant for its own blobsvc calls, since such a blobsvc
requires one on every call. Without a secret there is no direct access, and no grant is sent.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from linkedblob import grants
from linkedblob.errors import Reason, failed_precondition
from linkedblob.v1 import registry_pb2

Metadata = tuple[tuple[str, str], ...]


class GrantIssuer:
    """Signs the grants: the clients' (for one digest or one upload) and the gateway's own."""

    def __init__(self, secret: str, public_addr: str, ttl: float) -> None:
        self._signer = grants.Signer(secret) if secret else None
        self.public_addr = public_addr
        self.ttl = ttl
        self._internal = grants.InternalGrant(secret)

    @property
    def offered(self) -> bool:
        return self._signer is not None

    def internal_metadata(self) -> Metadata | None:
        """Call metadata for the gateway's own blobsvc calls (None without a secret)."""
        return self._internal.metadata()

    def read(self, digest: str) -> registry_pb2.DirectAccess:
        return self._issue(grants.READ, digest)

    def write(self, upload_id: str) -> registry_pb2.DirectAccess:
        return self._issue(grants.WRITE, upload_id)

    def require(self) -> grants.Signer:
        """The signer; FAILED_PRECONDITION / UNSUPPORTED when direct access is not offered."""
        if self._signer is None:
            raise failed_precondition(
                Reason.UNSUPPORTED,
                "this gateway does not offer direct access to blobsvc (no --grant-secret); "
                "use ReadBlob / WriteUpload",
            )
        return self._signer

    def _issue(self, action: str, subject: str) -> registry_pb2.DirectAccess:
        signer = self.require()
        token = signer.sign(action, subject, self.ttl)
        expires = signer.verify(token).expires  # exactly what blobsvc will check
        return registry_pb2.DirectAccess(
            address=self.public_addr,
            grant=token,
            expires_at=timestamp_pb2.Timestamp(seconds=expires),
        )
