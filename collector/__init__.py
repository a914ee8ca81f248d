"""The collector (issue 10): online garbage collection, upload purge and fsck.

A runner that talks to linksvc and blobsvc over gRPC only. The domain (:mod:`.runner`,
:mod:`.purge`, :mod:`.fsck`) speaks plain values (:mod:`.model`) to two small interfaces,
:class:`~collector.model.LinkIndex` (linksvc) and :class:`~collector.model.BlobStorage`
(blobsvc); :mod:`.grpc_backends` implements them over the services' stubs and :mod:`.fakes` in
memory for the unit tests. The command line is :mod:`.commands` (``linkedblob gc``, ``linkedblob
fsck``) and :mod:`.server` (``linkedblob serve gc``). The design: docs/design.md#lifecycle.

Named ``collector``, not ``gc``: a top-level package ``gc`` would shadow Python's gc module.
"""
