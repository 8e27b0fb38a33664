"""Builders of fixed-batch model variants, one file per (backend, batch size).

Engines hold exactly one fixed-batch variant (``app.engines.base``), because
fixed shapes are what TensorRT plans and EdgeTPU programs are compiled for and
what lets ONNX Runtime plan its memory once. These builders turn a user's
export into such files and describe each one as a ``VariantFile`` that the
repository registers; nothing here talks to MLflow.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from app.constants import BACKENDS
from app.errors import BadRequest, Unavailable

_TFLITE_MAGIC = b"TFL3"
_EDGETPU_OP = b"edgetpu-custom-op"
_VARIANT_FILE_RE = re.compile(r"_b(\d+)(?:_edgetpu)?\.tflite$")


@dataclass(frozen=True)
class VariantFile:
    """A built variant on local disk, with what the registry must record about it."""

    path: Path
    backend: str
    batch_size: int
    input_shape: tuple[int, ...]
    precision: str
    sha256: str
    size_bytes: int
    tags: dict[str, str] = field(default_factory=dict)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so big plans do not sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; sorted, unique, each >= 1."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise BadRequest(
            f"batch sizes {text!r} are not a comma-separated list of integers; write e.g. 1,2,4,8,16"
        ) from None
    if not sizes or sizes[0] < 1:
        raise BadRequest(f"batch sizes {text!r} must be integers >= 1, e.g. 1,2,4,8,16")
    return sizes


def _describe(path: Path, backend: str, batch: int, shape: tuple[int, ...], precision: str,
              tags: dict[str, str]) -> VariantFile:
    return VariantFile(
        path=path, backend=backend, batch_size=batch, input_shape=tuple(int(d) for d in shape),
        precision=precision, sha256=file_sha256(path), size_bytes=path.stat().st_size, tags=tags,
    )


# ---------------------------------------------------------------------------- ONNX

_ONNX_PRECISION = {1: "fp32", 10: "fp16", 16: "bf16", 3: "int8", 2: "uint8", 11: "fp64"}
_ONNX_NUMPY = {1: np.float32, 10: np.float16, 11: np.float64, 2: np.uint8, 3: np.int8,
               6: np.int32, 7: np.int64, 9: np.bool_}


def _graph_inputs(model) -> list:
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def source_batch(model) -> int | None:
    """The batch the export fixed (first input's dim 0), or ``None`` when it is dynamic."""
    inputs = _graph_inputs(model)
    if not inputs:
        raise BadRequest("the ONNX model has no graph inputs; export it with an image input")
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims:
        raise BadRequest(f"input {inputs[0].name!r} has no shape; export it with an NCHW shape")
    first = dims[0]
    return int(first.dim_value) if first.HasField("dim_value") and first.dim_value > 0 else None


def _constant_values(model) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name: where a baked batch hides."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _baked_batch_reshapes(model, batch: int) -> list[str]:
    """Reshape nodes whose constant target shape starts with the source's fixed batch."""
    constants = _constant_values(model)
    found = []
    for node in model.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in constants:
            shape = constants[node.input[1]].reshape(-1)
            if shape.size and int(shape[0]) == batch:
                found.append(node.name or node.output[0])
    return found


# ---------------------------------------------------------------------------- an export's own metadata

_METADATA_MAX_CHARS = 1 << 20  # a class-name table is a few KB; refuse to parse anything near a megabyte
_IMGSZ_MAX = 8192


@dataclass(frozen=True)
class ExportMetadata:
    """What an Ultralytics ONNX export says of itself in ``metadata_props`` (all optional)."""

    imgsz: tuple[int, int] | None = None  # (height, width) it was exported for
    stride: int | None = None  # the image size must be a multiple of it
    names: list[str] | None = None  # class names by class id


def _literal(key: str, text: str, label: str):
    """A metadata value that Ultralytics writes as a Python literal (``str(dict)``): parsed, never evaluated."""
    if len(text) > _METADATA_MAX_CHARS:
        raise BadRequest(f"metadata_props {key!r} of {label} is {len(text)} characters; too long to be what it "
                         "should hold (pass --labels / --imgsz instead)")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise BadRequest(f"metadata_props {key!r} of {label} is not a Python literal: {text[:80]!r}") from None


def parse_imgsz(value: object, what: str) -> tuple[int, int]:
    """``640``, ``"640"``, ``"480,640"``, ``[480, 640]`` -> (height, width); each in 1..8192."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().strip("[]()").split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise BadRequest(f"{what} {value!r} is not an image size; write e.g. 640 or 480,640 (height,width)") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, (list, tuple)) or len(value) not in (1, 2)
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= _IMGSZ_MAX for v in value)):
        raise BadRequest(f"{what} {value!r} is not an image size; write e.g. 640 or 480,640 (height,width), "
                         f"each between 1 and {_IMGSZ_MAX}")
    return (int(value[0]), int(value[-1]))


def read_export_metadata(model, label: str) -> ExportMetadata:
    """``imgsz``, ``stride`` and ``names`` from an (Ultralytics) export's metadata_props, checked."""
    props = {p.key: p.value for p in model.metadata_props}
    imgsz = parse_imgsz(_literal("imgsz", props["imgsz"], label), f"metadata_props 'imgsz' of {label}") \
        if "imgsz" in props else None
    stride = None
    if "stride" in props:
        value = _literal("stride", props["stride"], label)
        if isinstance(value, (list, tuple)) and value:
            value = max(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1024:
            raise BadRequest(f"metadata_props 'stride' of {label} is {props['stride']!r}, not a positive integer")
        stride = int(value)
    names = None
    if "names" in props:
        value = _literal("names", props["names"], label)
        if isinstance(value, dict) and all(isinstance(k, int) and not isinstance(k, bool) for k in value) \
                and sorted(value) == list(range(len(value))) and all(isinstance(v, str) for v in value.values()):
            names = [value[i] for i in range(len(value))]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            names = list(value)
        else:
            raise BadRequest(f"metadata_props 'names' of {label} is not a table of class ids 0..N-1 to names "
                             "(like {0: 'person', 1: 'bicycle'}); pass --labels FILE")
    return ExportMetadata(imgsz=imgsz, stride=stride, names=names)


def export_metadata(source: Path) -> ExportMetadata:
    """The metadata of an ONNX file on disk (its weights are not loaded)."""
    import onnx

    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:
        raise BadRequest(f"{source} is not a readable ONNX model ({exc}); pass an .onnx export") from None
    return read_export_metadata(model, Path(source).name)


def _image_size(model, label: str, imgsz: tuple[int, int] | None, meta: ExportMetadata) -> tuple[int, int] | None:
    """The (H, W) to fix the image input at: --imgsz, else the file's imgsz when H/W are dynamic; None: leave as is."""
    dims = _graph_inputs(model)[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        return None
    fixed = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[2:]]
    wanted = imgsz or (meta.imgsz if None in fixed else None)
    if wanted is None:
        return None
    if None not in fixed and tuple(fixed) != wanted:
        raise BadRequest(f"{label} was exported for images of {fixed[0]}x{fixed[1]}; it cannot run at "
                         f"{wanted[0]}x{wanted[1]}: drop --imgsz or export it with dynamic height and width")
    if meta.stride and (wanted[0] % meta.stride or wanted[1] % meta.stride):
        raise BadRequest(f"image size {wanted[0]}x{wanted[1]} is not a multiple of {label}'s stride {meta.stride}; "
                         f"pass --imgsz with multiples of {meta.stride}, e.g. {meta.stride * 20}")
    return wanted


def _dynamic_export_hint(model_name: str) -> str:
    return (
        f"re-export {model_name} with a dynamic batch axis, e.g. torch.onnx.export(..., "
        "input_names=['images'], dynamic_axes={'images': {0: 'batch'}}), and build from that file"
    )


def _with_batch(model, batch: int, image_size: tuple[int, int] | None = None):
    """A copy of ``model`` whose inputs and outputs have batch ``batch`` (and the image input
    ``image_size`` = (H, W) when given), shapes re-inferred."""
    import onnx

    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    for value in [*_graph_inputs(variant), *variant.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    if image_size is not None:
        dims = _graph_inputs(variant)[0].type.tensor_type.shape.dim
        for dim, size in zip(dims[2:], image_size):
            dim.Clear()
            dim.dim_value = size
    del variant.graph.value_info[:]  # stale intermediate shapes would pin the old batch
    return onnx.shape_inference.infer_shapes(variant, check_type=True, strict_mode=True)


def _verify_onnx(path: Path, batch: int, label: str) -> tuple[tuple[int, ...], str, str]:
    """Load and run the variant with ONNX Runtime; return (input shape, precision, ORT version)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise BadRequest(f"ONNX Runtime cannot load the batch-{batch} variant of {label}: {exc}") from None
    feeds = {}
    shape: tuple[int, ...] = ()
    precision = "fp32"
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    elem_types = {v.name: v.type.tensor_type.elem_type for v in _graph_inputs(model)}
    for index, inp in enumerate(session.get_inputs()):
        dims = inp.shape
        if any(not isinstance(d, int) or d < 1 for d in dims):
            raise BadRequest(
                f"input {inp.name!r} of {label} has dynamic dimensions {dims} besides the batch and its "
                "metadata names no image size (imgsz); pass --imgsz H,W (e.g. --imgsz 640) to build it at one size"
            )
        elem = elem_types.get(inp.name, 1)
        feeds[inp.name] = np.zeros(dims, dtype=_ONNX_NUMPY.get(elem, np.float32))
        if index == 0:
            shape, precision = tuple(dims), _ONNX_PRECISION.get(elem, "fp32")
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:
        raise BadRequest(
            f"the batch-{batch} variant of {label} loads but fails to run: {exc}; "
            + _dynamic_export_hint(label)
        ) from None
    for meta, out in zip(session.get_outputs(), outputs):
        if out.ndim == 0 or out.shape[0] != batch:
            raise BadRequest(
                f"the batch-{batch} variant of {label} returns output {meta.name!r} with shape "
                f"{out.shape}, not batch {batch}: the graph mixes images across the batch; "
                + _dynamic_export_hint(label)
            )
    return shape, precision, ort.__version__


def build_onnx_variants(
    source: Path,
    batch_sizes: Iterable[int],
    out_dir: Path,
    *,
    imgsz: tuple[int, int] | None = None,
    on_variant: Callable[[VariantFile], None] | None = None,
) -> list[VariantFile]:
    """Write one fixed-batch ONNX file per batch size, each verified to load and run.

    A dynamic-batch export can take any batch. A fixed-batch export can only be
    re-batched when no constant in the graph bakes its batch in; when a Reshape
    does, we refuse with the fix (export with a dynamic batch axis) instead of
    registering a variant that would mix images. Dynamic height and width (an
    Ultralytics ``dynamic=True`` export) are fixed at ``imgsz`` = (H, W), else at
    the ``imgsz`` the file's metadata names (checked against its ``stride``).
    """
    import onnx

    source = Path(source)
    if not source.is_file():
        raise BadRequest(f"ONNX file {source} does not exist; pass the path of your model export")
    try:
        model = onnx.load(str(source))
    except Exception as exc:
        raise BadRequest(f"{source} is not a readable ONNX model ({exc}); pass an .onnx export") from None
    label = source.name
    fixed = source_batch(model)
    image_size = _image_size(model, label, imgsz, read_export_metadata(model, label))
    source_sha = file_sha256(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = []
    for batch in batch_sizes:
        if fixed is not None and batch != fixed:
            baked = _baked_batch_reshapes(model, fixed)
            if baked:
                raise BadRequest(
                    f"{label} was exported with a fixed batch of {fixed} and Reshape node(s) "
                    f"{', '.join(baked[:3])} bake that batch into a constant shape, so it cannot be "
                    f"rebuilt for batch {batch}; " + _dynamic_export_hint(label)
                )
        try:
            variant = _with_batch(model, batch, image_size)
        except Exception as exc:  # onnx.shape_inference.InferenceError and friends
            raise BadRequest(
                f"shape inference fails for {label} at batch {batch}: {exc}; " + _dynamic_export_hint(label)
            ) from None
        path = out_dir / f"{source.stem}_b{batch}.onnx"
        onnx.save(variant, str(path))
        shape, precision, ort_version = _verify_onnx(path, batch, label)
        built = _describe(path, "onnx", batch, shape, precision, {
            "source_sha256": source_sha,
            "source_batch": "dynamic" if fixed is None else str(fixed),
            "opset": str(max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)),
            "verified_with": f"onnxruntime {ort_version}",
            **({"imgsz": f"{image_size[0]},{image_size[1]}"} if image_size else {}),
        })
        variants.append(built)
        if on_variant:
            on_variant(built)
    return variants


# ---------------------------------------------------------------------------- TensorRT

def build_tensorrt_variants(
    source: Path,
    batch_sizes: Iterable[int],
    out_dir: Path,
    *,
    fp16: bool = False,
    imgsz: tuple[int, int] | None = None,
    build_plans: Callable | None = None,
) -> list[VariantFile]:
    """One TensorRT plan per batch size, tagged with the GPU and TensorRT version it is valid for.

    ``build_plans`` defaults to ``model_registry.tensorrt_build.build_tensorrt_plans``,
    imported only here so nodes without TensorRT never import it. A fixed-batch
    source is first re-batched to ONNX (one plan call per batch) because a plan
    is only as flexible as the ONNX it is parsed from.
    """
    if build_plans is None:
        try:
            from model_registry.tensorrt_build import build_tensorrt_plans as build_plans
        except ImportError as exc:
            raise Unavailable(
                f"TensorRT cannot be used here ({exc}); build TensorRT variants on a node with an "
                "NVIDIA GPU and `pip install 'edgebatch[tensorrt]'` (Jetson: JetPack's TensorRT), "
                "or use --backend onnx"
            ) from None
    import onnx

    source = Path(source)
    if not source.is_file():
        raise BadRequest(f"ONNX file {source} does not exist; pass the path of your model export")
    sizes = list(batch_sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source), load_external_data=False)
    image_size = _image_size(model, source.name, imgsz, read_export_metadata(model, source.name))
    if source_batch(model) is None and image_size is None:
        plans = list(build_plans(source, sizes, out_dir, fp16=fp16))
    else:  # fixed batch, or a dynamic image size: fixed-shape ONNX first, one plan from each
        plans = []
        for onnx_variant in build_onnx_variants(source, sizes, out_dir / "onnx", imgsz=imgsz):
            plans += list(build_plans(onnx_variant.path, [onnx_variant.batch_size], out_dir, fp16=fp16))
    built = sorted(plans, key=lambda plan: plan.batch_size)
    if sorted(plan.batch_size for plan in built) != sorted(sizes):
        raise Unavailable(
            f"the TensorRT builder returned plans for batch sizes {[p.batch_size for p in built]}, "
            f"not {sizes}; check the builder log above"
        )
    return [
        _describe(Path(plan.path), "tensorrt", plan.batch_size, tuple(plan.input_shape), plan.precision, {
            "tensorrt_version": str(plan.tensorrt_version),
            "gpu_name": str(plan.gpu_name),
            "compute_capability": str(plan.compute_capability),
            "source_sha256": file_sha256(source),
        })
        for plan in built
    ]


# ---------------------------------------------------------------------------- TFLite / EdgeTPU

def _tflite_input(path: Path) -> tuple[tuple[int, ...], str]:
    """Input shape and precision read from the flatbuffer, best effort (no delegate needed)."""
    try:
        import tflite  # flatbuffer schema only; reads EdgeTPU files that no CPU interpreter can load

        model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
        graph = model.Subgraphs(0)
        tensor = graph.Tensors(graph.Inputs(0))
        names = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
        kind = names.get(tensor.Type(), "UNKNOWN").lower()
        precision = {"float32": "fp32", "float16": "fp16"}.get(kind, kind)
        return tuple(int(d) for d in tensor.ShapeAsNumpy()), precision
    except Exception:  # any error: shape is informative only; the file was checked already
        return (), "unknown"


def scan_variant_folder(folder: Path, backend: str) -> dict[int, Path]:
    """Find ``*_b<N>.tflite`` (tflite) or ``*_b<N>_edgetpu.tflite`` (edgetpu) files in a folder."""
    if not folder.is_dir():
        raise BadRequest(f"{folder} is not a folder; pass a folder of *_b<N>_edgetpu.tflite files")
    found: dict[int, Path] = {}
    for path in sorted(folder.glob("*.tflite")):
        match = _VARIANT_FILE_RE.search(path.name)
        if not match or (backend == "edgetpu") != path.name.endswith("_edgetpu.tflite"):
            continue
        batch = int(match.group(1))
        if batch in found:
            raise BadRequest(f"two files for batch {batch} in {folder}: {found[batch].name}, {path.name}")
        found[batch] = path
    if not found:
        pattern = "*_b<N>_edgetpu.tflite" if backend == "edgetpu" else "*_b<N>.tflite"
        raise BadRequest(f"no {pattern} files in {folder}; name each variant by its batch size, e.g. model_b8.tflite"
                         if backend == "tflite" else f"no {pattern} files in {folder}; compile each batch "
                         "size with edgetpu_compiler and keep its name, e.g. model_b8_edgetpu.tflite")
    return found


def parse_variant_args(values: Iterable[str]) -> dict[int, Path]:
    """``["1=a.tflite", "8=b.tflite"]`` -> ``{1: Path("a.tflite"), 8: Path("b.tflite")}``."""
    files: dict[int, Path] = {}
    for value in values:
        batch, sep, path = value.partition("=")
        if not sep or not batch.strip().isdigit() or int(batch) < 1 or not path:
            raise BadRequest(f"--variant {value!r} must be BATCH=FILE, e.g. --variant 8=model_b8_edgetpu.tflite")
        if int(batch) in files:
            raise BadRequest(f"--variant gives batch {batch} twice; give one file per batch size")
        files[int(batch)] = Path(path)
    return files


def variants_from_files(backend: str, files: dict[int, Path]) -> list[VariantFile]:
    """Describe already-compiled TFLite / EdgeTPU files, one per batch size.

    EdgeTPU programs come out of Google's ``edgetpu_compiler`` (which only runs
    offline on x86), so we register them as given, after checking that each is a
    TFLite flatbuffer and, for ``edgetpu``, that it holds the compiled EdgeTPU op.
    """
    if backend not in ("tflite", "edgetpu"):
        raise BadRequest(f"backend {backend!r} takes no precompiled files; use tflite or edgetpu")
    if not files:
        raise BadRequest(f"no {backend} files given; pass --variant BATCH=FILE or a folder")
    variants = []
    for batch, path in sorted(files.items()):
        path = Path(path)
        if not path.is_file():
            raise BadRequest(f"{backend} file {path} for batch {batch} does not exist")
        head = path.read_bytes()
        if head[4:8] != _TFLITE_MAGIC:
            raise BadRequest(f"{path} is not a TFLite flatbuffer (no TFL3 identifier); pass a .tflite file")
        if backend == "edgetpu" and _EDGETPU_OP not in head:
            raise BadRequest(
                f"{path} holds no compiled EdgeTPU op; compile it first: edgetpu_compiler {path.name} "
                "(the result is named *_edgetpu.tflite), or register it with --backend tflite"
            )
        shape, precision = _tflite_input(path)
        if shape and shape[0] != batch:
            raise BadRequest(f"{path} has input shape {shape} (batch {shape[0]}) but was given as batch {batch}")
        if backend == "edgetpu" and precision in ("unknown", ""):
            precision = "int8"
        variants.append(_describe(path, backend, batch, shape, precision, {"file_name": path.name}))
    return variants


def with_labels(variant: VariantFile, labels: list[str] | None) -> VariantFile:
    """Record class labels on a variant (tag ``labels``, JSON) so a detector needs no side file."""
    if not labels:
        return variant
    return replace(variant, tags={**variant.tags, "labels": json.dumps(list(labels))})


def read_labels(path: Path) -> list[str]:
    """Labels from a JSON list, a JSON object with ``labels`` (like detector.json), or one per line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BadRequest(f"cannot read labels file {path}: {exc}") from None
    if Path(path).suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BadRequest(f"labels file {path} is not valid JSON ({exc})") from None
        labels = data.get("labels") if isinstance(data, dict) else data
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise BadRequest(f"labels file {path} must hold a list of strings or {{\"labels\": [...]}}")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_variants(
    backend: str,
    batch_sizes: list[int],
    out_dir: Path | None = None,
    *,
    source: Path | None = None,
    files: dict[int, Path] | None = None,
    fp16: bool = False,
    imgsz: tuple[int, int] | None = None,
) -> list[VariantFile]:
    """One entry point for the CLI: dispatch on backend (``imgsz`` = (H, W) for exports with a dynamic image size)."""
    if backend not in BACKENDS:
        raise BadRequest(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="edgebatch-variants-"))
    if backend == "onnx":
        return build_onnx_variants(_need(source, backend), batch_sizes, out_dir, imgsz=imgsz)
    if backend == "tensorrt":
        return build_tensorrt_variants(_need(source, backend), batch_sizes, out_dir, fp16=fp16, imgsz=imgsz)
    if backend == "torch":  # torch is optional: imported only for this backend
        from model_registry.torch_build import build_torch_variants

        return build_torch_variants(source, batch_sizes, out_dir, imgsz=imgsz)
    if imgsz is not None:
        raise BadRequest(f"--imgsz is for ONNX sources; {backend} files were compiled at their own size")
    return variants_from_files(backend, files or {})


def _need(source: Path | None, backend: str) -> Path:
    if source is None:
        raise BadRequest(f"--backend {backend} builds from an ONNX export: pass SOURCE.onnx")
    return Path(source)
