"""Helpers and fixtures of test_linksvc_service_*: `linkedblob serve link --db URL`, its stub."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from linkedblob.errors import Reason, error_info
from linkedblob.link.v1 import link_pb2 as pb
from linkedblob.link.v1 import link_pb2_grpc
from tests.services import ServiceProcess, running

BIN = Path(sys.executable).parent
SERVICE = "linkedblob.link.v1.LinkService"
TABLES = ("repositories", "blobs", "links", "upload_sessions", "blob_leases", "runner_locks")
Code = grpc.StatusCode


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def lease(stub: link_pb2_grpc.LinkServiceStub, digest: str) -> str:
    """A lease on ``digest``, as the gateway takes one before it commits bytes."""
    lease_id: str = stub.Lease(pb.LeaseRequest(digest=digest)).lease_id
    assert lease_id
    return lease_id


@pytest.fixture
def linksvc(db_url: str) -> Iterator[ServiceProcess]:
    with running("link", "--db", db_url, "--migrate") as svc:
        yield svc


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'link.db'}"


@pytest.fixture
def stub(linksvc: ServiceProcess) -> Iterator[link_pb2_grpc.LinkServiceStub]:
    with linksvc.channel() as channel:
        yield link_pb2_grpc.LinkServiceStub(channel)


def snapshot(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read straight from the database."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return {
                table: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table}"))]
                for table in TABLES
            }
    finally:
        engine.dispose()


def refused(call: Callable[[], object], code: grpc.StatusCode, reason: Reason) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    info = error_info(err)
    assert info is not None, err
    assert (err.code(), info.reason) == (code, reason), err  # type: ignore[attr-defined]
    return err
