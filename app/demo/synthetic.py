"""Synthetic camera scenes with exact ground truth, for training and checking the demo detector.

Only numpy and OpenCV are used here so that serving, tests and video generation never need torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

LABELS: tuple[str, ...] = ("square", "circle", "triangle")

# Object sizes are given for a 720-pixel-high (short side) frame and scale with the short side,
# so a 640x480 frame gets proportionally smaller shapes.
REFERENCE_SHORT_SIDE = 720
MIN_SIZE_PX = 40
MAX_SIZE_PX = 160
# Placement rule: intersection over the smaller box stays below this, which keeps every object
# mostly visible (and IoU between any two objects well below 0.3).
MAX_OVERLAP_OF_SMALLER = 0.2


@dataclass(frozen=True)
class GroundTruth:
    """One object in a frame: tight box (x1, y1, x2, y2) in pixels and its class."""

    box: tuple[float, float, float, float]
    class_id: int
    label: str

    def to_json(self) -> dict:
        return {"box": [float(v) for v in self.box], "class_id": self.class_id, "label": self.label}

    @classmethod
    def from_json(cls, obj: dict) -> GroundTruth:
        x1, y1, x2, y2 = (float(v) for v in obj["box"])
        return cls(box=(x1, y1, x2, y2), class_id=int(obj["class_id"]), label=str(obj["label"]))


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _overlap_of_smaller(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def _size_range(width: int, height: int) -> tuple[int, int]:
    short = min(width, height)
    lo = max(8, round(MIN_SIZE_PX * short / REFERENCE_SHORT_SIDE))
    hi = max(lo + 1, round(MAX_SIZE_PX * short / REFERENCE_SHORT_SIDE))
    return lo, hi


def _saturated_bgr(rng: np.random.Generator) -> tuple[int, int, int]:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(190, 256), rng.integers(170, 256)]]], np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def render_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted gradient with low-frequency blotches and pixel noise, like a dull real scene."""
    # Built at quarter resolution and upscaled: the look is the same and it costs a few ms.
    sw, sh = max(2, width // 4), max(2, height // 4)
    c0 = rng.uniform(40, 200, size=3).astype(np.float32)
    c1 = np.clip(c0 + rng.uniform(-60, 60, size=3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.linspace(-0.5, 0.5, sw, dtype=np.float32)[None, :]
    ys = np.linspace(-0.5, 0.5, sh, dtype=np.float32)[:, None]
    t = np.clip(np.cos(angle) * xs + np.sin(angle) * ys + 0.5, 0, 1)[..., None]
    small = c0 * (1 - t) + c1 * t
    blotches = rng.standard_normal((max(2, height // 48), max(2, width // 48), 3), dtype=np.float32) * 10
    small += cv2.resize(blotches, (sw, sh), interpolation=cv2.INTER_CUBIC)
    small += rng.standard_normal((sh, sw, 3), dtype=np.float32) * 4
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    image += cv2.resize(rng.standard_normal((sh, sw, 3), dtype=np.float32) * 4, (width, height),
                        interpolation=cv2.INTER_NEAREST)
    return np.clip(image, 0, 255).astype(np.uint8)


def draw_shape(image: np.ndarray, gt: GroundTruth, color: tuple[int, int, int], pointing_up: bool = True) -> None:
    """Fill the shape of ``gt`` so that it exactly spans its box."""
    x1, y1, x2, y2 = (int(round(v)) for v in gt.box)
    if gt.label == "square":
        cv2.rectangle(image, (x1, y1), (x2 - 1, y2 - 1), color, thickness=-1, lineType=cv2.LINE_AA)
    elif gt.label == "circle":
        # Drawn with 4 bits of sub-pixel precision so the disc spans [x1, x2) exactly.
        shift = 4
        centre = (int(round((x1 + x2 - 1) / 2 * 16)), int(round((y1 + y2 - 1) / 2 * 16)))
        radius = int(round((x2 - x1 - 1) / 2 * 16))
        cv2.circle(image, centre, radius, color, thickness=-1, lineType=cv2.LINE_AA, shift=shift)
    elif gt.label == "triangle":
        xm = (x1 + x2 - 1) // 2
        if pointing_up:
            pts = [(x1, y2 - 1), (x2 - 1, y2 - 1), (xm, y1)]
        else:
            pts = [(x1, y1), (x2 - 1, y1), (xm, y2 - 1)]
        cv2.fillPoly(image, [np.array(pts, np.int32)], color, lineType=cv2.LINE_AA)
    else:
        raise ValueError(f"unknown shape label {gt.label!r}; expected one of {LABELS}")


def _place(
    rng: np.random.Generator, width: int, height: int, size: int, placed: list[tuple[float, ...]]
) -> tuple[float, float, float, float] | None:
    for _ in range(50):
        x1 = int(rng.integers(0, width - size + 1))
        y1 = int(rng.integers(0, height - size + 1))
        box = (float(x1), float(y1), float(x1 + size), float(y1 + size))
        if all(_overlap_of_smaller(box, other) < MAX_OVERLAP_OF_SMALLER for other in placed):
            return box
    return None


def render_scene(
    rng: np.random.Generator, width: int, height: int, n_objects: int
) -> tuple[np.ndarray, list[GroundTruth]]:
    """Draw up to ``n_objects`` separated shapes fully inside a ``width`` x ``height`` BGR frame.

    An object that cannot be placed without heavy overlap after 50 tries is left out, so a very
    crowded request may yield fewer objects; the returned ground truth always matches the image.
    """
    image = render_background(rng, width, height)
    lo, hi = _size_range(width, height)
    gts: list[GroundTruth] = []
    placed: list[tuple[float, ...]] = []
    for _ in range(n_objects):
        size = int(rng.integers(lo, hi + 1))
        box = _place(rng, width, height, size, placed)
        if box is None:
            continue
        class_id = int(rng.integers(0, len(LABELS)))
        gt = GroundTruth(box=box, class_id=class_id, label=LABELS[class_id])
        draw_shape(image, gt, _saturated_bgr(rng), pointing_up=bool(rng.integers(0, 2)))
        placed.append(box)
        gts.append(gt)
    return image, gts


def letterbox(
    image: np.ndarray, size: tuple[int, int] = (320, 320), pad_value: int = 114,
    interpolation: int = cv2.INTER_LINEAR,
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Aspect-preserving resize into a centred ``size`` (w, h) canvas, as Ultralytics does.

    Returns the canvas, the scale and the (left, top) padding, so that
    ``input_xy = image_xy * scale + pad``.
    """
    out_w, out_h = size
    h, w = image.shape[:2]
    scale = min(out_w / w, out_h / h)
    new_w, new_h = int(round(w * scale)), int(round(h * scale))
    left = int(round((out_w - new_w) / 2 - 0.1))
    top = int(round((out_h - new_h) / 2 - 0.1))
    canvas = np.full((out_h, out_w, 3), pad_value, np.uint8)
    resized = image if (new_w, new_h) == (w, h) else cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, scale, (float(left), float(top))


def to_model_input(letterboxed: list[np.ndarray]) -> np.ndarray:
    """BGR uint8 HWC canvases -> float32 (B, 3, H, W) RGB in 0..1, the YOLOv8 input convention."""
    batch = np.stack([img[..., ::-1] for img in letterboxed]).astype(np.float32) / 255.0
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


@dataclass
class _Mover:
    size: int
    x0: float
    y0: float
    vx: float
    vy: float
    class_id: int
    color: tuple[int, int, int]
    pointing_up: bool


def _bounce(start: float, velocity: float, t: float, span: float) -> float:
    """Position at time t of a point moving in [0, span] that reflects off both ends."""
    if span <= 0:
        return 0.0
    p = (start + velocity * t) % (2 * span)
    return p if p <= span else 2 * span - p


@dataclass
class MovingScene:
    """Shapes moving at constant velocity and bouncing off the frame edges.

    ``frame(i)`` is a pure function of (seed, i), computed in closed form, so any frame can be
    regenerated without replaying the earlier ones. Objects may pass over each other while moving;
    all of them stay fully inside the frame.
    """

    seed: int
    width: int = 1280
    height: int = 720
    n_objects: int = 12
    _background: np.ndarray = field(init=False, repr=False)
    _movers: list[_Mover] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._background = render_background(rng, self.width, self.height)
        lo, hi = _size_range(self.width, self.height)
        speed_scale = min(self.width, self.height) / REFERENCE_SHORT_SIDE
        self._movers = []
        placed: list[tuple[float, ...]] = []
        for _ in range(self.n_objects):
            size = int(rng.integers(lo, hi + 1))
            box = _place(rng, self.width, self.height, size, placed)
            if box is None:
                continue
            placed.append(box)
            speed = rng.uniform(2.0, 8.0) * speed_scale
            angle = rng.uniform(0, 2 * np.pi)
            class_id = int(rng.integers(0, len(LABELS)))
            self._movers.append(
                _Mover(size, box[0], box[1], speed * np.cos(angle), speed * np.sin(angle), class_id,
                       _saturated_bgr(rng), bool(rng.integers(0, 2)))
            )

    def frame(self, i: int) -> tuple[np.ndarray, list[GroundTruth]]:
        """The BGR image and ground truth of frame ``i``."""
        image = self._background.copy()
        gts: list[GroundTruth] = []
        for m in self._movers:
            x1 = round(_bounce(m.x0, m.vx, i, self.width - m.size))
            y1 = round(_bounce(m.y0, m.vy, i, self.height - m.size))
            gt = GroundTruth(
                box=(float(x1), float(y1), float(x1 + m.size), float(y1 + m.size)),
                class_id=m.class_id, label=LABELS[m.class_id],
            )
            draw_shape(image, gt, m.color, m.pointing_up)
            gts.append(gt)
        return image, gts
