"""`edgebatch batch set | auto | manual | status`: the operator's side of the Adaptive Batch Controller.

The commands join the running Ray cluster and talk to the ``edgebatch-controller``
application through its Serve handle; ``set`` falls back to the detector itself when
the controller is not deployed. A detector is named by the model it serves now.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from app.errors import BadRequest, ConfigError, EdgebatchError, NotFound, Unavailable, one_line

POLICIES = ("throughput_aware", "algorithm1", "aimd", "fixed")


def register(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="batch size per detector: pin it, or let the controller adapt it")
    bsub = batch.add_subparsers(dest="batch_cmd", metavar="CMD")
    bsub.required = True

    p = bsub.add_parser("set", help="pin MODEL's batch size to N (loads that variant beside the current one, then switches)")
    p.add_argument("model")
    p.add_argument("n", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_set)

    p = bsub.add_parser("auto", help="let the controller choose MODEL's batch size with a policy")
    p.add_argument("model")
    p.add_argument("--policy", choices=POLICIES, default="throughput_aware",
                   help="throughput_aware (default: Algorithm 1 + throughput-gain stop), algorithm1, aimd, fixed")
    p.add_argument("--fps", type=float, default=None, help="stream rate F of the real-time criterion N/F")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="policy knob, e.g. min_gain=0.05, mem_threshold=0.9, raise_after=2, size=8 (fixed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_auto)

    p = bsub.add_parser("manual", help="stop adapting MODEL's batch size and release its pin; the size stays as it is")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_manual)

    p = bsub.add_parser("status", help="per detector: size in force, policy, pin, last decision and its reason")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param wants KEY=VALUE, e.g. min_gain=0.05; got {item!r}")
        text = value.strip()
        if text.lower() in ("none", "null", ""):
            params[key.strip()] = None
            continue
        try:
            params[key.strip()] = int(text)
        except ValueError:
            try:
                params[key.strip()] = float(text)
            except ValueError:
                raise ConfigError(f"--param {key}: {text!r} is not a number") from None
    return params


def _join() -> None:
    from deployments import cluster

    cluster.require_cluster()


def _controller() -> Any | None:
    """The controller's handle, or None when its application is not running."""
    from ray import serve

    from deployments.controller import APP_NAME, DEPLOYMENT_NAME

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception as exc:
        raise Unavailable(f"cannot read Serve's status: {exc}") from None
    if app is None or str(getattr(app.status, "value", app.status)) != "RUNNING":
        return None
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)


def _call(method: Any, *args: Any, timeout_s: float = 180.0, **kwargs: Any) -> dict[str, Any]:
    try:
        result = method.remote(*args, **kwargs).result(timeout_s=timeout_s)
    except EdgebatchError:
        raise  # the controller's own answer (unknown model, size without a variant, failed load): its message
    except Exception as exc:
        raise Unavailable(f"the batch controller did not answer: {one_line(exc)[:300]}") from None
    return result


def _detector_for(model: str) -> tuple[str, Any]:
    """Without a controller: the app whose detector serves ``model``."""
    from ray import serve

    seen = []
    for app_name, app in serve.status().applications.items():
        if "Detector" not in app.deployments:
            continue
        handle = serve.get_deployment_handle("Detector", app_name=app_name)
        info = handle.info.remote().result(timeout_s=30)
        seen.append(str(info.model))
        if info.model == model:
            return app_name, handle
    raise NotFound(f"no detector serves model '{model}'; detectors serve: {', '.join(seen) or 'none'} (`edgebatch status`)")


def cmd_set(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"batch size must be >= 1, got {args.n}")
    _join()
    t0 = time.perf_counter()
    controller = _controller()
    if controller is not None:
        out = _call(controller.set_fixed, args.model, args.n)
        line = (f"{args.model}: batch size {out.get('current_batch_size')} (pinned; `edgebatch batch auto` or "
                "`batch manual` releases it)")
    else:
        app_name, handle = _detector_for(args.model)
        try:
            info = handle.set_batch_size.remote(args.n).result(timeout_s=180)
        except Exception as exc:
            raise BadRequest(f"could not set {args.model} to batch {args.n}: {one_line(exc)[:300]}") from None
        out = {"model": args.model, "app": app_name, "current_batch_size": info.max_batch_size,
               "loaded_variants": sorted(info.loaded_variants)}
        line = f"{args.model}: batch size {out['current_batch_size']} (no controller running; set on the detector)"
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"{line} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_auto(args: argparse.Namespace) -> int:
    params = parse_params(args.param)
    if args.fps is not None:
        if not args.fps > 0:
            raise ConfigError(f"--fps must be > 0, got {args.fps}")
        params["fps"] = args.fps
    if args.policy == "fixed" and "size" not in params:
        raise ConfigError("--policy fixed needs --param size=N (or use `edgebatch batch set MODEL N`)")
    _join()
    controller = _controller()
    if controller is None:
        raise Unavailable("the batch controller (application edgebatch-controller) is not running; "
                          "deploy it with `edgebatch up` (it is in deployments/serve_config.yaml)")
    out = _call(controller.set_policy, args.model, args.policy, **params)
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"{args.model}: policy {out['policy']} {out.get('params') or ''} at batch size {out.get('current_batch_size')}; "
              "`edgebatch batch status` shows its decisions".replace("  ", " "))
    return 0


def cmd_manual(args: argparse.Namespace) -> int:
    _join()
    controller = _controller()
    if controller is None:
        raise Unavailable("the batch controller (application edgebatch-controller) is not running, so nothing adapts "
                          "batch sizes: every detector is already manual")
    out = _call(controller.set_manual, args.model)
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"{args.model}: manual at batch size {out.get('current_batch_size')}; the controller only observes "
              "(`edgebatch batch set` or the Serve config's max_batch_size change the size)")
    return 0


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"


def cmd_status(args: argparse.Namespace) -> int:
    _join()
    controller = _controller()
    if controller is None:
        raise Unavailable("the batch controller (application edgebatch-controller) is not running; "
                          "`edgebatch up` deploys it; `edgebatch status` still shows each detector's size")
    out = _call(controller.status, timeout_s=30)
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    print(f"batch controller: every {out['interval_s']} s, observations {out['source']}, {out['ticks']} readings")
    if not out["detectors"]:
        print("  no detectors found yet")
    for model, d in out["detectors"].items():
        print(f"  {model} (app {d['app']}): batch {d['current_batch_size']} of {d['allowed_sizes']}, policy {d['policy']}")
        if d.get("pin"):
            p = d["pin"]
            print(f"    pinned at {p['batch_size']} since {_clock(p.get('at'))} by {p.get('by')}")
        if d.get("action"):
            last = d.get("last_decision") or {}
            move = f"{d['action']} {last['from']} -> {d['batch_size']}" if last.get("from") and d["action"] != "keep" \
                else f"keep {d['batch_size']}"
            print(f"    last decision {_clock(d.get('decided_at'))} [{d.get('reason_code')}]: {move}: {d['reason']}")
        if d.get("last_observation"):
            o = d["last_observation"]
            formed = o.get("formed_batch_size")
            print(f"    last window at batch {o['batch_size']}: batches of {formed} formed, d_batch {o['d_batch_s']} s, "
                  f"N/F {o['criterion_s']} s, margin {o['margin_s']} s, {o['throughput']} items/s")
        if d.get("last_failure"):
            f = d["last_failure"]
            print(f"    last load failure: batch {f['batch_size']}: {f['error']} (kept {f['kept_batch_size']})")
    for err in out.get("errors", []):
        print(f"  note: {err['model']}: {err['error']}")
    return 0
