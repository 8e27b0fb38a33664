"""Pipeline stages: image decoding errors, letterbox geometry, YOLO decode + NMS, padding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from app.config import DetectorConfig, parse_config
from app.engines.base import Engine, run_padded
from app.errors import BadRequest, ConfigError
from app.pipeline import decode_image, detect_layout, letterbox, postprocess, prepare


def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def test_decode_rejects_empty_and_non_images():
    with pytest.raises(BadRequest, match="empty request body"):
        decode_image(b"")
    with pytest.raises(BadRequest, match="not a decodable image"):
        decode_image(b"hello, I am text")


def test_decode_png_and_jpeg():
    img = np.full((30, 40, 3), 200, np.uint8)
    ok, png = cv2.imencode(".png", img)
    assert decode_image(png.tobytes()).shape == (30, 40, 3)
    assert decode_image(_jpeg(img)).shape == (30, 40, 3)


@pytest.mark.parametrize("w,h", [(1280, 720), (640, 480), (300, 300), (200, 600)])
def test_letterbox_maps_boxes_back(w, h):
    img = np.zeros((h, w, 3), np.uint8)
    tensor, lb = letterbox(img, (320, 320))
    assert tensor.shape == (3, 320, 320) and tensor.dtype == np.float32
    # a point in the original maps into the canvas and back exactly
    x, y = w * 0.3, h * 0.7
    cx, cy = x * lb.scale + lb.pad_x, y * lb.scale + lb.pad_y
    assert 0 <= cx <= 320 and 0 <= cy <= 320
    assert abs((cx - lb.pad_x) / lb.scale - x) < 1e-6
    # padding rows hold 114/255
    if lb.pad_y >= 1:
        assert np.allclose(tensor[:, 0, :], 114 / 255.0)


def _v8_output(boxes_cxcywh, classes, scores, nc=3, anchors=50):
    out = np.zeros((1, 4 + nc, anchors), np.float32)
    for i, (b, c, s) in enumerate(zip(boxes_cxcywh, classes, scores)):
        out[0, :4, i] = b
        out[0, 4 + c, i] = s
    return out


def test_postprocess_v8_nms_and_coordinates():
    img = np.zeros((720, 1280, 3), np.uint8)
    _, lb = letterbox(img, (320, 320))
    # two overlapping boxes of class 1 (NMS keeps the best) and one of class 2
    out = _v8_output([(100, 160, 40, 40), (101, 161, 40, 40), (200, 160, 20, 20)], [1, 1, 2], [0.9, 0.8, 0.7])
    dets = postprocess(out, [lb], ["a", "b", "c"], conf=0.25, iou=0.45)[0]
    assert [d.label for d in dets] == ["b", "c"]
    x1, y1, x2, y2 = dets[0].box
    # canvas box (80,140)-(120,180) -> original via scale 0.25, pad_y 70
    assert x1 == pytest.approx(80 / lb.scale, abs=0.01) and x2 == pytest.approx(120 / lb.scale, abs=0.01)
    assert y1 == pytest.approx((140 - lb.pad_y) / lb.scale, abs=0.01)


def test_postprocess_v5_layout_uses_objectness():
    out = np.zeros((1, 20, 5 + 2), np.float32)
    out[0, 0] = [50, 50, 10, 10, 0.9, 0.1, 0.8]  # obj 0.9 x cls 0.8 = 0.72 -> class 1
    out[0, 1] = [150, 150, 10, 10, 0.2, 0.9, 0.1]  # 0.18 < conf
    assert detect_layout(out, 2) == "yolov5"
    _, lb = letterbox(np.zeros((320, 320, 3), np.uint8), (320, 320))
    dets = postprocess(out, [lb], ["x", "y"], conf=0.25)[0]
    assert len(dets) == 1 and dets[0].class_id == 1 and dets[0].score == pytest.approx(0.72)


def test_postprocess_empty_and_max_det():
    _, lb = letterbox(np.zeros((320, 320, 3), np.uint8), (320, 320))
    assert postprocess(np.zeros((1, 7, 30), np.float32), [lb], ["a", "b", "c"]) == [[]]
    boxes = [(10 + 30 * i, 10, 10, 10) for i in range(10)]
    out = _v8_output(boxes, [0] * 10, [0.5 + i * 0.01 for i in range(10)])
    dets = postprocess(out, [lb], ["a", "b", "c"], max_det=3)[0]
    assert len(dets) == 3 and dets[0].score >= dets[1].score >= dets[2].score


class _DoubleEngine(Engine):
    backend = "fake"

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: list[np.ndarray] = []

    def load(self, path):  # pragma: no cover - not used
        pass

    @property
    def batch_size(self) -> int:
        return self.n

    @property
    def input_shape(self):
        return (self.n, 3, 4, 4)

    def run(self, batch):
        assert batch.shape[0] == self.n
        self.seen.append(batch)
        return [batch * 2]

    def memory_bytes(self) -> int:
        return 0


def test_run_padded_never_returns_padding():
    eng = _DoubleEngine(4)
    x = np.ones((3, 3, 4, 4), np.float32)
    out = run_padded(eng, x)[0]
    assert out.shape[0] == 3 and np.all(out == 2)
    assert eng.seen[0].shape[0] == 4 and np.all(eng.seen[0][3] == 0)
    with pytest.raises(ValueError, match="exceeds"):
        run_padded(eng, np.ones((5, 3, 4, 4), np.float32))


def test_prepare_then_config_errors_name_the_field():
    item = prepare(_jpeg(np.zeros((10, 20, 3), np.uint8)), (32, 32))
    assert item.tensor.shape == (3, 32, 32)
    with pytest.raises(ConfigError, match=r"user_config.max_batch_size"):
        parse_config(DetectorConfig, {"max_batch_size": 0}, "user_config")
    with pytest.raises(ConfigError, match="exceeds the largest variant"):
        parse_config(DetectorConfig, {"max_batch_size": 32}, "user_config")
    with pytest.raises(ConfigError, match=r"user_config.model"):
        parse_config(DetectorConfig, {"model": "../etc"}, "user_config")
    with pytest.raises(ConfigError, match=r"user_config.bogus"):
        parse_config(DetectorConfig, {"bogus": 1}, "user_config")
    assert DetectorConfig(max_batch_size=3).variant_for(3) == 4
