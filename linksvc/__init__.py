"""linksvc: the metadata plane. Links, the index of committed blobs and upload sessions, in SQL."""
