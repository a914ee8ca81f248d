"""The kill -9 storm of issue 10: four clients push distinct blobs while blobsvc, linksvc and
the gateway are killed with SIGKILL in turn and started again on the same data directory,
database and port. Afterwards nothing acknowledged is lost, and `linkedblob gc` and `fsck`
leave no orphan blob file and no staging area behind.

The pushers go down every commit path of the gateway: small puts (PutBlob) with and without a
declared digest, streamed pushes through the gateway without a declared digest (PushBlob: the
staged digest, then Lease, Commit, Link), pushes straight to blobsvc (direct, committed through
the gateway: CommitUpload) and resumable pushes (the upload API). A push is acknowledged only
when push() returned; a failed one (a service was down) is made again with the same bytes until
it goes through, or given up half of the time (as a client that gives up: what it had sent may
be left committed in blobsvc and never linked, which gc and fsck must clear).

Afterwards, once the gateway's short lease TTL has passed (leases of pushes that failed after
their bytes were committed protect those bytes until they expire): `gc --grace 0
--upload-expiry 0` purges the uploads; `fsck --repair` adopts the bytes a killed service left
unindexed (committed in blobsvc, never linked); a second gc reclaims them; then `fsck --json`
is clean, blobsvc holds no staging area and exactly the linked blobs' files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from linkedblob.client import Client, ClientError
from linkedblob.client.errors import DigestMismatchError
from linkedblob.config import MiB
from tests.services import ServiceProcess, spawn
from tests.stack import DB_KINDS, GRANT_SECRET_ENV, Stack, running_stack, spawn_gateway
from tests.test_collector_e2e import blob_file, fsck, gc, staging_ids

# Kill rounds (each kills blob, link and gateway in turn, one every KILL_EVERY seconds):
# LINKEDBLOB_KILL_ROUNDS, 2 in `make test`.
KILLS = ("blob", "link", "gateway") * int(os.environ.get("LINKEDBLOB_KILL_ROUNDS", "2"))
KILL_EVERY = 2.5
GIVE_UP = 0.5  # a failed push is given up this often, else made again with the same bytes
LEASE_TTL = 8.0  # the gateway's: a commit slower than this is answered ABORTED and pushed again
GATEWAY_ARGS = ("--lease-ttl", str(LEASE_TTL))


@dataclass
class Pusher:
    """One client pushing distinct blobs in one way; what it got acknowledged."""

    name: str
    direct: bool
    declared: bool  # the client declares the digest
    resumable: bool
    sizes: tuple[int, ...]
    acked: list[tuple[str, str, int]] = field(default_factory=list)  # repository, digest, size
    failures: Counter[str] = field(default_factory=Counter)  # code/reason of failed attempts
    errors: list[BaseException] = field(default_factory=list)  # anything not a failed call
    abandoned: int = 0  # failed pushes given up (their bytes may be left behind unindexed)


PUSHERS = (
    # Small and streamed pushes with a declared digest, large ones straight to blobsvc.
    Pusher("declared-direct", direct=True, declared=True, resumable=False,
           sizes=(700, 60_000, 1 * MiB + 3, 3 * MiB + 1)),
    # No declared digest and no direct access: PutBlob hashed by the gateway, and PushBlob's
    # undeclared path (relay without commit, staged digest, Lease, Commit, Link).
    Pusher("undeclared-relay", direct=False, declared=False, resumable=False,
           sizes=(900, 1 * MiB + 17, 2 * MiB + 5, 4 * MiB - 1)),
    # The upload API, resuming after broken connections; undeclared, direct when offered.
    Pusher("resumable-direct", direct=True, declared=False, resumable=True,
           sizes=(5_000, 1 * MiB + 9, 3 * MiB + 7)),
    # The upload API through the gateway, with a declared digest.
    Pusher("resumable-relay", direct=False, declared=True, resumable=True,
           sizes=(300, 2 * MiB + 11, 4 * MiB - 3)),
)  # fmt: skip


def restart(stack: Stack, kind: str) -> float:
    """SIGKILLs one service of the stack and starts it again on the same port (and data
    directory or database); the seconds it was gone."""
    old: ServiceProcess = getattr(stack, kind)
    began = time.monotonic()
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait(timeout=10)
    same = ("--port", str(old.port), "--log-level", "WARNING")
    for attempt in range(5):
        try:
            if kind == "blob":
                data = str(stack.data / "blobs")
                secret = {GRANT_SECRET_ENV: stack.grant_secret}
                new = spawn("blob", "--data", data, *same, env=secret)
            elif kind == "link":
                new = spawn("link", "--db", stack.db_url, "--migrate", *same)
            else:
                new = spawn_gateway(
                    stack.blob.address,
                    stack.link.address,
                    port=old.port,
                    grant_secret=stack.grant_secret,
                    args=GATEWAY_ARGS,
                )
            break
        except (RuntimeError, TimeoutError):  # the port not free again yet
            if attempt == 4:
                raise
            time.sleep(0.5)
    assert new.address == old.address
    setattr(stack, kind, new)
    return time.monotonic() - began


def push_loop(address: str, pusher: Pusher, seed: int, stop: threading.Event) -> None:
    """Pushes distinct blobs until ``stop``; a failed push is made again with the same bytes."""
    rng = random.Random(seed)
    repo = f"storm/{pusher.name}"
    try:
        with Client(address, timeout=10, retry_timeout=10, direct=pusher.direct) as client:
            while not stop.is_set():
                data = rng.randbytes(rng.choice(pusher.sizes))
                digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
                while not stop.is_set():
                    try:
                        desc = client.push(
                            repo,
                            data,
                            digest=digest if pusher.declared else "",
                            resumable=pusher.resumable,
                        )
                    except DigestMismatchError:
                        raise
                    except ClientError as exc:
                        pusher.failures[f"{exc.code.name}/{exc.reason or '-'}"] += 1
                        time.sleep(0.2)
                        if rng.random() < GIVE_UP:
                            pusher.abandoned += 1
                            break
                        continue
                    assert (desc.digest, desc.size) == (digest, len(data)), desc
                    pusher.acked.append((repo, digest, len(data)))
                    break
    except BaseException as exc:
        pusher.errors.append(exc)


@pytest.mark.parametrize("kind", DB_KINDS)
def test_kill_storm_loses_nothing_and_gc_fsck_leave_no_orphan(kind: str, tmp_path: Path) -> None:
    began = time.monotonic()
    with running_stack(kind, tmp_path, gateway_args=GATEWAY_ARGS) as stack:
        pushers = [
            replace(p, acked=[], failures=Counter(), errors=[], abandoned=0) for p in PUSHERS
        ]
        stop = threading.Event()
        threads = [
            threading.Thread(target=push_loop, args=(stack.address, p, i, stop), daemon=True)
            for i, p in enumerate(pushers)
        ]
        for t in threads:
            t.start()
        downtime: list[tuple[str, float]] = []
        try:
            for victim in KILLS:
                time.sleep(KILL_EVERY)
                downtime.append((victim, restart(stack, victim)))
            time.sleep(KILL_EVERY)  # a calm spell: the last failed pushes go through
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        storm_end = time.monotonic()
        hung = [p.name for p, t in zip(pushers, threads, strict=True) if t.is_alive()]
        assert not hung, f"pushes still running 60 s after the storm: {hung}"
        for p in pushers:
            assert not p.errors, (p.name, p.errors)
        acked = [a for p in pushers for a in p.acked]
        summary = {
            p.name: {"acked": len(p.acked), "failed": dict(p.failures), "given up": p.abandoned}
            for p in pushers
        }
        print(f"\n[{kind}] kills (seconds down): {downtime}\n[{kind}] pushes: {summary}")
        # Every way of pushing got through between (and despite) the kills.
        assert all(len(p.acked) >= 3 for p in pushers), summary
        assert sum(sum(p.failures.values()) for p in pushers) > 0, "no push ever failed"

        # Nothing acknowledged is lost: each pulls back verified (get checks the digest).
        with Client(stack.address, timeout=30) as client:
            for repo, digest, size in acked:
                assert len(client.get(repo, digest)) == size, (repo, digest)

        # After the leases of the pushes cut short have expired: purge, adopt, collect.
        time.sleep(max(0.0, storm_end + LEASE_TTL + 0.5 - time.monotonic()))
        first = gc(stack, "--grace", "0", "--upload-expiry", "0")
        assert first["stuck_deleting"] == 0, first
        code, found = fsck(stack, "--repair", "--upload-expiry", "0")
        counts = found["counts"]
        assert isinstance(counts, dict)
        print(f"[{kind}] first gc: {first}\n[{kind}] fsck --repair: {counts}")
        # Bytes a killed service left unindexed are the only damage a storm may leave, and
        # --repair adopts them; nothing linked may be missing or of the wrong size.
        damage = {k: v for k, v in counts.items() if k != "orphan" and v}
        assert not damage, json.dumps(found, indent=2)
        second = gc(stack, "--grace", "0", "--upload-expiry", "0")
        assert second["stuck_deleting"] == 0, second
        assert second["reclaimed_blobs"] == counts["orphan"], (second, counts)

        code, report = fsck(stack)
        assert code == 0 and report["clean"] is True, json.dumps(report, indent=2)
        checked = report["checked"]
        assert isinstance(checked, dict)
        assert checked["staging_areas"] == 0, checked
        assert staging_ids(stack) == set()
        assert list((stack.data / "blobs" / "uploads").iterdir()) == []
        # The files left are exactly the linked blobs', every acknowledged one among them.
        linked: set[str] = set()
        with Client(stack.address) as client:
            for repo in client.list_repositories():
                linked.update(d.digest for d in client.list_blobs(repo))
        assert {digest for _, digest, _ in acked} <= linked
        on_disk = {
            f"{path.parent.parent.name}:{path.name}"
            for path in (stack.data / "blobs" / "blobs").glob("*/*/*")
            if path.is_file()
        }
        assert on_disk == linked, (on_disk - linked, linked - on_disk)
        for digest in linked:
            assert blob_file(stack, digest).exists()
        assert checked["stored_blobs"] == checked["indexed_blobs"] == len(linked), checked
    print(f"[{kind}] {len(acked)} acknowledged pushes; {time.monotonic() - began:.0f} s in all")
