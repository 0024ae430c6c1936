"""The structured access log: one JSON object per line per request, written in batches.

Lines are built with one f-string (``json.dumps`` only for strings that need escaping; the
time text once per millisecond) and written in batches, when the buffer passes
``flush_bytes`` or when the server's housekeeping tick calls ``flush()``, so logging costs no
system call per request. (Keeping the fields and formatting a batch at the flush was tried:
it moves the work rather than saving it, and the tuple per entry makes it slightly dearer.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO

__all__ = ["AccessLog", "entry_line", "format_entry"]


def _js(value: str) -> str:
    # Printable ASCII without quote or backslash needs no escaping (all C-level checks).
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return json.dumps(value)


def _num(value: float | None) -> str:
    return "null" if value is None else f"{value:.6f}"


def entry_line(  # noqa: PLR0917 - positional on the hot path: no kwargs dict per request
    time_s: float,
    request_id: str,
    client: str,
    method: str,
    path: str,
    backend: str | None,
    status: int,
    bytes_in: int,
    bytes_out: int,
    upstream_connect_s: float | None,
    upstream_first_byte_s: float | None,
    total_s: float,
    cache: str | None = None,
) -> str:
    """``format_entry`` with positional arguments, in that order."""
    tail = "" if cache is None else f',"cache":{_js(cache)}'
    text = f"{request_id}{client}{method}{path}{backend}"
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        # Nothing to escape (the usual line): one check instead of one per field.
        quoted_backend = "null" if backend is None else f'"{backend}"'
        connect = "null" if upstream_connect_s is None else f"{upstream_connect_s:.6f}"
        first = "null" if upstream_first_byte_s is None else f"{upstream_first_byte_s:.6f}"
        return (
            f'{{"time":{time_s:.3f},"request_id":"{request_id}","client":"{client}",'
            f'"method":"{method}","path":"{path}","backend":{quoted_backend},'
            f'"status":{status},"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
            f'"upstream_connect_s":{connect},"upstream_first_byte_s":{first},'
            f'"total_s":{total_s:.6f}{tail}}}\n'
        )
    return (
        f'{{"time":{time_s:.3f},"request_id":{_js(request_id)},"client":{_js(client)},'
        f'"method":{_js(method)},"path":{_js(path)},'
        f'"backend":{"null" if backend is None else _js(backend)},"status":{status},'
        f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
        f'"upstream_connect_s":{_num(upstream_connect_s)},'
        f'"upstream_first_byte_s":{_num(upstream_first_byte_s)},"total_s":{total_s:.6f}'
        f"{tail}}}\n"
    )


def format_entry(
    *,
    time_s: float,
    request_id: str,
    client: str,
    method: str,
    path: str,
    backend: str | None,
    status: int,
    bytes_in: int,
    bytes_out: int,
    upstream_connect_s: float | None,
    upstream_first_byte_s: float | None,
    total_s: float,
    cache: str | None = None,
) -> str:
    """One JSON line (with its newline)."""
    return entry_line(
        time_s, request_id, client, method, path, backend, status, bytes_in, bytes_out,
        upstream_connect_s, upstream_first_byte_s, total_s, cache,
    )  # fmt: skip


class AccessLog:
    """Appends to ``path`` ("-" is stderr, i.e. the node log)."""

    def __init__(self, path: Path, *, flush_bytes: int = 64 * 1024) -> None:
        self.path = path
        self._flush_bytes = flush_bytes
        self._parts: list[str] = []
        self._size = 0
        self._ms = -1
        self._time_text = ""
        self._handle: IO[str] | None = None
        if str(path) == "-":
            self._handle = sys.stderr
            self._owned = False
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._handle = os.fdopen(fd, "a", encoding="utf-8")
            self._owned = True

    def add(  # noqa: PLR0917 - positional on the hot path
        self,
        time_s: float,
        request_id: str,
        client: str,
        method: str,
        path: str,
        backend: str | None,
        status: int,
        bytes_in: int,
        bytes_out: int,
        upstream_connect_s: float | None,
        upstream_first_byte_s: float | None,
        total_s: float,
        cache: str | None,
    ) -> None:
        """Format and buffer one entry: ``write(entry_line(...))``, with the time text
        formatted once per millisecond (truncated, like nginx's $msec)."""
        text = f"{request_id}{client}{method}{path}{backend}{cache}"
        if not (text.isascii() and text.isprintable() and '"' not in text and "\\" not in text):
            line = entry_line(
                time_s, request_id, client, method, path, backend, status, bytes_in,
                bytes_out, upstream_connect_s, upstream_first_byte_s, total_s, cache,
            )  # fmt: skip
        else:
            ms = int(time_s * 1000)
            if ms != self._ms:
                self._ms = ms
                self._time_text = f"{ms / 1000:.3f}"
            quoted_backend = "null" if backend is None else f'"{backend}"'
            connect = (
                "null"
                if upstream_connect_s is None
                else "0.000000"  # a pooled connection, the usual case: no float to format
                if upstream_connect_s == 0.0
                else f"{upstream_connect_s:.6f}"
            )
            first = "null" if upstream_first_byte_s is None else f"{upstream_first_byte_s:.6f}"
            tail = "" if cache is None else f',"cache":"{cache}"'
            line = (
                f'{{"time":{self._time_text},"request_id":"{request_id}","client":"{client}",'
                f'"method":"{method}","path":"{path}","backend":{quoted_backend},'
                f'"status":{status},"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
                f'"upstream_connect_s":{connect},"upstream_first_byte_s":{first},'
                f'"total_s":{total_s:.6f}{tail}}}\n'
            )
        self._parts.append(line)
        self._size += len(line)
        if self._size >= self._flush_bytes:
            self.flush()

    def write(self, line: str) -> None:
        self._parts.append(line)
        self._size += len(line)
        if self._size >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._parts or self._handle is None:
            return
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._handle.write(text)
        self._handle.flush()

    def close(self) -> None:
        self.flush()
        if self._owned and self._handle is not None:
            self._handle.close()
        self._handle = None
