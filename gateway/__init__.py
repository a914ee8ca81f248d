"""gateway: the public API (linkedblob.v1.Registry), composing blobsvc and linksvc over gRPC."""
