"""The storage contract (blobsvc.storage.contract), one line per driver and per stack of
wrappers. What only the filesystem driver promises is in tests/test_blobsvc_filesystem.py."""

from __future__ import annotations

import os
from typing import Any

import pytest

# The suite's plain asserts explain their failures as a test module's do.
pytest.register_assert_rewrite("blobsvc.storage.contract")

from blobsvc.storage import with_wrappers  # noqa: E402
from blobsvc.storage.contract import storage_contract  # noqa: E402
from blobsvc.storage.filesystem import FilesystemStorage  # noqa: E402
from blobsvc.storage.memory import MemoryStorage  # noqa: E402


def _no_temporary_file_left(root: str) -> None:
    assert os.listdir(os.path.join(root, "tmp")) == []


def _filesystem(**options: Any) -> type:
    return storage_contract(
        lambda root: FilesystemStorage(root, **options), after_close=_no_temporary_file_left
    )


TestFilesystem = _filesystem()
# Staged bytes and reads through the page cache (--direct-io off).
TestFilesystemBuffered = _filesystem(direct_io=False)
# Put through named temporary files, as where O_TMPFILE is missing.
TestFilesystemNamedTemporaryFiles = _filesystem(anonymous_files=False)
TestMemory = storage_contract(lambda root: MemoryStorage())
TestWrappersOnMemory = storage_contract(lambda root: with_wrappers(MemoryStorage(), "memory"))
TestWrappersOnFilesystem = storage_contract(
    lambda root: with_wrappers(FilesystemStorage(root), "filesystem"),
    after_close=_no_temporary_file_left,
)
