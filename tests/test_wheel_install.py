"""The package as a new user installs it: a wheel built from this tree, installed (not editable)
into a fresh virtualenv, runs `linkedblob migrate` and `linkedblob up` from a directory that is
not the checkout, and serves a real push and pull, then stops cleanly on Ctrl-C.

Offline and fast: the wheel is built with the dev venv's setuptools (no build isolation), and the
fresh venv reaches the already-installed dependencies through a .pth file naming the dev venv's
site-packages. A plain path line in a .pth does not run that directory's own .pth files (the
editable install's finder), so `linkedblob` there resolves to the wheel's copy, which the test
checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEV_PIP = Path(sys.executable).parent / "pip"
_UP = re.compile(r"^linkedblob is up: gateway (\S+) \(blobsvc (\S+),")
# What the checkout holds besides the package's sources: the dev venv, git, caches, earlier
# builds, local data. (Building from a copy also keeps setuptools' build/ and *.egg-info out of
# the shared checkout, and a stale build/lib from leaking removed modules into the wheel.)
_NOT_SOURCE_AT_ROOT = {".venv", ".git", "build", "dist", "data", "tests", "bench", "deploy"}
_NOT_SOURCE_ANYWHERE = shutil.ignore_patterns("*.egg-info", ".*_cache", "__pycache__", "*.pyc")


def _not_source(directory: str, names: list[str]) -> set[str]:
    ignored = set(_NOT_SOURCE_ANYWHERE(directory, names))
    if Path(directory) == ROOT:
        ignored |= _NOT_SOURCE_AT_ROOT & set(names)
    return ignored


pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@dataclass
class Installed:
    venv: Path
    cwd: Path  # a scratch directory to run it from, outside the checkout
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def linkedblob(self) -> str:
        return str(self.venv / "bin" / "linkedblob")

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _check(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    source, wheels, venv, cwd = base / "src", base / "wheels", base / "venv", base / "cwd"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_not_source)
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"  # never the network
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    runner = Installed(venv, cwd, env)

    pip_wheel = [str(DEV_PIP), "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _check(runner.run(*pip_wheel, "-w", str(wheels), str(source), timeout=120))
    (wheel,) = wheels.glob("linkedblob-*.whl")

    _check(runner.run(sys.executable, "-m", "venv", "--without-pip", str(venv)))
    # The dev venv's pip installs into the fresh venv (--python), before that venv can see the
    # dev venv's packages: nothing there to uninstall or to find already installed.
    install = [str(DEV_PIP), "--python", runner.python, "install", "-q", "--no-deps", str(wheel)]
    _check(runner.run(*install, timeout=120))
    site = _check(
        runner.run(runner.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    ).strip()
    dependencies = sysconfig.get_paths()["purelib"]  # the dev venv's: grpcio, SQLAlchemy, ...
    Path(site, "dev-venv-dependencies.pth").write_text(dependencies + "\n")
    return runner


def test_the_wheel_carries_what_runs(installed: Installed) -> None:
    """Everything comes from the fresh venv: the code, the migrations, the generated modules with
    their stubs, the .proto sources, py.typed."""
    code = (
        "import importlib.resources as r, linkedblob, linksvc, gateway, blobsvc\n"
        "from linksvc import migrate\n"
        "from linkedblob.v1 import registry_pb2\n"
        "print(linkedblob.__file__, linksvc.__file__, gateway.__file__, blobsvc.__file__,"
        " registry_pb2.__file__, migrate.MIGRATIONS, sep='\\n')\n"
        "lb = r.files('linkedblob')\n"
        "for p in ('py.typed', 'v1/registry_pb2.pyi', 'v1/registry_pb2_grpc.pyi',\n"
        "          'blob/v1/blob_pb2.pyi', 'link/v1/link_pb2_grpc.pyi',\n"
        "          'protos/linkedblob/v1/registry.proto',\n"
        "          'protos/linkedblob/blob/v1/blob.proto',\n"
        "          'protos/linkedblob/link/v1/link.proto'):\n"
        "    assert lb.joinpath(p).is_file(), p\n"
        "m = r.files('linksvc').joinpath('migrations')\n"
        "for p in ('env.py', 'script.py.mako', 'versions/0001_initial.py'):\n"
        "    assert m.joinpath(p).is_file(), p\n"
        "print(migrate.script_revisions() == migrate.REVISIONS)\n"
    )
    out = _check(installed.run(installed.python, "-c", code)).splitlines()
    venv = installed.venv.resolve()
    for path in out[:-1]:
        assert Path(path).resolve().is_relative_to(venv), out
    assert out[-1] == "True"


def test_migrate_from_the_wheel(installed: Installed) -> None:
    db = installed.cwd / "migrated" / "link.db"
    url = f"sqlite:///{db}"
    _check(installed.run(installed.linkedblob, "migrate", "--db", url))
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"repositories", "blobs", "links", "upload_sessions", "alembic_version"} <= tables
    _check(installed.run(installed.linkedblob, "migrate", "--db", url))  # at head: nothing to do


@contextlib.contextmanager
def _up(installed: Installed, data: Path, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    ports = ["--port", "0", "--blob-port", "0", "--link-port", "0"]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [installed.linkedblob, "up", "--data", str(data), *ports],
            cwd=installed.cwd,
            env=installed.env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        try:
            address = ""
            deadline = time.monotonic() + 60
            while not address:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "not up in 60 s:\n" + log.read_text()
                with contextlib.suppress(queue.Empty):
                    m = _UP.match(lines.get(timeout=0.2))
                    address = m.group(1) if m else ""
            yield proc, address
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_up_from_the_wheel_serves_and_stops_on_ctrl_c(installed: Installed) -> None:
    data = installed.cwd / "up-data"
    log = installed.cwd / "up.log"
    with _up(installed, data, log) as (proc, address):
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 4  # blobsvc, linksvc, gateway and the collector
        venv = installed.venv.resolve()
        for child in children:  # each service runs the fresh venv's interpreter
            assert Path(child.cmdline()[0]).parent.resolve() == venv / "bin"

        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        payload = os.urandom(3 * 1024 * 1024 + 7)
        src, copy = installed.cwd / "in.bin", installed.cwd / "out.bin"
        src.write_bytes(payload)
        linkedblob = installed.linkedblob
        digest = _check(installed.run(linkedblob, "push", "wheel/app", str(src), "--addr", address))
        assert digest.strip() == f"sha256:{hashlib.sha256(payload).hexdigest()}"
        pull = [linkedblob, "pull", "wheel/app", digest.strip(), "-o", str(copy), "--addr", address]
        _check(installed.run(*pull))
        assert copy.read_bytes() == payload

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in its terminal
        assert proc.wait(timeout=60) == 0, log.read_text()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.wait(timeout=10)
            assert not child.is_running()
    assert (data / "linkedblob.db").is_file()
