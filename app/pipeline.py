"""The detector's stages as small functions: decode + letterbox -> batch -> engine -> boxes + NMS.

Post-processing reads the output layouts of Ultralytics YOLOv8 (``(B, 4+nc, A)``,
no objectness) and YOLOv5 (``(B, A, 5+nc)``, with objectness) ONNX exports, so a
user's own exported YOLO model works; the demo detector uses the v8 layout.
Boxes come back in the original image's pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from app.errors import BadRequest
from app.imaging import DEFAULT_MAX_IMAGE_PIXELS, check_declared_size

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """How an original image was fitted into the model input; inverts box coordinates."""

    scale: float
    pad_x: float
    pad_y: float
    orig_w: int
    orig_h: int


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    score: float
    class_id: int
    label: str

    def to_json(self) -> dict:
        return {
            "box": [round(v, 2) for v in self.box],
            "score": round(self.score, 4),
            "class_id": self.class_id,
            "label": self.label,
        }


@dataclass
class PreparedImage:
    """One request after pre-processing: the letterboxed uint8 image plus what undoes the letterbox.

    It stays uint8 (a quarter of the float32 bytes) until the batch is formed: ``to_input`` then
    normalises the whole batch in one vectorised call, wherever the batch is (replica or process)."""

    image: np.ndarray  # (H, W, 3) BGR uint8 at the model input size
    letterbox: Letterbox
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tensor(self) -> np.ndarray:
        """This image alone as a model input row (3, H, W) float32 RGB 0..1 (v2 clients, tests)."""
        return to_input([self.image])[0]


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """JPEG/PNG/... bytes -> BGR uint8; a clear 400 for anything that is not an image or is too large
    (checked from the header, before any pixel is allocated)."""
    if not data:
        raise BadRequest("empty request body: send a JPEG or PNG image as the body")
    check_declared_size(data, max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV's own pixel limit (formats whose header we do not read)
        raise BadRequest(f"image is larger than this server decodes (max_image_pixels {max_pixels}); "
                         "send a smaller image") from None
    if img is None:
        raise BadRequest(
            f"body is not a decodable image ({len(data)} bytes, starts with {data[:8]!r}): "
            "send JPEG or PNG bytes with Content-Type image/jpeg or image/png"
        )
    if img.shape[0] * img.shape[1] > max_pixels:
        raise BadRequest(f"image of {img.shape[1]}x{img.shape[0]} pixels exceeds max_image_pixels ({max_pixels})")
    return img


def letterbox_image(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Aspect-preserving resize into ``size`` (h, w), centred, padded with 114; stays BGR uint8 HWC."""
    h, w = img.shape[:2]
    th, tw = size
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pad_y, pad_x = (th - nh) / 2, (tw - nw) / 2
    top, left = int(round(pad_y - 0.1)), int(round(pad_x - 0.1))
    canvas = np.full((th, tw, 3), PAD_VALUE, dtype=np.uint8)
    resized = img if (nh, nw) == (h, w) else cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas[top : top + nh, left : left + nw] = resized
    return canvas, Letterbox(scale=scale, pad_x=left, pad_y=top, orig_w=w, orig_h=h)


def to_input(images: Sequence[np.ndarray]) -> np.ndarray:
    """Letterboxed BGR uint8 images (H, W, 3) -> the model's (N, 3, H, W) float32 RGB 0..1 batch, in one
    vectorised call (BGR->RGB, HWC->CHW, scale): the only place pixels become floats."""
    return cv2.dnn.blobFromImages(list(images), scalefactor=1 / 255.0, swapRB=True)


def letterbox(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """``letterbox_image`` as one model input row (3, H, W) float32 RGB 0..1."""
    canvas, lb = letterbox_image(img, size)
    return to_input([canvas])[0], lb


def prepare(data: bytes | np.ndarray, size: tuple[int, int],
            max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PreparedImage:
    """Pre-processing stage for one request or frame."""
    img = decode_image(data, max_pixels) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        raise BadRequest("expected a colour image (H, W, 3)")
    canvas, lb = letterbox_image(img, size)
    return PreparedImage(image=canvas, letterbox=lb)


def detect_layout(output: np.ndarray, n_classes: int | None = None) -> str:
    """Guess YOLOv8 (B, 4+nc, A) vs YOLOv5 (B, A, 5+nc) from the shape."""
    if output.ndim != 3:
        raise ValueError(f"expected a 3-D YOLO output, got shape {output.shape}")
    _, d1, d2 = output.shape
    if n_classes is not None:
        if d1 == 4 + n_classes:
            return "yolov8"
        if d2 == 5 + n_classes:
            return "yolov5"
    return "yolov8" if d1 < d2 else "yolov5"


def _candidates(pred: np.ndarray, layout: str, conf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw prediction -> (boxes cxcywh, scores, class ids) above ``conf``."""
    if layout == "yolov8":
        p = pred.T  # (A, 4+nc)
        cls_scores = p[:, 4:]
    else:
        p = pred  # (A, 5+nc)
        cls_scores = p[:, 5:] * p[:, 4:5]
    class_ids = cls_scores.argmax(axis=1)
    scores = cls_scores[np.arange(len(class_ids)), class_ids]
    keep = scores > conf
    return p[keep, :4], scores[keep], class_ids[keep]


def postprocess(
    output: np.ndarray,
    letterboxes: Sequence[Letterbox],
    labels: Sequence[str],
    *,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    layout: str = "auto",
) -> list[list[Detection]]:
    """Decode boxes, class-aware NMS, undo the letterbox; one list per real (unpadded) image."""
    if layout == "auto":
        layout = detect_layout(output, len(labels) if labels else None)
    results: list[list[Detection]] = []
    for i, lb in enumerate(letterboxes):
        boxes, scores, class_ids = _candidates(output[i], layout, conf)
        if len(scores) == 0:
            results.append([])
            continue
        xywh = boxes.copy()
        xywh[:, 0] -= xywh[:, 2] / 2
        xywh[:, 1] -= xywh[:, 3] / 2
        keep = cv2.dnn.NMSBoxesBatched(
            xywh.tolist(), scores.tolist(), class_ids.tolist(), conf, iou, top_k=max_det
        )
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)[:max_det]
        dets = []
        for k in keep:
            x, y, bw, bh = xywh[k]
            x1 = (x - lb.pad_x) / lb.scale
            y1 = (y - lb.pad_y) / lb.scale
            x2 = (x + bw - lb.pad_x) / lb.scale
            y2 = (y + bh - lb.pad_y) / lb.scale
            x1, x2 = float(np.clip(x1, 0, lb.orig_w)), float(np.clip(x2, 0, lb.orig_w))
            y1, y2 = float(np.clip(y1, 0, lb.orig_h)), float(np.clip(y2, 0, lb.orig_h))
            cid = int(class_ids[k])
            label = labels[cid] if cid < len(labels) else str(cid)
            dets.append(Detection((x1, y1, x2, y2), float(scores[k]), cid, label))
        dets.sort(key=lambda d: -d.score)
        results.append(dets)
    return results


@dataclass(frozen=True)
class PostprocessSettings:
    """The thresholds boxes are decoded with; replaced whole, so a batch never sees half an update."""

    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    layout: str = "auto"


class Postprocessor:
    """The one post-processing stage (boxes + NMS), owner of the live thresholds.

    The detector's batch handler and the stream pipeline both decode through one of these,
    so a frame and an HTTP request of the same model get the same boxes."""

    def __init__(self, labels: Sequence[str], settings: PostprocessSettings | None = None) -> None:
        self.labels = list(labels)
        self.settings = settings or PostprocessSettings()

    def set_thresholds(self, settings: PostprocessSettings) -> None:
        self.settings = settings  # one assignment: batches in flight keep the object they read

    def decode(self, output: np.ndarray, letterboxes: Sequence[Letterbox]) -> list[list[Detection]]:
        s = self.settings
        return postprocess(output, letterboxes, self.labels, conf=s.conf, iou=s.iou, max_det=s.max_det, layout=s.layout)
