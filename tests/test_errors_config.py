"""Unit tests: the error helper's status encoding, and configuration from the environment."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

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


def _cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LINKEDBLOB_")}
    return subprocess.run(
        [sys.executable, "-m", "linkedblob.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def test_a_server_variable_breaks_only_the_command_that_reads_it(tmp_path: Path) -> None:
    """LINKEDBLOB_GRACE=half is a bad value for the servers' --grace (a duration): the servers
    refuse it in one line naming flag and variable; a client command is not affected."""
    done = _cli("ls", "--addr", "127.0.0.1:1", env={"LINKEDBLOB_GRACE": "half"})
    assert "Traceback" not in done.stderr and "GRACE" not in done.stderr
    assert "UNAVAILABLE" in done.stderr  # it ran (and found no gateway)
    done = _cli(
        "serve",
        "link",
        "--open",
        "--db",
        f"sqlite:///{tmp_path}/l.db",
        env={"LINKEDBLOB_GRACE": "half"},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--grace: 'half' is not valid" in done.stderr and "LINKEDBLOB_GRACE" in done.stderr


def test_every_time_flag_takes_a_duration_with_units() -> None:
    """A time is written with its unit everywhere (30s, 2m, 1h), never seconds-only."""
    from linkedblob.cli import build_parser

    parser = build_parser()
    times = ["--grace", "2m", "--lease-ttl", "90s", "--link-cache-ttl", "1s"]
    times += ["--grant-ttl", "5m", "--auth-token-leeway", "30s"]
    args = parser.parse_args(["serve", "gateway", *times])
    assert (args.grace, args.lease_ttl, args.link_cache_ttl) == (120.0, 90.0, 1.0)
    assert (args.grant_ttl, args.auth_token_leeway) == (300.0, 30.0)
    args = parser.parse_args(["serve", "link", "--db-busy-timeout", "2s"])
    assert args.db_busy_timeout == 2.0


def test_a_boolean_variable_takes_only_boolean_words(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for word, value in (("1", True), ("On", True), ("no", False), ("0", False), ("", False)):
        monkeypatch.setenv("LINKEDBLOB_ENABLE_DELETE", word)
        parser = argparse.ArgumentParser()
        add_option(parser, "--enable-delete", action="store_true")
        args = parser.parse_args([])
        assert args.enable_delete is value and not getattr(args, "env_errors", None), word
    done = _cli("serve", "gateway", "--open", env={"LINKEDBLOB_ENABLE_DELETE": "maybe"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "LINKEDBLOB_ENABLE_DELETE='maybe': not a boolean" in done.stderr
    # Another command does not read it, and is not broken by it.
    done = _cli("ls", "--addr", "127.0.0.1:1", env={"LINKEDBLOB_ENABLE_DELETE": "maybe"})
    assert "not a boolean" not in done.stderr and "UNAVAILABLE" in done.stderr


def test_version() -> None:
    import importlib.metadata

    done = _cli("--version", env={})
    assert done.returncode == 0
    assert done.stdout.strip() == f"linkedblob {importlib.metadata.version('linkedblob')}"
