"""A synchronous Python client of the linkedblob gateway (linkedblob.v1.Registry).

    from linkedblob.client import Client, ClientError

    with Client() as lb:  # LINKEDBLOB_ADDR, or 127.0.0.1:50051
        desc = lb.push("team/app", "layer.tar.gz", media_type="application/gzip")
        lb.pull("team/app", desc.digest, "copy.tar.gz")  # verified against the digest
        try:
            lb.stat("other/repo", desc.digest)
        except ClientError as e:
            assert e.reason == "BLOB_UNKNOWN"  # not linked there

Every failed call raises :class:`ClientError` (a :class:`linkedblob.errors.StatusError`), which
carries the gRPC status code and the ErrorInfo ``reason`` of the gateway's error model (README
"Errors"); the original grpc.RpcError is its ``__cause__``. A pull whose bytes do not hash to
the digest raises :class:`DigestMismatchError` (a ClientError).

Pushes stream from a path, bytes, a binary file or an iterable of bytes in ~1 MiB messages,
hashing as they send. ``resumable=True`` uses the upload API and survives a broken connection:
on UNAVAILABLE it backs off, asks the gateway for the upload's offset and continues from there.

Direct access: when the gateway offers it (it shares a grant secret with blobsvc, as
``linkedblob up`` sets it up), bytes go straight between the client and blobsvc, one hop instead
of two. A pull asks the gateway where the blob is (LocateBlob: the access check through the link,
blobsvc's address and a short-lived grant) and reads it from blobsvc, verifying the digest as
always; a push of more than one message starts an upload with direct access, writes it to
blobsvc and commits it through the gateway. When the gateway does not offer it, or blobsvc
cannot be reached from here, the same calls go through the gateway. ``Client(direct=False)``
never tries.

The package, by role: :mod:`.api` (the Client facade), :mod:`.channels` (the gateway's channel
and calls), :mod:`.direct` (grants and blobsvc channels), :mod:`.uploads`, :mod:`.push`,
:mod:`.pull` (and verification), :mod:`.sources` (sources and message framing), :mod:`.retry`,
:mod:`.errors` and :mod:`.model` (what the calls take and return).
"""

from linkedblob.client.api import ADDR_ENV, DEFAULT_ADDR, MALLOC_TUNING_ENV, Client
from linkedblob.client.channels import Security
from linkedblob.client.errors import ClientError, DigestMismatchError
from linkedblob.client.model import (
    Chunks,
    Descriptor,
    Destination,
    DirectGrant,
    Progress,
    Source,
    Upload,
)
from linkedblob.transport import channel_options as channel_options

# Deprecated aliases of names this package had before it was split; they go in a later release.
# DirectAccess is now DirectGrant; channel_options lives in linkedblob.transport.
DirectAccess = DirectGrant

__all__ = [
    "ADDR_ENV",
    "DEFAULT_ADDR",
    "MALLOC_TUNING_ENV",
    "Chunks",
    "Client",
    "ClientError",
    "Descriptor",
    "Destination",
    "DigestMismatchError",
    "DirectGrant",
    "Progress",
    "Security",
    "Source",
    "Upload",
]
