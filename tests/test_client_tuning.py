"""The client library changes no process-wide setting unless asked: a Client tunes glibc's
malloc (linkedblob.tuning.tune_malloc) only with ``malloc_tuning=True`` or
LINKEDBLOB_MALLOC_TUNING=1, once per process. Seen from the outside: a burst of ~1 MiB
allocations and frees, run in a fresh interpreter after creating a Client, page-faults tens of
thousands of times untuned (each buffer mmap-ed or trimmed and faulted in again) and a few
hundred tuned; and linkedblob.tuning.applied() says what the process set."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from linkedblob.client import MALLOC_TUNING_ENV

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc tuning is a glibc mallopt; the probe reads /proc",
)

# Every round allocates two 1 MiB buffers (touching every page) and frees them: with glibc's
# default thresholds the freed top of the heap is trimmed each time, so both are faulted in
# again (~512 faults a round); tuned, the same memory is reused.
PROBE = textwrap.dedent(
    """
    import json, sys, threading

    def minor_faults():
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])

    def burst():
        before = minor_faults()
        for _ in range(ROUNDS):
            a = b"a" * (1 << 20)
            b = b"b" * (1 << 20)
            del a, b
        return minor_faults() - before

    result = {}
    SETUP
    result["faults"] = burst()
    print(json.dumps(result))
    """
)
ROUNDS = 100
UNTUNED_AT_LEAST = ROUNDS * 256  # half of the pages touched
TUNED_AT_MOST = ROUNDS * 25  # a tenth of that


def probe(setup: str, env: dict[str, str] | None = None) -> dict[str, object]:
    code = PROBE.replace("ROUNDS", str(ROUNDS)).replace("SETUP", textwrap.dedent(setup).strip())
    environ = {k: v for k, v in os.environ.items() if k != MALLOC_TUNING_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


# No server is needed: a channel connects only when used.
CLIENT = "from linkedblob.client import Client; Client('127.0.0.1:1').close()"


@pytest.fixture(scope="module")
def untuned_faults() -> int:
    """The probe without any tuning: it has to fault a lot for the other tests to mean
    anything."""
    faults = probe("pass")["faults"]
    assert isinstance(faults, int)
    if faults < UNTUNED_AT_LEAST:
        pytest.skip(f"this malloc faults {faults} times untuned: the probe tells nothing here")
    return faults


APPLIED = "from linkedblob import tuning; result['applied'] = tuning.applied()"


def test_a_client_leaves_malloc_alone(untuned_faults: int) -> None:
    result = probe(f"{CLIENT}\n{APPLIED}")
    assert result["applied"] is None
    assert result["faults"] >= UNTUNED_AT_LEAST  # type: ignore[operator]


def test_a_client_tunes_malloc_when_asked(untuned_faults: int) -> None:
    setup = "from linkedblob.client import Client; Client('127.0.0.1:1', malloc_tuning=True)"
    result = probe(f"{setup}\n{APPLIED}")
    assert result["applied"] == {"mmap_threshold": 64 << 20, "trim_threshold": 1 << 30}
    assert result["faults"] <= TUNED_AT_MOST  # type: ignore[operator]


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_the_environment_opts_in(untuned_faults: int, value: str) -> None:
    assert probe(CLIENT, {MALLOC_TUNING_ENV: value})["faults"] <= TUNED_AT_MOST


def test_the_keyword_wins_over_the_environment(untuned_faults: int) -> None:
    setup = "from linkedblob.client import Client; Client('127.0.0.1:1', malloc_tuning=False)"
    assert probe(setup, {MALLOC_TUNING_ENV: "1"})["faults"] >= UNTUNED_AT_LEAST
    setup = "from linkedblob.client import Client; Client('127.0.0.1:1', malloc_tuning=True)"
    assert probe(setup, {MALLOC_TUNING_ENV: "0"})["faults"] <= TUNED_AT_MOST


def test_a_variable_that_is_not_a_boolean_is_refused() -> None:
    setup = """
        from linkedblob.client import Client
        try:
            Client('127.0.0.1:1')
        except ValueError as e:
            result["error"] = str(e)
    """
    assert "LINKEDBLOB_MALLOC_TUNING='maybe'" in str(probe(setup, {MALLOC_TUNING_ENV: "maybe"}))


def test_tuning_runs_once_per_process(untuned_faults: int) -> None:
    # Clients made at once from many threads all see it done; once done, it is not redone:
    # thresholds put back by hand (as an application may) stay as they were put.
    setup = """
        import ctypes
        from linkedblob import tuning
        from linkedblob.client import Client

        def make():
            Client('127.0.0.1:1', malloc_tuning=True).close()

        threads = [threading.Thread(target=make) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["tuned_faults"] = burst()
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: glibc's default
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        result["again"] = tuning.tune_malloc()
        make()
    """
    result = probe(setup)
    assert result["tuned_faults"] <= TUNED_AT_MOST  # type: ignore[operator]
    assert result["again"] is True  # the first call's result
    assert result["faults"] >= UNTUNED_AT_LEAST  # type: ignore[operator]
