"""CNCF distribution's registry (Debian's ``docker-registry``) and a streaming HTTP client.

The server runs from a config written here: filesystem storage in a fresh directory, deletes
enabled, ``http.secret`` set, listening on 127.0.0.1 and a free port, access log off and log
level warn (linkedblob's services run at WARNING too: both measure the data path, not logging).

The client is the stdlib ``http.client`` on one keep-alive connection, sending bodies straight
from memoryviews of the payload (no copy) and hashing pulls 1 MiB at a time.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import subprocess
import urllib.parse
from pathlib import Path

from bench.payload import Blob
from bench.procs import Process, free_port
from bench.systems import BenchError

BINARIES = ("docker-registry", "registry")
INSTALL_HINT = (
    "CNCF distribution's registry is not installed; install Debian's package with\n"
    "    apt-get update && apt-get install docker-registry\n"
    "(the harness runs it itself, with a config of its own; the packaged service need not run)"
)
STREAM_BYTES = 1024 * 1024

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: linkedblob-bench-{port}
"""


def find_binary() -> str | None:
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


def version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown version"
    return out.strip().split()[-1] if out.strip() else "unknown version"


class RegistrySystem:
    name = "registry"
    client_note = "http.client, keep-alive, bodies streamed from memoryviews"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.version = version(binary)
        root = workdir / "storage"
        root.mkdir(parents=True)
        self.port = free_port()
        config = workdir / "config.yml"
        config.write_text(CONFIG.format(root=root, port=self.port))
        self.process = Process("registry", [binary, "serve", str(config)], workdir / "registry.log")
        try:
            self.process.wait_until(self._answers)
        except BaseException:
            self.process.stop()
            raise

    def _answers(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("GET", "/v2/")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False

    def services(self) -> dict[str, int]:
        return {"registry": self.process.pid}

    def client(self) -> RegistryClient:
        return RegistryClient("127.0.0.1", self.port)

    def stop(self) -> None:
        self.process.stop()


class RegistryClient:
    """The OCI distribution HTTP API, the way a careful streaming client calls it."""

    def __init__(self, host: str, port: int) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=120)
        self._buffer = memoryview(bytearray(STREAM_BYTES))

    def close(self) -> None:
        self.conn.close()

    def _call(
        self,
        method: str,
        url: str,
        expect: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        self.conn.request(method, url, body=body, headers=headers or {})
        return self._answer(method, url, expect)

    def _answer(self, method: str, url: str, expect: int) -> http.client.HTTPResponse:
        response = self.conn.getresponse()
        body = response.read()  # always drained, so the connection stays alive
        if response.status != expect:
            raise BenchError(
                f"registry {method} {url}: {response.status} {response.reason} "
                f"(expected {expect}) {body[:300]!r}"
            )
        return response

    def _start_upload(self, repository: str) -> str:
        response = self._call("POST", f"/v2/{repository}/blobs/uploads/", 202)
        return _location(response)

    def _stream(self, method: str, url: str, blob: Blob, start: int, stop: int) -> None:
        self.conn.putrequest(method, url, skip_accept_encoding=True)
        self.conn.putheader("Content-Type", "application/octet-stream")
        self.conn.putheader("Content-Length", str(stop - start))
        if method == "PATCH":
            self.conn.putheader("Content-Range", f"{start}-{stop - 1}")
        self.conn.endheaders()
        for piece in blob.views(STREAM_BYTES, start, stop):
            self.conn.send(piece)

    def push(self, repository: str, blob: Blob) -> None:
        # The upload Location already carries ?_state=...: the digest is appended as text.
        url = self._start_upload(repository) + "&digest=" + blob.digest
        self._stream("PUT", url, blob, 0, blob.size)
        self._answer("PUT", url, 201)

    def push_chunked(self, repository: str, blob: Blob, chunk_bytes: int) -> None:
        url = self._start_upload(repository)
        for start in range(0, blob.size, chunk_bytes):
            stop = min(start + chunk_bytes, blob.size)
            self._stream("PATCH", url, blob, start, stop)
            url = _location(self._answer("PATCH", url, 202))
        self._call("PUT", url + "&digest=" + blob.digest, 201)

    def pull_verified(self, repository: str, digest: str, size: int) -> None:
        url = f"/v2/{repository}/blobs/{digest}"
        self.conn.request("GET", url)
        response = self.conn.getresponse()
        if response.status != 200:
            body = response.read()
            raise BenchError(f"registry GET {url}: {response.status} {body[:300]!r}")
        algorithm, _, expected = digest.partition(":")
        hasher = hashlib.new(algorithm)
        received = 0
        while n := response.readinto(self._buffer):
            hasher.update(self._buffer[:n])
            received += n
        if received != size or hasher.hexdigest() != expected:
            raise BenchError(f"registry GET {url}: got {received} bytes hashing differently")

    def stat(self, repository: str, digest: str) -> None:
        self._call("HEAD", f"/v2/{repository}/blobs/{digest}", 200)

    def mount(self, repository: str, from_repository: str, digest: str) -> None:
        query = urllib.parse.urlencode({"mount": digest, "from": from_repository})
        self._call("POST", f"/v2/{repository}/blobs/uploads/?{query}", 201)

    def push_small(self, repository: str, blob: Blob) -> None:
        # distribution 2.8 has no single-request upload (a POST with ?digest= and a body only
        # opens a session), so a small blob costs a POST and a PUT, as with docker push.
        url = self._start_upload(repository) + "&digest=" + blob.digest
        headers = {"Content-Type": "application/octet-stream"}
        self._call("PUT", url, 201, body=blob.data(), headers=headers)


def _location(response: http.client.HTTPResponse) -> str:
    location = response.getheader("Location")
    if not location:
        raise BenchError("registry upload response without a Location")
    parts = urllib.parse.urlsplit(location)
    return parts.path + ("?" + parts.query if parts.query else "")
