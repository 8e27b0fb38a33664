"""The detector's one batch handler, its knobs and the shared constants, without Ray.

``Detector.handle_batch`` runs on the real demo ONNX model (dynamic batch axis, loaded per
batch size as the registry's variants would be) and the project's own synthetic scenes.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from app.config import DetectorConfig
from app.demo import DETECTOR_META, DETECTOR_ONNX
from app.engines import create_engine
from app.engines.base import ModelVariant
from app.errors import BadRequest, EdgebatchError, PayloadTooLarge


def _demo_detector(loads: list[int] | None = None, **config):
    import json

    from app.detector import Detector

    meta = json.loads(DETECTOR_META.read_text())

    def load(n: int):
        if loads is not None:
            loads.append(n)
        engine = create_engine("onnx", DETECTOR_ONNX, options={"batch_size": n, "intra_op_num_threads": 1})
        return engine, ModelVariant(name="demo-detector", version="1", backend="onnx", batch_size=n,
                                    path=str(DETECTOR_ONNX), sha256="0" * 64)

    cfg = DetectorConfig(batch_sizes=[1, 2, 4, 8], max_batch_size=4, **config)
    det = Detector(cfg, load, labels=meta["labels"], input_size=tuple(meta["input_size"]),
                   model="demo-detector", version="1")
    det.setup(cfg.max_batch_size)
    return det


@pytest.fixture(scope="module")
def scenes():
    import cv2

    from app.demo.synthetic import render_scene

    out = []
    for seed in range(3):
        img, truth = render_scene(np.random.default_rng(seed), 1280, 720, 6)
        ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        out.append((img, jpeg.tobytes(), truth))
    return out


def test_one_handler_serves_encoded_decoded_and_tensor_items_and_a_bad_item_fails_alone(scenes):
    from app.detector import DetectRequest
    from app.pipeline import prepare

    det = _demo_detector()
    img, jpeg, truth = scenes[0]
    row = prepare(jpeg, det.input_size).tensor
    items = [DetectRequest.encoded(jpeg), DetectRequest.encoded(b"not an image"), DetectRequest.frame(img),
             DetectRequest.tensor(row), DetectRequest.tensor(np.zeros((3, 8, 8), np.float32))]
    results = det.handle_batch(items)
    assert len(results) == len(items)
    encoded, bad, frame, tensor, bad_shape = results
    assert isinstance(bad.error, BadRequest) and "not a decodable image" in bad.error.message
    assert isinstance(bad_shape.error, BadRequest) and "[3, 320, 320]" in bad_shape.error.message
    assert encoded.error is None and sorted(d.class_id for d in encoded.detections) == sorted(t.class_id for t in truth)
    assert {d.label for d in encoded.detections} <= set(det.labels)
    assert sorted(d.class_id for d in frame.detections) == sorted(t.class_id for t in truth)
    assert tensor.detections is None and tensor.output is not None and tensor.output.shape[0] == 7  # 4 + 3 classes
    # the good items ran together: 3 rows, on b4 padded or cut into b1 runs (whichever the pool timed faster)
    assert encoded.batch is tensor.batch and encoded.batch.variant.batch_size in (1, 4) and encoded.batch.items == 5
    assert encoded.timings.inference_s == encoded.batch.inference_s > 0 and encoded.timings.preprocess_s > 0
    body = encoded.to_json()
    assert body["model"] == "demo-detector" and body["version"] == "1" and body["batch_size"] in (1, 4)
    assert set(body["timings_ms"]) == {"queue", "preprocess", "inference", "postprocess"}
    with pytest.raises(BadRequest):
        bad.unwrap()


def test_letterboxed_uint8_items_are_normalised_in_the_batch_exactly_as_float_rows(scenes):
    """Stream readers send the letterboxed uint8 image (a quarter of the float bytes); the replica
    normalises the batch in one call, and the engine sees what a per-row float tensor gives."""
    from app.detector import DetectRequest, model_input
    from app.pipeline import prepare

    det = _demo_detector()
    prepared = [prepare(jpeg, det.input_size) for _, jpeg, _ in scenes[:2]]
    assert all(p.image.dtype == np.uint8 and p.image.shape == (320, 320, 3) for p in prepared)
    rows = [p.tensor for p in prepared]
    mixed = model_input([prepared[0].image, rows[1]])  # a v2 float row beside a uint8 image in one batch
    assert mixed.dtype == np.float32 and mixed.shape == (2, 3, 320, 320)
    assert np.array_equal(mixed, np.stack(rows)) and np.array_equal(model_input([p.image for p in prepared]), mixed)
    items = [DetectRequest.letterboxed(p.image) for p in prepared] + [DetectRequest.tensor(r) for r in rows]
    items += [DetectRequest.letterboxed(prepared[0].tensor), DetectRequest.letterboxed(np.zeros((8, 8, 3), np.uint8))]
    results = det.handle_batch(items)
    for k in range(2):
        assert results[k].detections is None and np.allclose(results[k].output, results[k + 2].output, atol=1e-5)
    assert isinstance(results[4].error, BadRequest) and "uint8 [320, 320, 3]" in results[4].error.message
    assert isinstance(results[5].error, BadRequest)
    boxes = det.post.decode(np.stack([results[0].output]), [prepared[0].letterbox])[0]
    assert sorted(d.class_id for d in boxes) == sorted(t.class_id for t in scenes[0][2])


def test_pipelined_bench_run_serves_every_batch_through_the_one_handler(scenes):
    """`bench engine --pipelined` keeps two batches in flight through ``handle_batch``; every image counts once."""
    from app.bench.engine import run_pipeline

    det = _demo_detector()
    calls: list[int] = []
    handle = det.handle_batch
    det.handle_batch = lambda items: (calls.append(len(items)), handle(items))[1]
    run = run_pipeline(det, [jpeg for _, jpeg, _ in scenes], 2, batches=5, warmup=1, concurrency=2)
    assert run.images == 10 and len(run.batch_latencies_s) == 5 and run.images_per_s > 0
    assert calls == [2] * 7  # one warm-up batch per thread, then the five measured ones


def test_body_limit_is_a_per_item_413(scenes):
    from app.detector import DetectRequest

    det = _demo_detector(max_body_bytes=1024)
    (_, jpeg, _), = scenes[:1]
    result, = det.handle_batch([DetectRequest.encoded(jpeg)])
    assert isinstance(result.error, PayloadTooLarge)


def test_engine_that_drops_rows_breaks_the_batch_contract_loudly(scenes):
    from app.detector import DetectRequest

    det = _demo_detector()
    for lv in det.pool.loaded.values():  # a broken engine: one row short of what it was given
        engine = lv.instances[0]
        engine.run = lambda x, run=engine.run: [run(x)[0][: x.shape[0] - 1]]
    with pytest.raises(EdgebatchError, match="rows for a batch of 2"):
        det.handle_batch([DetectRequest.encoded(scenes[0][1]), DetectRequest.encoded(scenes[1][1])])


def test_thresholds_knob_updates_the_live_post_processing(scenes):
    from app.detector import DetectRequest
    from app.pipeline import PostprocessSettings

    det = _demo_detector()
    before, = det.handle_batch([DetectRequest.encoded(scenes[0][1])])
    det.set_thresholds(PostprocessSettings(conf=0.999999, iou=0.45, max_det=300, layout="yolov8"))
    after, = det.handle_batch([DetectRequest.encoded(scenes[0][1])])
    assert before.detections and after.detections == []


def test_engine_instances_knob_reloads_each_variant_and_closes_the_old_ones():
    det = _demo_detector()
    old = dict(det.pool.loaded)
    assert all(len(lv.instances) == 1 for lv in old.values())
    det.set_engine_instances(2)
    assert sorted(det.pool.loaded) == sorted(old)
    assert all(len(lv.instances) == 2 for lv in det.pool.loaded.values())
    for lv in old.values():  # closed once their in-flight batches were done (none here)
        lv._state.acquire()
        lv._state.release()
        assert lv._closed
    # two batches at once each get an engine: neither waits for the other
    lv = det.pool.pick(1)
    got = []
    threads = [threading.Thread(target=lambda: got.append(lv.run(np.zeros((1, 3, 320, 320), np.float32))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 2


def test_resident_variants_knob_trims_the_pool():
    det = _demo_detector()
    assert sorted(det.pool.loaded) == [1, 4]
    det.set_resident_variants(1, max_batch_size=4)
    assert sorted(det.pool.loaded) == [4]


def test_max_batch_size_knob_loads_beside_and_a_failed_load_changes_nothing():
    from app.errors import Unavailable

    loads: list[int] = []
    det = _demo_detector(loads)
    det.set_max_batch_size(8)
    assert 8 in det.pool.loaded and loads[-1] == 8
    det.set_batch_sizes([1, 2, 4, 8, 16])
    det.pool._loader = lambda n: (_ for _ in ()).throw(MemoryError("no room"))
    with pytest.raises(Unavailable, match="batch-16"):
        det.set_max_batch_size(16)
    assert 16 not in det.pool.loaded and 8 in det.pool.loaded


def test_onnx_types_are_one_table_and_unknown_types_are_errors():
    from app.constants import UnsupportedTensorType, onnx_type, onnx_type_of_elem

    assert onnx_type("tensor(float)").datatype == "FP32" and onnx_type("tensor(float)").numpy == np.float32
    assert onnx_type_of_elem(10).ort == "tensor(float16)"
    with pytest.raises(UnsupportedTensorType, match="bfloat16"):
        onnx_type("tensor(bfloat16)")
    with pytest.raises(UnsupportedTensorType):
        onnx_type_of_elem(16)  # BFLOAT16: never silently FP32


def test_the_multimodel_signature_refuses_an_unknown_type(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from app.constants import UnsupportedTensorType
    from app.layered.multimodel import graph_io

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(UnsupportedTensorType):
        graph_io(path)


def test_an_item_whose_deadline_passed_in_the_queue_is_refused_unrun(scenes):
    """Issue 15: an item that waited past its budget is answered at once (503 + Retry-After), not run
    late; the rest of its batch runs."""
    import dataclasses
    import time

    from app.detector import DetectRequest
    from app.errors import Overloaded

    det = _demo_detector()
    now = time.perf_counter()
    late = dataclasses.replace(DetectRequest.encoded(scenes[0][1]), enqueued_at=now - 4, deadline_s=3.0,
                               expires_at=now - 1)
    fresh = dataclasses.replace(DetectRequest.encoded(scenes[1][1]), enqueued_at=now, deadline_s=3.0,
                                expires_at=now + 60)
    refused, served = det.handle_batch([late, fresh])
    assert isinstance(refused.error, Overloaded) and refused.error.headers["Retry-After"] == "1"
    assert "past its 3.00 s deadline" in refused.error.message and refused.detections is None
    assert served.error is None and served.detections
    assert served.batch.variant is not None and served.batch.items == 2

    det.set_batch_time_s(2.0)  # batches take 2 s here: 1 s left cannot be enough, so it is refused unrun too
    soon = dataclasses.replace(DetectRequest.encoded(scenes[0][1]), enqueued_at=time.perf_counter(), deadline_s=3.0,
                               expires_at=time.perf_counter() + 1.0)
    (refused,) = det.handle_batch([soon])
    assert isinstance(refused.error, Overloaded) and "too close to" in refused.error.message


def test_an_image_prepared_ahead_gets_the_same_boxes_and_a_swap_to_another_size_prepares_it_again(scenes):
    """Decoding moved ahead of the batch (while the engine runs the one before) must not change an
    answer, must name a bad image at once, and must survive a model swapped to another input size."""
    import dataclasses

    from app.detector import DetectRequest

    det = _demo_detector()
    _, jpeg, truth = scenes[0]
    plain = det.handle_batch([DetectRequest.encoded(jpeg)])[0]
    ahead = det.submit_prepare_ahead(DetectRequest.encoded(jpeg)).result(timeout=30)
    assert ahead.ahead is not None and ahead.ahead.image.image.shape == (*det.input_size, 3)
    early = det.handle_batch([ahead])[0]
    assert [d.to_json() for d in early.detections] == [d.to_json() for d in plain.detections]
    assert sorted(d.class_id for d in early.detections) == sorted(t.class_id for t in truth)
    assert early.timings.preprocess_s >= ahead.ahead.preprocess_s > 0
    with pytest.raises(BadRequest, match="not a decodable image"):
        det.prepare_ahead(DetectRequest.encoded(b"not an image"))
    tensor = DetectRequest.tensor(np.zeros((3, 320, 320), np.float32))
    assert det.prepare_ahead(tensor) is tensor  # only encoded images are decoded ahead
    # prepared for another input size (a swap happened meanwhile): decoded again from the bytes it kept
    small = dataclasses.replace(ahead, ahead=dataclasses.replace(ahead.ahead, image=dataclasses.replace(
        ahead.ahead.image, image=ahead.ahead.image.image[:160, :160])))
    again = det.handle_batch([small])[0]
    assert [d.to_json() for d in again.detections] == [d.to_json() for d in plain.detections]


def test_engine_instances_share_the_cores_instead_of_oversubscribing_them():
    """Two ORT instances on a 2-core box run one thread each (measured: 34 -> 41-48 images/s through
    HTTP over one instance with one thread); on bigger boxes all cores but one are shared out."""
    from model_registry.source import engine_threads

    assert engine_threads(cores=2, spare_cores=1, instances=1) == 1
    assert engine_threads(cores=2, spare_cores=1, instances=2) == 1
    assert engine_threads(cores=8, spare_cores=1, instances=2) == 4
    assert engine_threads(cores=6, spare_cores=1, instances=1) == 5
    assert engine_threads(cores=1, spare_cores=1, instances=3) == 1
