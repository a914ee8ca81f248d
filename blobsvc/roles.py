"""Who may call each BlobService method when blobsvc checks its peers' certificates
(linkedblob.peers): the gateway stages, commits and reads bytes; only the collector deletes
them and lists what is stored. Clients holding a read or write grant call the direct methods on
the direct port, without a certificate."""

from __future__ import annotations

from linkedblob.peers import COLLECTOR, GATEWAY, MethodTable

SERVICE = "linkedblob.blob.v1.BlobService"

_BOTH = frozenset({GATEWAY, COLLECTOR})
_GATEWAY = frozenset({GATEWAY})
_COLLECTOR = frozenset({COLLECTOR})

TABLE = MethodTable(
    SERVICE,
    {
        # gateway/grpc_blob.py
        "Stat": _BOTH,
        "FindMissing": _GATEWAY,
        "Read": _GATEWAY,
        "Write": _GATEWAY,
        "Commit": _GATEWAY,
        "Put": _GATEWAY,
        "UploadStatus": _BOTH,
        "Abort": _BOTH,
        # collector/grpc_backends.py, collector/fsck.py
        "Delete": _COLLECTOR,
        "List": _COLLECTOR,
        "ListUploads": _COLLECTOR,
    },
    # linkedblob/client/direct.py, with a grant
    direct=frozenset({"Read", "Write", "UploadStatus"}),
)
