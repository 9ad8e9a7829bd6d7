"""The scheduler's admin routes (served under ``/admin`` behind the admin token).

    GET  /admin/tasks               the task table
    POST /admin/tasks               add a schedule   {"id", "function", "trigger", "args", "kwargs"}
    PATCH /admin/tasks/{id}         change one       {"trigger", "args", "kwargs"}
    DELETE /admin/tasks/{id}        remove one added at runtime
    GET  /admin/tasks/{id}          one task with its recent runs
    GET  /admin/tasks/{id}/runs     its runs from the log, newest first (?limit=&offset=)
    GET  /admin/tasks/{id}/runs/{run_id}         one run
    POST /admin/tasks/{id}/run      run now      (TaskRunRequested -> TaskRunAccepted), 202
    POST /admin/tasks/{id}/runs/{run_id}/cancel  (TaskCancelRequested -> TaskCancelAnswered)
    POST /admin/tasks/{id}/pause    pause        (TaskPauseRequested -> TaskPaused)
    POST /admin/tasks/{id}/resume   resume       (TaskResumeRequested -> TaskResumed)

Requests are events recorded with ``kernel.request``, so the log is the audit trail;
an unknown task id is answered 404 before anything is recorded.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from kernel.contract import error_responses, link
from kernel.errors import RequestTimeout
from kernel.events import Event
from services.scheduler.events import (
    ScheduleApplied,
    TaskCancelAnswered,
    TaskCancelRequested,
    TaskPaused,
    TaskPauseRequested,
    TaskRequestRefused,
    TaskResumed,
    TaskResumeRequested,
    TaskRunAccepted,
    TaskRunRequested,
    stream_of,
)
from services.scheduler.runs import RUN_EVENT_TYPES, fold_runs
from services.scheduler.schedules import ChangeConflict
from services.scheduler.specs import TaskDeclarationError

if TYPE_CHECKING:
    from services.scheduler.service import SchedulerService

__all__ = ["build_router"]


def _actor(request: Request) -> str:
    return f"admin@{request.client.host}" if request.client else "admin"


def build_router(service: SchedulerService) -> APIRouter:
    router = APIRouter(prefix="/tasks", tags=["scheduler"])

    def live(summary: dict[str, Any]) -> dict[str, Any]:
        summary["scheduled"] = service.is_scheduled(summary["id"])
        summary["running"] = service.running(summary["id"])
        return summary

    first = "$response.body#/0/id"
    task_links = {
        "links": {
            f"{verb.title()}FirstTask": link(f"/admin/tasks/{{task_id}}{suffix}", m, task_id=first)
            for verb, suffix, m in (
                ("get", "", "get"),
                ("run", "/run", "post"),
                ("pause", "/pause", "post"),
                ("resume", "/resume", "post"),
            )
        }
    }

    @router.get(
        "",
        summary="Every task: trigger, next and last run, counts, paused",
        responses={200: task_links},
    )
    async def list_tasks() -> list[dict[str, Any]]:
        rows = sorted(service.table.tasks.values(), key=lambda r: r.id)
        return [live(row.summary()) for row in rows]

    @router.get(
        "/{task_id}", summary="One task with its recent runs", responses=error_responses(404)
    )
    async def get_task(task_id: str) -> dict[str, Any]:
        row = service.table.tasks.get(task_id)
        if row is None:
            await service.caught_up()
            row = service.table.tasks.get(task_id)
        if row is None:
            raise HTTPException(404, detail=f"no task {task_id!r}")
        return live(row.detail())

    async def task_runs(task_id: str) -> list[dict[str, Any]]:
        if task_id not in service.table.tasks:
            await service.caught_up()
        if task_id not in service.table.tasks:
            raise HTTPException(404, detail=f"no task {task_id!r}")
        records = await service._kernel().read(stream=stream_of(task_id), types=RUN_EVENT_TYPES)
        return fold_runs(records, time.time())

    @router.get(
        "/{task_id}/runs",
        summary="The task's runs from the log, newest first",
        responses=error_responses(404),
    )
    async def list_runs(
        task_id: str,
        limit: int = Query(50, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        runs = await task_runs(task_id)
        return {
            "task": task_id,
            "total": len(runs),
            "offset": offset,
            "limit": limit,
            "runs": runs[offset : offset + limit],
        }

    @router.get(
        "/{task_id}/runs/{run_id}", summary="One run of the task", responses=error_responses(404)
    )
    async def get_run(task_id: str, run_id: str) -> dict[str, Any]:
        for run in await task_runs(task_id):
            if run["run_id"] == run_id:
                return run
        raise HTTPException(404, detail=f"task {task_id!r} has no run {run_id!r}")

    async def ask(
        request: Request,
        task_id: str,
        event: Event,
        outcomes: list[type[Event]],
        ok: str,
        ok_status: int = 200,
    ) -> JSONResponse:
        if not service.is_scheduled(task_id):
            await service.caught_up()  # a reload answered a moment ago
        if not service.is_scheduled(task_id):
            known = task_id in service.table.tasks
            raise HTTPException(
                404 if not known else 409,
                detail=f"task {task_id!r} is not scheduled" if known else f"no task {task_id!r}",
            )
        kernel = service._kernel()
        try:
            outcome = await kernel.request(
                event,
                stream=stream_of(task_id),
                outcomes=[*outcomes, TaskRequestRefused],
                actor=_actor(request),
            )
        except RequestTimeout as exc:
            raise HTTPException(504, detail=str(exc)) from None
        status = ok_status if outcome.type == ok else 409
        if outcome.type == "TaskCancelAnswered" and outcome.data["status"] != "cancelled":
            status = 409
        body = {"outcome": outcome.type, "position": outcome.position, **outcome.data}
        if status >= 400:  # a refusal: the shared error model's sentence
            body.setdefault("detail", outcome.data.get("reason") or f"refused: {outcome.type}")
        return JSONResponse(body, status_code=status)

    async def change(
        request: Request, kind: str, task_id: str, body: dict[str, Any]
    ) -> JSONResponse:
        try:
            # compiled off the loop: a costly trigger must not stall the other requests
            try:
                event = await asyncio.to_thread(service.check_change, kind, task_id, body)
            except LookupError:
                await service.caught_up()  # a reload answered a moment ago
                event = await asyncio.to_thread(service.check_change, kind, task_id, body)
        except LookupError as exc:
            raise HTTPException(404, detail=str(exc).strip("'\"")) from None
        except TaskDeclarationError as exc:
            status = 409 if isinstance(exc, ChangeConflict) else 400
            raise HTTPException(status, detail=f"task {task_id!r}: {exc}") from None
        try:
            outcome = await service._kernel().request(
                event,
                stream=stream_of(task_id),
                outcomes=[ScheduleApplied, TaskRequestRefused],
                actor=_actor(request),
            )
        except RequestTimeout as exc:
            raise HTTPException(504, detail=str(exc)) from None
        ok = outcome.type == "ScheduleApplied"
        body = {"outcome": outcome.type, "position": outcome.position, **outcome.data}
        if not ok:
            body.setdefault("detail", outcome.data.get("reason") or f"refused: {outcome.type}")
        return JSONResponse(body, status_code=(201 if kind == "add" else 200) if ok else 409)

    @router.post(
        "",
        summary="Add a schedule at runtime (calls a declared task's function)",
        status_code=201,
        responses=error_responses(400, 404, 409, 504),
    )
    async def add_schedule(request: Request, body: dict[str, Any] = Body(...)) -> JSONResponse:
        task_id = body.get("id")
        if not isinstance(task_id, str) or "." not in task_id:
            raise HTTPException(400, detail="give an id like 'plugin.name'")
        return await change(request, "add", task_id, body)

    @router.patch(
        "/{task_id}",
        summary="Change a schedule's trigger or arguments at runtime",
        responses=error_responses(400, 404, 409, 504),
    )
    async def change_schedule(
        task_id: str, request: Request, body: dict[str, Any] = Body(...)
    ) -> JSONResponse:
        return await change(request, "change", task_id, body)

    @router.delete(
        "/{task_id}",
        summary="Remove a schedule added at runtime",
        responses=error_responses(404, 409, 504),
    )
    async def remove_schedule(task_id: str, request: Request) -> JSONResponse:
        return await change(request, "remove", task_id, {})

    @router.post(
        "/{task_id}/run",
        summary="Run the task now (202: accepted, with its place)",
        status_code=202,
        responses=error_responses(404, 409, 504),
    )
    async def run_task(task_id: str, request: Request) -> JSONResponse:
        return await ask(
            request,
            task_id,
            TaskRunRequested(task=task_id),
            [TaskRunAccepted],
            "TaskRunAccepted",
            202,
        )

    @router.post(
        "/{task_id}/runs/{run_id}/cancel",
        summary="Cancel a run in progress",
        responses=error_responses(404, 409, 504),
    )
    async def cancel_run(task_id: str, run_id: str, request: Request) -> JSONResponse:
        return await ask(
            request,
            task_id,
            TaskCancelRequested(task=task_id, run_id=run_id),
            [TaskCancelAnswered],
            "TaskCancelAnswered",
        )

    @router.post(
        "/{task_id}/pause",
        summary="Stop scheduling the task until resumed",
        responses=error_responses(404, 409, 504),
    )
    async def pause_task(task_id: str, request: Request) -> JSONResponse:
        return await ask(
            request, task_id, TaskPauseRequested(task=task_id), [TaskPaused], "TaskPaused"
        )

    @router.post(
        "/{task_id}/resume",
        summary="Schedule the task again",
        responses=error_responses(404, 409, 504),
    )
    async def resume_task(task_id: str, request: Request) -> JSONResponse:
        return await ask(
            request, task_id, TaskResumeRequested(task=task_id), [TaskResumed], "TaskResumed"
        )

    return router
