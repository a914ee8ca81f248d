"""The results of a run and the one table they are printed as (Markdown, for bench/README.md)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

from bench.stats import median, spread
from bench.workload import RSS_GROWTH_LIMIT, RSS_LIMIT, MiB, Row

REFERENCE = "registry"


@dataclass
class SystemResult:
    name: str
    client_note: str
    values: dict[str, list[float]] = field(default_factory=dict)  # row key -> one per round
    peak_rss: dict[str, int] = field(default_factory=dict)  # service -> bytes, figures 1-6
    rss_growth: dict[str, int] = field(default_factory=dict)  # service -> bytes, blob x8
    # figure -> service -> bytes: each figure's own peak (max over rounds)
    peak_rss_by_figure: dict[str, dict[str, int]] = field(default_factory=dict)
    rss_method: str = ""

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.values.setdefault(key, []).append(value)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"nproc {os.cpu_count()}, {cpu}, {memory:.0f} GiB memory, {platform.platform()}"


def _number(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f} ms"
    return f"{value:,.0f} {unit}"


def _cell(values: list[float] | None, unit: str) -> str:
    if not values:
        return "—"
    text = _number(median(values), unit)
    if len(values) > 1:
        text += f" ±{spread(values) * 100:.0f}%"
    return text


def _verdict(ratio: float | None, row: Row) -> str:
    if ratio is None or row.target is None:
        return "—" if row.target is not None else ""
    met = ratio >= row.target if row.higher_is_better else ratio <= row.target
    return "yes" if met else "NO"


def _ratio(system: SystemResult, reference: SystemResult | None, key: str) -> float | None:
    if reference is None or not system.values.get(key) or not reference.values.get(key):
        return None
    ref = median(reference.values[key])
    return median(system.values[key]) / ref if ref else None


def _rss_cell(result: SystemResult | None, service: str) -> str:
    if result is None or service not in result.peak_rss:
        return "—"
    peak, growth = result.peak_rss[service], result.rss_growth.get(service, 0)
    return f"{peak / MiB:.0f} MiB ({growth / MiB:+.0f})"


def table(rows: list[Row], results: list[SystemResult]) -> str:
    """figure | linkedblob | registry | ratio | target | met, then value | ratio | met for
    each further linkedblob configuration. Ratios are linkedblob / registry."""
    reference = next((r for r in results if r.name == REFERENCE), None)
    ours = [r for r in results if r.name != REFERENCE]
    header = ["figure"]
    for i, result in enumerate(ours):
        header += (
            [result.name, REFERENCE, "ratio", "target", "met"]
            if i == 0
            else [result.name, "ratio", "met"]
        )
    if not ours:
        header += [REFERENCE, "target"]
    lines: list[list[str]] = []
    for row in rows:
        target = ""
        if row.target is not None:
            target = f"{'≥' if row.higher_is_better else '≤'} {row.target:.1f}x"
        ref_cell = _cell(reference.values.get(row.key), row.unit) if reference else "skipped"
        lines.append(
            _line(
                row.label,
                ours,
                ref_cell,
                target,
                [
                    (
                        _cell(result.values.get(row.key), row.unit),
                        ratio := _ratio(result, reference, row.key),
                        _verdict(ratio, row),
                    )
                    for result in ours
                ],
            )
        )
    services = list(ours[0].peak_rss) if ours else list(reference.peak_rss if reference else [])
    ref_peak = max(reference.peak_rss.values()) if reference and reference.peak_rss else None
    ref_rss = _rss_cell(reference, REFERENCE) if reference else "skipped"
    target = f"≤ {RSS_LIMIT // MiB} MiB, +≤{RSS_GROWTH_LIMIT // MiB}"
    for service in services:
        cells = []
        for result in ours:
            peak = result.peak_rss.get(service)
            met = ""
            if peak is not None:
                flat = result.rss_growth.get(service, 0) <= RSS_GROWTH_LIMIT
                met = "yes" if peak <= RSS_LIMIT and flat else "NO"
            ratio = peak / ref_peak if peak is not None and ref_peak else None
            cells.append((_rss_cell(result, service), ratio, met))
        lines.append(_line(f"8. peak RSS {service} (growth)", ours, ref_rss, target, cells))
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def _line(
    label: str,
    ours: list[SystemResult],
    ref_cell: str,
    target: str,
    cells: list[tuple[str, float | None, str]],
) -> list[str]:
    line = [label]
    for i, (value, ratio, met) in enumerate(cells):
        shown = f"{ratio:.2f}x" if ratio is not None else "—"
        line += [value, ref_cell, shown, target, met] if i == 0 else [value, shown, met]
    if not ours:
        line += [ref_cell, target]
    return line
