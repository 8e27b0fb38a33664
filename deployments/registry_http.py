"""The model registry over HTTP, on the ``edgebatch`` app: ``GET /v1/registry`` (models, versions,
aliases, variants with their hashes: what `edgebatch models list/show` prints) and
``PUT /v1/registry/{name}/aliases/{alias}`` (`edgebatch models promote NAME VERSION --alias ALIAS`:
the same ``ModelRepository.set_alias``, with its name, alias and version checks), which needs the API
token like every other write. A detector that follows the alias rolls to the version by itself.
"""

# no `from __future__ import annotations`: FastAPI must see real types (Request) on the routes

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from app.console.views import registry_view
from app.security.auth import TokenCheck
from app.state import StateDir
from deployments.http import error_responses, read_json_model
from model_registry.repository import ModelRepository

router = APIRouter()


class PromoteRequest(BaseModel):
    """``PUT /v1/registry/{name}/aliases/{alias}``: the version the alias moves to."""

    model_config = ConfigDict(extra="forbid")

    version: int | str = Field(..., description="an existing version number, e.g. 3")


def read_registry(repo: ModelRepository) -> list[dict[str, Any]]:
    """Every model with all its versions and variants (blocking: MLflow calls)."""
    models = repo.list_models()
    return registry_view(models, {m.name: repo.describe(m.name) for m in models})


class RegistryRoutes:
    """Mixed into the ``edgebatch`` app's HTTP gateway, which has the API token check (``self._token``)."""

    _token: TokenCheck

    def _repository(self) -> ModelRepository:
        """The registry `edgebatch models` uses: ``MLFLOW_TRACKING_URI``, else the state folder's SQLite."""
        return ModelRepository.from_env(StateDir.default())

    @router.get("/v1/registry", responses=error_responses(503))
    async def registry(self) -> dict:
        return {"models": await asyncio.to_thread(read_registry, self._repository())}

    @router.put("/v1/registry/{name}/aliases/{alias}", responses=error_responses(400, 401, 404, 503))
    async def promote(self, name: str, alias: str, request: Request) -> dict:
        self._token.require(request.headers, f"PUT {request.url.path}")
        body = await read_json_model(request, PromoteRequest, '{"version": 3}')
        repo = self._repository()
        await asyncio.to_thread(repo.set_alias, name, alias, str(body.version))
        return {"model": name, "alias": alias, "version": await asyncio.to_thread(repo.resolve, name, alias=alias)}
