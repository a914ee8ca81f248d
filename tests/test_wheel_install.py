"""The package as a new user installs it: a wheel built from this tree, installed (not editable)
into a fresh virtualenv. Without extras (`pip install linkedblob`) it has the client library, the
generated stubs and the CLI's client commands, and none of the services' dependencies; the
service commands say to install `linkedblob[server]`. With the server extra it runs
`linkedblob migrate` and `linkedblob up` from a directory that is not the checkout, and serves a
real push and pull (made by the client-only install), then stops cleanly on Ctrl-C.

Offline and fast: the wheel is built with the dev venv's setuptools (no build isolation), and the
fresh venv reaches the already-installed dependencies of the dev venv through links to exactly
the distributions the wheel requires: those of its base requirements (and theirs) in a directory
named by a .pth file, those the server extra adds in a second one that only the server commands
get on PYTHONPATH. A forgotten requirement in either set fails here. (A plain path line in a .pth
does not run that directory's own .pth files, so `linkedblob` resolves to the wheel's copy,
which the test checks.)
"""

from __future__ import annotations

import contextlib
import email
import hashlib
import importlib.metadata
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
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from linkedblob import exitcodes

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
    env: dict[str, str]  # `pip install linkedblob`: the base requirements only
    server_env: dict[str, str] | None = None  # `pip install 'linkedblob[server]'`

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def linkedblob(self) -> str:
        return str(self.venv / "bin" / "linkedblob")

    def run(
        self, *argv: str, timeout: float = 60, server: bool = False
    ) -> subprocess.CompletedProcess[str]:
        env = self.server_env if server else self.env
        assert env is not None
        return subprocess.run(
            list(argv),
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _requirements(wheel: Path, extra: str) -> list[Requirement]:
    """The wheel's Requires-Dist that apply with ``extra`` ("" : the base ones only)."""
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(z.read(name))
    chosen = []
    for text in metadata.get_all("Requires-Dist") or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            req.marker = None
            chosen.append(req)
    return chosen


def _closure(requirements: Iterable[Requirement]) -> set[str]:
    """The dev venv's distributions (canonical names) these requirements install, recursively."""
    found: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = req.extras
        if name == "linkedblob" or (name in found and not extras):
            continue
        found.add(name)
        for text in importlib.metadata.distribution(name).requires or ():
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *extras}):
                dep.marker = None
                todo.append(dep)
    return found


def _link_distributions(names: Iterable[str], into: Path) -> None:
    """Links the dev venv's files of these distributions (top-level packages, modules and
    dist-info) into ``into``."""
    into.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for name in names:
        files = importlib.metadata.distribution(name).files or ()
        for top in {f.parts[0] for f in files if f.parts[0] != ".."}:
            if not (into / top).exists():
                (into / top).symlink_to(site / top)


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
    client = _closure(_requirements(wheel, ""))
    server = _closure(_requirements(wheel, "server")) - client
    assert {"grpcio", "protobuf"} <= client and {"sqlalchemy", "uvloop"} <= server
    client_dir, server_dir = base / "client-deps", base / "server-deps"
    _link_distributions(client, client_dir)
    _link_distributions(server, server_dir)
    Path(site, "client-dependencies.pth").write_text(f"{client_dir}\n")
    runner.server_env = {**env, "PYTHONPATH": str(server_dir)}
    return runner


# What only the services need: none of it comes with `pip install linkedblob`.
SERVER_ONLY = ("sqlalchemy", "alembic", "psycopg", "uvloop", "jwt", "prometheus_client")


def test_without_extras_the_client_and_its_cli_work_alone(installed: Installed) -> None:
    code = (
        "import importlib.util as u, importlib.resources as r, linkedblob\n"
        "from linkedblob.client import Client\n"
        "from linkedblob.v1 import registry_pb2, registry_pb2_grpc\n"
        "Client('127.0.0.1:1').close()\n"
        "lb = r.files('linkedblob')\n"
        "assert lb.joinpath('py.typed').is_file()\n"
        "assert lb.joinpath('protos/linkedblob/v1/registry.proto').is_file()\n"
        f"print(linkedblob.__file__, [m for m in {SERVER_ONLY!r} if u.find_spec(m)])\n"
    )
    out = _check(installed.run(installed.python, "-c", code)).split()
    assert Path(out[0]).resolve().is_relative_to(installed.venv.resolve())
    assert out[1:] == ["[]"]  # no server dependency is importable

    assert "push" in _check(installed.run(installed.linkedblob, "--help"))
    assert _check(installed.run(installed.linkedblob, "--version")).startswith("linkedblob 0.")
    _check(installed.run(installed.linkedblob, "push", "--help"))
    # What it requires is there (the extras are not required).
    _check(installed.run(str(DEV_PIP), "--python", installed.python, "check"))

    for argv in (("serve", "link", "--open"), ("up",), ("migrate",), ("gc",), ("fsck",)):
        done = installed.run(installed.linkedblob, *argv)
        assert done.returncode == exitcodes.USAGE, (argv, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and "pip install 'linkedblob[server]'" in lines[0], (argv, lines)


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
    out = _check(installed.run(installed.python, "-c", code, server=True)).splitlines()
    venv = installed.venv.resolve()
    for path in out[:-1]:
        assert Path(path).resolve().is_relative_to(venv), out
    assert out[-1] == "True"


def test_migrate_from_the_wheel(installed: Installed) -> None:
    db = installed.cwd / "migrated" / "link.db"
    url = f"sqlite:///{db}"
    _check(installed.run(installed.linkedblob, "migrate", "--db", url, server=True))
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"repositories", "blobs", "links", "upload_sessions", "alembic_version"} <= tables
    _check(
        installed.run(installed.linkedblob, "migrate", "--db", url, server=True)
    )  # at head: nothing to do


@contextlib.contextmanager
def _up(installed: Installed, data: Path, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    ports = ["--port", "0", "--blob-port", "0", "--link-port", "0"]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [installed.linkedblob, "up", "--data", str(data), *ports],
            cwd=installed.cwd,
            env=installed.server_env,
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
        # The client-only install pushes and pulls.
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
