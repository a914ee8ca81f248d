"""The filesystem driver (``--storage filesystem``, the default), one module per role:

- ``storage``: FilesystemStorage, the driver: its layout under the root, blobs, listing;
- ``durable``: how a blob appears under its name only complete and fsynced;
- ``uploads``: staged uploads: exclusivity across processes (flock) and appends;
- ``direct_io``: O_DIRECT for staged bytes and uncached reads, and its aligned buffer pool;
- ``anonymous_files``: the O_TMPFILE files made ahead for Put;
- ``read_admission``: which blobs are read again, and so read into the page cache.
"""

from blobsvc.storage.filesystem.storage import FileBlobReader, FilesystemStorage
from blobsvc.storage.filesystem.uploads import FileStagedUpload

__all__ = ["FileBlobReader", "FileStagedUpload", "FilesystemStorage"]
