"""Register the demo detector once, so ``edgebatch demo`` works on a fresh registry.

Also writes a small synthetic detector-shaped ONNX network: the registry bench
and tests need a real ONNX file before (or without) the trained demo asset.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

from app.errors import ConfigError, NotFound
from model_registry.builders import build_onnx_variants, with_labels
from model_registry.repository import ModelRepository

DEMO_MODEL = "demo-detector"
DEMO_BATCH_SIZES = (1, 2, 4, 8, 16)
DEMO_ALIAS = "production"
_DEMO_TAG = "edgebatch.demo_build"


def _production_or_latest(repo: ModelRepository) -> str | None:
    try:
        return repo.resolve(DEMO_MODEL, alias=DEMO_ALIAS)
    except NotFound:
        pass
    try:
        return repo.resolve(DEMO_MODEL)
    except NotFound:
        return None


DEFAULT_ASSETS = Path(__file__).resolve().parents[1] / "app" / "demo" / "assets"


def demo_export(assets_dir: Path | None = None) -> tuple[Path, list[str] | None]:
    """The demo detector's ONNX export and its labels: what `edgebatch models build` builds when no
    SOURCE is given (TensorRT plans of it on a GPU node, or a second tenant registered from it)."""
    assets_dir = Path(assets_dir) if assets_dir is not None else DEFAULT_ASSETS
    onnx_path, meta_path = assets_dir / "detector.onnx", assets_dir / "detector.json"
    if not onnx_path.is_file():
        raise ConfigError(f"the demo detector {onnx_path} is missing; reinstall edgebatch (the file ships in "
                          "app/demo/assets) or pass SOURCE.onnx")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return onnx_path, meta.get("labels")


def ensure_demo_model(repo: ModelRepository, assets_dir: Path | None = None) -> str:
    """The version of ``demo-detector`` behind ``production``, registering it first if absent.

    Safe when several processes call it: on one node a file lock makes the
    others wait and then find the version; across nodes sharing a server each
    may register, then all keep the lowest demo version and the others delete
    their own, so exactly one stays.
    """
    assets_dir = Path(assets_dir) if assets_dir is not None else DEFAULT_ASSETS
    onnx_path, meta_path = assets_dir / "detector.onnx", assets_dir / "detector.json"
    with repo.node_lock(repo.cache.root / "locks" / f"{DEMO_MODEL}.lock"):
        existing = _production_or_latest(repo)
        if existing is not None:
            if not repo.describe(DEMO_MODEL).aliases.get(DEMO_ALIAS):
                repo.set_alias(DEMO_MODEL, DEMO_ALIAS, existing)
            return existing
        if not onnx_path.is_file():
            raise ConfigError(
                f"the demo detector {onnx_path} is missing; reinstall edgebatch (the file ships in "
                "app/demo/assets) or register your own model with `edgebatch models build`"
            )
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        text = json.dumps(meta, sort_keys=True)
        if len(text) > 7000:  # MLflow tag values stop at 8000 characters; labels stay in the asset
            text = json.dumps({k: v for k, v in meta.items() if k != "labels"}, sort_keys=True)
        build_id = uuid.uuid4().hex
        with tempfile.TemporaryDirectory(prefix="edgebatch-demo-") as tmp:
            variants = [with_labels(v, meta.get("labels")) for v in
                        build_onnx_variants(onnx_path, DEMO_BATCH_SIZES, Path(tmp))]
            mine = repo.register_version(
                DEMO_MODEL, variants, description="edgebatch demo detector",
                tags={_DEMO_TAG: build_id, "edgebatch.metadata": text},
            )
        winner = min((d.version for d in repo.describe(DEMO_MODEL).versions if _DEMO_TAG in d.tags), key=int)
        if winner != mine:
            repo.delete_version(DEMO_MODEL, mine)
        if _production_or_latest(repo) is None or not repo.describe(DEMO_MODEL).aliases.get(DEMO_ALIAS):
            repo.set_alias(DEMO_MODEL, DEMO_ALIAS, winner)
        return repo.resolve(DEMO_MODEL, alias=DEMO_ALIAS)


def write_synthetic_detector(
    path: Path,
    *,
    batch: int | None = None,
    size: int = 320,
    width: int = 16,
    bake_batch_reshape: bool = False,
) -> Path:
    """A small conv net with the demo's I/O names ("images" -> "output0").

    ``batch=None`` exports a dynamic batch axis; an int fixes it. With
    ``bake_batch_reshape`` the head flattens through a Reshape whose constant
    shape starts with that batch, like a careless fixed-batch export.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from app.engines.onnxrt import save_onnx

    rng = np.random.default_rng(0)
    dim0: int | str = batch if batch is not None else "batch"
    inits = [
        numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32) * 0.1, "w1"),
        numpy_helper.from_array(rng.standard_normal((width, width, 3, 3)).astype(np.float32) * 0.1, "w2"),
        numpy_helper.from_array(rng.standard_normal((6, width, 1, 1)).astype(np.float32) * 0.1, "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], strides=[4, 4], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="head"),
    ]
    cells = (size // 8) ** 2
    if bake_batch_reshape:
        if batch is None:
            raise ValueError("bake_batch_reshape needs a fixed batch")
        inits.append(numpy_helper.from_array(np.array([batch, 6, cells], dtype=np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["c3", "flat_shape"], ["output0"], name="flatten_baked"))
    else:
        inits.append(numpy_helper.from_array(np.array([0, 6, -1], dtype=np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["c3", "flat_shape"], ["output0"], name="flatten"))
    graph = helper.make_graph(
        nodes, "synthetic_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [dim0, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [dim0, 6, cells])],
        inits,
    )
    return save_onnx(graph, path)
