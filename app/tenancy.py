"""Multi-tenancy as configuration: which models run where, how many at once, on what share.

Two ideas from the edge multi-tenancy research (Hao, Subedi, Ramaswamy, Kim):

* CME, concurrent model executions: k replicas of a model on one device, each asking
  Ray for 1/k of it (``num_gpus`` or an ``edgetpu`` share), and ``engine_instances``
  concurrent batches inside each replica.
* DMP, dynamic model placement: nodes carry tags (``gpu``, ``edgetpu``, ``jetson``,
  ``x86``, ``cpu``) declared as Ray custom resources by their own ``ray start
  --resources``; each model lists where it may run and with which backend variant,
  and requests are spread across its placements by capacity.

This module is the schema only (plain pydantic, no Ray): ``deployments/tenancy.py``
turns it into Serve deployments, ``policies/placement.py`` decides route weights.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config import DetectorConfig, parse_config
from app.constants import Backend, check_model_name

TAG_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
PLACEMENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")

# The device resource a placement shares among its CME replicas, by node tag: Ray's own
# GPU count for GPUs (num_gpus), a custom "edgetpu" count declared by Coral hosts.
DEFAULT_DEVICE_RESOURCE: dict[str, str] = {"gpu": "GPU", "jetson": "GPU", "edgetpu": "edgetpu"}
NODE_PRESENCE_SHARE = 0.001  # a replica asks this much of its node-tag resource: presence, not capacity


def tag_resource(tag: str) -> str:
    """The Ray custom resource that says "this node has tag ``tag``": ``gpu`` -> ``gpu_node``."""
    return f"{tag}_node"


class DeviceShare(BaseModel):
    """A fractional share of one device per replica (CME): k replicas each ask 1/k."""

    model_config = ConfigDict(extra="forbid")

    resource: str = Field(description="'GPU' (Ray num_gpus) or a custom resource such as 'edgetpu'")
    share: float | None = Field(None, gt=0.0, le=1.0, description="per replica; default 1/replicas_per_device")

    @field_validator("resource")
    @classmethod
    def _resource(cls, v: str) -> str:
        if not v or not re.match(r"^[A-Za-z][A-Za-z0-9_:.-]{0,63}$", v):
            raise ValueError("must be 'GPU' or a Ray custom resource name such as 'edgetpu'")
        return v


class PlacementSpec(BaseModel):
    """One place a model may run: a node tag, a backend variant, and its concurrency level."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="unique per model; default the tag")
    tag: str = Field(description="node tag: gpu, edgetpu, jetson, x86, cpu or your own")
    backend: Backend = Field("onnx", description="variant to load there: tensorrt (GPU), edgetpu/tflite, onnx")
    devices: int = Field(1, ge=1, le=64, description="how many devices of this tag to use")
    replicas_per_device: int = Field(1, ge=1, le=64, description="CME concurrency level k on one device")
    engine_instances: int = Field(1, ge=1, le=16, description="concurrent batches inside each replica")
    device: DeviceShare | None = Field(
        None, description="device share per replica; default GPU for gpu/jetson, edgetpu for edgetpu, none else"
    )
    num_cpus: float = Field(0.0, ge=0.0, le=64.0, description="Ray num_cpus per replica")
    throughput_items_s: float | None = Field(
        None, gt=0.0, description="measured items/s of this placement (edgebatch bench sweep); routes by capacity"
    )
    instance_memory_mb: float | None = Field(None, gt=0.0, description="device memory one replica holds")
    device_memory_mb: float | None = Field(None, gt=0.0, description="memory of one device of this tag")
    alias: str | None = Field(None, description="registry alias this placement serves (default the model's): "
                                                "a TensorRT plan is built on, and valid for, one kind of device")
    version: str | None = Field(None, description="pin a model version for this placement; wins over alias")
    user_config: dict[str, Any] = Field(default_factory=dict, description="DetectorConfig overrides")

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        if not TAG_RE.match(v):
            raise ValueError("must be a lowercase tag like gpu, edgetpu, jetson, x86 or cpu")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not PLACEMENT_NAME_RE.match(v):
            raise ValueError("must be lowercase letters, digits, '_' or '-' (up to 32)")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> PlacementSpec:
        if self.name is None:
            self.name = self.tag
        if self.device is None and self.tag in DEFAULT_DEVICE_RESOURCE:
            self.device = DeviceShare(resource=DEFAULT_DEVICE_RESOURCE[self.tag])
        if self.device is not None and self.device.share is None:
            self.device = DeviceShare(resource=self.device.resource, share=1.0 / self.replicas_per_device)
        if self.device is not None and self.device.share is not None:
            if self.device.share * self.replicas_per_device > 1.0 + 1e-9:
                raise ValueError(
                    f"device.share {self.device.share} x replicas_per_device {self.replicas_per_device} exceeds "
                    "one device; lower the share to 1/k or the replicas per device"
                )
        bad = {"model", "backend", "engine_instances", "version", "alias"} & set(self.user_config)
        if bad:
            raise ValueError(f"user_config must not set {sorted(bad)}: they come from the model and placement")
        return self

    @property
    def num_replicas(self) -> int:
        return self.devices * self.replicas_per_device

    def ray_resources(self) -> tuple[float, dict[str, float]]:
        """(num_gpus, custom resources) per replica: node-tag presence plus the device share."""
        custom = {tag_resource(self.tag): NODE_PRESENCE_SHARE}
        num_gpus = 0.0
        if self.device is not None and self.device.share is not None:
            if self.device.resource == "GPU":
                num_gpus = self.device.share
            else:
                custom[self.device.resource] = self.device.share
        return num_gpus, custom

    def capacity(self) -> float:
        """What routing weighs this placement by: measured items/s, else replicas x engine instances."""
        if self.throughput_items_s is not None:
            return self.throughput_items_s
        return float(self.num_replicas * self.engine_instances)


class TenantModel(BaseModel):
    """One registered model and every placement it may serve from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="registered model name in the MLflow repository")
    version: str | None = None
    alias: str | None = "production"
    user_config: dict[str, Any] = Field(default_factory=dict, description="DetectorConfig fields for all placements")
    placements: list[PlacementSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_model_name(v)

    @model_validator(mode="after")
    def _unique(self) -> TenantModel:
        bad = {"model", "backend", "engine_instances", "version", "alias"} & set(self.user_config)
        if bad:
            raise ValueError(f"user_config must not set {sorted(bad)}: set them on the model or its placements")
        names = [p.name for p in self.placements]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"placement names must be unique per model; repeated: {dup} (set placements[].name)")
        return self

    def detector_config(self, placement: PlacementSpec) -> dict[str, Any]:
        """The user_config of one placement's Detector deployment, validated now, not on the node."""
        data = {**self.user_config, **placement.user_config}
        data.update(model=self.name, backend=placement.backend, engine_instances=placement.engine_instances)
        if placement.version is not None or placement.alias is not None:
            data.update(version=placement.version, alias=placement.alias or self.alias)
        else:
            data.update(version=self.version, alias=self.alias)
        where = f"models[{self.name}].placements[{placement.name}].user_config"
        return parse_config(DetectorConfig, data, where).model_dump(exclude_defaults=False)


class TenancyConfig(BaseModel):
    """The whole multi-model application: the ``args`` of ``deployments.tenancy:build_app``."""

    model_config = ConfigDict(extra="forbid")

    models: list[TenantModel] = Field(min_length=1)
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0.0, le=600.0)
    max_ongoing_requests: int = Field(64, ge=1, le=10000, description=">= max_batch_size x engine_instances")
    auth_inference: bool = Field(False, description="/tenancy/<model>/v1/detect needs the API bearer token too")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request bodies above this get 413")
    state_refresh_s: float = Field(1.0, ge=0.1, le=60.0, description="how often the router reads Serve's replica "
                                                                    "states (off the request path)")
    placement_timeout_s: float = Field(10.0, gt=0.0, le=600.0, description="a placement whose running replicas do "
                                                                         "not answer in this long is skipped")
    skip_failed_s: float = Field(15.0, ge=0.0, le=3600.0, description="how long a failed placement is skipped, "
                                                                     "unless Serve shows its replicas running again")
    retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After of the 503 when no placement of a model "
                                                             "has a running replica")

    @model_validator(mode="after")
    def _unique(self) -> TenancyConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        return self

    def model(self, name: str) -> TenantModel:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def required_resources(ray_actor_options: dict[str, Any]) -> dict[str, float]:
    """One replica's resource request, keyed as Ray's nodes report them (GPU, CPU, custom)."""
    out = {k: float(v) for k, v in (ray_actor_options.get("resources") or {}).items()}
    if ray_actor_options.get("num_gpus"):
        out["GPU"] = float(ray_actor_options["num_gpus"])
    if ray_actor_options.get("num_cpus"):
        out["CPU"] = float(ray_actor_options["num_cpus"])
    return out


def deployment_name(model: str, placement: str) -> str:
    """The Serve deployment of one (model, placement): ``demo-detector.gpu``."""
    return f"{model}.{placement}"


def split_deployment_name(name: str) -> tuple[str, str] | None:
    """(model, placement) back from a deployment name, or None for other deployments."""
    model, sep, placement = name.rpartition(".")
    if not sep or not PLACEMENT_NAME_RE.match(placement):
        return None
    return model, placement


def parse_tenancy(data: dict[str, Any] | None, where: str = "tenancy") -> TenancyConfig:
    """Validate the tenancy ``args``; a ConfigError names every bad field."""
    return parse_config(TenancyConfig, data, where)
