"""Many models on one replica under one memory budget (EdgeCaffe's multi-model setting).

``MultiModelHost`` keeps whole models resident while they fit in the budget and
evicts the least recently used one when another needs the room. A model whose
whole form does not fit runs split: its stages are loaded, run and freed under
the configured loading policy (``policies.loading``) by ``LayeredExecutor``.

Requests queue here and run one at a time (a replica on an edge CPU computes one
model at a time; the interleaved policy still overlaps loading and computing
inside a request). Which queued request goes next is ``policies.loading.order_requests``:
``fcfs`` takes arrival order and, when the head does not fit beside what is
resident, evicts for it; ``masa`` admits only requests whose memory fits now
(a resident model needs nothing more) and takes the highest response ratio
among them, evicting only when nothing fits. Because a request runs to its
end, the bytes it must admit are its whole need: the whole model's cost, or the
split plan's peak. Plain Python: no Ray, so it is testable and reusable.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.constants import onnx_type, onnx_type_of_elem
from app.errors import BadRequest, EdgebatchError
from app.layered.executor import (
    LayeredExecutor,
    MemoryBudgetError,
    PeakRss,
    ResidentMemory,
    StagedModel,
    budget_error,
    load_session,
    profile_stages_isolated,
    release_heap,
    run_session,
)
from policies.loading import (
    LOADING_POLICIES,
    BudgetExceeded,
    LoadingPolicy,
    Request,
    order_requests,
    plan_loading,
)

RequestOrder = Literal["masa", "fcfs"]


class MultiModelConfig(BaseModel):
    """``user_config`` of the multi-model deployment: one budget for every model on the replica."""

    model_config = ConfigDict(extra="forbid")

    budget_mb: float = Field(512.0, gt=0, description="resident-memory budget for all models, MB (1e6 bytes)")
    policy: Literal["bulk", "linear", "partial", "interleaved"] = "interleaved"
    order: Literal["masa", "fcfs"] = "masa"
    alias: str | None = Field("production", description="alias to serve; latest version if the model has none")
    batch_size: int = Field(1, ge=1, description="which fixed-batch variant (and split) to serve")
    stages: int | None = Field(None, ge=2, description="which split to use; None takes the finest registered")
    models: list[str] = Field(default_factory=list, description="models allowed; empty allows any")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per session; 0 = its default")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024,
                                description="request bodies above this get 413, also after decompression")
    auth_inference: bool = Field(False, description="inference needs the API bearer token")

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * 1e6)
# Resident bytes per byte of ONNX file when a model has no profiled stages to measure it:
# about 4.2 was measured for conv nets here (weights + ONNX Runtime's pre-packed copies + arena).
DEFAULT_BYTES_PER_FILE_BYTE = 5.0


@dataclass(frozen=True)
class ModelSource:
    """Where one model's files are: the whole ONNX file and, if split, its stage files."""

    name: str
    version: str
    whole_path: Path
    stage_paths: tuple[Path, ...] = ()


@dataclass
class HostedModel:
    """A model the host knows: its measured costs, and its session while resident whole."""

    source: ModelSource
    input_specs: dict[str, tuple[tuple[int, ...], str]]
    staged: StagedModel | None
    whole_bytes: int
    whole_load_s: float
    whole_exec_s: float
    session: Any = None
    last_used: float = 0.0
    output_specs: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    split_plan: Any = None  # the host's loading plan for the staged form, made once (the policy is fixed)


@dataclass
class Outcome:
    """One request's answer and how it was served."""

    request_id: str
    model: str
    version: str
    outputs: dict[str, np.ndarray]
    mode: Literal["whole", "split"]
    policy: str | None
    latency_s: float
    queue_s: float
    loaded_whole: bool
    evicted: list[str] = field(default_factory=list)
    measured_peak_bytes: int = 0


@dataclass
class _Pending:
    request_id: str
    model: str
    inputs: dict[str, np.ndarray]
    arrival_s: float
    future: Future


def graph_io(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, tuple[tuple[int, ...], str]]]:
    """Inputs and outputs (name -> (shape, ORT type)) read from the ONNX graph, without a session:
    opening a session would load the weights, which may not fit the budget."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def spec(values) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {}
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out[v.name] = (shape, onnx_type_of_elem(t.elem_type).ort)
        return out

    result = spec(model.graph.input), spec(model.graph.output)
    del model
    return result



class MultiModelHost:
    """LRU of whole models under a byte budget, split execution for the rest, one queue."""

    def __init__(
        self,
        budget_bytes: int,
        resolve: Callable[[str], ModelSource],
        *,
        policy: LoadingPolicy = "interleaved",
        order: RequestOrder = "masa",
        options: dict | None = None,
        bytes_per_file_byte: float = DEFAULT_BYTES_PER_FILE_BYTE,
    ) -> None:
        if policy not in LOADING_POLICIES:
            raise BadRequest(f"loading policy {policy!r} is unknown; use one of {', '.join(LOADING_POLICIES)}")
        if order not in ("masa", "fcfs"):
            raise BadRequest(f"request order {order!r} is unknown; use masa or fcfs")
        self.memory = ResidentMemory(budget_bytes)
        self.executor = LayeredExecutor(self.memory, options=options)
        self.policy: LoadingPolicy = policy
        self.order: RequestOrder = order
        self.options = dict(options or {})
        self.bytes_per_file_byte = bytes_per_file_byte
        self._resolve = resolve
        self._models: dict[str, HostedModel] = {}
        self._resident: OrderedDict[str, HostedModel] = OrderedDict()  # least recently used first
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._dispatcher: threading.Thread | None = None
        self._closed = False
        self.counters = {"requests": 0, "whole_loads": 0, "evictions": 0, "split_runs": 0, "errors": 0}
        self.eviction_log: list[str] = []
        self.served_order: list[str] = []

    # ------------------------------------------------------------------ models
    def _hosted(self, name: str) -> HostedModel:
        if name in self._models:
            return self._models[name]
        source = self._resolve(name)
        input_specs, output_specs = graph_io(source.stage_paths[0] if source.stage_paths else source.whole_path)
        if source.stage_paths:
            output_specs = graph_io(source.stage_paths[-1])[1]
        specs = {n: (tuple(d if d > 0 else 1 for d in shape), t) for n, (shape, t) in input_specs.items()}
        staged = None
        if source.stage_paths:
            sample = {n: np.zeros(shape, onnx_type(t).numpy) for n, (shape, t) in specs.items()}
            staged = profile_stages_isolated(name, source.stage_paths, sample, self.options)
            factor = staged.bytes_per_file_byte
            whole_bytes = max(staged.total_bytes, int(Path(source.whole_path).stat().st_size * factor))
            load_s = sum(s.load_s for s in staged.stages)
            exec_s = sum(s.exec_s for s in staged.stages)
        else:
            whole_bytes = int(Path(source.whole_path).stat().st_size * self.bytes_per_file_byte)
            load_s = exec_s = 0.0
        hosted = HostedModel(source, specs, staged, whole_bytes, load_s, exec_s, output_specs=output_specs)
        self._models[name] = hosted
        return hosted

    def fits_whole(self, hosted: HostedModel) -> bool:
        return hosted.whole_bytes <= self.memory.budget_bytes

    def _need_bytes(self, hosted: HostedModel) -> int:
        """What a request for this model must find free: 0 if resident, else its whole need."""
        if hosted.session is not None:
            return 0
        if self.fits_whole(hosted):
            return hosted.whole_bytes
        if hosted.staged is None:
            return hosted.whole_bytes
        return self._split_plan(hosted).peak_bytes

    def _service_s(self, hosted: HostedModel) -> float:
        if hosted.session is not None:
            return max(hosted.whole_exec_s, 1e-6)
        if self.fits_whole(hosted) or hosted.staged is None:
            return max(hosted.whole_load_s + hosted.whole_exec_s, 1e-6)
        return max(self._split_plan(hosted).est_makespan_s, 1e-6)

    def _split_plan(self, hosted: HostedModel):
        """Queue ordering asks for every queued request on every dispatch: plan once per model."""
        if hosted.split_plan is None:
            hosted.split_plan = plan_loading(hosted.staged.spec, self.policy)
        return hosted.split_plan

    def _evict_lru(self) -> str | None:
        if not self._resident:
            return None
        name, hosted = self._resident.popitem(last=False)
        self._unload(hosted)
        self.counters["evictions"] += 1
        self.eviction_log.append(name)
        return name

    def _unload(self, hosted: HostedModel) -> None:
        """Idempotent: a second call finds nothing to free."""
        session, hosted.session = hosted.session, None
        del session
        release_heap()
        self.memory.release(f"{hosted.source.name}/whole")

    def _load_whole(self, hosted: HostedModel) -> tuple[bool, list[str]]:
        evicted: list[str] = []
        if hosted.session is not None:
            self._resident.move_to_end(hosted.source.name)
            return False, evicted
        while self.memory.resident_bytes + hosted.whole_bytes > self.memory.budget_bytes:
            name = self._evict_lru()
            if name is None:
                break
            evicted.append(name)
        self.memory.reserve(f"{hosted.source.name}/whole", hosted.whole_bytes)
        try:
            with PeakRss() as peak:
                t0 = time.perf_counter()
                hosted.session = load_session(hosted.source.whole_path, self.options)
                hosted.whole_load_s = time.perf_counter() - t0
        except BaseException:
            self.memory.release(f"{hosted.source.name}/whole")
            raise
        if hosted.staged is None:  # first real measurement of a model with no stages to profile
            hosted.whole_bytes = max(hosted.whole_bytes, peak.delta_bytes)
        self._resident[hosted.source.name] = hosted
        self.counters["whole_loads"] += 1
        return True, evicted

    # ------------------------------------------------------------------ running
    def _serve(self, pending: _Pending, hosted: HostedModel) -> Outcome:
        start = time.perf_counter()
        queue_s = start - pending.arrival_s
        if self.fits_whole(hosted):
            loaded, evicted = self._load_whole(hosted)
            with PeakRss() as peak:
                t0 = time.perf_counter()
                outputs = run_session(hosted.session, pending.inputs)
                hosted.whole_exec_s = time.perf_counter() - t0
            mode, policy, measured = "whole", None, peak.delta_bytes
        else:
            if hosted.staged is None:
                raise MemoryBudgetError(
                    f"model {hosted.source.name!r} needs about {hosted.whole_bytes / 1e6:.1f} MB whole, budget "
                    f"{self.memory.budget_bytes / 1e6:.1f} MB, and it has no stages; split it with `edgebatch "
                    f"models split {hosted.source.name}/{hosted.source.version} --stages 4`",
                    needed_bytes=hosted.whole_bytes, budget_bytes=self.memory.budget_bytes)
            evicted = []
            while True:
                try:
                    result = self.executor.run(hosted.staged, self.policy, pending.inputs, request_id=pending.request_id)
                    break
                except MemoryBudgetError:
                    name = self._evict_lru()  # whole models make room for a split run, LRU first
                    if name is None:
                        raise
                    evicted.append(name)
            outputs, loaded = result.outputs, False
            mode, policy, measured = "split", self.policy, result.measured_peak_bytes
            self.counters["split_runs"] += 1
        hosted.last_used = time.monotonic()
        self.served_order.append(pending.request_id)
        return Outcome(pending.request_id, hosted.source.name, hosted.source.version, outputs, mode, policy,
                       time.perf_counter() - pending.arrival_s, queue_s, loaded, evicted, measured)

    def submit(self, model: str, inputs: dict[str, np.ndarray] | np.ndarray) -> Future:
        """Queue a request; the future resolves to an ``Outcome`` (or raises an ``EdgebatchError``)."""
        if self._closed:
            raise BadRequest("the multi-model host is closed")
        future: Future = Future()
        if isinstance(inputs, np.ndarray):
            inputs = {"": inputs}
        request = _Pending(f"r{next(self._ids)}", model, dict(inputs), time.perf_counter(), future)
        with self._cond:
            self.counters["requests"] += 1
            self._queue.append(request)
            self._cond.notify_all()
        return future

    def _bind_inputs(self, pending: _Pending, hosted: HostedModel) -> None:
        if "" in pending.inputs:
            if len(hosted.input_specs) != 1:
                raise BadRequest(f"model {pending.model!r} takes inputs {sorted(hosted.input_specs)}; name them")
            pending.inputs = {next(iter(hosted.input_specs)): pending.inputs.pop("")}
        for name, (shape, _) in hosted.input_specs.items():
            if name not in pending.inputs:
                raise BadRequest(f"model {pending.model!r} needs input {name!r} of shape {list(shape)}")
            got = tuple(pending.inputs[name].shape)
            if got != shape:
                raise BadRequest(f"input {name!r} of {pending.model!r} has shape {list(got)}; the model takes "
                                 f"{list(shape)} (its variants are fixed-batch)")

    def dispatch_one(self) -> bool:
        """Pick the next request by the order policy and serve it; False when the queue is empty."""
        with self._run_lock:
            with self._cond:
                queue = list(self._queue)
            if not queue:
                return False
            candidates: dict[str, tuple[_Pending, HostedModel]] = {}
            for pending in queue:
                try:
                    hosted = self._hosted(pending.model)
                    self._bind_inputs(pending, hosted)
                    need = self._need_bytes(hosted)
                    if need > self.memory.budget_bytes:
                        if hosted.staged is not None:  # the planner's refusal names the stage and the figure
                            try:
                                plan_loading(hosted.staged.spec, self.policy, self.memory.budget_bytes)
                            except BudgetExceeded as exc:
                                raise budget_error(exc) from None
                        raise MemoryBudgetError(
                            f"model {pending.model!r} needs {need / 1e6:.1f} MB, budget "
                            f"{self.memory.budget_bytes / 1e6:.1f} MB", needed_bytes=need,
                            budget_bytes=self.memory.budget_bytes)
                    candidates[pending.request_id] = (pending, hosted)
                except Exception as exc:  # any error: the request fails, the host goes on
                    self._finish(pending, exc)
            if not candidates:
                return True
            now = time.perf_counter()
            requests = [Request(rid, p.model, p.arrival_s, self._service_s(h), self._need_bytes(h))
                        for rid, (p, h) in candidates.items()]
            made_room: list[str] = []  # evicted so that the chosen request fits
            while True:
                admitted = order_requests(requests, policy=self.order, now=now,
                                          resident_bytes=self.memory.resident_bytes,
                                          budget_bytes=self.memory.budget_bytes)
                if admitted:
                    break
                evicted = self._evict_lru()
                if evicted is None:
                    break
                made_room.append(evicted)
            chosen = admitted[0].request_id if admitted else min(requests, key=lambda r: r.arrival_s).request_id
            pending, hosted = candidates[chosen]
            try:
                outcome = self._serve(pending, hosted)
            except Exception as exc:  # any error: the request fails, the host goes on
                self._finish(pending, exc)
            else:
                outcome.evicted = made_room + outcome.evicted
                self._finish(pending, None, outcome)
            return True

    def _finish(self, pending: _Pending, exc: BaseException | None, outcome: Outcome | None = None) -> None:
        with self._cond:
            if pending in self._queue:
                self._queue.remove(pending)
        if exc is not None:
            self.counters["errors"] += 1
            pending.future.set_exception(exc)
        else:
            pending.future.set_result(outcome)

    def run_pending(self) -> None:
        """Serve everything queued, in this thread (tests, benchmarks)."""
        while self.dispatch_one():
            pass

    def infer(self, model: str, inputs: dict[str, np.ndarray] | np.ndarray, timeout_s: float | None = None) -> Outcome:
        """Submit and wait; without a dispatcher thread the caller serves the queue itself."""
        future = self.submit(model, inputs)
        if self._dispatcher is None:
            self.run_pending()
        return future.result(timeout=timeout_s)

    def start(self) -> None:
        """A dispatcher thread that serves the queue as requests arrive (the deployment's mode)."""
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(target=self._dispatch_loop, name="edgebatch-multimodel", daemon=True)
            self._dispatcher.start()

    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            self.dispatch_one()

    def close(self) -> None:
        """Stop the dispatcher, fail what is queued, unload every model (idempotent)."""
        with self._cond:
            self._closed = True
            queued, self._queue = self._queue, []
            self._cond.notify_all()
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(timeout=30)
        for pending in queued:
            if not pending.future.done():
                pending.future.set_exception(EdgebatchError("the multi-model host closed before serving this"))
        with self._run_lock:
            while self._evict_lru() is not None:
                pass

    def describe(self, name: str) -> tuple[ModelSource, dict, dict]:
        """Source, input specs (shape, ORT type) and output specs of a model; resolves it on first use.
        A known model is answered without the run lock, so requests do not queue behind a running one."""
        hosted = self._models.get(name)  # entries are only ever added, whole
        if hosted is None:
            with self._run_lock:
                hosted = self._hosted(name)
        return hosted.source, dict(hosted.input_specs), dict(hosted.output_specs)

    # ------------------------------------------------------------------ status
    def info(self) -> dict[str, Any]:
        """Budget, what is resident (LRU order), each known model's mode and cost, counters."""
        return {
            "budget_bytes": self.memory.budget_bytes,
            "resident_bytes": self.memory.resident_bytes,
            "accounted_peak_bytes": self.memory.peak_bytes,
            "policy": self.policy,
            "order": self.order,
            "resident_models": list(self._resident),
            "models": {
                name: {"version": h.source.version, "mode": "whole" if self.fits_whole(h) else "split",
                       "whole_bytes": h.whole_bytes, "stages": len(h.staged.stages) if h.staged else 0,
                       "stage_bytes": [s.load_bytes for s in h.staged.stages] if h.staged else [],
                       "resident": h.session is not None}
                for name, h in sorted(self._models.items())
            },
            "evictions": list(self.eviction_log[-50:]),
            "counters": dict(self.counters),
            "queue_length": len(self._queue),
        }
