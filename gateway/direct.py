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

    def __init__(
        self,
        signer: grants.Signer | str | None,
        public_addr: str,
        ttl: float,
        read_ttl: float | None = None,
    ) -> None:
        """``ttl``: of write grants; ``read_ttl``: of read grants (default ``ttl``), short, since
        a read grant keeps reading a blob whose link was deleted until it expires."""
        if isinstance(signer, str):
            signer = grants.Signer(signer) if signer else None
        self._signer = signer
        self.public_addr = public_addr
        self.ttl = ttl
        self.read_ttl = ttl if read_ttl is None else read_ttl
        self._internal = grants.InternalGrant(signer)

    @property
    def offered(self) -> bool:
        return self._signer is not None

    def internal_metadata(self) -> Metadata | None:
        """Call metadata for the gateway's own blobsvc calls (None without a secret)."""
        return self._internal.metadata()

    def read(self, digest: str) -> registry_pb2.DirectAccess:
        return self._issue(grants.READ, digest, self.read_ttl)

    def write(self, upload_id: str) -> registry_pb2.DirectAccess:
        """A grant to append to the upload's staging area, which the caller has created
        (gateway.uploads.Uploads.prepare_direct): blobsvc creates none for a write grant."""
        return self._issue(grants.WRITE, upload_id, self.ttl)

    def require(self) -> grants.Signer:
        """The signer; FAILED_PRECONDITION / UNSUPPORTED when direct access is not offered."""
        if self._signer is None:
            raise failed_precondition(
                Reason.UNSUPPORTED,
                "this gateway does not offer direct access to blobsvc (no --grant-secret); "
                "use ReadBlob / WriteUpload",
            )
        return self._signer

    def _issue(self, action: str, subject: str, ttl: float) -> registry_pb2.DirectAccess:
        signer = self.require()
        token = signer.sign(action, subject, ttl)
        expires = signer.verify(token).expires  # exactly what blobsvc will check
        return registry_pb2.DirectAccess(
            address=self.public_addr,
            grant=token,
            expires_at=timestamp_pb2.Timestamp(seconds=expires),
        )
