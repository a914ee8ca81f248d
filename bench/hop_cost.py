"""What one gRPC round trip costs here: a unary call against a message on an open stream.

The floor under figures 5 and 7 of ``python -m bench`` (mount, small blobs) is the Python gRPC
hop. This starts a bare grpc.aio echo server (uvloop when installed, as the services run) in a
child process and, from a grpc.aio client as the gateway calls its backends, times in turn:

- unary: one unary-unary call per round trip (what the gateway makes to linksvc and blobsvc);
- stream: one request and its reply on a bidirectional stream kept open (what multiplexing the
  backend calls over one stream would cost per call).

Both with 200-byte messages, one at a time, after a warm-up; p50 / p99 and the client's CPU per
round trip. Nothing of linkedblob's own code is on the path::

    .venv/bin/python bench/hop_cost.py [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc

_SERVICE = "bench.Echo"


def _identity(message: bytes) -> bytes:
    return message


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _serve() -> None:
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, _identity, _identity),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(name: str, seconds: list[float], cpu: float) -> None:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"  {name:<7} p50 {statistics.median(ordered) * 1e6:6.0f} us   p99 {p99 * 1e6:6.0f} us"
        f"   client CPU {cpu / len(seconds) * 1e6:5.0f} us per round trip",
        flush=True,
    )


async def _measure(port: int, calls: int, rounds: int) -> None:
    message = b"x" * 200
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(f"/{_SERVICE}/Unary", None, None)
        stream = channel.stream_stream(f"/{_SERVICE}/Stream", None, None)
        for _ in range(200):  # connect, warm up
            await unary(message)
        for round_no in range(1, rounds + 1):
            print(f"round {round_no}:")
            seconds, cpu = [], _cpu()
            for _ in range(calls):
                began = time.perf_counter()
                await unary(message)
                seconds.append(time.perf_counter() - began)
            _report("unary", seconds, _cpu() - cpu)
            call = stream(None)  # requests are written on the call
            seconds, cpu = [], _cpu()
            for _ in range(calls):
                began = time.perf_counter()
                await call.write(message)
                await call.read()
                seconds.append(time.perf_counter() - began)
            _report("stream", seconds, _cpu() - cpu)
            await call.done_writing()


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="round trips per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    _use_uvloop()
    if args.serve:
        asyncio.run(_serve())
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        asyncio.run(_measure(port, args.calls, args.rounds))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
