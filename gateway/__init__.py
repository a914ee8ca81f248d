"""gateway: the public API (linkedblob.v1.Registry), composing blobsvc and linksvc.

Layers, outside in: gateway.servicer (validates requests, maps values to messages) over the
domain, gateway.registry (blobs through links) and gateway.uploads (resumable uploads), which
commit bytes in the order gateway.leases keeps (lease, commit, link with the lease) and speak
gateway.model's values to the interfaces of gateway.backends. Their implementations:
gateway.grpc_blob and gateway.grpc_link (the services over gRPC), gateway.linkcache.CachedLinks
(resolved links kept in memory) and gateway.fakes (in memory, for tests).
"""
