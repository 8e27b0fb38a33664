"""The ``edgebatch`` app's HTTP ingress: the detector replica plus thin /v1 and /v2 routes.

The routes only translate HTTP into ``DetectRequest`` items for the replica's ``detect`` and
results back into JSON; they run in the replica's own process, so HTTP costs no extra hop
(and Serve's direct ingress reaches the batcher directly). Errors are raised, never caught
here: ``install_error_handlers`` is the one place they become replies.
"""

# no `from __future__ import annotations`: FastAPI must see real types (Request) on the routes

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from app.config import DetectorConfig
from app.constants import DETECTOR_DEPLOYMENT
from app.detector import DetectRequest
from app.errors import NotFound
from app.oip import ModelSignature, TensorSpec, encode_infer_response, model_metadata, server_metadata
from app.security.auth import TokenCheck
from deployments.decoding import V2BodyDecoder
from deployments.detector import DetectorReplica
from deployments.http import error_responses, install_error_handlers, read_inference_body

api = FastAPI(title="edgebatch", description="Batched object detection on Ray Serve")
install_error_handlers(api)

#: The OpenAPI descriptions of what the routes really take and answer (for clients and fuzzers).
DETECT_BODY = {"requestBody": {"required": True, "content": {
    t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png", "application/octet-stream")}}}
V2_INFER_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"],
                       "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                      "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                      "data": {"type": "array"}, "parameters": {"type": "object"}}}},
            "outputs": {"type": "array", "items": {"type": "object"}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "binary tensor data extension: the first "
                                                    "Inference-Header-Content-Length bytes are the JSON header"}}},
    "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 0}}],
}
V2_INFER_RESPONSES = {
    200: {"description": "the outputs: JSON, or JSON header plus raw tensors (binary extension)",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(400, 401, 404, 413, 503),
}


class GuardedBody:
    """The request body under max_body_bytes, after the API token check when inference is guarded
    (``auth_inference``); the v2 JSON is parsed off the event loop (large bodies in a worker)."""

    def __init__(self) -> None:
        super().__init__()  # the replica: its state folder and config
        self._token = TokenCheck(self._state)
        self._v2_decoder = V2BodyDecoder(ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgebatch-decode"))

    async def _body(self, request: Request) -> bytes:
        config = self._config or DetectorConfig()
        return await read_inference_body(request, config.max_body_bytes, self._token, config.auth_inference)


class V1Routes(GuardedBody):
    """``/v1``: an encoded image in, detections out; the model and replica status."""

    @api.post("/v1/detect", responses=error_responses(400, 401, 413, 503), openapi_extra=DETECT_BODY)
    async def v1_detect(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        result = await self.detect(DetectRequest.encoded(body))
        return JSONResponse(result.to_json())

    @api.get("/v1/models")
    async def v1_models(self) -> dict:
        return {"models": [self.info().to_dict()]}

    @api.get("/v1/info")
    async def v1_info(self) -> dict:
        return self.info().to_dict()


class V2Routes(GuardedBody):
    """Open Inference Protocol v2 (KServe / Triton HTTP): letterboxed FP32 rows in, raw outputs out."""

    def _signature(self, name: str, version: str | None) -> ModelSignature:
        m = self.model()
        if name != m.name:
            raise NotFound(f"unknown model '{name}'; this server serves '{m.name}' (GET /v2/models/{m.name})")
        if version not in (None, "", m.version):
            raise NotFound(f"model '{name}' has no loaded version '{version}'; loaded version is '{m.version}'")
        lv = self._require_detector().pool.pick(1)
        return ModelSignature(
            name=m.name,
            versions=[m.version],
            platform="onnxruntime_onnx" if lv.variant.backend == "onnx" else lv.variant.backend,
            inputs=[TensorSpec("images", "FP32", [-1, 3, m.input_size[0], m.input_size[1]])],
            outputs=[TensorSpec("output0", "FP32", [-1, *lv.output_shape[1:]])],
            max_batch_size=max(self._config.batch_sizes) if self._config else 16,
        )

    @api.get("/v2")
    async def v2_server(self) -> dict:
        return server_metadata("edgebatch", "0.1.0", ["binary_tensor_data"])

    @api.get("/v2/health/live")
    async def v2_live(self) -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> Response:
        return Response(status_code=200 if self._detector is not None else 503)

    @api.get("/v2/models/{name}", responses=error_responses(404, 503))
    @api.get("/v2/models/{name}/versions/{version}", responses=error_responses(404, 503))
    async def v2_model(self, name: str, version: str | None = None) -> JSONResponse:
        return JSONResponse(model_metadata(self._signature(name, version)))

    @api.get("/v2/models/{name}/ready", responses=error_responses(404, 503))
    @api.get("/v2/models/{name}/versions/{version}/ready", responses=error_responses(404, 503))
    async def v2_model_ready(self, name: str, version: str | None = None) -> Response:
        self._signature(name, version)
        return Response(status_code=200)

    @api.post("/v2/models/{name}/infer", responses=V2_INFER_RESPONSES, openapi_extra=V2_INFER_BODY)
    @api.post("/v2/models/{name}/versions/{version}/infer", responses=V2_INFER_RESPONSES, openapi_extra=V2_INFER_BODY)
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        body = await self._body(request)  # the token before anything about the model is told
        sig = self._signature(name, version)
        limit = (self._config or DetectorConfig()).max_body_bytes
        req = await self._v2_decoder.decode(body, request.headers, sig, limit)  # every client mistake is a 400
        images = req.inputs["images"]
        results = await asyncio.gather(*(self.detect(DetectRequest.tensor(row)) for row in images))
        output = np.stack([r.output for r in results])
        payload, headers = encode_infer_response(sig.name, sig.versions[0], {"output0": output}, req)
        return Response(content=payload, headers=headers, media_type=headers.get("Content-Type", "application/json"))


@serve.deployment(name=DETECTOR_DEPLOYMENT, max_ongoing_requests=64)
@serve.ingress(api)
class DetectorIngress(V1Routes, V2Routes, DetectorReplica):
    """The detector replica serving HTTP itself (the ``edgebatch`` app's ingress)."""
