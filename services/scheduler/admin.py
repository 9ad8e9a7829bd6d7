"""The scheduler's admin routes (served under ``/admin`` behind the admin token).

    GET  /admin/tasks               the task table
    GET  /admin/tasks/{id}          one task with its recent runs
    POST /admin/tasks/{id}/run      run now      (TaskRunRequested -> TaskStarted)
    POST /admin/tasks/{id}/pause    pause        (TaskPauseRequested -> TaskPaused)
    POST /admin/tasks/{id}/resume   resume       (TaskResumeRequested -> TaskResumed)

Requests are events recorded with ``kernel.request``, so the log is the audit trail;
an unknown task id is answered 404 before anything is recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from kernel.contract import error_responses, link
from kernel.errors import RequestTimeout
from kernel.events import Event
from services.scheduler.events import (
    TaskPaused,
    TaskPauseRequested,
    TaskRequestRefused,
    TaskResumed,
    TaskResumeRequested,
    TaskRunRequested,
    TaskSkipped,
    TaskStarted,
    stream_of,
)

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
            raise HTTPException(404, detail=f"no task {task_id!r}")
        return live(row.detail())

    async def ask(
        request: Request, task_id: str, event: Event, outcomes: list[type[Event]], ok: str
    ) -> JSONResponse:
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
        body = {"outcome": outcome.type, "position": outcome.position, **outcome.data}
        if outcome.type != ok:  # a refusal: the shared error model's sentence
            body.setdefault("detail", outcome.data.get("reason") or f"refused: {outcome.type}")
        return JSONResponse(body, status_code=200 if outcome.type == ok else 409)

    @router.post(
        "/{task_id}/run", summary="Run the task now", responses=error_responses(404, 409, 504)
    )
    async def run_task(task_id: str, request: Request) -> JSONResponse:
        return await ask(
            request,
            task_id,
            TaskRunRequested(task=task_id),
            [TaskStarted, TaskSkipped],
            "TaskStarted",
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
