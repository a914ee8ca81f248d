"""A short soak: `serve gc` looping with a grace of 0 while clients push, re-push, mount and
delete the same few digests through the gateway. No push or pull fails (a blob being deleted is
retried by the client by itself), every link left resolves to the right bytes, and after a last
run fsck is clean and nothing unlinked is left on disk."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from linkedblob.client import Client
from tests.services import spawn
from tests.stack import DB_KINDS, GRANT_SECRET_ENV, free_port, running_stack, scrape
from tests.test_collector_e2e import blob_file, fsck, gc

SECONDS = 6.0
PAYLOADS = [os.urandom(n) for n in (100, 70_000, 1_500_000)] + [b"same" * 1000]


@pytest.mark.parametrize("kind", DB_KINDS)
def test_gc_looping_under_pushes_mounts_and_deletes(kind: str, tmp_path: Path) -> None:
    with running_stack(kind, tmp_path) as stack:
        worker = spawn(
            "gc",
            "--link-addr",
            stack.link.address,
            "--blob-addr",
            stack.blob.address,
            "--interval",
            "0.05",
            "--grace",
            "0",
            "--metrics-port",
            str(metrics_port := free_port()),
            "--log-level",
            "WARNING",
            env={GRANT_SECRET_ENV: stack.grant_secret},
        )
        errors: list[BaseException] = []
        deadline = time.monotonic() + SECONDS
        counts = {"push": 0, "delete": 0, "mount": 0}

        def client_loop(seed: int) -> None:
            rng = random.Random(seed)
            repo = f"soak/r{seed}"
            try:
                with Client(stack.address) as client:
                    while time.monotonic() < deadline:
                        data = rng.choice(PAYLOADS)
                        digest = client.push(repo, data).digest
                        counts["push"] += 1
                        assert client.get(repo, digest) == data
                        if rng.random() < 0.3:
                            other = f"soak/m{seed}"
                            client.mount(other, digest, from_repository=repo)
                            counts["mount"] += 1
                            assert client.get(other, digest) == data
                            client.delete(other, digest)
                        if rng.random() < 0.7:
                            client.delete(repo, digest)
                            counts["delete"] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SECONDS + 120)
        samples = scrape(metrics_port)
        assert worker.stop(signal.SIGTERM) == 0, "".join(worker.output)
        # The collector did reclaim while the clients ran (the races were there to be lost).
        assert samples["linkedblob_gc_reclaimed_blobs_total"] > 0, samples
        assert samples.get('linkedblob_gc_runs_total{outcome="error"}', 0) == 0, samples
        assert not errors, errors
        assert counts["push"] > 10 and counts["delete"] > 3, counts

        # What is still linked resolves to its bytes; the rest goes in a last run.
        stats = gc(stack, "--grace", "0")
        assert stats["stuck_deleting"] == 0
        linked: set[str] = set()
        with Client(stack.address) as client:
            for repo in client.list_repositories():
                for desc in client.list_blobs(repo):
                    data = client.get(repo, desc.digest)
                    assert f"sha256:{hashlib.sha256(data).hexdigest()}" == desc.digest
                    linked.add(desc.digest)
        code, report = fsck(stack)
        assert code == 0, json.dumps(report, indent=2)
        for data in PAYLOADS:
            digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
            assert blob_file(stack, digest).exists() == (digest in linked)
