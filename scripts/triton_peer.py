"""The peer for `edgebatch bench http --peer-url`: NVIDIA Triton (PyTriton) with its dynamic batcher,
serving the demo detector two ways, so both servers answer the same request:

- ``demo-detector-jpeg``, the whole job as `/v1/detect` does it: a JPEG in (a v2 BYTES input),
  decode + letterbox (the project's own ``app.pipeline`` code, in a thread pool of the size the
  edgebatch replica uses), the batch normalised in one call, ONNX Runtime, boxes + NMS (the same
  ``Postprocessor``), the detections out as the same JSON. `edgebatch bench http --peer-url URL`
  (the default v1 protocol) loads it with the same JPEG frames.
- ``demo-detector``, the engine alone: a letterboxed FP32 tensor in, the raw output out
  (`edgebatch bench http --protocol v2 --peer-url URL`).

Not part of the product and not a dependency: run it from its own venv,

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install nvidia-pytriton onnxruntime numpy opencv-python-headless
    LD_LIBRARY_PATH=$(python3 -c 'import sysconfig;print(sysconfig.get_config_var("LIBDIR"))') \\
        /tmp/tvenv/bin/python scripts/triton_peer.py --port 8010 --max-batch 8

PyTriton bundles only Triton's Python backend, so the work runs inside the bound function, as in the
field notes' peer reading. LD_LIBRARY_PATH matters for pyenv Pythons (libpython).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's own pre- and post-processing (numpy + OpenCV only)

from app.imaging import DEFAULT_MAX_IMAGE_PIXELS  # noqa: E402
from app.pipeline import Postprocessor, PostprocessSettings, prepare, to_input  # noqa: E402

ASSET = ROOT / "app" / "demo" / "assets" / "detector.onnx"
META = ROOT / "app" / "demo" / "assets" / "detector.json"
FULL_JOB_SUFFIX = "-jpeg"  # `edgebatch bench http` names the peer's full-job model <model>-jpeg


def make_engine_infer(sess: ort.InferenceSession):
    @batch
    def infer(images: np.ndarray):
        return {"output0": sess.run(["output0"], {"images": images.astype(np.float32)})[0]}
    return infer


def make_full_job_infer(sess: ort.InferenceSession, post: Postprocessor, size: tuple[int, int], pool: ThreadPoolExecutor):
    """JPEG bytes -> the `/v1/detect` detections JSON, a batch at a time (what `Detector.handle_batch` does)."""

    def one(data: bytes):
        return prepare(data, size, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)

    @batch
    def infer(image: np.ndarray):
        bodies = [bytes(row[0]) for row in image]
        prepared = list(pool.map(one, bodies)) if len(bodies) > 1 else [one(bodies[0])]
        out = sess.run(["output0"], {"images": to_input([p.image for p in prepared])})[0]
        dets = post.decode(out, [p.letterbox for p in prepared])
        replies = [json.dumps({"detections": [d.to_json() for d in ds]}).encode() for ds in dets]
        return {"detections": np.array([[r] for r in replies], dtype=np.object_)}
    return infer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8010)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue-delay-us", type=int, default=5000, help="max_queue_delay_microseconds (edgebatch: 5 ms)")
    ap.add_argument("--instances", type=int, default=1, help="instance group count (concurrent executions)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--decode-threads", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                    help="JPEG decode threads of the full-job model (edgebatch's replica: min(4, cores))")
    ap.add_argument("--model", type=Path, default=ASSET)
    args = ap.parse_args()

    meta = json.loads(META.read_text())
    size = tuple(meta["input_size"])
    post = Postprocessor(meta["labels"], PostprocessSettings(layout=meta.get("layout", "auto")))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = [ort.InferenceSession(str(args.model), opts, providers=["CPUExecutionProvider"]) for _ in range(args.instances)]
    pool = ThreadPoolExecutor(max_workers=args.decode_threads, thread_name_prefix="peer-decode")
    # the demo asset has a dynamic batch dimension: every formed batch runs at its own size
    batcher = ModelConfig(max_batch_size=args.max_batch,
                          batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us))

    config = TritonConfig(http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="demo-detector",
            infer_func=[make_engine_infer(s) for s in sessions],
            inputs=[Tensor(name="images", dtype=np.float32, shape=(3, *size))],
            outputs=[Tensor(name="output0", dtype=np.float32, shape=(-1, -1))],
            config=batcher,
            strict=False,
        )
        triton.bind(
            model_name="demo-detector" + FULL_JOB_SUFFIX,
            infer_func=[make_full_job_infer(s, post, size, pool) for s in sessions],
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="detections", dtype=np.bytes_, shape=(1,))],
            config=batcher,
            strict=False,
        )
        print(f"Triton (PyTriton) serving demo-detector (tensor) and demo-detector{FULL_JOB_SUFFIX} (JPEG, whole job) "
              f"on http://127.0.0.1:{args.port} (dynamic batcher max {args.max_batch}, {args.queue_delay_us} us, "
              f"{args.instances} instance(s), {args.threads} ORT threads, {args.decode_threads} decode threads)", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
