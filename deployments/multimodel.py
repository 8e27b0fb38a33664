"""The multi-model deployment: many models on one replica under one memory budget (issue 7).

Requests name their model with Ray Serve's multiplexing header
``serve_multiplexed_model_id`` (``POST /v1/multi/infer``) or as the Open Inference
Protocol v2 model name (``POST /v1/multi/v2/models/{name}/infer``); bodies are v2
infer requests. The replica's ``MultiModelHost`` keeps whole models resident while
they fit the byte budget (least recently used evicted) and runs models that do not
fit through their registered split form under the configured loading policy.

Why not ``@serve.multiplexed``: it caps models by COUNT per replica; a budget in
bytes is what an edge device has, so the host does the LRU itself. The header is
still Serve's, so clients and handles (``.options(multiplexed_model_id=...)``) work
unchanged. Without a model name Serve would answer 500; here it is a 400 naming
the header.
"""

# no `from __future__ import annotations`: FastAPI must see real types (Request) on the routes

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from app.config import parse_config
from app.constants import onnx_type
from app.errors import BadRequest, EdgebatchError, NotFound
from app.layered.multimodel import ModelSource, MultiModelConfig, MultiModelHost
from app.security.auth import TokenCheck
from app.state import StateDir
from deployments.decoding import V2BodyDecoder
from deployments.http import install_error_handlers, read_inference_body

log = logging.getLogger("ray.serve")

MODEL_HEADER = "serve_multiplexed_model_id"

api = FastAPI(title="edgebatch multi-model", description="Many models under one memory budget")
install_error_handlers(api)


def registry_resolver(config: MultiModelConfig, state: StateDir) -> Callable[[str], ModelSource]:
    """Model name -> verified local files (whole variant and, if registered, its stages)."""
    from model_registry.repository import ModelRepository, validate_name
    from model_registry.split import find_stages

    repo = ModelRepository.from_env(state)

    def resolve(name: str) -> ModelSource:
        validate_name(name)
        if config.models and name not in config.models:
            raise NotFound(f"model {name!r} is not served by this deployment; served: {', '.join(config.models)} "
                           "(user_config.models)")
        version = None
        if config.alias:
            try:
                version = repo.resolve(name, alias=config.alias)
            except NotFound:
                version = None  # no such alias on this model: serve its latest version
        version = version or repo.resolve(name)
        whole = repo.find(name, version=version, batch_size=config.batch_size, backend="onnx")
        try:
            stages = find_stages(repo, name, version, batch_size=config.batch_size, stages=config.stages)
        except NotFound:
            stages = []  # no split registered: the model can only run whole
        return ModelSource(name, version, Path(whole.path), tuple(stages))

    return resolve


@serve.deployment(name="MultiModel", max_ongoing_requests=32, graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class MultiModelDeployment:
    """One ``MultiModelHost`` per replica; ``user_config`` sets budget, policy and order (live)."""

    def __init__(self) -> None:
        self._state = StateDir.default()
        self._token = TokenCheck(self._state)
        self._v2_decoder = V2BodyDecoder(ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgebatch-decode"))
        self._host: MultiModelHost | None = None
        self._config: MultiModelConfig | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = parse_config(MultiModelConfig, user_config, "user_config")
        options = {"intra_op_num_threads": config.intra_op_threads} if config.intra_op_threads else None
        host = MultiModelHost(config.budget_bytes, registry_resolver(config, self._state), policy=config.policy,
                              order=config.order, options=options)
        host.start()
        old, self._host, self._config = self._host, host, config
        if old is not None:
            await asyncio.get_running_loop().run_in_executor(None, old.close)
        log.info("multi-model host: budget %.1f MB, %s loading, %s order", config.budget_mb, config.policy,
                 config.order)

    def __del__(self) -> None:
        if self._host is not None:
            self._host.close()

    def _require_host(self) -> MultiModelHost:
        if self._host is None:
            raise EdgebatchError("the multi-model host is not configured yet; retry in a moment", status=503)
        return self._host

    async def _signature(self, name: str):
        from app.oip import ModelSignature, TensorSpec

        host = self._require_host()
        source, inputs, outputs = await asyncio.get_running_loop().run_in_executor(None, host.describe, name)
        return source, ModelSignature(
            name=name, versions=[source.version], platform="onnxruntime_onnx",
            inputs=[TensorSpec(n, onnx_type(t).datatype, shape) for n, (shape, t) in inputs.items()],
            outputs=[TensorSpec(n, onnx_type(t).datatype, [d if d > 0 else -1 for d in shape])
                     for n, (shape, t) in outputs.items()],
            max_batch_size=0,
        )

    async def _infer(self, name: str, request: Request, version: str | None = None) -> Response:
        from app.oip import encode_infer_response

        config = self._config or MultiModelConfig()
        body = await read_inference_body(request, config.max_body_bytes, self._token, config.auth_inference)
        source, sig = await self._signature(name)
        if version is not None and version != source.version:
            raise NotFound(f"model {name} is served at version {source.version}, not {version}")
        # every client mistake is a BadRequest here; large JSON is parsed off the event loop
        req = await self._v2_decoder.decode(body, request.headers, sig, config.max_body_bytes)
        outcome = await asyncio.wrap_future(self._require_host().submit(name, req.inputs))
        payload, headers = encode_infer_response(name, source.version, outcome.outputs, req)
        headers = {**headers, "X-Edgebatch-Mode": outcome.mode,
                   "X-Edgebatch-Evicted": ",".join(outcome.evicted)}
        return Response(content=payload, headers=headers,
                        media_type=headers.get("Content-Type", "application/json"))

    @api.post("/infer")
    async def infer(self, request: Request) -> Response:
        name = serve.get_multiplexed_model_id() or request.headers.get(MODEL_HEADER, "")
        if not name:
            raise BadRequest(f"no model named: set the HTTP header {MODEL_HEADER}: NAME (or use "
                             "/v1/multi/v2/models/NAME/infer)")
        return await self._infer(name, request)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        return await self._infer(name, request, version)

    @api.get("/v2/models/{name}")
    async def v2_model(self, name: str) -> Response:
        from app.oip import model_metadata

        _, sig = await self._signature(name)
        return JSONResponse(model_metadata(sig))

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        return Response(status_code=200 if self._host is not None else 503)

    @api.get("/info")
    async def http_info(self) -> dict:
        return self.info()

    def info(self) -> dict:
        """Budget, resident models (LRU first), per-model mode and measured costs, counters."""
        host = self._require_host()
        return {**host.info(), "config": self._config.model_dump() if self._config else None}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The ``edgebatch-multimodel`` application (import_path ``deployments.multimodel:build_app``)."""
    return MultiModelDeployment.bind()


__all__ = ["MODEL_HEADER", "MultiModelDeployment", "build_app", "registry_resolver"]
