"""Carry out a layer-loading plan (``policies.loading``) with ONNX Runtime, under a memory budget.

The plan says which stage to Load, Run and Free, on which worker, after which
steps. ``LayeredExecutor`` runs it: the ``interleaved`` policy with a loader
thread and an executor thread (stage i+1 is read and initialised while stage i
computes, as in DeepEye), the others in one thread in plan order. A Load creates
an ``InferenceSession`` from the stage's file; a Free drops it and hands the heap
back to the OS (``malloc_trim``), or the process would keep the pages and the
next stage would not fit.

Memory is counted twice, on purpose:
- ``ResidentMemory`` (``MemoryLedger``) is the accountant: every Load reserves the
  stage's measured cost before it starts and is refused if the budget would be
  exceeded, so the budget holds even if a plan or a caller is wrong; after every
  Free the process RSS growth is read back and what the OS did not get back is
  booked as residual, so the ledger follows actually-resident bytes;
- ``PeakRss`` measures what really happened: the kernel's resident high-water
  mark (``VmHWM``, reset through ``/proc/self/clear_refs``), or, where that is
  not available, a psutil sampling thread.

A stage's cost is measured, not guessed: ``profile_stages`` loads and runs each
stage alone and records the high-water-mark delta (weights, ONNX Runtime's
pre-packed copies and the activation arena: about 4x the file size here) plus
the activation it is handed (resident while it runs, but allocated before the
measurement started), and its load and run times for the planner.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import BadRequest, Unavailable
from policies.loading import (
    BudgetExceeded,
    Free,
    Load,
    LoadingPolicy,
    LoadPlan,
    ModelSpec,
    Run,
    StageSpec,
    plan_loading,
)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class MemoryBudgetError(Unavailable):
    """A model or stage does not fit the memory budget; carries the figures."""

    def __init__(self, message: str, *, needed_bytes: int, budget_bytes: int, stage: int | None = None) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        self.stage = stage

    def __reduce__(self):  # crosses process boundaries (``isolated``) with its figures
        return _rebuild_budget_error, (self.message, self.needed_bytes, self.budget_bytes, self.stage)


def _rebuild_budget_error(message: str, needed_bytes: int, budget_bytes: int, stage: int | None) -> MemoryBudgetError:
    return MemoryBudgetError(message, needed_bytes=needed_bytes, budget_bytes=budget_bytes, stage=stage)


def budget_error(exc: BudgetExceeded) -> MemoryBudgetError:
    """The planner's refusal, with the fix a user can apply."""
    return MemoryBudgetError(
        f"{exc}; nothing was loaded. Use a policy with a lower peak (partial, then interleaved), split the "
        f"model into more stages (`edgebatch models split {exc.model} --stages K`), or raise the budget",
        needed_bytes=exc.needed_bytes, budget_bytes=exc.budget_bytes, stage=exc.stage,
    )


# ---------------------------------------------------------------------------- measuring memory

def current_rss() -> int:
    """Resident set size of this process in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


@functools.cache
def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_heap() -> None:
    """Return freed heap pages to the OS (glibc); a no-op where the C library has no malloc_trim."""
    libc = _load_libc()
    if libc is not None:
        libc.malloc_trim(0)


def _hwm_available() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return "VmHWM" in _STATUS.read_text()
    except OSError:
        return False


class PeakRss:
    """Measured peak RSS over a ``with`` block, as a delta over the RSS at its start.

    Uses the kernel's exact high-water mark when it can be reset (Linux >= 4.0), else
    samples RSS every ``interval_s`` in a thread (which can miss spikes shorter than that).
    Not re-entrant across threads: the high-water mark is per process.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.baseline = current_rss()
        self.peak = self.baseline
        if _hwm_available():
            self.method = "VmHWM"
        else:
            self.method = "psutil sampling"
            self._thread = threading.Thread(target=self._sample, name="edgebatch-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())
        else:
            match = re.search(r"VmHWM:\s+(\d+)\s*kB", _STATUS.read_text())
            self.peak = int(match.group(1)) * 1024 if match else current_rss()

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak - self.baseline)


# ---------------------------------------------------------------------------- the accountant

class ResidentMemory:
    """The memory ledger: bytes held by loaded stages and whole models, refused beyond the budget.

    Costs are the measured ones (``StageProfile.load_bytes``). ``reserve`` happens
    before a load starts, so a load that would cross the budget never begins.
    Freeing a session does not hand every page back to the OS (allocator arenas,
    fragmentation), so after each Free the executor reports the process's measured
    RSS growth (``observe``): what is not explained by held entries is booked as
    ``residual_bytes`` and counts against the budget like a loaded stage.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise BadRequest(f"memory budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self.residual_bytes = 0
        self.peak_bytes = 0

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values()) + self.residual_bytes

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)

    def reserve(self, key: str, nbytes: int) -> None:
        with self._lock:
            if key in self._held:
                raise RuntimeError(f"{key} is already resident")
            now = sum(self._held.values()) + self.residual_bytes
            if now + nbytes > self.budget_bytes:
                raise MemoryBudgetError(
                    f"loading {key} needs {nbytes / 1e6:.1f} MB with {now / 1e6:.1f} MB already resident "
                    f"({self.residual_bytes / 1e6:.1f} MB of it freed but not returned to the OS), budget "
                    f"{self.budget_bytes / 1e6:.1f} MB; evict something first, use more stages or raise the budget",
                    needed_bytes=now + nbytes, budget_bytes=self.budget_bytes)
            self._held[key] = int(nbytes)
            self.peak_bytes = max(self.peak_bytes, now + nbytes)

    def release(self, key: str) -> None:
        """Idempotent: releasing twice (a ``__del__`` after a close) is harmless."""
        with self._lock:
            self._held.pop(key, None)

    def observe(self, measured_bytes: int) -> None:
        """Book the measured RSS growth that held entries do not explain as residual."""
        with self._lock:
            self.residual_bytes = max(0, int(measured_bytes) - sum(self._held.values()))
            self.peak_bytes = max(self.peak_bytes, sum(self._held.values()) + self.residual_bytes)

    def clear_residual(self) -> None:
        """A request is over: its leftovers become the next request's baseline."""
        with self._lock:
            self.residual_bytes = 0


MemoryLedger = ResidentMemory


# ---------------------------------------------------------------------------- stages

@dataclass(frozen=True)
class StageProfile:
    """One stage file with its measured cost: resident bytes, load and run seconds."""

    index: int
    path: Path
    file_bytes: int
    load_bytes: int
    load_s: float
    exec_s: float


@dataclass(frozen=True)
class StagedModel:
    """A model as stage files plus their profiles; ``spec`` is what the planner takes."""

    name: str
    stages: tuple[StageProfile, ...]

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.name, tuple(StageSpec(s.index, s.load_bytes, s.load_s, s.exec_s) for s in self.stages))

    @property
    def total_bytes(self) -> int:
        return sum(s.load_bytes for s in self.stages)

    @property
    def file_bytes(self) -> int:
        return sum(s.file_bytes for s in self.stages)

    @property
    def bytes_per_file_byte(self) -> float:
        """Measured resident bytes per byte of ONNX file: prices a whole model without loading it."""
        return self.total_bytes / max(1, self.file_bytes)


def load_session(path: Path, options: dict | None = None) -> Any:
    """An ONNX Runtime CPU session for one stage or whole model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    options = options or {}
    if options.get("intra_op_num_threads"):
        so.intra_op_num_threads = int(options["intra_op_num_threads"])
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise Unavailable(f"ONNX Runtime could not load {Path(path).name}: {exc}; split the model again "
                          "(edgebatch models split NAME --stages K)") from None


def warm_runtime(options: dict | None = None) -> None:
    """Create and drop a one-node session, so ONNX Runtime's one-time start-up (its environment and
    thread pools, tens of MB that are never given back) happens before any measurement baseline
    and is not booked against the first stage a process loads."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    import onnxruntime as ort

    so = ort.SessionOptions()
    if (options or {}).get("intra_op_num_threads"):
        so.intra_op_num_threads = int(options["intra_op_num_threads"])
    session = ort.InferenceSession(model.SerializeToString(),
                                   sess_options=so, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros((1, 4), np.float32)})
    del session
    release_heap()


def run_session(session: Any, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {i.name: tensors[i.name] for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def profile_stages(name: str, paths: Sequence[Path], inputs: dict[str, np.ndarray],
                   options: dict | None = None) -> StagedModel:
    """Load and run each stage alone, once, measuring its peak RSS delta and times.

    A throw-away load of stage 0 first pays ONNX Runtime's one-time start-up, so
    that is not charged to stage 0. Peak memory while profiling is one stage.
    """
    if not paths:
        raise BadRequest(f"model {name!r} has no stage files")
    release_heap()
    warm = load_session(paths[0], options)
    run_session(warm, inputs)
    del warm
    tensors = dict(inputs)
    profiles = []
    for index, path in enumerate(paths):
        release_heap()
        carried = sum(int(np.asarray(t).nbytes) for t in tensors.values())  # already resident, not in the delta
        with PeakRss() as peak:
            t0 = time.perf_counter()
            session = load_session(path, options)
            t1 = time.perf_counter()
            tensors = run_session(session, tensors)  # a cut carries one live tensor: drop the rest
            t2 = time.perf_counter()
        del session
        release_heap()
        file_bytes = Path(path).stat().st_size
        cost = max(peak.delta_bytes, file_bytes) + carried
        profiles.append(StageProfile(index, Path(path), file_bytes, cost, t1 - t0, t2 - t1))
    return StagedModel(name, tuple(profiles))


def isolated(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned Python process (``fn`` importable at module level).

    Why: a long-running process keeps freed pages resident and reuses them, so memory
    measured there as RSS growth is too low. A fresh process measures what is really
    needed. Costs a second or two of start-up.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def profile_stages_isolated(name: str, paths: Sequence[Path], inputs: dict[str, np.ndarray],
                            options: dict | None = None) -> StagedModel:
    """``profile_stages`` in a fresh process: a replica that served other models would price stages too cheap."""
    return isolated(profile_stages, name, [Path(p) for p in paths], inputs, options)


# ---------------------------------------------------------------------------- the executor

@dataclass(frozen=True)
class StepRecord:
    """What one step did and when (seconds from the start of the run)."""

    op: str
    stage: int
    worker: str
    start_s: float
    end_s: float


@dataclass
class LayeredResult:
    """Outputs of one request and what it cost: time, accounted and measured memory."""

    outputs: dict[str, np.ndarray]
    policy: str
    total_s: float
    planned_peak_bytes: int
    accounted_peak_bytes: int
    measured_peak_bytes: int
    measure_method: str
    steps: list[StepRecord] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # "start load 1", "end run 0", ... in the order they happened

    def overlaps(self) -> list[tuple[int, int]]:
        """(load stage, run stage) pairs whose events interleave: the load started before the run
        ended and ended after the run started. Read from the event order, not from clocks."""
        pos = {e: i for i, e in enumerate(self.events)}
        pairs = []
        for load in (r.stage for r in self.steps if r.op == "load"):
            for run in (r.stage for r in self.steps if r.op == "run"):
                ls, le = pos.get(f"start load {load}"), pos.get(f"end load {load}")
                rs, re_ = pos.get(f"start run {run}"), pos.get(f"end run {run}")
                if None not in (ls, le, rs, re_) and ls < re_ and le > rs:
                    pairs.append((load, run))
        return pairs


class LayeredExecutor:
    """Runs requests through a staged model under one policy and one accountant."""

    def __init__(self, memory: ResidentMemory, *, options: dict | None = None) -> None:
        self.memory = memory
        self.options = dict(options or {})
        self._runtime_warm = False

    def plan(self, model: StagedModel, policy: LoadingPolicy) -> LoadPlan:
        """The plan, refused before anything loads if its peak exceeds what the budget leaves free."""
        free = self.memory.budget_bytes - self.memory.resident_bytes
        try:
            return plan_loading(model.spec, policy, free)
        except BudgetExceeded as exc:
            if free < self.memory.budget_bytes:
                exc = BudgetExceeded(exc.model, exc.policy, exc.needed_bytes, exc.stage, free)
            raise budget_error(exc) from None

    def run(self, model: StagedModel, policy: LoadingPolicy, inputs: dict[str, np.ndarray],
            *, request_id: str = "r") -> LayeredResult:
        """Plan (may raise ``MemoryBudgetError`` before anything loads), then carry the plan out."""
        plan = self.plan(model, policy)
        if not self._runtime_warm:
            warm_runtime(self.options)
            self._runtime_warm = True
        release_heap()
        before = self.memory.peak_bytes
        self.memory.peak_bytes = self.memory.resident_bytes
        try:
            with PeakRss() as peak:
                t0 = time.perf_counter()
                outputs, records, events = self._carry_out(model, plan, inputs, request_id, t0)
                total = time.perf_counter() - t0
        finally:
            accounted = self.memory.peak_bytes
            self.memory.peak_bytes = max(before, accounted)
            self.memory.clear_residual()
        return LayeredResult(outputs, policy, total, plan.peak_bytes, accounted, peak.delta_bytes, peak.method,
                             records, events)

    def _carry_out(self, model: StagedModel, plan: LoadPlan, inputs: dict[str, np.ndarray], request_id: str,
                   t0: float) -> tuple[dict[str, np.ndarray], list[StepRecord], list[str]]:
        sessions: dict[int, Any] = {}
        tensors: dict[str, np.ndarray] = dict(inputs)
        final: dict[str, np.ndarray] = {}
        last = len(model.stages) - 1
        records: list[StepRecord | None] = [None] * len(plan.steps)
        done = [threading.Event() for _ in plan.steps]
        failed: list[BaseException] = []
        key = f"{model.name}#{request_id}/stage"
        baseline = current_rss()
        events: list[str] = []
        events_lock = threading.Lock()

        def event(text: str) -> None:
            with events_lock:
                events.append(text)

        def do(index: int) -> None:
            step = plan.steps[index]
            start = time.perf_counter() - t0
            event(f"start {step.op} {step.stage}")
            stage = model.stages[step.stage]
            if isinstance(step, Load):
                self.memory.reserve(f"{key}{step.stage}", stage.load_bytes)
                try:
                    sessions[step.stage] = load_session(stage.path, self.options)
                except BaseException:
                    self.memory.release(f"{key}{step.stage}")
                    raise
            elif isinstance(step, Run):
                produced = run_session(sessions[step.stage], tensors)
                tensors.clear()  # a cut carries one live tensor: the previous activations can go
                tensors.update(produced)
                if step.stage == last:
                    final.update(produced)
                self.memory.observe(current_rss() - baseline)  # arena growth beyond the profiled cost counts
            elif isinstance(step, Free):
                self._free(sessions, step.stage, f"{key}{step.stage}")
                self.memory.observe(current_rss() - baseline)
            event(f"end {step.op} {step.stage}")
            records[index] = StepRecord(step.op, step.stage, step.worker, start, time.perf_counter() - t0)

        def worker(indices: list[int]) -> None:
            for index in indices:
                for dep in plan.steps[index].deps:
                    done[dep].wait()
                if failed:
                    break
                try:
                    do(index)
                except BaseException as exc:  # any error: handed to the caller below
                    failed.append(exc)
                    for event in done:
                        event.set()  # wake the other worker so it stops too
                    break
                done[index].set()

        try:
            if plan.policy == "interleaved":
                by_worker: dict[str, list[int]] = {}
                for i, step in enumerate(plan.steps):
                    by_worker.setdefault(step.worker, []).append(i)
                threads = [threading.Thread(target=worker, args=(ids,), name=f"edgebatch-{name}", daemon=True)
                           for name, ids in by_worker.items()]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                worker(list(range(len(plan.steps))))
        finally:
            for stage in list(sessions):  # bulk/linear keep stages until the request is done
                self._free(sessions, stage, f"{key}{stage}")
        if failed:
            raise failed[0]
        return final, [r for r in records if r is not None], events

    def _free(self, sessions: dict[int, Any], stage: int, key: str) -> None:
        session = sessions.pop(stage, None)
        del session
        release_heap()
        self.memory.release(key)


def run_once(model: StagedModel, policy: LoadingPolicy, inputs: dict[str, np.ndarray], budget_bytes: int) -> LayeredResult:
    """One request under a fresh ledger (for ``isolated``: a measurement in a clean process)."""
    return LayeredExecutor(MemoryLedger(budget_bytes)).run(model, policy, inputs)
