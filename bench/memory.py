"""Peak resident memory of server processes over a stretch of the run.

Linux keeps each process's peak RSS in /proc/PID/status (VmHWM); writing "5" to
/proc/PID/clear_refs resets it to the current RSS, so a peak can be taken per phase. Where that
reset is refused (another user's process, an old kernel), a thread samples RSS with psutil
every few milliseconds instead, which can miss a short spike but not a held blob.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import psutil

SAMPLE_SECONDS = 0.005


def read_hwm(pid: int) -> int:
    """The process's peak RSS since start or the last reset, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Tracks the peak RSS of named processes between :meth:`reset` and :meth:`read`."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.method = "VmHWM" if all(reset_hwm(pid) for pid in self.pids.values()) else "sampled"
        self._peaks = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def reset(self) -> None:
        if self.method == "VmHWM":
            for pid in self.pids.values():
                reset_hwm(pid)
            return
        self._stop_sampler()
        self._peaks = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def read(self) -> dict[str, int]:
        """Peak RSS in bytes per process name since the last reset."""
        if self.method == "VmHWM":
            return {name: read_hwm(pid) for name, pid in self.pids.items()}
        self._stop_sampler()
        return dict(self._peaks)

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None

    def _sample(self) -> None:
        procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while not self._stop.wait(SAMPLE_SECONDS):
            for name, proc in procs.items():
                try:
                    rss = int(proc.memory_info().rss)
                except psutil.Error:
                    continue
                self._peaks[name] = max(self._peaks[name], rss)
