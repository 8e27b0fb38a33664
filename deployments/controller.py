"""The Adaptive Batch Controller: a Serve deployment that sizes every detector's batches.

Every ``interval_s`` it reads, per detector, what the pipeline measured since the last
reading (the detector's ``stats()``: d_batch, throughput, the size in force) and what
the node's accelerator reports (``deployments.collectors.latest_samples()`` when that
module is deployed; or all of it by PromQL when ``prometheus_url`` is set), turns it
into a ``policies.batch_size.Observation``, asks the detector's policy for the next
size and applies it with the detector's ``set_batch_size`` (load beside, warm, switch).
A load failure keeps the current size; it is fed back to the policy as a failed
observation, so the policy lowers and (throughput_aware) will not retry that size
until a re-probe is due. Every decision is logged with its reason and exported.

``ControlLoop`` holds all of this without Ray (detector clients are injected), so it
is tested with fakes; ``BatchController`` wires it to Serve handles and Ray metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from app.constants import CONTROLLER_APP, CONTROLLER_DEPLOYMENT, DETECTOR_DEPLOYMENT
from app.errors import BadRequest, NotFound, Unavailable, one_line
from app.records import RecordStore
from policies.batch_size import (
    DEFAULT_POLICY,
    POLICIES,
    ControllerState,
    Decision,
    Observation,
    PolicyConfig,
    ReasonCode,
    get_policy,
)

log = logging.getLogger("ray.serve")

APP_NAME = CONTROLLER_APP  # defined once in app.constants; these names are what the CLI imports
DEPLOYMENT_NAME = CONTROLLER_DEPLOYMENT
MANUAL = "manual"
POLICY_CHOICES = (MANUAL, *sorted(POLICIES))
# PolicyConfig fields an operator may set with `edgebatch batch auto ... --param k=v`
TUNABLE = tuple(f.name for f in fields(PolicyConfig) if f.name not in ("allowed_sizes", "start_size"))


class DetectorTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app: str = Field(..., description="Serve application that holds the detector")
    deployment: str = DETECTOR_DEPLOYMENT


class ControllerConfig(BaseModel):
    """The controller's ``user_config``; a ``serve deploy`` with a new one reconfigures it live."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(2.0, gt=0, le=600, description="seconds between readings (one policy window)")
    window: int = Field(3, ge=1, le=100, description="observations the policy sees (at the size in force)")
    policy: str = Field(MANUAL, description="policy for detectors nobody set one for; 'manual' only observes")
    policy_params: dict[str, float | int | None] = Field(default_factory=dict, description="PolicyConfig fields")
    stream_fps: float = Field(30.0, gt=0, description="stream rate F of the real-time criterion N/F")
    detectors: list[DetectorTarget] = Field(default_factory=list, description="empty: every app with a 'Detector'")
    prometheus_url: str | None = Field(None, description="read observations by PromQL instead of from the detectors")
    apply_timeout_s: float = Field(120.0, gt=0, description="how long a variant load may take")


class DetectorClient(Protocol):
    """What the loop needs of one detector (a Serve handle in production, a fake in tests)."""

    async def stats(self, stream_fps: float | None, since: float | None) -> dict[str, Any]: ...

    async def set_batch_size(self, n: int) -> dict[str, Any]: ...


def observation_from_stats(stats: dict[str, Any], fps: float, sample: Any | None = None) -> Observation | None:
    """A detector's window reading (plus its node's accelerator sample) as a policy observation.

    None when no batch ran in the window: an idle detector says nothing about batch sizes.
    N of the criterion is the mean size of the batches that formed, and the items each
    variant served go along, so a policy credits a size only with what its variant ran.
    Memory: the accelerator's when the node has one, else the node's RAM (a CPU engine lives there).
    """
    m = stats["metrics"]
    if not m.get("batches"):
        return None
    util = mem_used = mem_total = None
    if sample is not None:
        devices = [d for d in (getattr(sample, "devices", None) or []) if getattr(d, "kind", "") != "cpu"]
        if devices:  # the node's accelerator (the first; a detector replica uses one)
            dev = devices[0]
            util = getattr(dev, "util_percent", None)
            mem_used, mem_total = getattr(dev, "mem_used_bytes", None), getattr(dev, "mem_total_bytes", None)
        else:  # CPU-only node: the engine's memory is the node's RAM
            util = getattr(sample, "cpu_percent", None)
            mem_used, mem_total = getattr(sample, "ram_used_bytes", None), getattr(sample, "ram_total_bytes", None)
    formed = m.get("mean_batch_size")
    variant_items = tuple(sorted((int(size), int(items)) for size, items in (m.get("variant_items") or {}).items()))
    return Observation(
        batch_size=int(stats["max_batch_size"]),
        d_batch_s=float(m["d_batch_s"]),
        fps=float(fps),
        throughput=float(m["throughput"]),
        device_util=None if util is None else float(util) / 100.0,
        mem_used_bytes=None if mem_used is None else int(mem_used),
        mem_total_bytes=None if mem_total is None else int(mem_total),
        timestamp=time.time(),
        formed_batch_size=float(formed) if formed else None,
        variant_items=variant_items,
    )


DEFAULT_PROMQL = {
    "throughput": 'sum(ray_edgebatch_throughput_items_per_s{{model="{model}"}})',
    "d_batch": 'max(ray_edgebatch_d_batch_mean_seconds{{model="{model}"}})',
    "batch_size": 'max(ray_edgebatch_max_batch_size{{model="{model}"}})',
    # the batches that formed (the per-batch histogram): N of the criterion
    "formed_batch_size": ('sum(rate(ray_edgebatch_batch_size_sum{{model="{model}"}}[1m])) / '
                          'sum(rate(ray_edgebatch_batch_size_count{{model="{model}"}}[1m]))'),
    # the node collectors' series (deployments/collectors.py); absent on a node without them
    "device_util": 'max(ray_edgebatch_device_util_percent{{node="{node}",kind!="cpu"}})',
    "device_mem_used": 'max(ray_edgebatch_device_mem_used_bytes{{node="{node}",kind!="cpu"}})',
    "device_mem_total": 'max(ray_edgebatch_device_mem_total_bytes{{node="{node}",kind!="cpu"}})',
    "ram_used": 'max(ray_edgebatch_node_ram_used_bytes{{node="{node}"}})',
    "ram_total": 'max(ray_edgebatch_node_ram_total_bytes{{node="{node}"}})',
}


def observation_from_promql(query: Callable[[str], list[Any]], model: str, fps: float,
                            current: int, exprs: dict[str, str] | None = None, node: str = "") -> Observation | None:
    """The same observation from a Prometheus server: the detector's exported window gauges.

    ``query`` is ``PromQLClient.query`` (a list of samples with ``.value``); a series that
    is absent (not scraped yet) means no observation this window.
    """
    exprs = {**DEFAULT_PROMQL, **(exprs or {})}

    def scalar(key: str) -> float | None:
        samples = query(exprs[key].format(model=model, node=node))
        values = [float(s.value) for s in samples if s.value == s.value]
        return max(values) if values else None

    throughput, d_batch = scalar("throughput"), scalar("d_batch")
    if throughput is None or d_batch is None or throughput <= 0:
        return None
    size = scalar("batch_size")
    if size is not None and int(size) != current:
        return None  # Prometheus has not scraped the size in force yet: a stale window
    formed = scalar("formed_batch_size")
    util = mem_used = mem_total = None
    if node:
        util, mem_used, mem_total = scalar("device_util"), scalar("device_mem_used"), scalar("device_mem_total")
        if mem_used is None or not mem_total:  # CPU-only node: its RAM
            mem_used, mem_total = scalar("ram_used"), scalar("ram_total")
    return Observation(
        batch_size=current, d_batch_s=d_batch, fps=fps, throughput=throughput, timestamp=time.time(),
        device_util=None if util is None else util / 100.0,
        mem_used_bytes=None if mem_used is None else int(mem_used),
        mem_total_bytes=None if not mem_total else int(mem_total),
        formed_batch_size=formed if formed and formed > 0 else None,
    )


@dataclass
class DetectorControl:
    """Everything the controller keeps about one detector (keyed by the model it serves)."""

    model: str
    app: str
    policy: str
    params: dict[str, Any] = field(default_factory=dict)
    fps: float = 30.0
    state: ControllerState = field(default_factory=ControllerState)
    window: deque = field(default_factory=lambda: deque(maxlen=3))
    cursor: float | None = None
    current: int | None = None
    allowed: tuple[int, ...] = ()
    last_decision: dict[str, Any] | None = None
    last_failure: dict[str, Any] | None = None
    last_observation: dict[str, Any] | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=20))
    operator_set: bool = False  # an operator chose the policy: it holds until the config names another policy
    basis: dict[str, Any] = field(default_factory=dict)  # the config's policy when this control last took it
    pin: dict[str, Any] | None = None  # {"batch_size", "at", "by"} while an operator's fixed size holds
    applies: int = 0  # sizes this controller applied: a reading taken across one is stale
    applying: bool = False

    def to_record(self) -> dict[str, Any]:
        """What an operator set and what was decided: the part that must outlive this replica."""
        return {"model": self.model, "app": self.app, "policy": self.policy, "params": dict(self.params),
                "fps": self.fps, "operator_set": self.operator_set, "pin": self.pin, "basis": dict(self.basis),
                "last_decision": self.last_decision, "last_failure": self.last_failure,
                "history": list(self.history)}

    def restore(self, record: dict[str, Any]) -> None:
        """Take back a record written by an earlier controller replica (Serve restarted it)."""
        self.policy = str(record.get("policy", self.policy))
        self.params = dict(record.get("params") or {})
        self.fps = float(record.get("fps", self.fps))
        self.operator_set = bool(record.get("operator_set", False))
        self.pin = record.get("pin")
        self.basis = dict(record.get("basis") or {})
        self.last_decision, self.last_failure = record.get("last_decision"), record.get("last_failure")
        self.history.extend(record.get("history") or [])

    def take_config(self, config: ControllerConfig) -> bool:
        """Follow the config's policy unless an operator chose one under this same config.

        An operator's choice (``batch auto``/``set``/``manual``, the console) outlives a controller
        restart and a config change that leaves the policy alone; a config that names another
        policy, rate or parameters is the operator's newer word and wins, as a pin yields to a
        new size from the Serve config. True when the control changed.
        """
        basis = config_basis(config)
        if self.operator_set and self.basis == basis:
            return False
        overridden = self.operator_set
        self.basis = basis
        self.operator_set, self.pin = False, None
        if (self.policy, self.params, self.fps) == (config.policy, dict(config.policy_params), config.stream_fps):
            return overridden
        self.policy, self.params, self.fps = config.policy, dict(config.policy_params), config.stream_fps
        self.state, self.window = ControllerState(current=self.current), deque(maxlen=config.window)
        return True

    def policy_config(self) -> PolicyConfig:
        sizes = self.allowed or (1, 2, 4, 8, 16)
        params = {k: v for k, v in self.params.items() if k in TUNABLE}
        start = self.params.get("size") if self.policy == "fixed" else self.current
        if start not in sizes:
            start = None
        return PolicyConfig(allowed_sizes=tuple(sizes), start_size=start, **params)

    def status(self) -> dict[str, Any]:
        d = self.last_decision or {}
        return {
            "model": self.model,
            "app": self.app,
            "policy": self.policy,
            "params": dict(self.params),
            "stream_fps": self.fps,
            "current_batch_size": self.current,
            "allowed_sizes": list(self.allowed),
            "pin": self.pin,
            "batch_size": d.get("batch_size", self.current),
            "action": d.get("action"),
            "reason": d.get("reason"),
            "reason_code": d.get("reason_code"),
            "decided_at": d.get("at"),
            "last_decision": self.last_decision,
            "last_failure": self.last_failure,
            "last_observation": self.last_observation,
            "history": list(self.history),
            "measured_throughput": dict(self.state.throughput),
        }


def config_basis(config: ControllerConfig) -> dict[str, Any]:
    """The part of the controller's config an operator's own choice is weighed against."""
    return {"policy": config.policy, "params": dict(config.policy_params), "fps": config.stream_fps}


def check_policy(policy: str, params: dict[str, Any]) -> None:
    """Raise ValueError naming the problem (unknown policy, unknown or bad parameter)."""
    if policy != MANUAL:
        get_policy(policy)
    unknown = sorted(set(params) - set(TUNABLE) - {"size", "fps"})
    if unknown:
        raise ValueError(f"unknown policy parameter(s) {', '.join(unknown)}; valid: {', '.join((*TUNABLE, 'size', 'fps'))}")
    if policy == "fixed" and "size" not in params:
        raise ValueError("the fixed policy needs size=N")
    if "fps" in params and not float(params["fps"]) > 0:
        raise ValueError("fps must be > 0")
    PolicyConfig(**{k: v for k, v in params.items() if k in TUNABLE})  # validates the values


class ControlLoop:
    """The controller without Ray: detectors in (by app), decisions applied, everything recorded.

    A detector is known by the model it serves *now*: every reading names it, and when an app's
    detector switches to another model the old model's control (policy, pin, failures) is
    dropped and the new model starts afresh, so an operator addresses it by its new name.
    With ``records``, each control's operator settings and decisions are written there on every
    change and read back when the control is made again, so a restarted controller (or one that
    lost sight of a restarting detector) keeps the policy and pin the operator left.
    """

    def __init__(self, config: ControllerConfig, *, on_decision: Callable[[DetectorControl, dict], None] | None = None,
                 sampler: Callable[[], dict[str, Any]] | None = None,
                 promql: Callable[[str], list[Any]] | None = None, records: RecordStore | None = None) -> None:
        self.config = config
        self.records = records
        self.controls: dict[str, DetectorControl] = {}
        self.served: dict[str, str] = {}  # app -> the model its detector served at the last reading
        self._on_decision = on_decision
        self._sampler = sampler
        self._promql = promql
        self.ticks = 0
        self.errors: deque = deque(maxlen=20)
        self.samples_note = "not read yet"

    # -- which control a reading belongs to ------------------------------------
    def control_for(self, model: str, app: str) -> DetectorControl:
        ctl = self.controls.get(model)
        if ctl is None:
            ctl = DetectorControl(model, app, self.config.policy, dict(self.config.policy_params), self.config.stream_fps)
            ctl.window = deque(maxlen=self.config.window)
            ctl.basis = config_basis(self.config)
            saved = self._read_record(model)
            if saved is not None:
                ctl.restore(saved)
                self._take_config(ctl)
            self.controls[model] = ctl
        ctl.app = app
        return ctl

    def apply_config(self) -> None:
        """A new config: every control follows its policy, except where an operator chose under the same one."""
        for ctl in self.controls.values():
            self._take_config(ctl)

    def _take_config(self, ctl: DetectorControl) -> None:
        held = ctl.operator_set
        if not ctl.take_config(self.config):
            return
        if held:
            self._record(ctl, Decision(ctl.current or 0, "keep", f"the controller's config now names policy "
                                       f"{ctl.policy}: it replaces the operator's earlier choice", "controller",
                                       ctl.current or 0, code=ReasonCode.CONFIG_CHANGED))
        else:
            self._save(ctl)

    def _read_record(self, model: str) -> dict[str, Any] | None:
        if self.records is None:
            return None
        try:
            return self.records.get(model)
        except Exception as exc:  # the store is down: decide afresh rather than not at all
            self.errors.append({"model": model, "error": f"could not read saved control: {one_line(exc)}", "at": time.time()})
            return None

    def _save(self, ctl: DetectorControl) -> None:
        if self.records is None:
            return
        try:
            self.records.put(ctl.model, ctl.to_record())
        except Exception as exc:  # never stop deciding because the store hiccups; the status says so
            self.errors.append({"model": ctl.model, "error": f"could not save control: {one_line(exc)}", "at": time.time()})

    def _forget(self, model: str) -> None:
        """The model is no longer served by any detector: its control (and record) go."""
        self.controls.pop(model, None)
        if self.records is not None:
            try:
                self.records.delete(model)
            except Exception as exc:
                self.errors.append({"model": model, "error": f"could not delete saved control: {one_line(exc)}",
                                    "at": time.time()})

    def _known(self, app: str) -> DetectorControl | None:
        model = self.served.get(app)
        return self.controls.get(model) if model is not None else None

    def observe(self, app: str, stats: dict[str, Any]) -> DetectorControl:
        """Attach a detector's reading to the control of the model it serves now.

        A model change drops the old model's control and starts the new one afresh; a size in
        force that moved without this controller (a Serve config with a new ``max_batch_size``,
        a restarted replica) clears an operator's pin: the config wins and the status says so.
        """
        model = str(stats.get("model") or app)
        before = self.served.get(app)
        self.served[app] = model
        size = int(stats["max_batch_size"])
        if before is not None and before != model:
            if before not in self.served.values():
                self._forget(before)  # no detector serves it any more
            self._forget(model)
            ctl = self.control_for(model, app)
            ctl.current, ctl.allowed = size, tuple(sorted(stats["batch_sizes"]))
            self._record(ctl, Decision(size, "keep", f"app {app} now serves {model} (was {before}): {before}'s policy, "
                                       f"pin and failures no longer apply; policy {ctl.policy}", "controller", size,
                                       code=ReasonCode.MODEL_CHANGED))
            return ctl
        ctl = self.control_for(model, app)
        if ctl.pin is not None and not ctl.applying and ctl.current is not None and size != ctl.current:
            self._clear_pin(ctl, size)
        ctl.current, ctl.allowed = size, tuple(sorted(stats["batch_sizes"]))
        return ctl

    def _clear_pin(self, ctl: DetectorControl, size: int) -> None:
        pinned = ctl.pin["batch_size"] if ctl.pin else None
        ctl.pin = None
        ctl.policy, ctl.params, ctl.fps = self.config.policy, dict(self.config.policy_params), self.config.stream_fps
        ctl.operator_set, ctl.basis = False, config_basis(self.config)
        ctl.state, ctl.cursor = ControllerState(current=size), None
        ctl.window.clear()
        self._record(ctl, Decision(size, "keep", f"batch size changed to {size} outside the controller (a Serve config "
                                   f"with a new max_batch_size, or a restarted replica): pin on {pinned} cleared, "
                                   f"policy {ctl.policy}", "controller", pinned or size, code=ReasonCode.PIN_CLEARED))

    async def find(self, model: str, clients: dict[str, DetectorClient]) -> tuple[DetectorControl, DetectorClient]:
        """Read every detector once and return the one that serves ``model`` now (NotFound names what is served)."""
        for app, client in clients.items():
            known = self._known(app)
            stats = await client.stats(known.fps if known else self.config.stream_fps, None)
            ctl = self.observe(app, stats)
            if ctl.model == model:
                return ctl, client
        served = ", ".join(sorted(set(self.served[a] for a in clients if a in self.served))) or "none"
        raise NotFound(f"no detector serves model '{model}'; detectors serve: {served} (`edgebatch batch status`)")

    # -- operator API --------------------------------------------------------
    def set_policy(self, model: str, policy: str, params: dict[str, Any]) -> DetectorControl:
        check_policy(policy, params)
        ctl = self.controls.get(model)
        if ctl is None:
            raise KeyError(model)
        ctl.policy, ctl.params, ctl.operator_set = policy, dict(params), True
        ctl.basis = config_basis(self.config)
        ctl.fps = float(params.get("fps", self.config.stream_fps))
        ctl.state = ControllerState(current=ctl.current)
        ctl.window.clear()
        if policy == "fixed":
            ctl.pin = {"batch_size": int(params["size"]), "at": time.time(), "by": "operator (fixed policy)"}
        else:
            ctl.pin = None
        code = ReasonCode.MANUAL if policy == MANUAL else ReasonCode.POLICY_SET
        what = "manual: the controller observes and never changes the size" if policy == MANUAL else \
            f"policy set to {policy} {params or ''}".rstrip()
        self._record(ctl, Decision(ctl.current or 0, "keep", what, "operator", ctl.current or 0, code=code))
        return ctl

    async def pin(self, model: str, n: int, clients: dict[str, DetectorClient]) -> DetectorControl:
        """``edgebatch batch set``: apply size ``n`` now and hold it (fixed policy), recorded as a pin.

        A failed load keeps the size in force, is recorded, and raises Unavailable saying so.
        """
        ctl, client = await self.find(model, clients)
        if int(n) not in ctl.allowed:
            raise BadRequest(f"batch size {n} is not one of {model}'s variant sizes {list(ctl.allowed)}; "
                             "build that variant (`edgebatch models build`) and add it to batch_sizes")
        n, before = int(n), ctl.current
        if n != before:
            try:
                await self._set_size(ctl, client, n)
            except Exception as exc:
                message = one_line(exc)[:500]
                ctl.last_failure = {"batch_size": n, "kept_batch_size": before, "error": message, "at": time.time()}
                self._record(ctl, Decision(before or 0, "keep", f"operator asked for batch {n}: load failed "
                                           f"({message}); kept {before}", "operator", before or 0,
                                           code=ReasonCode.LOAD_FAILED))
                raise Unavailable(f"could not switch {model} to batch {n}: {message}; still serving batch {before}") from None
        self.set_policy(model, "fixed", {"size": n})
        ctl.pin = {"batch_size": n, "at": time.time(), "by": "edgebatch batch set"}
        action = "keep" if n == before else ("raise" if n > (before or 0) else "lower")
        self._record(ctl, Decision(n, action, f"operator pinned batch size {n} (fixed policy; `edgebatch batch auto` "
                                   "or `batch manual` releases it)", "operator", before or 0, code=ReasonCode.PINNED))
        return ctl

    # -- one reading per detector ----------------------------------------------
    async def tick(self, clients: dict[str, DetectorClient]) -> None:
        """``clients``: app -> detector client. One window for every detector."""
        self.ticks += 1
        for app in [a for a in self.served if a not in clients]:  # its app is gone (or restarting): drop it from
            model = self.served.pop(app)                        # memory; its record brings it back when it returns
            if model not in self.served.values():
                self.controls.pop(model, None)
        known = [self._known(app) for app in clients]
        if any(ctl is None or ctl.policy != MANUAL for ctl in known):
            samples = await self._samples()
        else:  # nothing decides this tick: do not ask every node for a reading
            samples, self.samples_note = {}, "not read: every detector is manual"
        for app, client in clients.items():
            try:
                await self.step(app, client, samples)
            except Exception as exc:  # one detector's trouble must not stop the others
                model = self.served.get(app, app)
                self.errors.append({"model": model, "error": f"{type(exc).__name__}: {exc}", "at": time.time()})
                log.warning("batch controller: %s: %s", model, exc)

    async def _samples(self) -> dict[str, Any]:
        if self._sampler is None or self._promql is not None:
            self.samples_note = "by PromQL" if self._promql is not None else "no collectors"
            return {}
        try:
            samples = await asyncio.get_running_loop().run_in_executor(None, self._sampler) or {}
        except Exception as exc:  # no collectors, or one node slow: decide without device readings
            self.samples_note = f"unavailable: {getattr(exc, 'message', None) or exc}"
            return {}
        self.samples_note = f"{len(samples)} node(s)"
        return samples

    async def step(self, app: str, client: DetectorClient, samples: dict[str, Any]) -> Decision | None:
        known = self._known(app)
        applies = known.applies if known else 0
        stats = await client.stats(known.fps if known else self.config.stream_fps, known.cursor if known else None)
        if known is not None and (known.applying or known.applies != applies):
            return None  # the size changed while this reading was on its way: it describes neither size
        ctl = self.observe(app, stats)
        if ctl is not known:  # first reading, or another model now: its window starts here
            ctl.cursor = stats["metrics"]["clock"]
            return None
        ctl.cursor = stats["metrics"]["clock"]
        if ctl.policy == MANUAL:
            return None
        if self._promql is not None:
            obs = await asyncio.get_running_loop().run_in_executor(
                None, observation_from_promql, self._promql, ctl.model, ctl.fps, ctl.current, None,
                str(stats.get("node_id") or ""))
        else:
            obs = observation_from_stats(stats, ctl.fps, samples.get(stats.get("node_id")))
        if ctl.policy == "fixed" and ctl.current != ctl.params.get("size") and obs is None:
            obs = Observation(ctl.current, 0.0, ctl.fps, 0.0, timestamp=time.time())  # pin even when idle
        if obs is None:
            return None
        ctl.last_observation = {"batch_size": obs.batch_size, "formed_batch_size": round(obs.filled_size, 2),
                                "d_batch_s": round(obs.d_batch_s, 4),
                                "throughput": round(obs.throughput, 2), "fps": obs.fps,
                                "criterion_s": round(obs.budget.criterion_s, 4),
                                "margin_s": round(obs.budget.margin_s(obs.d_batch_s), 4),
                                "variant_items": dict(obs.variant_items),
                                "mem_fraction": obs.mem_fraction, "device_util": obs.device_util}
        ctl.window.append(obs)
        policy = get_policy(ctl.policy)
        config = ctl.policy_config()
        decision, ctl.state = policy(list(ctl.window), replace(ctl.state, current=ctl.current), config)
        self._record(ctl, decision)
        if decision.batch_size != ctl.current:
            await self._apply(ctl, client, decision, policy, config)
        return decision

    async def _set_size(self, ctl: DetectorControl, client: DetectorClient, n: int) -> None:
        """Move the detector to ``n``; readings taken meanwhile are discarded."""
        ctl.applying = True
        try:
            await asyncio.wait_for(client.set_batch_size(n), self.config.apply_timeout_s)
        finally:
            ctl.applying = False
            ctl.applies += 1
        ctl.current = n
        ctl.cursor = None  # the detector cuts its window at the change itself
        ctl.window.clear()
        if ctl.last_failure and ctl.last_failure.get("batch_size") == n:
            ctl.last_failure = None  # that size loads now

    async def _apply(self, ctl: DetectorControl, client: DetectorClient, decision: Decision, policy, config) -> None:
        target, before = decision.batch_size, ctl.current
        try:
            await self._set_size(ctl, client, target)
        except Exception as exc:
            message = one_line(exc)[:500]
            ctl.last_failure = {"batch_size": target, "kept_batch_size": before, "error": message, "at": time.time()}
            log.warning("batch controller: %s: batch %s not applied, still %s: %s", ctl.model, target, before, message)
            # tell the policy: a failed observation at the size it asked for (lowers, and settles below it)
            failed = Observation(target, 0.0, ctl.fps, 0.0, failed=True, timestamp=time.time())
            back, ctl.state = policy([failed], replace(ctl.state, current=target), config)
            self._record(ctl, replace(back, batch_size=before, reason=f"{back.reason} ({message}); kept {before}",
                                      code=ReasonCode.LOAD_FAILED))
            ctl.state = replace(ctl.state, current=before)
            ctl.window.clear()

    def _record(self, ctl: DetectorControl, decision: Decision) -> None:
        entry = {
            "batch_size": decision.batch_size,
            "from": decision.from_size,
            "action": decision.action,
            "reason": decision.reason,
            "reason_code": str(decision.code),
            "policy": decision.policy,
            "at": time.time(),
        }
        ctl.last_decision = entry
        ctl.history.append(entry)
        self._save(ctl)
        if decision.action != "keep" or decision.policy in ("operator", "controller"):
            log.info("batch controller: %s %s %s -> %s: %s", ctl.model, decision.action, decision.from_size,
                     decision.batch_size, decision.reason)
        else:
            log.debug("batch controller: %s keep %s: %s", ctl.model, decision.batch_size, decision.reason)
        if self._on_decision is not None:
            try:
                self._on_decision(ctl, entry)
            except Exception as exc:  # metrics must never stop the loop
                log.debug("decision not exported: %s", exc)

    def status(self) -> dict[str, Any]:
        return {
            "interval_s": self.config.interval_s,
            "source": "promql" if self._promql is not None else "direct",
            "prometheus_url": self.config.prometheus_url,
            "ticks": self.ticks,
            "node_samples": self.samples_note,
            "detectors": {m: c.status() for m, c in sorted(self.controls.items())},
            "errors": list(self.errors)[-5:],
        }


# ---------------------------------------------------------------------------- Ray Serve side
from ray import serve  # noqa: E402  (the pure part above is importable and testable on its own)

from deployments.controller_http import ControllerRoutes, api  # noqa: E402  (GET /v1/batch, the operator's PUT/DELETE)


class _HandleClient:
    """A detector deployment reached through its Serve handle."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def stats(self, stream_fps: float | None, since: float | None) -> dict[str, Any]:
        return (await self._handle.stats.remote(stream_fps, since)).to_dict()  # a DetectorStats

    async def set_batch_size(self, n: int) -> dict[str, Any]:
        return (await self._handle.set_batch_size.remote(n)).to_dict()  # a DetectorInfo


def _node_samples() -> dict[str, Any]:
    """The collectors' latest readings per node; {} where the collectors are not deployed."""
    try:
        from deployments.collectors import latest_samples
    except ImportError:
        return {}
    return latest_samples(timeout_s=5)


@serve.deployment(name=DEPLOYMENT_NAME, num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class BatchController(ControllerRoutes):
    """One controller for every detector of the cluster; its loop runs inside the replica."""

    def __init__(self) -> None:
        from deployments.records import GcsRecords

        self._config = ControllerConfig()
        self._records = GcsRecords("controller")  # policies and pins outlive this replica (issue 15)
        self._loop = ControlLoop(self._config, on_decision=self._export, sampler=_node_samples, records=self._records)
        self._task: asyncio.Task | None = None
        self._handles: dict[tuple[str, str], Any] = {}
        self._gauge = self._counter = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        from app.config import parse_config

        config = parse_config(ControllerConfig, user_config, "user_config")
        check_policy(config.policy, dict(config.policy_params))
        promql = None
        if config.prometheus_url:
            try:
                from app.monitoring.promql import PromQLClient
            except ImportError as exc:
                from app.errors import ConfigError

                raise ConfigError(f"prometheus_url is set but the PromQL client is not installed ({exc}); "
                                  "unset prometheus_url to read the detectors directly") from None
            promql = PromQLClient(config.prometheus_url, timeout_s=min(config.interval_s, 5.0)).query
        controls = self._loop.controls
        self._config = config
        served = self._loop.served
        self._loop = ControlLoop(config, on_decision=self._export, sampler=_node_samples, promql=promql,
                                 records=self._records)
        self._loop.controls, self._loop.served = controls, served  # keep what operators set across a config change
        self._loop.apply_config()
        self._ensure_running()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def check_health(self) -> None:
        self._ensure_running()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._loop.tick(await self._clients())
            except Exception as exc:  # discovery trouble: try again next interval
                self._loop.errors.append({"model": "*", "error": f"{type(exc).__name__}: {exc}", "at": time.time()})
                log.warning("batch controller tick failed: %s", exc)
            await asyncio.sleep(max(0.05, self._config.interval_s - (time.monotonic() - started)))

    def _targets(self) -> list[tuple[str, str]]:
        if self._config.detectors:
            return [(d.app, d.deployment) for d in self._config.detectors]
        status = serve.status()
        return [(app_name, DETECTOR_DEPLOYMENT) for app_name, app in status.applications.items()
                if DETECTOR_DEPLOYMENT in app.deployments and str(getattr(app.status, "value", app.status)) == "RUNNING"]

    async def _clients(self) -> dict[str, _HandleClient]:
        """Detector clients by app (``app/deployment`` for a deployment not called Detector); the model each
        serves is read from every reading, never cached, so a detector switched to another model is followed."""
        loop = asyncio.get_running_loop()
        targets = await loop.run_in_executor(None, self._targets)
        clients: dict[str, _HandleClient] = {}
        for app, deployment in targets:
            handle = self._handles.get((app, deployment))
            if handle is None:
                handle = serve.get_deployment_handle(deployment, app_name=app)
                self._handles[(app, deployment)] = handle
            clients[app if deployment == DETECTOR_DEPLOYMENT else f"{app}/{deployment}"] = _HandleClient(handle)
        return clients

    def _export(self, ctl: DetectorControl, entry: dict[str, Any]) -> None:
        from ray.serve import metrics

        if self._gauge is None:
            self._gauge = metrics.Gauge("edgebatch_controller_batch_size", description="batch size the controller chose",
                                        tag_keys=("model",))
            self._counter = metrics.Counter("edgebatch_controller_decisions_total", description="decisions by reason",
                                            tag_keys=("model", "reason", "action"))
        self._gauge.set(entry["batch_size"], tags={"model": ctl.model})
        self._counter.inc(tags={"model": ctl.model, "reason": entry["reason_code"], "action": entry["action"]})

    # -- operator API (handle calls; errors are app.errors exceptions the caller gets with their message) --
    async def set_policy(self, model: str, policy: str = DEFAULT_POLICY, **params: Any) -> dict[str, Any]:
        """`edgebatch batch auto` (and `batch manual`: policy ``manual``)."""
        ctl, _ = await self._loop.find(model, await self._clients())
        try:
            self._loop.set_policy(ctl.model, policy, params)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return ctl.status()

    async def set_manual(self, model: str) -> dict[str, Any]:
        """`edgebatch batch manual`: stop deciding for ``model`` and drop its pin; the size stays as it is."""
        return await self.set_policy(model, MANUAL)

    async def set_fixed(self, model: str, n: int) -> dict[str, Any]:
        """`edgebatch batch set`: pin a size (the fixed policy) and apply it now."""
        ctl = await self._loop.pin(model, n, await self._clients())
        return ctl.status()

    async def status(self) -> dict[str, Any]:
        if not self._loop.controls:
            try:
                clients = await self._clients()
                for app, client in clients.items():
                    self._loop.observe(app, await client.stats(self._config.stream_fps, None))
            except Exception as exc:  # status must answer even while discovery fails
                return {**self._loop.status(), "error": str(exc)}
        return self._loop.status()


def build_app(args: dict[str, Any] | None = None):
    """The ``edgebatch-controller`` application at /v1/batch (deployments/controller_http.py)."""
    return BatchController.bind()
