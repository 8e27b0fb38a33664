"""The peer for `edgebatch bench http --external`: NVIDIA Triton (PyTriton) serving the same
demo ONNX file with its dynamic batcher, so both servers answer the same v2 request.

Not part of the product and not a dependency: run it from its own venv,

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install nvidia-pytriton onnxruntime numpy
    LD_LIBRARY_PATH=$(python3 -c 'import sysconfig;print(sysconfig.get_config_var("LIBDIR"))') \\
        /tmp/tvenv/bin/python scripts/triton_peer.py --port 8010 --max-batch 8

then `edgebatch bench http --external --protocol v2 --url http://127.0.0.1:8010 --batch-sizes 8`.
PyTriton bundles only Triton's Python backend, so ONNX Runtime runs inside the bound function,
as in the field notes' peer reading. LD_LIBRARY_PATH matters for pyenv Pythons (libpython).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

ASSET = Path(__file__).resolve().parent.parent / "app" / "demo" / "assets" / "detector.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8010)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue-delay-us", type=int, default=5000, help="max_queue_delay_microseconds (edgebatch: 5 ms)")
    ap.add_argument("--instances", type=int, default=1, help="instance group count (concurrent executions)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--model", type=Path, default=ASSET)
    args = ap.parse_args()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = [ort.InferenceSession(str(args.model), opts, providers=["CPUExecutionProvider"]) for _ in range(args.instances)]
    # the demo asset has a dynamic batch dimension; a fixed-batch export would be padded by the caller

    def make_infer(sess):
        @batch
        def infer(images: np.ndarray):
            return {"output0": sess.run(["output0"], {"images": images.astype(np.float32)})[0]}
        return infer

    config = TritonConfig(http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="demo-detector",
            infer_func=[make_infer(s) for s in sessions],
            inputs=[Tensor(name="images", dtype=np.float32, shape=(3, 320, 320))],
            outputs=[Tensor(name="output0", dtype=np.float32, shape=(-1, -1))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
            ),
            strict=False,
        )
        print(f"Triton (PyTriton) serving demo-detector on http://127.0.0.1:{args.port} "
              f"(dynamic batcher max {args.max_batch}, {args.queue_delay_us} us, {args.instances} instance(s))", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
