"""Synthetic conv nets with several MB of weights per layer, made offline with ``onnx.helper``.

Why: the demo detector is 4 MB, which fits any budget; layer loading only matters
when models are bigger than the memory a replica may use. These nets give the
benchmark and the tests models of a chosen size without torch or a download.
Each layer is Conv(3x3, C->C) + Relu, so every layer boundary is a cut point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_conv_chain(
    path: Path,
    *,
    layers: int = 6,
    channels: int = 192,
    size: int = 32,
    batch: int = 1,
    seed: int = 0,
    input_name: str = "x",
) -> Path:
    """A chain of ``layers`` 3x3 convolutions on ``(batch, channels, size, size)``; ends with a global mean.

    Weights per layer: ``channels**2 * 9 * 4`` bytes (192 channels: 1.3 MB, 384: 5.3 MB).
    """
    from onnx import TensorProto, helper, numpy_helper

    from app.engines.onnxrt import save_onnx

    if layers < 1 or channels < 1 or size < 1:
        raise ValueError("layers, channels and size must be >= 1")
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(channels * 9))  # keeps activations O(1) through the chain
    inits = []
    nodes = []
    current = input_name
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * scale)
        b = (rng.standard_normal(channels).astype(np.float32) * 0.01)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                      name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        current = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"], name="pool"))
    graph = helper.make_graph(
        nodes, f"conv_chain_{layers}x{channels}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [batch, channels, 1, 1])],
        inits,
    )
    return save_onnx(graph, path)
