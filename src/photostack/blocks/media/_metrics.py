"""Plain counters rendered as Prometheus text at scrape time (nothing but ``+= 1`` per request)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

__all__ = ["CONTENT_TYPE", "Counters"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Counters:
    """Named counters (optionally with one label) and gauges read at scrape time."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.values: Counter[tuple[str, str]] = Counter()
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []
        self._help: dict[str, str] = {}

    def describe(self, name: str, text: str) -> None:
        self._help[name] = text

    def inc(self, name: str, label: str = "", amount: int = 1) -> None:
        self.values[(name, label)] += amount

    def get(self, name: str, label: str = "") -> int:
        return self.values[(name, label)]

    def gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        self._gauges.append((name, text, read))

    def render(self, label_name: str = "kind") -> bytes:
        lines: list[str] = []
        names = sorted({name for name, _ in self.values} | set(self._help))
        for name in names:
            full = f"{self.prefix}_{name}_total"
            lines.append(f"# HELP {full} {self._help.get(name, name)}")
            lines.append(f"# TYPE {full} counter")
            rows: Iterable[tuple[str, int]] = sorted(
                (label, value) for (n, label), value in self.values.items() if n == name
            )
            for label, value in rows:
                where = f'{{{label_name}="{label}"}}' if label else ""
                lines.append(f"{full}{where} {value}")
        for name, text, read in self._gauges:
            full = f"{self.prefix}_{name}"
            lines += [f"# HELP {full} {text}", f"# TYPE {full} gauge", f"{full} {read()}"]
        return ("\n".join(lines) + "\n").encode()
