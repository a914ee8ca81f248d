"""Single-stream throughput of blobsvc: one upload and one download of a 256 MiB blob.

Starts a real blobsvc (`linkedblob serve blob`, filesystem storage in a temporary directory)
and drives it with the generated synchronous Python gRPC stub, 1 MiB messages:

- upload: one Write stream committing at its end (the server hashes the bytes as they arrive
  and verifies the digest); the blob is deleted after each run so every run stores it;
- download: one Read stream; the client hashes what it receives and checks the digest;
- small blobs: ``--puts N`` sequential Put calls of ``--put-kib`` KiB (distinct blobs), as the
  gateway's PutBlob makes them: p50 / p99 latency and blobs per second, beside the latency of
  a bare unary call (Health.Check) on the same server, for scale on a busy machine.

Prints the median of 3 runs of each in MB/s (10^6 bytes per second), and the CPU time the
server spent per GiB (from /proc; steadier than MB/s on a busy machine). Client and server
share the machine's cores, so MB/s is for the pair. Usage:

    .venv/bin/python bench/blob_throughput.py [--size-mib 256] [--runs 3] [--storage memory]
        [--puts 1000] [--put-kib 4] [--only-puts]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linkedblob.blob.v1 import blob_pb2 as pb
from linkedblob.blob.v1 import blob_pb2_grpc

MiB = 1024 * 1024
_READY = re.compile(r"^linkedblob blob listening on (\S+)$")


def chunks(size_mib: int, block: bytes) -> Iterator[bytes]:
    """``size_mib`` distinct 1 MiB chunks: a random block behind an 8-byte counter."""
    for i in range(size_mib):
        yield i.to_bytes(8, "big") + block[8:]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(data_dir: str, storage: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "linkedblob.cli", "serve", "blob", "--port", "0", "--open"]
    cmd += ["--data", data_dir, "--storage", storage, "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = _READY.match(line.strip())
        if m:
            return proc, m.group(1)
    raise SystemExit(f"blobsvc exited with {proc.wait()}")


def upload(
    stub: blob_pb2_grpc.BlobServiceStub, upload_id: str, size_mib: int, block: bytes, digest: str
) -> float:
    def requests() -> Iterator[pb.WriteRequest]:
        for i, chunk in enumerate(chunks(size_mib, block)):
            if i == 0:
                yield pb.WriteRequest(
                    upload_id=upload_id, data=chunk, commit=True, commit_digest=digest
                )
            else:
                yield pb.WriteRequest(data=chunk)

    started = time.perf_counter()
    response = stub.Write(requests())
    elapsed = time.perf_counter() - started
    assert response.blob.digest == digest and not response.already_existed, response
    return elapsed


def download(stub: blob_pb2_grpc.BlobServiceStub, size: int, digest: str) -> float:
    hasher = hashlib.sha256()
    received = 0
    started = time.perf_counter()
    for message in stub.Read(pb.ReadRequest(digest=digest)):
        data = message.data
        hasher.update(data)
        received += len(data)
    elapsed = time.perf_counter() - started
    assert received == size and f"sha256:{hasher.hexdigest()}" == digest, "download corrupted"
    return elapsed


def small_puts(stub: blob_pb2_grpc.BlobServiceStub, count: int, size: int) -> list[float]:
    """Seconds per Put of ``count`` distinct blobs of ``size`` bytes, one after another."""
    base = os.urandom(size)
    blobs = [i.to_bytes(8, "big") + base[8:] for i in range(count)]
    times = []
    for data in blobs:
        started = time.perf_counter()
        response = stub.Put(pb.PutRequest(data=data))
        times.append(time.perf_counter() - started)
        assert not response.already_existed
    return times


def bare_hops(channel: grpc.Channel, count: int) -> list[float]:
    """Seconds per Health.Check: what any unary call costs here (the machine's load included)."""
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        health.Check(request)
        times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description="blobsvc single-stream throughput")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--storage", default="filesystem", choices=["filesystem", "memory"])
    parser.add_argument("--puts", type=int, default=1000, help="small Puts (0: none)")
    parser.add_argument("--put-kib", type=int, default=4)
    parser.add_argument("--only-puts", action="store_true", help="skip the 256 MiB streams")
    args = parser.parse_args()

    size = args.size_mib * MiB
    streams = not args.only_puts
    with tempfile.TemporaryDirectory(prefix="blobsvc-bench-") as data_dir:
        proc, address = start_server(data_dir, args.storage)
        try:
            options = [("grpc.max_receive_message_length", 8 * MiB)]
            with grpc.insecure_channel(address, options=options) as channel:
                stub = blob_pb2_grpc.BlobServiceStub(channel)
                if streams:
                    ups, cpu_up, downs, cpu_down = stream(stub, proc.pid, args.size_mib, args.runs)
                if args.puts:
                    hops = bare_hops(channel, args.puts)
                    small_puts(stub, min(args.puts, 100), args.put_kib * 1024)  # warm up
                    cpu = cpu_seconds(proc.pid)
                    puts = small_puts(stub, args.puts, args.put_kib * 1024)
                    cpu_puts = cpu_seconds(proc.pid) - cpu
                peak = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait()

    def mbps(seconds: float) -> float:
        return size / seconds / 1e6

    gib_moved = args.runs * size / (1024 * MiB)

    def line(what: str, times: list[float], cpu: float) -> str:
        runs = ", ".join(f"{mbps(t):.0f}" for t in times)
        median = mbps(statistics.median(times))
        return (
            f"  {what:<44}{median:7.0f} MB/s  (runs: {runs}; "
            f"server CPU {cpu / gib_moved:.2f} s/GiB)"
        )

    if streams:
        print(f"blobsvc ({args.storage}), one stream, {args.size_mib} MiB blob, 1 MiB messages")
        print(line("upload   (Write + commit, sha256 verified):", ups, cpu_up))
        print(line("download (Read, client verifies sha256):", downs, cpu_down))
    if args.puts:
        print(
            f"  {args.puts} sequential Puts of {args.put_kib} KiB:{'':13}"
            f"{len(puts) / sum(puts):7.0f} blobs/s  (p50 {percentile(puts, 50) * 1e3:.3f} ms, "
            f"p99 {percentile(puts, 99) * 1e3:.3f} ms; server CPU "
            f"{cpu_puts / len(puts) * 1e6:.0f} us/blob)"
        )
        print(
            f"  for scale, a bare unary call (Health.Check):  p50 "
            f"{percentile(hops, 50) * 1e3:.3f} ms, p99 {percentile(hops, 99) * 1e3:.3f} ms"
        )
    print(f"  blobsvc peak RSS: {peak:.0f} MiB")


def stream(
    stub: blob_pb2_grpc.BlobServiceStub, pid: int, size_mib: int, runs: int
) -> tuple[list[float], float, list[float], float]:
    """Upload and download times of a ``size_mib`` blob, ``runs`` times, and the server's CPU
    seconds for each direction."""
    block = os.urandom(MiB)
    hasher = hashlib.sha256()
    for chunk in chunks(size_mib, block):
        hasher.update(chunk)
    digest = f"sha256:{hasher.hexdigest()}"
    ups = []
    cpu = cpu_seconds(pid)
    for run in range(runs):
        ups.append(upload(stub, f"bench-{run}", size_mib, block, digest))
        stub.Delete(pb.DeleteRequest(digest=digest))  # the next run stores it again
    cpu_up = cpu_seconds(pid) - cpu
    upload(stub, "bench-keep", size_mib, block, digest)
    cpu = cpu_seconds(pid)
    downs = [download(stub, size_mib * MiB, digest) for _ in range(runs)]
    cpu_down = cpu_seconds(pid) - cpu
    return ups, cpu_up, downs, cpu_down


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
