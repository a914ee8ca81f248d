"""TLS for the servers and their clients: server credentials that follow their files, client
channel credentials, and the flags that configure both.

A server's certificate and key (and the CA its clients' certificates must chain to) are read
again when their files change (modification time, size or inode: a Kubernetes Secret update
swaps a symlink, cert-manager rewrites the files), so a renewal takes effect for new connections
without a restart; connections already open keep the certificate they were made with. gRPC asks
the fetcher of :func:`grpc.dynamic_ssl_server_credentials` on every new connection, grpc.aio
servers included (tests/test_tls.py checks the certificate served after a swap).
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc

from linkedblob.config import add_option

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A TLS file that is missing, unreadable or inconsistent; its message is one line."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise TlsConfigError(f"{what} {path}: the file is empty")
    return data


def _check_pair(cert: str, key: str) -> None:
    """That the key is the certificate's (a renewal caught between its two writes is not)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a matching PEM certificate and key ({exc})"
        ) from None


class CertificateFiles:
    """The server's certificate files, loaded again when any of them changes."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._stamps()

    def _paths(self) -> tuple[str, ...]:
        return (self.cert, self.key, self.client_ca) if self.client_ca else (self.cert, self.key)

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self._paths():
            try:
                st = os.stat(path)  # follows symlinks: a Secret's ..data swap changes the inode
            except OSError:
                stamps.append((-1, -1, -1))
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The current files as a configuration; TlsConfigError when they are not usable."""
        cert = _read(self.cert, "--tls-cert")
        key = _read(self.key, "--tls-key")
        ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca else None
        _check_pair(self.cert, self.key)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, called (in a gRPC thread) for each new connection: a new
        configuration when the files changed, None to keep the current one. Files caught in
        the middle of a renewal keep the old configuration, and are tried again next time."""
        with self._lock:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            try:
                config = self.load()
            except TlsConfigError as exc:
                log.warning("TLS files changed but cannot be used yet; keeping the old: %s", exc)
                return None
            self._stamp = stamp
            log.info("TLS certificate reloaded from %s", self.cert)
            return config


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS server credentials that follow their files; with ``client_ca``, clients must present
    a certificate that CA signed (mTLS)."""
    files = CertificateFiles(cert, key, client_ca)
    initial = files.load()
    return grpc.dynamic_ssl_server_credentials(
        initial,
        files.fetch,  # type: ignore[arg-type]  # the stubs miss that None keeps the config
        require_client_authentication=bool(client_ca),
    )


def server_credentials_from_args(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """The credentials ``--tls-cert/--tls-key/--tls-client-ca`` ask for (None: plaintext)."""
    cert = getattr(args, "tls_cert", "") or ""
    key = getattr(args, "tls_key", "") or ""
    client_ca = getattr(args, "tls_client_ca", "") or ""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not cert:
        raise TlsConfigError("--tls-key needs --tls-cert")
    if not key:
        raise TlsConfigError("--tls-cert needs --tls-key")
    return server_credentials(cert, key, client_ca)


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Client TLS credentials: ``ca`` the roots the server's certificate must chain to (empty:
    the system's), ``cert`` and ``key`` the client's own certificate for mTLS."""
    if key and not cert:
        raise TlsConfigError("a client key needs its certificate (--cert / --backend-tls-cert)")
    if cert and not key:
        raise TlsConfigError("a client certificate needs its key (--key / --backend-tls-key)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA file") if ca else None,
        private_key=_read(key, "key file") if key else None,
        certificate_chain=_read(cert, "certificate file") if cert else None,
    )


def add_client_tls_options(
    parser: argparse.ArgumentParser, prefix: str = "--backend-tls", to: str = "blobsvc and linksvc"
) -> None:
    """``PREFIX-ca``, ``PREFIX-cert``, ``PREFIX-key``: TLS on the channels to ``to``."""
    add_option(
        parser,
        f"{prefix}-ca",
        default="",
        help=f"PEM CA bundle that {to}'s certificates chain to; any of the three {prefix}-* "
        "flags turns TLS on for those channels",
    )
    add_option(parser, f"{prefix}-cert", default="", help=f"PEM client certificate for {to} (mTLS)")
    add_option(parser, f"{prefix}-key", default="", help=f"PEM private key of {prefix}-cert")


def client_credentials_from_args(
    args: argparse.Namespace, prefix: str = "--backend-tls"
) -> grpc.ChannelCredentials | None:
    """The channel credentials the ``PREFIX-*`` flags ask for (None: plaintext)."""
    dest = prefix.lstrip("-").replace("-", "_")
    ca = getattr(args, f"{dest}_ca", "") or ""
    cert = getattr(args, f"{dest}_cert", "") or ""
    key = getattr(args, f"{dest}_key", "") or ""
    if not (ca or cert or key):
        return None
    if key and not cert:
        raise TlsConfigError(f"{prefix}-key needs {prefix}-cert")
    if cert and not key:
        raise TlsConfigError(f"{prefix}-cert needs {prefix}-key")
    return channel_credentials(ca, cert, key)


def exit_with(name: str, exc: Exception) -> NoReturn:
    """One line on stderr, exit status 2 (a configuration error)."""
    print(f"linkedblob {name}: {exc}", file=sys.stderr)
    raise SystemExit(2)


def aio_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[Any],
    interceptors: Sequence[Any] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel: TLS with ``credentials``, plaintext without; ``interceptors``: the
    backend channels' (linkedblob.interceptors)."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def channel(
    address: str, credentials: grpc.ChannelCredentials | None, options: Sequence[Any]
) -> grpc.Channel:
    """A blocking channel: TLS with ``credentials``, plaintext without."""
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
