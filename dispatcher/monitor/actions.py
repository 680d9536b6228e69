"""The actions: cancel a workflow, replay failed events (the monitor token only)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from dispatcher.monitor.auth import Guards
from dispatcher.monitor.params import FORBIDDEN, NO_BROKER, NOT_FOUND_WORKFLOW, NOT_RUNNING, UNREADABLE_BODY, WorkflowId
from dispatcher.replay import Selector, cancel, replay
from dispatcher.store import Store
from schemas.api import ActionResult, ReplayRequest
from transport.interface import Transport


def router(store: Store, broker: Transport | None, guards: Guards) -> APIRouter:
    api = APIRouter()
    act = guards.act

    @api.post(
        "/api/workflows/{workflow_id}/cancel",
        dependencies=act,
        response_model=ActionResult,
        responses={**FORBIDDEN, **NOT_FOUND_WORKFLOW, **NOT_RUNNING, **NO_BROKER},
    )
    async def api_cancel(workflow_id: WorkflowId) -> ActionResult:
        if broker is None:
            raise HTTPException(503, "RabbitMQ is not configured for this monitor")
        jobs = await cancel(store, broker, workflow_id)
        if jobs is None:
            if not await store.workflow_exists(workflow_id):
                raise HTTPException(404, f"no workflow {workflow_id}")
            raise HTTPException(409, f"workflow {workflow_id} is not running")
        return ActionResult(ok=True, detail=f"cancelled workflow {workflow_id}: {len(jobs)} job(s) stopped")

    @api.post(
        "/api/replay",
        dependencies=act,
        response_model=ActionResult,
        responses={**UNREADABLE_BODY, **FORBIDDEN, **NO_BROKER},
    )
    async def api_replay(body: ReplayRequest) -> ActionResult:
        if broker is None:
            raise HTTPException(503, "RabbitMQ is not configured for this monitor")
        selector = Selector(workflow=body.workflow, task=body.task, job=body.job, event=body.event, reason=body.reason)
        outcomes = await replay(store, broker, selector, limit=body.limit, dry_run=body.dry_run)
        n = sum(o.action in ("replayed", "would replay") for o in outcomes)
        return ActionResult(
            ok=True,
            detail=f"{'would replay' if body.dry_run else 'replayed'} {n} event(s)",
            lines=[o.describe() for o in outcomes],
        )

    return api
