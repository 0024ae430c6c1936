"""``workers``: every worker stopped, uploads are still acknowledged and queued; when the workers
start again every task completes, none is lost and none ran twice (DESIGN.md section 6.4)."""

from __future__ import annotations

import asyncio
import io
import uuid
from typing import Any

import httpx
from PIL import Image

from photostack.ops._drill_base import DrillContext, Scenario
from photostack.ops._drill_model import LoadLog, Op, ScenarioResult, equals, holds
from photostack.ops.client import ControlError

__all__ = ["WORKERS"]

UPLOADS = 4
_POLL_S = 0.3


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    image = Image.linear_gradient("L").resize((160 + seed, 120)).convert("RGB")
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


async def _workers(ctx: DrillContext) -> ScenarioResult:
    summary = WORKERS.summary
    workers = [n["name"] for n in await ctx.control.nodes_of("worker")]
    if not workers:
        return ScenarioResult.skipped("workers", summary, "the topology has no worker nodes")
    log = LoadLog()
    started = ctx.clock()
    async with ctx.api() as api:
        r = await api.post("/v1/users", json={"username": f"drill_w_{uuid.uuid4().hex[:10]}"})
        r.raise_for_status()
        auth = {"Authorization": f"Bearer {r.json()['token']}"}
        try:
            for name in workers:
                await ctx.control.command(name, "stop")
            ctx.out(f"  stopped {', '.join(workers)}; uploading {UPLOADS} photos")
            made = [await _upload(api, auth, log, ctx, i) for i in range(UPLOADS)]
            accepted = [m for m in made if m is not None]
            queued = [await _task(api, auth, m["task"]["id"]) for m in accepted]
        finally:
            for name in workers:
                try:
                    await ctx.control.command(name, "start")
                except ControlError as exc:  # already started: nothing to heal
                    ctx.out(f"  start {name}: {exc}")
        restarted_s = ctx.clock()
        done = await _wait_done(ctx, api, auth, [m["task"]["id"] for m in accepted])
        complete_s = ctx.clock() - restarted_s
        photos = [await api.get(f"/v1/photos/{m['photo']['id']}") for m in accepted]
    ready = [p for p in photos if p.status_code == 200 and p.json()["status"] == "ready"]
    succeeded = [t for t in done if t.get("status") == "succeeded"]
    twice = [t for t in done if int(t.get("attempts", 0)) > 1]
    checks = [
        equals("uploads acknowledged (202) with workers down", UPLOADS, len(accepted)),
        equals(
            "tasks queued while workers are down",
            len(accepted),
            sum(1 for t in queued if t.get("status") == "queued"),
        ),
        holds(
            "every task completes after the workers start",
            f"{len(accepted)} succeeded, photos ready",
            f"{len(succeeded)} succeeded, {len(ready)} ready in {complete_s:.1f} s",
            len(succeeded) == len(ready) == len(accepted) == UPLOADS,
        ),
        equals("tasks that ran more than once", 0, len(twice)),
    ]
    figures = {
        "writes_resume_s": 0.0 if len(accepted) == UPLOADS else None,
        "requests": len(log.ops),
        "requests_failed": len(log.failed()),
        "acknowledged_writes": len(accepted),
        "acknowledged_writes_missing": len(accepted) - len(ready),
        "stale_reads": 0,
        "stale_reads_marked": 0,
        "complete_after_start_s": round(complete_s, 2),
        "workers": workers,
    }
    return ScenarioResult.judged(
        "workers", summary, checks, figures, duration_s=ctx.clock() - started
    )


async def _upload(
    api: httpx.AsyncClient, auth: dict[str, str], log: LoadLog, ctx: DrillContext, i: int
) -> dict[str, Any] | None:
    started = ctx.clock()
    try:
        r = await api.post(
            "/v1/photos",
            headers=auth,
            files={"file": (f"drill-{i}.jpg", _jpeg(i), "image/jpeg")},
            data={"caption": f"drill {i}"},
        )
    except httpx.HTTPError as exc:
        log.record(Op("upload", started, ctx.clock(), False, None, type(exc).__name__))
        return None
    ok = r.status_code == 202
    log.record(Op("upload", started, ctx.clock(), ok, r.status_code, "" if ok else r.text[:80]))
    return dict(r.json()) if ok else None


async def _task(api: httpx.AsyncClient, auth: dict[str, str], task_id: str) -> dict[str, Any]:
    r = await api.get(f"/v1/tasks/{task_id}", headers=auth)
    return dict(r.json()) if r.status_code == 200 else {"id": task_id, "status": r.status_code}


async def _wait_done(
    ctx: DrillContext, api: httpx.AsyncClient, auth: dict[str, str], task_ids: list[str]
) -> list[dict[str, Any]]:
    end = ctx.clock() + ctx.options.recover_deadline_s
    while True:
        found = [await _task(api, auth, t) for t in task_ids]
        final = {"succeeded", "failed", "dead"}
        if all(t.get("status") in final for t in found) or ctx.clock() >= end:
            return found
        await asyncio.sleep(_POLL_S)  # polling task status under a deadline


WORKERS = Scenario(
    "workers",
    "stop every worker: uploads still acknowledged and queued, all complete after start (6.4)",
    _workers,
)
