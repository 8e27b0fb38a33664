"""Where a replica's variants come from: the MLflow repository, through its per-node cache."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from app.config import DetectorConfig
from app.engines import create_engine
from app.engines.base import Engine, ModelVariant
from app.state import StateDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """A model version pinned for the life of one VariantPool."""

    name: str
    version: str
    labels: list[str]
    input_size: tuple[int, int]


class RegistryModelSource:
    """Resolves name + version/alias and loads one engine per batch size from the registry."""

    def __init__(self, config: DetectorConfig, state: StateDir, spare_cores: int = 0) -> None:
        """``spare_cores``: when ``config.intra_op_threads`` is unset, give ONNX Runtime all cores but
        these. A serving replica leaves one to decoding, NMS and HTTP, which run beside the engine
        (on 2 cores, 1 engine thread served 35% more images/s over HTTP than ORT's default of 2);
        a sequential bench leaves none."""
        from model_registry.repository import ModelRepository

        self.config = config
        self.spare_cores = spare_cores
        self.engine_instances = config.engine_instances
        self.repo = ModelRepository(config.tracking_uri or None, state=state, reader=True)

    def resolve(self) -> ResolvedModel:
        c = self.config
        version = self.repo.resolve(c.model, version=c.version, alias=None if c.version else c.alias)
        variants = self.repo.list_variants(c.model, version=version)
        labels = list(c.labels or [])
        input_size: tuple[int, int] | None = None
        for v in variants:
            if not labels and v.tags.get("labels"):
                labels = list(json.loads(v.tags["labels"]))
            if v.backend == c.backend and len(v.input_shape) == 4:
                shape = v.input_shape
                input_size = (shape[2], shape[3]) if shape[1] in (1, 3) else (shape[1], shape[2])
        if input_size is None:
            input_size = (320, 320)
        return ResolvedModel(c.model, version, labels, input_size)

    def set_engine_instances(self, n: int) -> None:
        """Engines loaded from now on share the cores among ``n`` instances (see ``engine_threads``)."""
        self.engine_instances = n

    def loader(self, model: ResolvedModel):
        """A VariantLoader bound to one resolved version."""

        def load(batch_size: int) -> tuple[Engine, ModelVariant]:
            variant = self.repo.find(model.name, version=model.version, batch_size=batch_size, backend=self.config.backend)
            options = {}
            threads = self.config.intra_op_threads
            if not threads and self.spare_cores:
                threads = engine_threads(os.cpu_count() or 1, self.spare_cores, self.engine_instances)
            if threads:
                options["intra_op_num_threads"] = threads
            options["allow_spinning"] = self.config.intra_op_spinning
            if self.config.cuda_graphs:
                options["cuda_graphs"] = True
            engine = create_engine(variant.backend, Path(variant.path), options=options)
            log.info("loaded %s v%s batch %d (%s) from %s", model.name, model.version, batch_size, variant.backend, variant.path)
            return engine, variant

        return load


def engine_threads(cores: int, spare_cores: int, instances: int) -> int:
    """ONNX Runtime threads per engine instance when the config sets none: all cores but ``spare_cores``,
    shared among the instances (rounded up, at least one each), so two instances on a 2-core box run one
    thread each instead of oversubscribing the cores the decoding and the HTTP front end need."""
    return max(1, -(-(cores - spare_cores) // max(1, instances)))


def local_detector(config: DetectorConfig, state: StateDir | None = None, spare_cores: int = 0):
    """A Detector in this process, loading variants through the repository (bench, streams, tests);
    ``spare_cores=1`` gives its engines the threads a serving replica's get."""
    from app.detector import Detector

    source = RegistryModelSource(config, state or StateDir.default(), spare_cores=spare_cores)
    model = source.resolve()
    detector = Detector(config, source.loader(model), labels=model.labels, input_size=model.input_size,
                        model=model.name, version=model.version)
    return detector, model, source
