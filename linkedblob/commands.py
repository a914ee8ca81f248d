"""Client commands of the CLI (push, pull, stat, mount, ls, rm, uploads), built on
linkedblob.client.

Each talks to the gateway at --addr ($LINKEDBLOB_ADDR, default 127.0.0.1:50051). Results go to
stdout (a digest, or tab-separated descriptor lines; with --json, for push, stat and ls, one
JSON object per line with snake_case keys and nothing else), a progress bar to stderr for
transfers that last more than a moment on a terminal. A failure propagates to linkedblob.cli,
which prints one line on stderr with the gRPC code and the reason and exits with the status of
the code's class (linkedblob.exitcodes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from linkedblob import tuning
from linkedblob.client import DEFAULT_ADDR, Client, ClientError, Descriptor, Progress
from linkedblob.config import add_option
from linkedblob.exitcodes import UsageError

# A progress bar appears only when a transfer is still going after this many seconds.
_PROGRESS_DELAY = 0.5


def register(commands: Any) -> None:
    """Adds the client commands to the CLI's subcommands."""
    push = _command(commands, "push", _push, "store FILE as a blob and link it into REPO")
    push.add_argument("repository", metavar="REPO")
    push.add_argument("file", metavar="FILE", help="the file to store; - reads stdin")
    push.add_argument("--media-type", default="", help="media type recorded on the link")
    push.add_argument(
        "--digest", default="", help="the expected digest (a stored blob is linked at once)"
    )
    push.add_argument(
        "--resumable",
        action="store_true",
        help="use the resumable upload API (resumes after broken connections)",
    )
    _json_flag(push)

    pull = _command(commands, "pull", _pull, "write a blob that REPO links to a file")
    pull.add_argument("repository", metavar="REPO")
    pull.add_argument("digest", metavar="DIGEST")
    pull.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="where to write it; - for stdout"
    )
    pull.add_argument("--offset", type=int, default=0, help="first byte to read")
    pull.add_argument("--length", type=int, default=0, help="bytes to read (0: to the end)")

    stat = _command(commands, "stat", _stat, "show a blob that REPO links: digest, size, type")
    stat.add_argument("repository", metavar="REPO")
    stat.add_argument("digest", metavar="DIGEST")
    _json_flag(stat)

    mount = _command(commands, "mount", _mount, "link into REPO a blob another repository links")
    mount.add_argument("repository", metavar="REPO")
    mount.add_argument("digest", metavar="DIGEST")
    mount.add_argument(
        "--from", dest="source", default="", metavar="SRC", help="the repository that links it"
    )

    ls = _command(commands, "ls", _ls, "list REPO's blobs, or with no REPO the repositories")
    ls.add_argument("repository", metavar="REPO", nargs="?", default="")
    _json_flag(ls)

    rm = _command(commands, "rm", _rm, "unlink a blob from REPO (gateway must allow deletes)")
    rm.add_argument("repository", metavar="REPO")
    rm.add_argument("digest", metavar="DIGEST")

    uploads = _command(
        commands, "uploads", _uploads, "list REPO's uploads in progress (needs push on REPO)"
    )
    uploads.add_argument("repository", metavar="REPO")
    uploads.add_argument("--json", action="store_true", help="one JSON object per upload and line")


def _command(
    commands: Any, name: str, handler: Callable[[argparse.Namespace], None], help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
    add_option(parser, "--addr", default=DEFAULT_ADDR, help="gateway address")
    add_option(parser, "--tls", action="store_true", help="reach the gateway over TLS")
    add_option(
        parser, "--ca", default="", help="PEM CA bundle the gateway's certificate chains to (TLS)"
    )
    add_option(parser, "--cert", default="", help="PEM client certificate (TLS)")
    add_option(parser, "--key", default="", help="PEM private key of --cert")
    add_option(
        parser,
        "--token",
        default="",
        help="bearer token sent on every call (over TLS, or in clear to a loopback address)",
    )

    def run(args: argparse.Namespace) -> None:
        try:
            handler(args)
        except ClientError as e:
            if e.code.name == "UNAVAILABLE" and not (args.tls or args.ca):
                # What a plaintext client sees of a TLS gateway: a closed socket.
                e.add_note(f"(if {args.addr} serves TLS, pass --tls and --ca)")
            raise

    parser.set_defaults(handler=run)
    return parser


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per line (snake_case keys)"
    )


def _client(args: argparse.Namespace) -> Client:
    try:
        # The CLI asks for the malloc tuning the library leaves alone by default (faster pulls);
        # LINKEDBLOB_MALLOC_TUNING=0 keeps it off.
        return Client(
            args.addr,
            malloc_tuning=tuning.wanted(default=True),
            tls=args.tls,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            token=args.token,
        )
    except ValueError as e:  # TLS files or a token the client cannot use
        raise UsageError(str(e)) from e


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj))


def _print_descriptor(desc: Descriptor, args: argparse.Namespace) -> None:
    if args.json:
        _print_json(
            {
                "repository": args.repository,
                "digest": desc.digest,
                "size": desc.size,
                "media_type": desc.media_type,
            }
        )
    else:
        print(f"{desc.digest}\t{desc.size}\t{desc.media_type}")


@contextlib.contextmanager
def _progress(total: int | None, desc: str) -> Iterator[Progress]:
    """A tqdm bar on stderr, shown only on a terminal and only after a moment."""
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        delay=_PROGRESS_DELAY,
        leave=False,
    ) as bar:
        yield bar.update


def _push(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.file == "-":
            if args.resumable:
                raise UsageError("--resumable needs a file, not stdin")
            with _progress(None, "push") as progress:
                desc = client.push(
                    args.repository,
                    sys.stdin.buffer,
                    media_type=args.media_type,
                    digest=args.digest,
                    progress=progress,
                )
        else:
            with open(args.file, "rb") as f:
                size = f.seek(0, 2)
                f.seek(0)
                with _progress(size, "push") as progress:
                    desc = client.push(
                        args.repository,
                        f,
                        media_type=args.media_type,
                        digest=args.digest,
                        resumable=args.resumable,
                        progress=progress,
                    )
    if args.json:
        _print_descriptor(desc, args)
    else:
        print(desc.digest)


def _pull(args: argparse.Namespace) -> None:
    to_stdout = args.output == "-"
    with _client(args) as client:
        size = client.stat(args.repository, args.digest).size
        total = max(size - args.offset, 0) if args.length == 0 else args.length
        with _progress(min(total, max(size - args.offset, 0)), "pull") as progress:
            client.pull(
                args.repository,
                args.digest,
                sys.stdout.buffer if to_stdout else args.output,
                offset=args.offset,
                length=args.length,
                progress=progress,
            )
    if to_stdout:
        sys.stdout.buffer.flush()


def _stat(args: argparse.Namespace) -> None:
    with _client(args) as client:
        _print_descriptor(client.stat(args.repository, args.digest), args)


def _mount(args: argparse.Namespace) -> None:
    with _client(args) as client:
        desc = client.mount(args.repository, args.digest, from_repository=args.source)
    print(desc.digest)


def _ls(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.repository:
            for desc in client.list_blobs(args.repository, page_size=1000):
                _print_descriptor(desc, args)
        else:
            for name in client.list_repositories(page_size=1000):
                if args.json:
                    _print_json({"repository": name})
                else:
                    print(name)


def _uploads(args: argparse.Namespace) -> None:
    """One line per upload: id, offset (bytes recorded by its last completed write), started
    and last written (ISO 8601, UTC); tab-separated, or with --json an object per line."""
    with _client(args) as client:
        for upload in client.list_uploads(args.repository, page_size=1000):
            started = upload.started_at.isoformat()
            updated = upload.updated_at.isoformat() if upload.updated_at else ""
            if args.json:
                fields = {
                    "id": upload.id,
                    "repository": upload.repository,
                    "offset": upload.offset,
                    "started_at": started,
                    "updated_at": updated,
                }
                print(json.dumps(fields))
            else:
                print(f"{upload.id}\t{upload.offset}\t{started}\t{updated}")


def _rm(args: argparse.Namespace) -> None:
    with _client(args) as client:
        client.delete(args.repository, args.digest)
