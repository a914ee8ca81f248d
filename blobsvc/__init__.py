"""blobsvc: the data plane. Streams content-addressed bytes in and out of pluggable storage.

- ``servicer``: the gRPC surface (validation at the edge; Write/Read data messages raw)
- ``store``: the domain (BlobStore): reads, resumable uploads hashed as they arrive, verified
  commits; ``hashing``: the uploads' running hashes; ``jobs``: how it awaits its worker threads
- ``storage``: the driver interface (Storage), the drivers ``storage.filesystem`` and
  ``storage.memory``, the wrappers every driver gets (``storage.empty_blob``,
  ``storage.metrics``) and the contract suite drivers pass (``storage.contract``)
- ``server``: ``linkedblob serve blob``

How it fits with the other services: docs/design.md.
"""
