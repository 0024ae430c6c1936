"""The request-path benchmark's figures and its BENCHMARKS.md section (pure: no I/O).

One run measures two targets with the same load generator and concurrency: a bare uvicorn
hello-world (the anchor) and ``GET /v1/users/{id}`` through the cluster's edge. Every figure
the section prints is either measured in that run or a ratio of two such figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from photostack.ops._bench_report import Bullets, Paragraph, Section, Table, fmt
from photostack.ops.loadgen import TIMES, LoadSummary

__all__ = [
    "CLUSTER_LABEL",
    "HELLO_LABEL",
    "HELLO_TIER",
    "SECTION_TITLE",
    "TIERS",
    "RequestPathFigures",
    "TargetFigures",
    "interpret",
    "request_path_section",
]

SECTION_TITLE = "Request path: GET /v1/users/{id} through the edge"
HELLO_LABEL = "bare uvicorn hello"
CLUSTER_LABEL = "photostack edge→web→app→postgres"
HELLO_TIER = "uvicorn hello"
TIERS = ("edge", "web", "app", "cache", "postgres")
"""Cluster tiers in request order; a tier with no CPU (cache, when unused) is still shown."""

# Above this share of all CPUs busy, throughput is bound by the machine, not by latency.
_SATURATED_FRACTION = 0.85
# Above this share of the machine busy with processes outside the benchmark, say so.
_NOISY_FRACTION = 0.10
# CPU times move in clock ticks; below this many ticks a target's CPU figure is coarse.
_MIN_CPU_TICKS = 50


@dataclass(frozen=True)
class TargetFigures:
    """One target's load figures and the CPU its serving processes spent in the window."""

    label: str
    load: LoadSummary
    cpu_s_by_tier: Mapping[str, float]
    processes_by_tier: Mapping[str, int]
    loadgen_cpu_s: float
    machine_busy_fraction: float = math.nan
    """Share of all CPUs busy in the window, counting every process on the machine."""

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_s_by_tier.values())

    def cpu_us_per_request(self, tier: str | None = None) -> float:
        """Serving CPU µs per 2xx response (one tier, or all); NaN when nothing succeeded."""
        spent = self.cpu_s if tier is None else self.cpu_s_by_tier.get(tier, 0.0)
        return _per_request_us(spent, self.load.ok)

    @property
    def loadgen_us_per_request(self) -> float:
        return _per_request_us(self.loadgen_cpu_s, self.load.ok)

    def busy_fraction(self, cpus: int) -> float:
        """Share of the machine's CPUs the servers and the generator kept busy in the window."""
        capacity_s = self.load.elapsed_s * cpus
        return (self.cpu_s + self.loadgen_cpu_s) / capacity_s if capacity_s > 0 else math.nan


@dataclass(frozen=True)
class RequestPathFigures:
    hello: TargetFigures
    cluster: TargetFigures
    requests: int
    concurrency: int
    cpus: int
    clock_tick_s: float = 0.01
    """Resolution of the kernel's per-process CPU times (1 / SC_CLK_TCK)."""

    @property
    def throughput_ratio(self) -> float:
        """cluster req/s ÷ hello req/s."""
        return _ratio(self.cluster.load.requests_per_s, self.hello.load.requests_per_s)

    @property
    def cpu_ratio(self) -> float:
        """cluster CPU µs/request ÷ hello CPU µs/request."""
        return _ratio(self.cluster.cpu_us_per_request(), self.hello.cpu_us_per_request())

    @property
    def edge_cpu_ratio(self) -> float:
        """The edge proxy's own CPU µs/request ÷ a whole hello app's."""
        return _ratio(self.cluster.cpu_us_per_request("edge"), self.hello.cpu_us_per_request())

    @property
    def has_errors(self) -> bool:
        return self.hello.load.errors > 0 or self.cluster.load.errors > 0


def request_path_section(figures: RequestPathFigures) -> Section:
    """The BENCHMARKS.md section for one request-path run."""
    blocks: list[Paragraph | Table | Bullets] = []
    if figures.has_errors:
        blocks.append(Paragraph(_error_warning(figures)))
    blocks += [
        Paragraph(
            f"{figures.concurrency} concurrent keep-alive connections, the same load generator "
            "(photostack.ops.loadgen, in the bench process) for both targets, measured one "
            "after the other while the cluster idles; at least "
            f"{figures.requests:,} measured requests per target after a warm-up "
            f"({_measured(figures.hello)} for the hello, {_measured(figures.cluster)} for the "
            "cluster: a fast target gets more, so its CPU window spans enough clock ticks). "
            "req/s counts 2xx responses; CPU is user+system time of every serving process and "
            "its children over the measured window, per 2xx response."
        ),
        _summary_table(figures),
        Paragraph("CPU per request by tier (cluster), beside the anchor:"),
        _tier_table(figures),
        Paragraph("Ratios (same run):"),
        Bullets(
            (
                f"throughput, cluster ÷ hello: **{_times(figures.throughput_ratio)}**",
                f"CPU µs/request, cluster ÷ hello: **{_times(figures.cpu_ratio)}**",
                f"CPU µs/request, edge alone ÷ hello: **{_times(figures.edge_cpu_ratio)}**",
            )
        ),
        Paragraph(interpret(figures)),
    ]
    return Section(SECTION_TITLE, tuple(blocks))


def interpret(figures: RequestPathFigures) -> str:
    """A short reading of the numbers, written from them (nothing here is a fixed claim)."""
    hello, cluster = figures.hello, figures.cluster
    if cluster.load.ok == 0 or hello.load.ok == 0:
        return "No comparison: one target served no successful responses in this run."
    parts = [
        f"Through the edge, web, app and Postgres tiers, photostack serves "
        f"{_pct(figures.throughput_ratio)} of the bare hello's request rate and spends "
        f"{_times(figures.cpu_ratio)} its CPU per request "
        f"({fmt(cluster.cpu_us_per_request())} µs vs {fmt(hello.cpu_us_per_request())} µs)."
    ]
    ranked = sorted(
        ((cluster.cpu_us_per_request(t), t) for t in cluster.cpu_s_by_tier), reverse=True
    )
    total = cluster.cpu_us_per_request()
    if len(ranked) >= 2 and total > 0:
        (top_us, top), (second_us, second) = ranked[0], ranked[1]
        parts.append(
            f"The {top} tier costs the most ({_pct(top_us / total)} of the cluster's CPU per "
            f"request), then {second} ({_pct(second_us / total)})."
        )
    edge = figures.edge_cpu_ratio
    if math.isfinite(edge):
        verdict = "more" if edge >= 1 else "less"
        parts.append(
            f"The edge proxy alone spends {_times(edge)} the CPU of a whole uvicorn hello app "
            f"per request: forwarding a request costs {verdict} than answering it in bare "
            "uvicorn."
        )
    parts += _load_notes(figures)
    coarse = [
        f"{t.label} ({t.cpu_s / figures.clock_tick_s:.0f} ticks)"
        for t in (hello, cluster)
        if t.cpu_s < _MIN_CPU_TICKS * figures.clock_tick_s
    ]
    if coarse:
        parts.append(
            f"CPU times move in {figures.clock_tick_s * 1000:.0f} ms clock ticks and some "
            f"CPU figures rest on few of them: {', '.join(coarse)}; a larger --requests "
            "tightens them."
        )
    parts.append(
        f"The load generator itself used {fmt(hello.loadgen_us_per_request)} µs/request against "
        f"the hello and {fmt(cluster.loadgen_us_per_request)} µs/request against the cluster "
        "(not counted above)."
    )
    return " ".join(parts)


def _load_notes(figures: RequestPathFigures) -> list[str]:
    """What bounded the cluster run's throughput, and whether others shared the machine."""
    cluster = figures.cluster
    ours = cluster.busy_fraction(figures.cpus)
    machine = cluster.machine_busy_fraction
    busy = machine if math.isfinite(machine) else ours
    if not math.isfinite(busy):
        return []
    notes = []
    if busy >= _SATURATED_FRACTION:
        notes.append(
            f"During the cluster run the {figures.cpus} CPUs were {_pct(busy)} busy, so its "
            "req/s is bound by CPU on this machine; CPU µs/request is the figure that "
            "carries over to other machines."
        )
    else:
        notes.append(
            f"During the cluster run the {figures.cpus} CPUs were only {_pct(busy)} busy, so "
            f"its req/s is bound by per-request latency at concurrency {figures.concurrency}, "
            "not by CPU."
        )
    others = [
        f"{_pct(t.machine_busy_fraction - t.busy_fraction(figures.cpus))} during the "
        f"{'hello' if t is figures.hello else 'cluster'} run"
        for t in (figures.hello, cluster)
        if t.machine_busy_fraction - t.busy_fraction(figures.cpus) >= _NOISY_FRACTION
    ]
    if others:
        notes.append(
            f"Processes outside the benchmark kept the CPUs busy too ({', '.join(others)}): "
            "these figures carry that noise; rerun on a quiet machine to compare runs."
        )
    return notes


def _summary_table(figures: RequestPathFigures) -> Table:
    rows = []
    for target in (figures.hello, figures.cluster):
        load = target.load
        label = target.label + (" (duration cap hit)" if load.hit_duration_cap else "")
        errors = str(load.errors) + (f" ({load.error_detail})" if load.error_detail else "")
        rows.append(
            (
                label,
                fmt(load.requests_per_s),
                fmt(load.p50_ms, 2),
                fmt(load.p99_ms, 2),
                fmt(target.cpu_us_per_request()),
                errors,
            )
        )
    return Table(("target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors"), tuple(rows))


def _tier_table(figures: RequestPathFigures) -> Table:
    cluster, hello = figures.cluster, figures.hello
    total_us = cluster.cpu_us_per_request()
    hello_us = hello.cpu_us_per_request()
    rows = []
    for tier in cluster.cpu_s_by_tier:
        us = cluster.cpu_us_per_request(tier)
        rows.append(
            (
                tier,
                str(cluster.processes_by_tier.get(tier, 0)),
                fmt(us),
                _pct(_ratio(us, total_us)),
                _times(_ratio(us, hello_us)),
            )
        )
    rows.append(
        (
            "**cluster total**",
            str(sum(cluster.processes_by_tier.values())),
            fmt(total_us),
            "100%",
            _times(_ratio(total_us, hello_us)),
        )
    )
    rows.append(
        (
            f"{HELLO_TIER} (anchor)",
            str(sum(hello.processes_by_tier.values())),
            fmt(hello_us),
            "",
            _times(1.0),
        )
    )
    rows.append(("load generator, cluster run", "1", fmt(cluster.loadgen_us_per_request), "", ""))
    return Table(("tier", "processes", "CPU µs/req", "share", "÷ hello"), tuple(rows))


def _error_warning(figures: RequestPathFigures) -> str:
    parts = []
    for target in (figures.hello, figures.cluster):
        if target.load.errors:
            parts.append(f"{target.label}: {target.load.errors} ({target.load.error_detail})")
    return (
        "**Warning: this run had errors** — "
        + "; ".join(parts)
        + ". Throughput and CPU per request count 2xx responses only."
    )


def _measured(target: TargetFigures) -> str:
    load = target.load
    return f"{load.ok + load.errors:,} in {load.elapsed_s:.1f} s"


def _per_request_us(cpu_s: float, ok: int) -> float:
    return cpu_s / ok * 1e6 if ok > 0 else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return math.nan
    return numerator / denominator


def _times(ratio: float) -> str:
    """A ratio to three significant digits (0.0252, 5.98, 69.0), whole from 100 up."""
    if not math.isfinite(ratio):
        return "n/a"
    if abs(ratio) >= 100:
        return f"{ratio:,.0f}{TIMES}"
    digits = max(0, 2 - math.floor(math.log10(abs(ratio)))) if ratio else 2
    return f"{ratio:.{digits}f}{TIMES}"


def _pct(fraction: float) -> str:
    """Whole percents, one decimal below 10%."""
    if not math.isfinite(fraction):
        return "n/a"
    return (
        f"{fraction * 100:.1f}%" if abs(fraction) < 0.1 and fraction else f"{fraction * 100:.0f}%"
    )
