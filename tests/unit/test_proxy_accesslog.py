"""The access log: one JSON line per entry, buffered and written in batches."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.proxy._accesslog import AccessLog, format_entry


def _add(log: AccessLog, **fields: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "time_s": 1795832014.4409,
        "request_id": "rid-1",
        "client": "127.0.0.1",
        "method": "GET",
        "path": "/v1/items",
        "backend": "web-1",
        "status": 200,
        "bytes_in": 88,
        "bytes_out": 184,
        "upstream_connect_s": 0.000321,
        "upstream_first_byte_s": 0.0015,
        "total_s": 0.0021,
        "cache": None,
    }
    entry.update(fields)
    log.add(*entry.values())  # type: ignore[arg-type]
    return entry


def test_entries_are_written_at_the_flush_not_before(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    _add(log)
    _add(log, request_id="rid-2", upstream_connect_s=None, backend=None, status=503)
    assert path.read_text() == ""  # no write per request
    log.flush()
    first, second = map(json.loads, path.read_text().splitlines())
    assert first["upstream_connect_s"] == 0.000321
    assert first["time"] == 1795832014.440  # milliseconds, truncated like nginx's $msec
    assert first["backend"] == "web-1"
    assert second["upstream_connect_s"] is None
    assert second["backend"] is None
    assert second["status"] == 503
    assert "cache" not in first
    log.close()


def test_a_full_buffer_is_flushed_without_waiting_for_the_tick(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path, flush_bytes=500)
    for i in range(3):  # about 300 bytes a line
        _add(log, request_id=f"rid-{i}", cache="HIT")
    lines = path.read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["rid-0", "rid-1"]
    assert json.loads(lines[0])["cache"] == "HIT"
    log.close()
    assert len(path.read_text().splitlines()) == 3


def test_write_keeps_the_order_of_entries_added_before(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    _add(log, request_id="before")
    log.write('{"request_id":"written"}\n')
    _add(log, request_id="after")
    log.close()
    ids = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
    assert ids == ["before", "written", "after"]


@given(st.text(max_size=30), st.text(max_size=30), st.one_of(st.none(), st.floats(0, 10)))
def test_buffered_lines_are_the_formatted_entries(
    path: str, rid: str, connect: float | None
) -> None:
    class Capture(AccessLog):
        def __init__(self) -> None:
            super().__init__(Path("-"))
            self._handle = None  # nothing written; the lines are read from _parts

    log = Capture()
    entry = _add(log, path=path, request_id=rid, upstream_connect_s=connect, time_s=12.5)
    (line,) = log._parts
    assert json.loads(line) == json.loads(format_entry(**entry))  # type: ignore[arg-type]
