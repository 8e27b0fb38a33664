"""PyTorch engine: one ``torch.export`` program per batch size, on CUDA when there is one, else the CPU.

torch is an optional extra (``pip install 'edgebatch[torch]'``, pinned): a node without it still
serves every other backend, and asking for this one without torch is one ``Unavailable`` line
naming the fix. On CUDA the batch can be replayed from a captured CUDA graph (``cuda_graphs``),
and memory is read from the device's allocator; on the CPU it is an estimate from the program's
own tensor shapes (weights + inputs + the peak of live intermediates in graph order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.constants import TORCH_REQUIREMENT
from app.engines.base import Engine
from app.errors import BadRequest, ConfigError, Unavailable

log = logging.getLogger(__name__)

INSTALL_HINT = f"pip install '{TORCH_REQUIREMENT}' (or 'edgebatch[torch]'; on Jetson use JetPack's torch)"
PROGRAM_SUFFIX = ".pt2"  # what torch.export.save writes
_WARMUP_RUNS = 3  # CUDA graph capture needs a few eager runs first (cuDNN autotuning, lazy init)


def import_torch() -> Any:
    """``torch``, or Unavailable with the install line (serving other backends never gets here)."""
    try:
        import torch
    except ImportError:
        raise Unavailable(f"the torch backend needs PyTorch, which is not installed: {INSTALL_HINT}") from None
    if not hasattr(torch, "export"):
        raise Unavailable(f"torch {torch.__version__} has no torch.export; {INSTALL_HINT}")
    return torch


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one loaded variant and where the figure comes from (``torch.cuda`` or ``estimate``)."""

    device: str
    source: str
    variant_bytes: int  # weights + buffers + the peak a batch needs
    weights_bytes: int
    allocated_bytes: int | None = None  # torch.cuda.memory_allocated of the device, after load
    max_reserved_bytes: int | None = None  # torch.cuda.max_memory_reserved of the device

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_device(torch: Any, options: dict) -> str:
    """"cuda:N" when CUDA is there (or asked for), else "cpu"; an unknown or absent device is an error."""
    wanted = str(options.get("device", "auto"))
    if "device_index" in options:
        wanted = f"cuda:{int(options['device_index'])}"
    if wanted == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return "cpu"
    if wanted == "cuda" or wanted.startswith("cuda:"):
        index = int(wanted.split(":", 1)[1]) if ":" in wanted else 0
        if not torch.cuda.is_available():
            raise Unavailable(f"device {wanted} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                              "use device cpu, or install a CUDA build of torch on a GPU node")
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {wanted}: this node has {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    raise ConfigError(f"unknown torch device {wanted!r}: use auto, cpu, cuda or cuda:N")


def _cuda_graphs_option(options: dict) -> bool:
    value = options.get("cuda_graphs", False)
    if not isinstance(value, bool):
        raise ConfigError(f"options['cuda_graphs'] must be true or false, got {value!r}")
    return value


def _tensors(value: Any) -> list[Any]:
    """The tensors in a program's output (a tensor, or a tuple/list of them), in order."""
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return [value]


def _nbytes(meta: Any) -> int:
    shape = getattr(meta, "shape", None)
    dtype = getattr(meta, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return int(np.prod([int(d) for d in shape])) * dtype.itemsize


def estimate_activation_peak(graph: Any) -> int:
    """Peak bytes of live intermediates when the graph runs eagerly in order (each freed after its last user).

    An estimate: views count as allocations and the allocator's caching is ignored, so it errs high.
    """
    last_use: dict[Any, int] = {}
    nodes = list(graph.nodes)
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    live, peak, size = 0, 0, {}
    for i, node in enumerate(nodes):
        if node.op == "call_function":
            size[node] = sum(_nbytes(m) for m in _tensors(node.meta.get("val")))
            live += size[node]
            peak = max(peak, live)
        for arg in node.all_input_nodes:
            if last_use.get(arg) == i and arg in size:
                live -= size.pop(arg)
    return peak


def output_bytes(graph: Any) -> int:
    """Bytes of the program's outputs (what a batch hands back)."""
    out = next(n for n in graph.nodes if n.op == "output")
    return sum(_nbytes(arg.meta.get("val")) for arg in _tensors(out.args[0]) if hasattr(arg, "meta"))


class TorchEngine(Engine):
    """One ``torch.export`` program at one fixed batch size; optionally replayed as a CUDA graph."""

    backend = "torch"

    def __init__(self, options: dict | None = None) -> None:
        self.options: dict = dict(options or {})
        self._torch: Any = None
        self._module: Any = None
        self._device = "cpu"
        self._input_shape: tuple[int, ...] = ()
        self._input_dtype: Any = None
        self._graph: Any = None  # torch.cuda.CUDAGraph when captured
        self._static_in: Any = None
        self._static_out: list[Any] = []
        self._host_in: Any = None  # pinned host buffer for the copy to the GPU
        self._memory: MemoryReport | None = None

    @property
    def cuda_graphs(self) -> bool:
        """True when batches replay a captured CUDA graph."""
        return self._graph is not None

    def load(self, path: Path) -> None:
        torch = import_torch()
        want_graphs = _cuda_graphs_option(self.options)
        device = resolve_device(torch, self.options)
        if want_graphs and not device.startswith("cuda"):
            raise Unavailable(f"options['cuda_graphs'] needs a CUDA device; this engine runs on {device} "
                              "(CUDA graphs are not available there): drop cuda_graphs or run on a GPU node")
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"torch program file not found: {path}")
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch raises many types for a bad or foreign file
            raise ConfigError(f"{path.name} is not a torch.export program ({type(exc).__name__}: {exc}); "
                              "build it with `edgebatch models build --backend torch`") from None
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        user_inputs = list(program.graph_signature.user_inputs)
        if len(user_inputs) != 1:
            raise ConfigError(f"{path.name} takes {len(user_inputs)} inputs; an image model takes exactly one")
        meta = next(n.meta.get("val") for n in placeholders if n.name == user_inputs[0])
        shape = tuple(int(d) for d in meta.shape)  # int() raises on a symbolic (dynamic) dimension
        weights = sum(p.numel() * p.element_size() for p in program.state_dict.values())
        weights += sum(t.numel() * t.element_size() for t in program.constants.values() if hasattr(t, "numel"))
        if device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        module = program.module()
        self._torch, self._module, self._device = torch, module, device
        self._input_shape, self._input_dtype = shape, meta.dtype
        activations = estimate_activation_peak(program.graph)
        if cuda:
            self._host_in = torch.empty(shape, dtype=meta.dtype, pin_memory=True)
            self._static_in = torch.zeros(shape, dtype=meta.dtype, device=device)
            self._warm_up(want_graphs)
            torch.cuda.synchronize(device)
            self._memory = MemoryReport(
                device, "torch.cuda", int(torch.cuda.max_memory_allocated(device) - base), int(weights),
                allocated_bytes=int(torch.cuda.memory_allocated(device)),
                max_reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
            )
        else:
            io = _nbytes(meta) + output_bytes(program.graph)
            self._memory = MemoryReport(device, "estimate", int(weights + io + activations), int(weights))

    def _warm_up(self, capture: bool) -> None:
        torch = self._torch
        stream = torch.cuda.Stream(device=self._device)
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(_WARMUP_RUNS):
                self._module(self._static_in)
        torch.cuda.current_stream(self._device).wait_stream(stream)
        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                self._static_out = _tensors(self._module(self._static_in))
            self._graph = graph

    def _require_loaded(self) -> Any:
        if self._module is None:
            raise Unavailable("the torch engine is not loaded (closed, or load() was never called)")
        return self._module

    @property
    def batch_size(self) -> int:
        return self._input_shape[0] if self._input_shape else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def device(self) -> str:
        return self._device + (" (CUDA graphs)" if self.cuda_graphs else "")

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        module = self._require_loaded()
        if tuple(batch.shape) != self._input_shape:
            raise BadRequest(f"batch shape {tuple(batch.shape)} does not match the model input {self._input_shape}; "
                             "pad partial batches with run_padded")
        torch = self._torch
        feed = torch.from_numpy(np.ascontiguousarray(batch)).to(self._input_dtype)
        with torch.inference_mode():
            if self._device == "cpu":
                return [t.numpy() for t in _tensors(module(feed))]
            self._host_in.copy_(feed)
            if self._graph is not None:
                self._static_in.copy_(self._host_in, non_blocking=True)
                self._graph.replay()
                outputs = self._static_out
            else:
                outputs = _tensors(module(self._host_in.to(self._device, non_blocking=True)))
            return [t.cpu().numpy() for t in outputs]  # .cpu() waits for the GPU

    def memory_bytes(self) -> int:
        return self._memory.variant_bytes if self._memory is not None and self._module is not None else 0

    def memory_report(self) -> MemoryReport | None:
        """Where the memory figure came from, with the device's own counters on CUDA."""
        return self._memory if self._module is not None else None

    def close(self) -> None:
        self._module = self._graph = self._static_in = self._host_in = None
        self._static_out = []


def export_program(module: Any, input_shape: tuple[int, ...], path: Path) -> Path:
    """``torch.export`` ``module`` (already in eval mode, on the CPU) at one fixed input shape; save it to ``path``."""
    torch = import_torch()
    example = torch.zeros(input_shape)
    with torch.no_grad():
        program = torch.export.export(module, (example,))
    try:
        program.example_inputs = None  # a zero tensor of the batch's size: no reason to ship it in every file
    except AttributeError:  # an older torch without the setter keeps them
        pass
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path
