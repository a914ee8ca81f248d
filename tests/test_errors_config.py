"""Unit tests: the error helper's status encoding, and configuration from the environment."""

from __future__ import annotations

import argparse

import grpc
from google.rpc import error_details_pb2, status_pb2

from linkedblob.config import add_option, env_name
from linkedblob.errors import DOMAIN, Reason, out_of_range


def test_error_status_carries_error_info() -> None:
    err = out_of_range(Reason.BLOB_UPLOAD_INVALID, "wrong offset", size=42)
    status = err.to_status()
    assert status.code == grpc.StatusCode.OUT_OF_RANGE
    assert status.details == "wrong offset"
    ((key, raw),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    decoded = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    assert decoded.details[0].Unpack(info)
    assert info.reason == "BLOB_UPLOAD_INVALID"
    assert info.domain == DOMAIN
    assert dict(info.metadata) == {"size": "42"}


def test_flag_defaults_come_from_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert env_name("--blob-addr") == "LINKEDBLOB_BLOB_ADDR"
    monkeypatch.setenv("LINKEDBLOB_BLOB_ADDR", "10.0.0.1:1")
    monkeypatch.setenv("LINKEDBLOB_PORT", "7")
    monkeypatch.setenv("LINKEDBLOB_ENABLE_DELETE", "true")
    parser = argparse.ArgumentParser()
    add_option(parser, "--blob-addr", default="x")
    add_option(parser, "--port", type=int, default=1)
    add_option(parser, "--enable-delete", action="store_true")
    args = parser.parse_args([])
    assert (args.blob_addr, args.port, args.enable_delete) == ("10.0.0.1:1", 7, True)
    # A flag on the command line wins over the environment.
    assert parser.parse_args(["--port", "9"]).port == 9
