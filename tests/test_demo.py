"""The demo detector asset and its synthetic data: deterministic scenes, sample videos, and a
detector that really finds the shapes. No torch here: serving-side checks must run without it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.demo.synthetic import LABELS, GroundTruth, MovingScene, box_iou, letterbox, render_scene, to_model_input
from app.demo.video import ground_truth_path, read_ground_truth, write_sample_video

ASSETS = Path(__file__).resolve().parents[1] / "app" / "demo" / "assets"
HELD_OUT_SEED = 424242  # training uses 20261122 and evaluation 777000


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((ASSETS / "detector.json").read_text())


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(ASSETS / "detector.onnx"), options, providers=["CPUExecutionProvider"])


def test_render_scene_is_deterministic_per_seed() -> None:
    a_img, a_gts = render_scene(np.random.default_rng(5), 640, 480, 8)
    b_img, b_gts = render_scene(np.random.default_rng(5), 640, 480, 8)
    c_img, _ = render_scene(np.random.default_rng(6), 640, 480, 8)
    assert np.array_equal(a_img, b_img) and a_gts == b_gts
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("size", [(1280, 720), (640, 480), (320, 320)])
def test_scene_objects_inside_frame_sized_and_separated(size: tuple[int, int]) -> None:
    width, height = size
    for seed in range(5):
        image, gts = render_scene(np.random.default_rng(seed), width, height, 12)
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert len(gts) >= 6
        scale = min(width, height) / 720
        for g in gts:
            x1, y1, x2, y2 = g.box
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert 40 * scale - 1 <= x2 - x1 <= 160 * scale + 1
            assert g.label == LABELS[g.class_id]
        for i, a in enumerate(gts):
            for b in gts[i + 1 :]:
                assert box_iou(a.box, b.box) < 0.3


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    width=st.integers(120, 1400),
    height=st.integers(120, 900),
    n_objects=st.integers(0, 30),
)
def test_any_scene_keeps_objects_inside_and_apart(seed: int, width: int, height: int, n_objects: int) -> None:
    image, gts = render_scene(np.random.default_rng(seed), width, height, n_objects)
    assert image.shape == (height, width, 3)
    assert len(gts) <= n_objects
    for i, g in enumerate(gts):
        assert 0 <= g.box[0] < g.box[2] <= width and 0 <= g.box[1] < g.box[3] <= height
        assert all(box_iou(g.box, other.box) < 0.3 for other in gts[i + 1 :])


def test_shapes_are_drawn_where_ground_truth_says() -> None:
    """The pixels at each box centre differ from the background of an empty scene."""
    image, gts = render_scene(np.random.default_rng(11), 1280, 720, 12)
    empty, _ = render_scene(np.random.default_rng(11), 1280, 720, 0)
    for g in gts:
        cx, cy = int((g.box[0] + g.box[2]) / 2), int((g.box[1] + g.box[3]) / 2) + 5
        assert np.abs(image[cy, cx].astype(int) - empty[cy, cx].astype(int)).sum() > 30


def test_moving_scene_is_deterministic_moves_and_stays_inside() -> None:
    scene = MovingScene(seed=3)
    again = MovingScene(seed=3)
    img5, gts5 = scene.frame(5)
    img5b, gts5b = again.frame(5)
    assert np.array_equal(img5, img5b) and gts5 == gts5b
    assert len(gts5) == 12
    _, gts6 = scene.frame(6)
    assert gts5 != gts6
    for i in range(0, 3000, 37):
        _, gts = scene.frame(i)
        for g in gts:
            x1, y1, x2, y2 = g.box
            assert 0 <= x1 < x2 <= 1280 and 0 <= y1 < y2 <= 720
            assert 40 <= x2 - x1 <= 160


def test_sample_video_reads_back_with_matching_ground_truth(tmp_path: Path) -> None:
    path = write_sample_video(tmp_path / "clip.mp4", seconds=1.0, fps=30, width=640, height=360, seed=2, n_objects=5)
    assert path.exists() and ground_truth_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip.mp4.gt.jsonl"]
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 30
    assert frames[0].shape == (360, 640, 3)
    gts = read_ground_truth(path)
    assert len(gts) == 30 and all(len(f) == 5 for f in gts)
    assert read_ground_truth(ground_truth_path(path)) == gts
    # The sidecar describes what was encoded: the decoded frame is close to the rendered one.
    expected, expected_gts = MovingScene(seed=2, width=640, height=360, n_objects=5).frame(17)
    assert gts[17] == expected_gts
    assert np.abs(frames[17].astype(int) - expected.astype(int)).mean() < 8


def test_read_ground_truth_without_sidecar_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="clip.mp4.gt.jsonl"):
        read_ground_truth(tmp_path / "clip.mp4")


def test_asset_metadata_describes_the_yolov8_contract(meta: dict) -> None:
    assert meta["name"] == "demo-detector"
    assert meta["labels"] == list(LABELS)
    assert meta["layout"] == "yolov8"
    assert meta["input_size"] == [320, 320]
    assert (meta["input_name"], meta["output_name"], meta["letterbox_pad"]) == ("images", "output0", 114)
    ev = meta["trained"]["eval"]
    assert ev["precision"] >= 0.9 and ev["recall"] >= 0.9


def test_onnx_graph_has_symbolic_batch_and_no_baked_batch(meta: dict) -> None:
    model = onnx.load(str(ASSETS / "detector.onnx"))
    assert (ASSETS / "detector.onnx").stat().st_size <= 10 * 1024 * 1024
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "images" and out.name == "output0"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, 320, 320]
    assert isinstance(out_dims[0], str) and out_dims[1] == 4 + len(LABELS)


def test_fixed_batch_variant_by_rewriting_the_input_dim(tmp_path: Path) -> None:
    """How per-batch variants are built: pin dim 0 of input and output; nothing else may disagree."""
    model = onnx.load(str(ASSETS / "detector.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True))
    path = tmp_path / "detector_b4.onnx"
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["output0"], {"images": np.zeros((4, 3, 320, 320), np.float32)})
    assert out.shape[:2] == (4, 4 + len(LABELS))


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runs_at_any_batch_with_yolov8_output(session: ort.InferenceSession, batch: int) -> None:
    x = np.random.default_rng(0).random((batch, 3, 320, 320), dtype=np.float32)
    (out,) = session.run(["output0"], {"images": x})
    assert out.dtype == np.float32
    assert out.shape[0] == batch and out.shape[1] == 4 + len(LABELS) and out.shape[2] >= 1000
    probs = out[:, 4:]
    assert probs.min() >= 0 and probs.max() <= 1  # sigmoid is inside the graph
    assert (out[:, 2:4] > 0).all()  # widths and heights
    # Each row of a batch equals running it alone: no cross-talk, no baked batch.
    (single,) = session.run(["output0"], {"images": x[-1:]})
    np.testing.assert_allclose(out[-1:], single, rtol=1e-4, atol=1e-3)


def _detect(output: np.ndarray, scale: float, pad: tuple[float, float]) -> list[tuple[tuple[float, ...], int, float]]:
    """YOLOv8 decode: best class per anchor, conf 0.25, class-agnostic NMS at IoU 0.45, unletterbox."""
    scores, classes = output[4:].max(axis=0), output[4:].argmax(axis=0)
    keep = scores >= 0.25
    cx, cy, w, h = output[:4, keep]
    xywh = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
    idx = np.array(cv2.dnn.NMSBoxes(xywh.tolist(), scores[keep].tolist(), 0.25, 0.45)).reshape(-1)
    dets = []
    for i in idx:
        x, y, bw, bh = xywh[i]
        box = ((x - pad[0]) / scale, (y - pad[1]) / scale, (x + bw - pad[0]) / scale, (y + bh - pad[1]) / scale)
        dets.append((box, int(classes[keep][i]), float(scores[keep][i])))
    return dets


def _true_positives(dets: list[tuple[tuple[float, ...], int, float]], gts: list[GroundTruth]) -> int:
    used: set[int] = set()
    for box, cls, _ in sorted(dets, key=lambda d: -d[2]):
        candidates = [(box_iou(box, g.box), j) for j, g in enumerate(gts) if j not in used and g.class_id == cls]
        best = max(candidates, default=(0.0, -1))
        if best[0] >= 0.5:
            used.add(best[1])
    return len(used)


def test_detector_finds_the_shapes_in_held_out_scenes(session: ort.InferenceSession) -> None:
    canvases, letterboxes, scenes = [], [], []
    for k in range(10):
        image, gts = render_scene(np.random.default_rng([HELD_OUT_SEED, k]), 1280, 720, 12)
        canvas, scale, pad = letterbox(image, (320, 320), 114)
        canvases.append(canvas)
        letterboxes.append((scale, pad))
        scenes.append(gts)
    (out,) = session.run(["output0"], {"images": to_model_input(canvases)})
    tp = n_det = n_gt = 0
    for output, (scale, pad), gts in zip(out, letterboxes, scenes):
        dets = _detect(output, scale, pad)
        tp += _true_positives(dets, gts)
        n_det += len(dets)
        n_gt += len(gts)
    assert n_gt >= 100
    assert tp / n_gt >= 0.85, f"recall {tp}/{n_gt}"
    assert tp / max(1, n_det) >= 0.85, f"precision {tp}/{n_det}"


def test_detector_works_on_other_aspects_too(session: ort.InferenceSession) -> None:
    """4:3 and square frames letterbox differently; the detector was trained on them as well."""
    tp = n_gt = n_det = 0
    for k, (w, h) in enumerate([(640, 480), (720, 720), (640, 480), (640, 640)]):
        image, gts = render_scene(np.random.default_rng([HELD_OUT_SEED + 1, k]), w, h, 10)
        canvas, scale, pad = letterbox(image, (320, 320), 114)
        (out,) = session.run(["output0"], {"images": to_model_input([canvas])})
        dets = _detect(out[0], scale, pad)
        tp += _true_positives(dets, gts)
        n_gt += len(gts)
        n_det += len(dets)
    assert tp / n_gt >= 0.8, f"recall {tp}/{n_gt}"
    assert tp / max(1, n_det) >= 0.8, f"precision {tp}/{n_det}"


def test_letterbox_matches_the_ultralytics_convention() -> None:
    image = np.zeros((720, 1280, 3), np.uint8)
    canvas, scale, pad = letterbox(image, (320, 320), 114)
    assert canvas.shape == (320, 320, 3) and scale == 0.25 and pad == (0.0, 70.0)
    assert (canvas[:70] == 114).all() and (canvas[250:] == 114).all() and (canvas[70:250] == 0).all()
    x = to_model_input([canvas])
    assert x.shape == (1, 3, 320, 320) and x.dtype == np.float32
    assert np.isclose(x.max(), 114 / 255)


def test_serving_side_demo_modules_do_not_import_torch() -> None:
    """Serving nodes (Jetson, Pi) have no or a different torch: only re-training may need it."""
    import subprocess
    import sys

    code = "import sys, app.demo, app.demo.synthetic, app.demo.video; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
