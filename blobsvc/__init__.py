"""blobsvc: the data plane. Streams content-addressed bytes in and out of pluggable storage.

- ``servicer``: the gRPC surface (validation at the edge; Write/Read data messages raw)
- ``store``: the domain: reads, resumable uploads hashed as they arrive, verified commits
- ``storage``: the driver interface, with ``storage.filesystem`` and ``storage.memory``
- ``server``: ``linkedblob serve blob``
"""
