"""Kubernetes exec probe: a gRPC health check over TLS, presenting a client certificate.

The kubelet's own gRPC probe speaks plaintext only, and grpc_health_probe is not in the image;
this uses the grpcio the image already has. It connects to the pod's own port on 127.0.0.1,
checks the server's certificate against --ca under the Service's name (--server-name), and
presents the pod's certificate (--cert/--key) for servers that require one (mTLS). Exit 0 when
the server answers SERVING for --service, 1 otherwise, with one line on stderr.

--service: ``liveness`` for a livenessProbe (the process is not wedged), ``readiness`` for a
readinessProbe (what the service needs works; linkedblob.health), "" (the default) is readiness
too.

    python /app/deploy/probe.py --port 50052 --ca ca.crt --cert tls.crt --key tls.key \
        --server-name linkedblob-blobsvc --service readiness
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(args: argparse.Namespace) -> grpc.Channel:
    target = f"{args.host}:{args.port}"
    if not args.ca:
        return grpc.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(args.ca).read_bytes(),
        private_key=Path(args.key).read_bytes() if args.key else None,
        certificate_chain=Path(args.cert).read_bytes() if args.cert else None,
    )
    options = []
    if args.server_name:  # 127.0.0.1 is not in the certificate; the Service's name is
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(target, creds, options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", help="CA of the server's certificate (without it: plaintext)")
    parser.add_argument("--cert", help="client certificate, for servers that require one")
    parser.add_argument("--key", help="its private key")
    parser.add_argument("--server-name", help="the name the server's certificate carries")
    parser.add_argument(
        "--service",
        default="",
        help="health service name: liveness, readiness ('' = readiness of the whole server)",
    )
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        with _channel(args) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"probe: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:  # a certificate file missing or unreadable
        print(f"probe: {exc}", file=sys.stderr)
        return 1
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        print(f"probe: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
