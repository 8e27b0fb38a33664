"""`edgebatch streams add|list|show|rm|follow`: the edgebatch-streams application over HTTP."""

from __future__ import annotations

import argparse
import json
from typing import Any

from app.errors import BadRequest, EdgebatchError, NotFound, Unavailable


def register(sub: argparse._SubParsersAction) -> None:
    streams = sub.add_parser("streams", help="real-time video streams through the batched detector")
    ssub = streams.add_subparsers(dest="streams_cmd", metavar="ACTION")
    ssub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=None,
                       help="base URL of the running app (default: the address `edgebatch up` recorded for this instance)")
        p.add_argument("--token", default=None, help="API bearer token (default: EDGEBATCH_API_TOKEN, else the "
                       "state folder's api_token file)")
        p.add_argument("--json", action="store_true", help="print the raw JSON answer")

    p = ssub.add_parser("add", help="start a stream from a video in the server's media folder, an allowed camera "
                        "URL, or a camera index (see docs/security.md for the allowlist)")
    p.add_argument("source", help="a file name in the server's media folder (default <state>/videos, e.g. "
                   "sample.mp4), a URL to a host listed in sources.hosts, or a camera index when enabled")
    p.add_argument("--fps", type=float, default=30.0, help="target frames per second (files are paced to it)")
    p.add_argument("--behind", choices=("drop_oldest", "queue"), default="drop_oldest",
                   help="when the pipeline falls behind: drop the oldest frames, or queue up to --queue-bound")
    p.add_argument("--queue-bound", type=int, default=8)
    p.add_argument("--jsonl", metavar="NAME.jsonl",
                   help="also write per-frame results as JSON Lines to this file name in the server's output "
                   "folder (default <state>/outputs on the reader's node)")
    p.add_argument("--video-out", metavar="NAME.mp4",
                   help="also write an annotated .mp4/.avi under this file name in the server's output folder")
    p.add_argument("--node", help="run the reader on this Ray node (id, IP or hostname): the camera's node")
    p.add_argument("--model", help="model name (must be the one the detector serves)")
    p.add_argument("--loop", action="store_true", help="replay a file forever (a camera stand-in)")
    p.add_argument("--id", help="stream id (default: random)")
    common(p)
    p.set_defaults(func=cmd_add)

    p = ssub.add_parser("list", help="all streams with state, fps, lag, drops")
    common(p)
    p.set_defaults(func=cmd_list)

    p = ssub.add_parser("show", help="one stream's full status")
    p.add_argument("id")
    common(p)
    p.set_defaults(func=cmd_show)

    p = ssub.add_parser("rm", help="stop a stream and free its reader")
    p.add_argument("id")
    common(p)
    p.set_defaults(func=cmd_rm)

    p = ssub.add_parser("follow", help="print a stream's per-frame results as they come (server-sent events)")
    p.add_argument("id")
    p.add_argument("--limit", type=int, default=0, help="stop after this many frames (0 = until the stream ends)")
    common(p)
    p.set_defaults(func=cmd_follow)


def _base(args: argparse.Namespace) -> str:
    from app.instance import recorded_http_url

    return (args.url or recorded_http_url()).rstrip("/") + "/v1/streams"


def _auth_headers(args: argparse.Namespace) -> dict[str, str]:
    """The Authorization header when a token is given or configured here; none otherwise."""
    from app.security.auth import load_api_token

    token = getattr(args, "token", None) or load_api_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _call(method: str, url: str, **kw: Any) -> Any:
    """One HTTP call; connection problems and 4xx/5xx bodies become EdgebatchErrors with the fix."""
    import httpx

    try:
        r = httpx.request(method, url, timeout=kw.pop("timeout", 180), **kw)
    except httpx.HTTPError as exc:
        raise Unavailable(f"no edgebatch streams app at {url} ({type(exc).__name__}); start it with `edgebatch up` "
                          "or pass --url") from None
    try:
        body = r.json()
    except ValueError:
        body = {"error": r.text.strip()[:300]}
    if r.status_code == 404 and "error" not in body or r.status_code == 404 and body.get("detail") == "Not Found":
        raise Unavailable(f"{url} answered 404: the edgebatch-streams application is not deployed; "
                          "check `edgebatch status` and deployments/serve_config.yaml")
    if r.status_code >= 400:
        msg = body.get("error") or body.get("detail") or r.text
        cls = {400: BadRequest, 404: NotFound}.get(r.status_code, EdgebatchError)
        raise cls(str(msg)) if cls is not EdgebatchError else EdgebatchError(str(msg), status=r.status_code)
    return body


def _row(s: dict) -> str:
    lag = s.get("lag_s")
    margin = s.get("realtime_margin_s")
    return (f"{s.get('id', '?'):<10} {s.get('state', '?'):<12} {s.get('fps_in', 0) or 0:>6.1f} {s.get('fps_out', 0) or 0:>7.1f} "
            f"{'-' if lag is None else f'{lag:.2f}':>6} {s.get('drops', 0) or 0:>6} {s.get('frames_out', 0) or 0:>7} "
            f"{'-' if margin is None else f'{margin * 1000:.0f}':>10}  {s.get('source', '')}")


HEADER = f"{'ID':<10} {'STATE':<12} {'FPS_IN':>6} {'FPS_OUT':>7} {'LAG_S':>6} {'DROPS':>6} {'FRAMES':>7} {'MARGIN_MS':>10}  SOURCE"


def cmd_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"source": args.source, "fps": args.fps, "behind": args.behind,
                            "queue_bound": args.queue_bound, "loop": args.loop}
    for key in ("jsonl", "video_out", "node", "model", "id"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    s = _call("POST", _base(args), json=body, headers=_auth_headers(args))
    if args.json:
        print(json.dumps(s))
    else:
        print(f"stream {s['id']} started: {s['source']} ({s.get('kind')}) at {s['options']['fps']} fps, "
              f"behind={s['options']['behind']}; follow it with `edgebatch streams follow {s['id']}`")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    out = _call("GET", _base(args))
    if args.json:
        print(json.dumps(out))
        return 0
    print(HEADER)
    for s in out["streams"]:
        print(_row(s))
    if not out["streams"]:
        print("(no streams; start one with `edgebatch streams add VIDEO_OR_URL`)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    s = _call("GET", f"{_base(args)}/{args.id}")
    if args.json:
        print(json.dumps(s))
        return 0
    for k, v in s.items():
        print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    out = _call("DELETE", f"{_base(args)}/{args.id}", headers=_auth_headers(args))
    if args.json:
        print(json.dumps(out))
    else:
        f = out.get("final", {})
        print(f"stream {args.id} removed ({f.get('frames_out', 0)} frames delivered, {f.get('drops', 0)} dropped)")
    return 0


def cmd_follow(args: argparse.Namespace) -> int:
    import httpx

    from app.streams.sinks import read_events

    url = f"{_base(args)}/{args.id}/events"
    seen = 0
    try:
        with httpx.stream("GET", url, timeout=httpx.Timeout(10, read=60)) as r:
            if r.status_code != 200:
                r.read()
                _call("GET", f"{_base(args)}/{args.id}")  # raises the app's own message (404 etc.)
                raise EdgebatchError(f"{url} answered {r.status_code}", status=r.status_code)
            for event, data in read_events(r.iter_lines()):
                if event == "frame":
                    seen += 1
                    if args.json:
                        print(json.dumps(data), flush=True)
                    else:
                        labels = ", ".join(f"{d['label']} {d['score']:.2f}" for d in data["detections"])
                        err = f" ERROR {data['error']}" if data.get("error") else ""
                        print(f"frame {data['frame']:>6}  t={data['capture_ts']:.3f}  "
                              f"{len(data['detections'])} objects: {labels}{err}", flush=True)
                    if args.limit and seen >= args.limit:
                        return 0
                elif event == "end":
                    print(f"stream ended: {data.get('reason')}", flush=True)
                    return 0
                elif event == "missed":
                    print(f"(missed {data['missed']} results: this follower was too slow)", flush=True)
    except httpx.HTTPError as exc:
        raise Unavailable(f"lost the event stream at {url} ({type(exc).__name__}); is the app running?") from None
    return 0
