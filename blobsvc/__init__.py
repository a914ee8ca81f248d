"""blobsvc: the data plane. Streams content-addressed bytes in and out of pluggable storage."""
