"""The batch controller over HTTP at ``/v1/batch``: its status (GET, open like every status read) and
the operator's changes (PUT/DELETE, which need the API token like every other write).

These are the routes the console uses; each calls the same controller method as `edgebatch batch`
(``set_fixed``, ``set_manual``, ``set_policy``), which reaches the controller by Serve handle.
"""

# no `from __future__ import annotations`: FastAPI must see real types (Request) on the routes

from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from app.security.auth import TokenCheck
from deployments.http import CollectionPath, error_responses, install_error_handlers, read_json_model, require_token_for_writes

api = FastAPI(title="edgebatch batch controller", description="Batch size per detector: pin it, or let a policy adapt it",
              dependencies=[Depends(require_token_for_writes(TokenCheck()))])
install_error_handlers(api)
api.add_middleware(CollectionPath)


class SizeRequest(BaseModel):
    """``PUT /v1/batch/{model}/size``: pin this size (`edgebatch batch set MODEL N`)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(..., ge=1, le=4096)


class PolicyRequest(BaseModel):
    """``PUT /v1/batch/{model}/policy``: `edgebatch batch auto MODEL --policy P --fps F --param k=v`,
    or ``manual`` (`edgebatch batch manual MODEL`: observe only, releases a pin)."""

    model_config = ConfigDict(extra="forbid")

    policy: str = Field(..., min_length=1, max_length=64)
    fps: float | None = Field(None, gt=0, le=1000)
    params: dict[str, float | int | None] = Field(default_factory=dict)


class ControllerRoutes:
    """Mixed into ``BatchController``: the methods called here are its operator API."""

    @api.get("/")
    async def http_status(self) -> dict:
        return await self.status()

    @api.put("/{model}/size", responses=error_responses(400, 401, 404, 503))
    async def http_pin(self, model: str, request: Request) -> dict:
        body = await read_json_model(request, SizeRequest, '{"batch_size": 8}')
        return await self.set_fixed(model, body.batch_size)

    @api.delete("/{model}/size", responses=error_responses(401, 404, 503))
    async def http_release(self, model: str) -> dict:
        """Release a pinned size: the controller goes back to observing; the size stays as it is."""
        return await self.set_manual(model)

    @api.put("/{model}/policy", responses=error_responses(400, 401, 404, 503))
    async def http_policy(self, model: str, request: Request) -> dict:
        body = await read_json_model(request, PolicyRequest, '{"policy": "throughput_aware", "fps": 30}')
        params: dict[str, Any] = dict(body.params)
        if body.fps is not None:
            params["fps"] = body.fps
        return await self.set_policy(model, body.policy, **params)
