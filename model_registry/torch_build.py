"""Builders of ``torch`` variants: one ``torch.export`` program per batch size (``.pt2``).

From the project's own demo network (weights from the committed ONNX asset, so the torch and
ONNX variants serve the same detector) or from a user's exported program (``torch.export.save``
output, with a dynamic or fixed batch axis). Each program is loaded back and run on the CPU at
its batch size before it is described, the same check the ONNX builder makes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from app.engines.torchrt import PROGRAM_SUFFIX, TorchEngine, export_program, import_torch
from app.errors import BadRequest
from model_registry.builders import VariantFile, _describe, file_sha256

DEMO_ASSETS = Path(__file__).resolve().parents[1] / "app" / "demo" / "assets"


def _user_module(source: Path, imgsz: tuple[int, int] | None) -> tuple[Any, tuple[int, ...]]:
    """The module of a saved ``torch.export`` program and its per-image input shape (C, H, W)."""
    torch = import_torch()
    try:
        program = torch.export.load(str(source))
    except Exception as exc:  # torch raises many types for a file that is not a program
        raise BadRequest(f"{source} is not a torch.export program ({type(exc).__name__}: {exc}); save one with "
                         "torch.export.save(torch.export.export(model, (example,)), 'model.pt2')") from None
    inputs = list(program.graph_signature.user_inputs)
    if len(inputs) != 1:
        raise BadRequest(f"{source.name} takes {len(inputs)} inputs; an image model takes exactly one (N, C, H, W)")
    meta = next(n.meta["val"] for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    if len(meta.shape) != 4:
        raise BadRequest(f"{source.name}'s input has shape {tuple(meta.shape)}; an image model takes (N, C, H, W)")
    dims = [d if isinstance(d, int) else None for d in meta.shape[1:]]
    if imgsz is not None:
        dims = [dims[0], imgsz[0], imgsz[1]]
    if None in dims:
        raise BadRequest(f"{source.name} has a dynamic channel/height/width ({tuple(meta.shape)}); pass --imgsz H,W")
    return program.module(), tuple(int(d) for d in dims)


def build_torch_variants(
    source: Path | None,
    batch_sizes: Iterable[int],
    out_dir: Path,
    *,
    imgsz: tuple[int, int] | None = None,
) -> list[VariantFile]:
    """One verified ``.pt2`` per batch size: the demo network when ``source`` is None, else a user's program."""
    if source is None:
        from app.demo.network import demo_export_module

        onnx_path = DEMO_ASSETS / "detector.onnx"
        module, _ = demo_export_module(str(onnx_path))
        per_image, stem = (3, 320, 320), "demo-detector"
        tags = {"source": "app/demo/network.py", "weights_sha256": file_sha256(onnx_path)}
        if imgsz is not None and imgsz != (320, 320):
            raise BadRequest("the demo detector is built at 320x320 (its anchors are fixed there); drop --imgsz")
    else:
        source = Path(source)
        if not source.is_file():
            raise BadRequest(f"torch program {source} does not exist; pass the .pt2 file torch.export.save wrote")
        module, per_image = _user_module(source, imgsz)
        stem, tags = source.stem, {"source_sha256": file_sha256(source)}
    torch = import_torch()
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = []
    for batch in batch_sizes:
        shape = (batch, *per_image)
        path = out_dir / f"{stem}_b{batch}{PROGRAM_SUFFIX}"
        try:
            export_program(module, shape, path)
        except Exception as exc:  # torch.export's own errors name the op that refused
            raise BadRequest(f"torch.export failed at batch {batch}: {type(exc).__name__}: {exc}") from None
        engine = TorchEngine({"device": "cpu"})
        engine.load(path)
        outputs = engine.run(np.zeros(shape, np.float32))
        engine.close()
        bad = [o.shape for o in outputs if o.ndim == 0 or o.shape[0] != batch]
        if bad:
            raise BadRequest(f"the batch-{batch} program returns outputs of shapes {bad}, not batch {batch}: the "
                             "model mixes images across the batch; export it with a dynamic batch axis")
        variants.append(_describe(path, "torch", batch, shape, "fp32", {
            **tags, "torch_version": str(torch.__version__), "format": "torch.export"}))
    return variants
