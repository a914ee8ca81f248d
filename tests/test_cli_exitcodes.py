"""The CLI's exit statuses (linkedblob.exitcodes) and --json output, as subprocesses against one
real stack (gateway, blobsvc, linksvc on SQLite) and a second gateway with a policy, a session
rate limit and deletes disabled: each status class from a real failure, one line on stderr,
never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from linkedblob import exitcodes
from tests.services import ServiceProcess
from tests.stack import GRANT_SECRET_ENV, Stack, running_stack

POLICY = """
[[rule]]
anonymous = true
repositories = ["public/*"]
actions = ["pull"]

[[rule]]
anonymous = true
repositories = ["open/**"]
actions = ["pull", "push"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("cli-exit")) as s:
        yield s


@pytest.fixture(scope="module")
def strict(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> ServiceProcess:
    """A gateway on the same backends: a policy (anonymous pulls public/*, pushes open/**), one
    upload session per caller per ~hour, deletes disabled."""
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    policy.write_text(POLICY)
    args = ("--auth-policy", str(policy), "--session-rate", "0.0003", "--session-burst", "1")
    return stack.another_gateway(enable_delete=False, args=args)


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linkedblob.cli", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
    )


def failed(expected: int, *args: str, contains: str = "") -> str:
    """Runs the command, checks its status and its one line on stderr; returns that line."""
    out = cli(*args)
    assert out.returncode == expected, (args, out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and out.stdout == "", (args, out)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"linkedblob {args[0]}: "), (args, lines)
    assert contains in lines[0], (args, lines)
    return lines[0]


def push(addr: str, repo: str, data: bytes, tmp_path: Path, *more: str) -> str:
    src = tmp_path / f"{secrets.token_hex(4)}.bin"
    src.write_bytes(data)
    done = cli("push", repo, str(src), "--addr", addr, *more)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_table_has_one_status_per_class() -> None:
    classes = {
        exitcodes.OK,
        exitcodes.FAILURE,
        exitcodes.USAGE,
        exitcodes.NOT_FOUND,
        exitcodes.INVALID,
        exitcodes.CONFLICT,
        exitcodes.DENIED,
        exitcodes.EXHAUSTED,
        exitcodes.RETRY,
        exitcodes.DATA_LOSS,
    }
    assert len(classes) == 10 and max(classes) < 64  # below sysexits and the shell's 126+
    assert set(exitcodes.BY_STATUS.values()) <= classes


def test_status_per_grpc_code_class(stack: Stack, strict: ServiceProcess, tmp_path: Path) -> None:
    addr = ("--addr", stack.address)
    repo = f"exit/{secrets.token_hex(4)}"
    missing = "sha256:" + "0" * 64
    failed(exitcodes.NOT_FOUND, "stat", repo, missing, *addr, contains="NOT_FOUND BLOB_UNKNOWN")
    failed(exitcodes.INVALID, "stat", repo, "sha256:nope", *addr, contains="DIGEST_INVALID")

    data = os.urandom(1000)
    digest = push(stack.address, repo, data, tmp_path)
    on_strict = ("--addr", strict.address)
    failed(exitcodes.CONFLICT, "rm", repo, digest, *on_strict, contains="FAILED_PRECONDITION")
    failed(exitcodes.DENIED, "stat", repo, digest, *on_strict, contains="UNAUTHENTICATED")

    # One session per caller, then RESOURCE_EXHAUSTED until the bucket refills.
    open_repo = f"open/{secrets.token_hex(4)}"
    src = tmp_path / "small.bin"
    src.write_bytes(data)
    push(strict.address, open_repo, data, tmp_path, "--resumable")
    failed(
        exitcodes.EXHAUSTED,
        "push",
        open_repo,
        str(src),
        "--resumable",
        *on_strict,
        contains="RESOURCE_EXHAUSTED",
    )

    # Unreachable: worth retrying; the hint about TLS is an indented second line.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    out = cli("ls", "--addr", dead)
    assert out.returncode == exitcodes.RETRY, out.stderr
    assert out.stderr.startswith("linkedblob ls: UNAVAILABLE") and "Traceback" not in out.stderr


def test_bytes_that_do_not_match_their_digest_are_data_loss(stack: Stack, tmp_path: Path) -> None:
    repo = f"exit/{secrets.token_hex(4)}"
    data = os.urandom(100_000)
    digest = push(stack.address, repo, data, tmp_path)
    algorithm, hex_digest = digest.split(":")
    stored = stack.data / "blobs" / "blobs" / algorithm / hex_digest[:2] / hex_digest
    assert stored.read_bytes() == data
    os.chmod(stored, 0o644)
    stored.write_bytes(bytes(b ^ 0xFF for b in data[:10]) + data[10:])
    out = tmp_path / "out.bin"
    line = failed(
        exitcodes.DATA_LOSS, "pull", repo, digest, "-o", str(out), "--addr", stack.address
    )
    assert "DATA_LOSS" in line


def test_usage_errors(stack: Stack, tmp_path: Path) -> None:
    addr = ("--addr", stack.address)
    missing = tmp_path / "missing.bin"
    line = failed(exitcodes.USAGE, "push", "exit/x", str(missing), *addr)
    assert line.endswith(f"No such file or directory: {missing}")
    failed(exitcodes.USAGE, "push", "exit/x", "-", "--resumable", *addr, contains="stdin")
    failed(exitcodes.USAGE, "ls", "--ca", str(missing), *addr, contains=str(missing))
    bad = cli("ls", "--nope")
    assert bad.returncode == exitcodes.USAGE and "unrecognized arguments: --nope" in bad.stderr


def test_ctrl_c_exits_130_quietly(stack: Stack) -> None:
    # A push from stdin that never ends: it waits for more until interrupted.
    argv = [sys.executable, "-m", "linkedblob.cli", "push", "exit/ctrl-c", "-"]
    proc = subprocess.Popen(
        [*argv, "--addr", stack.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"some bytes, and more to come")
    proc.stdin.flush()
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == exitcodes.INTERRUPTED, err
    assert out == b"" and err == b""


def test_a_busy_port_is_one_line_and_status_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "linkedblob.cli",
                "serve",
                "link",
                "--open",
                "--port",
                str(port),
                "--db",
                f"sqlite:///{tmp_path / 'link.db'}",
                "--migrate",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == exitcodes.USAGE, done.stderr
    assert "Traceback" not in done.stderr and "listening" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"linkedblob link: cannot listen on 127.0.0.1:{port}: ")
    assert "--host/--port" in last

    # The metrics port too.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run(
            [
                *(sys.executable, "-m", "linkedblob.cli", "serve", "blob", "--open"),
                *("--port", "0", "--metrics-port", str(port), "--data", str(tmp_path / "blobs")),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == exitcodes.USAGE, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"linkedblob blob: cannot listen on 127.0.0.1:{port}: ")
    assert last.endswith("(--metrics-port)")


def test_json_output(stack: Stack, tmp_path: Path) -> None:
    addr = ("--addr", stack.address)
    repo = f"json/{secrets.token_hex(4)}"
    data = os.urandom(3000)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    src = tmp_path / "in.bin"
    src.write_bytes(data)

    def objects(*args: str) -> list[dict[str, object]]:
        done = cli(*args, "--json")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    described = {"repository": repo, "digest": digest, "size": 3000, "media_type": "text/x"}
    assert objects("push", repo, str(src), "--media-type", "text/x", *addr) == [described]
    assert objects("stat", repo, digest, *addr) == [described]
    assert objects("ls", repo, *addr) == [described]
    assert {"repository": repo} in objects("ls", *addr)

    backends = ("--link-addr", stack.link.address, "--blob-addr", stack.blob.address)
    env = {**os.environ, GRANT_SECRET_ENV: stack.grant_secret}
    for command in (("gc", "--dry-run"), ("fsck",)):
        done = subprocess.run(
            [sys.executable, "-m", "linkedblob.cli", *command, "--json", *backends],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        # fsck may find what the other tests left (the interrupted push's staging area): 1.
        assert done.returncode in (0, 1) and done.stderr == "", done.stderr
        (line,) = done.stdout.splitlines()  # one object, on one line
        report = json.loads(line)
        assert all(key == key.lower() and " " not in key for key in report), report
        assert ("outcome" in report) if command[0] == "gc" else ("findings" in report), report


def test_migrate_errors_are_one_line(tmp_path: Path) -> None:
    failed(exitcodes.USAGE, "migrate", "--db", "not a url", contains="--db")
    failed(exitcodes.USAGE, "migrate", "--db", "nope://x", contains="--db nope://x")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"postgresql+psycopg://u:secret@127.0.0.1:{s.getsockname()[1]}/x"
    line = failed(exitcodes.FAILURE, "migrate", "--db", url, contains="cannot open")
    assert "secret" not in line
