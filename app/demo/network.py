"""A small anchor-free YOLO-style detector whose ONNX export has the Ultralytics YOLOv8 layout.

The export contract (what serving relies on, see ``detector.json``):
input ``images`` float32 (B, 3, 320, 320) RGB 0..1 letterboxed; output ``output0`` float32
(B, 4 + nc, A) with rows cx, cy, w, h in input pixels and then per-class sigmoid probabilities,
no objectness row. torch is imported by this module, ``train.py`` and the optional torch backend
(``app/engines/torchrt.py``) only; serving the ONNX export needs none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own idiom


@dataclass(frozen=True)
class DetectorSpec:
    """Shape of the network; ``width`` scales every channel count (cost grows with its square)."""

    num_classes: int = 3
    input_size: int = 320
    strides: tuple[int, ...] = (8, 16)
    width: int = 16  # stem channels; stages use 2x, 4x, 8x
    head_channels: int = 64


class ConvBNAct(nn.Sequential):
    """Conv + BatchNorm + SiLU, the YOLOv8 building block (BN folds into the conv at export)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03),
            nn.SiLU(inplace=True),
        )


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's split-and-concatenate block: cheap depth with good gradient flow."""

    def __init__(self, c_in: int, c_out: int, n: int = 1) -> None:
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = ConvBNAct(c_in, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.hidden, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class Head(nn.Module):
    """Decoupled box / class branches for one stride."""

    def __init__(self, c_in: int, c_head: int, num_classes: int) -> None:
        super().__init__()
        self.box = nn.Sequential(ConvBNAct(c_in, c_head), ConvBNAct(c_head, c_head), nn.Conv2d(c_head, 4, 1))
        self.cls = nn.Sequential(ConvBNAct(c_in, c_head), ConvBNAct(c_head, c_head), nn.Conv2d(c_head, num_classes, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box(x), self.cls(x)


def make_anchor_points(input_size: int, strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres (A, 2) in input pixels and the stride of each (A,), stride-8 cells first."""
    points, stride_of = [], []
    for s in strides:
        n = input_size // s
        ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
        points.append(torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s], dim=1))
        stride_of.append(torch.full((n * n,), float(s)))
    return torch.cat(points), torch.cat(stride_of)


class Detector(nn.Module):
    """Backbone (strides 2..16), a two-level PAN neck and decoupled heads at strides 8 and 16.

    ``forward`` returns the raw per-cell (ltrb distances in strides, class logits) for training;
    ``export_forward`` (used via ``ExportWrapper``) decodes them into the YOLOv8 layout.
    """

    def __init__(self, spec: DetectorSpec = DetectorSpec()) -> None:
        super().__init__()
        if spec.strides != (8, 16):
            raise ValueError("this network has exactly the strides (8, 16)")
        self.spec = spec
        w = spec.width
        self.stem = ConvBNAct(3, w, 3, 2)  # /2
        self.stage2 = nn.Sequential(ConvBNAct(w, 2 * w, 3, 2), C2f(2 * w, 2 * w, 1))  # /4
        self.stage3 = nn.Sequential(ConvBNAct(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 2))  # /8
        self.stage4 = nn.Sequential(ConvBNAct(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 2))  # /16
        self.top_down = C2f(12 * w, 4 * w, 1)
        self.down = ConvBNAct(4 * w, 4 * w, 3, 2)
        self.bottom_up = C2f(12 * w, 8 * w, 1)
        self.heads = nn.ModuleList([Head(4 * w, spec.head_channels, spec.num_classes),
                                    Head(8 * w, spec.head_channels, spec.num_classes)])
        points, stride_of = make_anchor_points(spec.input_size, spec.strides)
        self.register_buffer("anchor_points", points, persistent=False)
        self.register_buffer("anchor_strides", stride_of, persistent=False)
        self._init_biases()

    def _init_biases(self) -> None:
        # Start with a low class prior (few cells hold objects) and boxes about 1.5 strides wide.
        for head in self.heads:
            nn.init.constant_(head.cls[-1].bias, -4.6)
            nn.init.constant_(head.box[-1].bias, 0.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs: (B, A, 4) ltrb distances in units of the cell's stride, (B, A, nc) logits."""
        p3 = self.stage3(self.stage2(self.stem(images)))
        p4 = self.stage4(p3)
        n3 = self.top_down(torch.cat([F.interpolate(p4, scale_factor=2.0, mode="nearest"), p3], dim=1))
        n4 = self.bottom_up(torch.cat([self.down(n3), p4], dim=1))
        boxes, logits = [], []
        for feature, head in zip((n3, n4), self.heads):
            box, cls = head(feature)
            boxes.append(box.flatten(2))
            logits.append(cls.flatten(2))
        return torch.cat(boxes, dim=2).transpose(1, 2), torch.cat(logits, dim=2).transpose(1, 2)

    def decode_ltrb(self, ltrb: torch.Tensor) -> torch.Tensor:
        """(B, A, 4) raw distances -> (B, A, 4) x1, y1, x2, y2 boxes in input pixels."""
        dist = F.softplus(ltrb) * self.anchor_strides[None, :, None]
        xy = self.anchor_points[None]
        return torch.cat([xy - dist[..., :2], xy + dist[..., 2:]], dim=-1)


class ExportWrapper(nn.Module):
    """The graph that is exported: decoded boxes and class probabilities in the YOLOv8 layout."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ltrb, logits = self.detector(images)
        xyxy = self.detector.decode_ltrb(ltrb)
        cxcy = (xyxy[..., :2] + xyxy[..., 2:]) * 0.5
        wh = xyxy[..., 2:] - xyxy[..., :2]
        return torch.cat([cxcy, wh, logits.sigmoid()], dim=-1).transpose(1, 2)


def export_onnx(detector: Detector, path: str) -> None:
    """Write the YOLOv8-layout ONNX file with a dynamic batch axis."""
    model = ExportWrapper(detector).eval()
    size = detector.spec.input_size
    dummy = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        model, (dummy,), path, dynamo=False, opset_version=17,
        input_names=["images"], output_names=["output0"],
        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
        do_constant_folding=True,
    )
    n_anchors = sum((size // s) ** 2 for s in detector.spec.strides)
    declare_output_shape(path, 4 + detector.spec.num_classes, n_anchors)


def declare_output_shape(path: str, channels: int, anchors: int) -> None:
    """Write the static (batch, 4 + nc, A) output shape into the file, as Ultralytics exports do.

    The legacy exporter leaves dims 1 and 2 symbolic; consumers read nc and A from them.
    """
    import onnx

    model = onnx.load(path)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[1].ClearField("dim_param")
    dims[1].dim_value = channels
    dims[2].ClearField("dim_param")
    dims[2].dim_value = anchors
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True))
    onnx.save(model, path)


def _module_path(node_name: str) -> str:
    """The torch module path of an exported Conv node: ``/detector/stage2/stage2.1/cv1/cv1.0/Conv`` ->
    ``stage2.1.cv1.0`` (the legacy exporter names each scope, repeating its parent's prefix)."""
    scopes = node_name.strip("/").split("/")[1:-1]
    return ".".join(s for i, s in enumerate(scopes) if not (i + 1 < len(scopes) and scopes[i + 1].startswith(s + ".")))


def load_onnx_weights(detector: Detector, onnx_path: str) -> Detector:
    """Put the weights of an ``export_onnx`` file (BatchNorm folded into each conv) back into ``detector``.

    The committed asset ships only the ONNX file; this makes the same network in torch, so the
    torch backend serves the very weights the ONNX variants do. Each folded conv's BatchNorm
    becomes the identity (scale 1, shift = the folded bias, mean 0, variance 1 - eps).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    modules = dict(detector.named_modules())
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    expected = sum(isinstance(m, nn.Conv2d) for m in detector.modules())
    if len(convs) != expected:
        raise ValueError(f"{onnx_path} has {len(convs)} convolutions, this DetectorSpec {expected}: another network")
    with torch.no_grad():
        for node in convs:
            path = _module_path(node.name)
            conv = modules.get(path)
            weight = torch.from_numpy(values[node.input[1]].copy())
            bias = torch.from_numpy(values[node.input[2]].copy())
            if not isinstance(conv, nn.Conv2d) or conv.weight.shape != weight.shape:
                raise ValueError(f"{onnx_path}: conv {node.name} does not match module {path!r} of this DetectorSpec")
            conv.weight.copy_(weight)
            if conv.bias is not None:
                conv.bias.copy_(bias)
                continue
            norm = modules[path.rsplit(".", 1)[0]][1]
            norm.weight.fill_(1.0)
            norm.bias.copy_(bias)
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
    return detector.eval()


def demo_export_module(onnx_path: str | None) -> tuple[ExportWrapper, str]:
    """The demo detector's exported graph as a torch module, and where its weights came from.

    ``onnx_path``: the committed ``detector.onnx`` (the trained weights); None: seeded random
    weights, for a speed curve on a machine without the ``onnx`` package (same shapes, same cost).
    """
    torch.manual_seed(0)
    detector = Detector(DetectorSpec())
    if onnx_path is None:
        return ExportWrapper(detector.eval()).eval(), "random (seeded): speed only, outputs are not the demo's"
    return ExportWrapper(load_onnx_weights(detector, onnx_path)).eval(), f"trained weights from {onnx_path}"
