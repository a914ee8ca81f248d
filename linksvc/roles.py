"""Who may call each LinkService method when linksvc checks its peers' certificates
(linkedblob.peers): only the gateway writes links and upload sessions; the collector runs the
lifecycle (lock, mark, fence, forget, adopt, purge) and reads what it needs."""

from __future__ import annotations

from linkedblob.peers import COLLECTOR, GATEWAY, MethodTable

SERVICE = "linkedblob.link.v1.LinkService"

_BOTH = frozenset({GATEWAY, COLLECTOR})
_GATEWAY = frozenset({GATEWAY})
_COLLECTOR = frozenset({COLLECTOR})

TABLE = MethodTable(
    SERVICE,
    {
        # gateway/grpc_link.py
        "RecordBlob": _GATEWAY,
        "StatBlob": _BOTH,
        "Link": _GATEWAY,
        "Lease": _GATEWAY,
        "ReleaseLease": _GATEWAY,
        "Resolve": _GATEWAY,
        "Unlink": _GATEWAY,
        "Mount": _GATEWAY,
        "ListLinks": _BOTH,
        "ListRepositories": _BOTH,
        "ListLinkingRepositories": _GATEWAY,
        "CreateSession": _GATEWAY,
        "GetSession": _BOTH,
        "AdvanceSession": _GATEWAY,
        # the gateway's ListUploads
        "ListSessions": _GATEWAY,
        # the collector finishes the sessions it purges as expired
        "FinishSession": _BOTH,
        # collector/grpc_backends.py, collector/fsck.py
        "ListStaleSessions": _COLLECTOR,
        "PurgeSession": _COLLECTOR,
        "MarkUnreferenced": _COLLECTOR,
        "ListCollectable": _COLLECTOR,
        "FenceBlob": _COLLECTOR,
        "ForgetBlob": _COLLECTOR,
        "AdoptBlob": _COLLECTOR,
        "ListBlobs": _COLLECTOR,
        "AcquireRunnerLock": _COLLECTOR,
        "ReleaseRunnerLock": _COLLECTOR,
    },
)
