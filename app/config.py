"""Declarative configuration, validated when loaded, with errors that name the field.

``DetectorConfig`` is the ``user_config`` of the detector deployment: changing it
in the Serve config and running ``serve deploy`` again reconfigures live replicas
(batch size, timeout, thresholds, model alias) without restarting them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.constants import Backend, check_model_name
from app.errors import ConfigError
from app.imaging import DEFAULT_MAX_IMAGE_PIXELS


class DetectorConfig(BaseModel):
    """What one detector serves and how it batches (Triton's model config, in spirit)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("demo-detector", description="registered model name in the MLflow repository")
    version: str | None = Field(None, description="pin a model version; wins over alias")
    alias: str | None = Field("production", description="follow this registry alias when no version is pinned")
    backend: Backend = "onnx"
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], description="variants that may be loaded")
    max_batch_size: int = Field(8, ge=1, description="largest batch the batcher forms (Serve set_max_batch_size)")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0, description="how long a partial batch waits for more")
    resident_variants: int = Field(2, ge=1, le=8, description="variants kept loaded at once when memory allows")
    engine_instances: int = Field(1, ge=1, le=16, description="engine instances per replica = concurrent batches (CME)")
    conf_threshold: float = Field(0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(0.45, ge=0.0, le=1.0)
    max_detections: int = Field(300, ge=1, le=10000)
    layout: Literal["auto", "yolov8", "yolov5"] = "auto"
    labels: list[str] | None = Field(None, description="class names; default from the model version's tags")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024,
                                description="request bodies above this get 413 (v2: also after decompression)")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1, le=1 << 30,
                                  description="images whose header declares more pixels get 400, before decoding")
    auth_inference: bool = Field(False, description="inference (/v1/detect, /v2 infer) needs the API bearer token too")
    deadline_s: float = Field(3.0, gt=0, le=600, description="a request's time budget when the client gives none: "
                              "one that cannot start in time is refused at once (503 + Retry-After)")
    max_deadline_s: float = Field(30.0, gt=0, le=3600, description="the longest budget a client may ask for "
                                  "(X-Request-Timeout header, or the v2 'timeout' parameter)")
    intra_op_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime threads per engine; unset = all cores but one in a replica")
    intra_op_spinning: bool = Field(
        False,
        description="let ONNX Runtime's idle threads spin: a little lower latency on a free core, but they "
        "burn the CPU that decoding, NMS and the HTTP proxy need on a small edge box",
    )
    cuda_graphs: bool = Field(False, description="torch backend: replay each batch size from a captured CUDA graph "
                              "(needs a CUDA GPU: a CPU node refuses the variant rather than ignore it)")
    alias_poll_s: float = Field(5.0, ge=0.0, description="how often to check whether the alias moved (0 = never)")
    tracking_uri: str | None = Field(None, description="MLflow URI; default MLFLOW_TRACKING_URI or the local state folder")

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str | None:
        """MLflow versions are positive integers; YAML's ``version: 3`` is as good as ``"3"``."""
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).strip().isdigit() or int(v) < 1:
            raise ValueError(f"must be a positive integer model version (as in `edgebatch models list`), got {v!r}")
        return str(int(v))

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError("must be a non-empty list of positive integers")
        return sorted(set(v))

    @model_validator(mode="after")
    def _max_in_range(self) -> DetectorConfig:
        if self.max_batch_size > max(self.batch_sizes):
            raise ValueError(
                f"max_batch_size {self.max_batch_size} exceeds the largest variant in batch_sizes "
                f"{self.batch_sizes}; add a larger variant or lower max_batch_size"
            )
        if self.cuda_graphs and self.backend != "torch":
            raise ValueError(f"cuda_graphs is a knob of the torch backend, not of {self.backend}; "
                             "set backend: torch or drop cuda_graphs")
        return self

    def variant_for(self, n: int) -> int:
        """Smallest allowed variant batch size that holds ``n`` items."""
        for s in self.batch_sizes:
            if s >= n:
                return s
        return self.batch_sizes[-1]


def parse_config(model: type[BaseModel], data: dict[str, Any] | None, where: str = "config") -> Any:
    """Validate ``data`` into ``model``; a ``ConfigError`` names every bad field."""
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")  # our validators' messages name the field
            problems.append(f"{where}.{loc}: {msg}" if loc else f"{where}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
