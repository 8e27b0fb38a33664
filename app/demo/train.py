"""Train the demo detector on synthetic scenes and write ``detector.onnx`` + ``detector.json``.

``python -m app.demo.train --out app/demo/assets`` reproduces the committed asset (fixed seeds,
fixed step count; about 10 minutes on 2 CPU cores). The exported graph is then checked with
ONNX Runtime on held-out scenes, the same way serving will run it.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch
from torch.nn import functional as F  # noqa: N812 - torch's own idiom

from app.demo.network import Detector, DetectorSpec, export_onnx, make_anchor_points
from app.demo.synthetic import LABELS, GroundTruth, box_iou, letterbox, render_scene, to_model_input

INPUT_SIZE = 320
PAD_VALUE = 114
# 16:9 canvases hold their content in rows 70..250; most steps train on rows 64..256 only,
# which is the same letterboxed picture with less of the constant border and ~40% less compute.
CROP_TOP, CROP_ROWS = 64, 192


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the result; recorded in detector.json."""

    seed: int = 20261122
    pool_scenes: int = 2400
    steps: int = 800
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 50
    ema_decay: float = 0.995
    full_canvas_every: int = 4  # every Nth step uses whole 320x320 canvases of all aspects
    eval_scenes: int = 50
    eval_seed: int = 777_000
    conf_threshold: float = 0.25
    nms_iou: float = 0.45


@dataclass
class ScenePool:
    """Letterboxed RGB canvases with ground truth in input pixels: (x1, y1, x2, y2, class)."""

    images: np.ndarray  # (N, 320, 320, 3) uint8 RGB
    targets: list[np.ndarray]
    wide: np.ndarray  # indices of 16:9 scenes (croppable to CROP_ROWS)


def _render_one(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, bool]:
    """One training scene from (seed, index): order-independent, so worker scheduling cannot change it."""
    seed, scene_index = args
    rng = np.random.default_rng([seed, scene_index])
    kind = rng.random()
    if kind < 0.7:
        width, height = 1280, 720
    elif kind < 0.85:
        width, height = 640, 480
    else:
        width = height = int(rng.choice([640, 720]))
    image, gts = render_scene(rng, width, height, int(rng.integers(4, 17)))
    interpolation = cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_AREA
    canvas, scale, (left, top) = letterbox(image, (INPUT_SIZE, INPUT_SIZE), PAD_VALUE, interpolation)
    boxes = np.array(
        [[g.box[0] * scale + left, g.box[1] * scale + top, g.box[2] * scale + left, g.box[3] * scale + top, g.class_id]
         for g in gts],
        np.float32,
    ).reshape(-1, 5)
    return canvas[..., ::-1].copy(), boxes, (width, height) == (1280, 720)


def build_pool(seed: int, n: int, workers: int = 2) -> ScenePool:
    """Render the training scenes once (in worker processes) and reuse them with augmentation."""
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_render_one, [(seed, i) for i in range(n)], chunksize=32))
    images = np.stack([r[0] for r in results])
    wide = np.array([i for i, r in enumerate(results) if r[2]], np.int64)
    return ScenePool(images=images, targets=[r[1] for r in results], wide=wide)


def sample_batch(pool: ScenePool, rng: np.random.Generator, batch: int, cropped: bool) -> tuple[torch.Tensor, list[np.ndarray]]:
    """A batch with random flips and colour-channel permutations (shapes and labels are colour-free)."""
    source = pool.wide if cropped else np.arange(len(pool.images))
    picks = rng.choice(source, size=batch, replace=False)
    images, targets = [], []
    for i in picks:
        img = pool.images[i]
        tgt = pool.targets[i].copy()
        if cropped:
            img = img[CROP_TOP : CROP_TOP + CROP_ROWS]
            tgt[:, [1, 3]] -= CROP_TOP
        h, w = img.shape[:2]
        if rng.random() < 0.5:
            img = img[:, ::-1]
            tgt[:, [0, 2]] = w - tgt[:, [2, 0]]
        if rng.random() < 0.5:
            img = img[::-1]
            tgt[:, [1, 3]] = h - tgt[:, [3, 1]]
        img = img[..., rng.permutation(3)]
        images.append(np.ascontiguousarray(img))
        targets.append(tgt)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    gain = torch.empty(batch, 1, 1, 1).uniform_(0.8, 1.2)  # mild contrast jitter around the pad grey
    x = ((x - PAD_VALUE / 255.0) * gain + PAD_VALUE / 255.0).clamp_(0, 1)
    return x, targets


def assign(targets: list[np.ndarray], points: torch.Tensor, strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-sampling assignment: cells within one stride of a GT centre and inside its box.

    Stride 8 takes objects up to 32 px, stride 16 those from 24 px; a cell claimed by two GTs
    goes to the smaller one. Returns (B, A) matched GT index (-1 for background) and the padded
    GT tensor (B, G, 5).
    """
    g_max = max(1, max(len(t) for t in targets))
    gt = torch.zeros(len(targets), g_max, 5)
    for b, t in enumerate(targets):
        if len(t):
            gt[b, : len(t)] = torch.from_numpy(t)
    valid = torch.zeros(len(targets), g_max, dtype=torch.bool)
    for b, t in enumerate(targets):
        valid[b, : len(t)] = True
    x1, y1, x2, y2 = gt[..., 0:1], gt[..., 1:2], gt[..., 2:3], gt[..., 3:4]  # (B, G, 1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    size = torch.maximum(x2 - x1, y2 - y1)
    px, py, s = points[:, 0][None, None], points[:, 1][None, None], strides[None, None]  # (1, 1, A)
    near = ((px - cx).abs() <= s) & ((py - cy).abs() <= s)
    inside = (px > x1 + 0.5) & (px < x2 - 0.5) & (py > y1 + 0.5) & (py < y2 - 0.5)
    level_ok = ((s == 8) & (size <= 32)) | ((s == 16) & (size >= 24))
    # Always keep the cell holding the centre on the right level, so tiny objects get a positive.
    home = ((px - cx).abs() <= s / 2) & ((py - cy).abs() <= s / 2)
    candidate = ((near & inside) | home) & level_ok & valid[..., None]
    area = ((x2 - x1) * (y2 - y1)).expand_as(candidate)
    cost = torch.where(candidate, area, torch.full_like(area, float("inf")))
    best_cost, best_gt = cost.min(dim=1)  # (B, A)
    matched = torch.where(torch.isfinite(best_cost), best_gt, torch.full_like(best_gt, -1))
    return matched, gt


def giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of paired (N, 4) xyxy boxes."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    union = area_a + area_b - inter + 1e-7
    iou = inter / union
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1) + 1e-7
    return iou, iou - (hull - union) / hull


def detection_loss(
    ltrb: torch.Tensor, logits: torch.Tensor, targets: list[np.ndarray], points: torch.Tensor, strides: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE on class scores (positives aim at 0.5 + IoU/2, so the score ranks box quality) + GIoU + L1."""
    matched, gt = assign(targets, points, strides)
    pos = matched >= 0
    n_pos = max(1, int(pos.sum()))
    dist = F.softplus(ltrb) * strides[None, :, None]
    pred = torch.cat([points[None] - dist[..., :2], points[None] + dist[..., 2:]], dim=-1)
    gt_boxes = torch.gather(gt, 1, matched.clamp(min=0)[..., None].expand(-1, -1, 5))  # (B, A, 5)
    cls_target = torch.zeros_like(logits)
    if pos.any():
        p_box, g_box = pred[pos], gt_boxes[pos][:, :4]
        iou, g = giou(p_box, g_box)
        p_pts, p_str = points[None].expand_as(pred[..., :2])[pos], strides[None].expand(pos.shape)[pos]
        g_ltrb = torch.cat([p_pts - g_box[:, :2], g_box[:, 2:] - p_pts], dim=1).clamp(min=0.05) / p_str[:, None]
        loss_box = (1 - g).mean()
        loss_l1 = (dist[pos] / p_str[:, None] - g_ltrb).abs().mean()
        cls_target[pos, gt_boxes[pos][:, 4].long()] = 0.5 + 0.5 * iou.detach()
    else:
        loss_box = loss_l1 = ltrb.sum() * 0
    loss_cls = F.binary_cross_entropy_with_logits(logits, cls_target, reduction="sum") / n_pos
    total = loss_cls + 2.0 * loss_box + 0.5 * loss_l1
    return total, {"cls": loss_cls.item(), "giou": loss_box.item(), "l1": loss_l1.item(), "pos": n_pos}


@dataclass(frozen=True)
class EvalResult:
    precision: float
    recall: float
    true_positives: int
    false_positives: int
    ground_truths: int
    ms_per_image_batch1: float
    ms_per_image_batch8: float


def decode_yolov8(
    output: np.ndarray, scale: float, pad: tuple[float, float], conf: float, nms_iou: float
) -> list[tuple[tuple[float, float, float, float], int, float]]:
    """One image's (4 + nc, A) output -> [(xyxy in image pixels, class, score)] after NMS."""
    scores = output[4:].max(axis=0)
    classes = output[4:].argmax(axis=0)
    keep = scores >= conf
    cx, cy, w, h = output[:4, keep]
    boxes_xywh = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
    idx = cv2.dnn.NMSBoxes(boxes_xywh.tolist(), scores[keep].tolist(), conf, nms_iou)
    result = []
    for i in np.array(idx).reshape(-1):
        x, y, bw, bh = boxes_xywh[i]
        box = ((x - pad[0]) / scale, (y - pad[1]) / scale, (x + bw - pad[0]) / scale, (y + bh - pad[1]) / scale)
        result.append((box, int(classes[keep][i]), float(scores[keep][i])))
    return result


def match(detections: list[tuple[tuple[float, ...], int, float]], gts: list[GroundTruth], iou_min: float = 0.5) -> int:
    """Greedy matching by score; a true positive needs IoU >= iou_min and the right class."""
    used: set[int] = set()
    tp = 0
    for box, cls, _ in sorted(detections, key=lambda d: -d[2]):
        best, best_iou = -1, iou_min
        for j, g in enumerate(gts):
            if j not in used and g.class_id == cls:
                iou = box_iou(box, g.box)
                if iou >= best_iou:
                    best, best_iou = j, iou
        if best >= 0:
            used.add(best)
            tp += 1
    return tp


def evaluate_onnx(path: Path, config: TrainConfig) -> EvalResult:
    """Run the exported file in ONNX Runtime on held-out 1280x720 scenes, as serving would."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tp = fp = n_gt = 0
    for k in range(config.eval_scenes):
        rng = np.random.default_rng([config.eval_seed, k])
        image, gts = render_scene(rng, 1280, 720, 12)
        canvas, scale, pad = letterbox(image, (INPUT_SIZE, INPUT_SIZE), PAD_VALUE)
        out = session.run(["output0"], {"images": to_model_input([canvas])})[0][0]
        dets = decode_yolov8(out, scale, pad, config.conf_threshold, config.nms_iou)
        hits = match(dets, gts)
        tp += hits
        fp += len(dets) - hits
        n_gt += len(gts)
    timings = {b: median_ms_per_image(session, b) for b in (1, 8)}
    return EvalResult(
        precision=tp / max(1, tp + fp), recall=tp / max(1, n_gt), true_positives=tp, false_positives=fp,
        ground_truths=n_gt, ms_per_image_batch1=round(timings[1], 2), ms_per_image_batch8=round(timings[8], 2),
    )


def median_ms_per_image(session: ort.InferenceSession, batch: int, runs: int = 30) -> float:
    """Median over single runs: robust to other processes briefly taking the CPU."""
    x = np.random.default_rng(0).random((batch, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"images": x})
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {"images": x})
        samples.append((time.perf_counter() - t0) / batch * 1000)
    return float(np.median(samples))


def eval_record(result: EvalResult, config: TrainConfig) -> dict:
    return {**asdict(result), "scenes": config.eval_scenes, "frame_size": [1280, 720], "iou_match": 0.5,
            "conf_threshold": config.conf_threshold, "nms_iou": config.nms_iou, "seed": config.eval_seed,
            "onnxruntime_threads": 2}


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * progress)))


def train(config: TrainConfig, out_dir: Path) -> dict:
    """Train, export and evaluate; returns the ``trained`` record written to detector.json."""
    torch.set_num_threads(2)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    pool = build_pool(config.seed, config.pool_scenes)
    pool_seconds = time.perf_counter() - started
    print(f"pool: {len(pool.images)} scenes ({len(pool.wide)} 16:9) in {pool_seconds:.0f}s", flush=True)

    spec = DetectorSpec(num_classes=len(LABELS), input_size=INPUT_SIZE)
    model = Detector(spec)
    ema = Detector(spec)
    ema.load_state_dict(model.state_dict())
    ema.eval()
    decay_params = [p for n, p in model.named_parameters() if p.ndim > 1]
    other_params = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay_params, "weight_decay": config.weight_decay}, {"params": other_params, "weight_decay": 0.0}],
        lr=config.lr,
    )
    anchors = {
        True: tuple(make_anchor_points_rect(CROP_ROWS, INPUT_SIZE, spec.strides)),
        False: tuple(make_anchor_points(INPUT_SIZE, spec.strides)),
    }
    model.train()
    for step in range(config.steps):
        cropped = step % config.full_canvas_every != config.full_canvas_every - 1
        images, targets = sample_batch(pool, rng, config.batch, cropped)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        ltrb, logits = model(images)
        loss, parts = detection_loss(ltrb, logits, targets, *anchors[cropped])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        with torch.no_grad():
            d = min(config.ema_decay, (1 + step) / (10 + step))
            for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
                if e.dtype.is_floating_point:
                    e.mul_(d).add_(m.detach(), alpha=1 - d)
                else:
                    e.copy_(m)
        if step % 25 == 0 or step == config.steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:4d} loss {float(loss):.3f} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                  + f" lr {_lr_at(step, config):.5f} t {elapsed:.0f}s", flush=True)
    train_seconds = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "detector.onnx"
    export_onnx(ema.eval(), str(onnx_path))
    result = evaluate_onnx(onnx_path, config)
    record = {
        "eval": eval_record(result, config),
        "steps": config.steps,
        "batch": config.batch,
        "seconds": round(train_seconds, 1),
        "cpu_seconds": round(time.process_time(), 1),
        "pool_seconds": round(pool_seconds, 1),
        "torch_version": torch.__version__,
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    meta = {
        "name": "demo-detector",
        "labels": list(LABELS),
        "input_size": [INPUT_SIZE, INPUT_SIZE],
        "layout": "yolov8",
        "input_name": "images",
        "output_name": "output0",
        "letterbox_pad": PAD_VALUE,
        "trained": record,
    }
    (out_dir / "detector.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(record["eval"]), flush=True)
    return record


def make_anchor_points_rect(height: int, width: int, strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres for a non-square training crop, in the same (stride-8 first) order as the head."""
    points, stride_of = [], []
    for s in strides:
        ys, xs = torch.meshgrid(
            torch.arange(height // s, dtype=torch.float32), torch.arange(width // s, dtype=torch.float32), indexing="ij"
        )
        points.append(torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s], dim=1))
        stride_of.append(torch.full((xs.numel(),), float(s)))
    return torch.cat(points), torch.cat(stride_of)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Re-train the demo detector (needs the 'demo' extra: torch==2.13.0).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--pool-scenes", type=int, default=TrainConfig.pool_scenes)
    parser.add_argument("--eval-only", action="store_true",
                        help="re-check an existing detector.onnx in --out and refresh the eval block of detector.json")
    args = parser.parse_args(argv)
    if args.eval_only:
        reevaluate(args.out)
        return
    train(TrainConfig(steps=args.steps, pool_scenes=args.pool_scenes), args.out)


def reevaluate(out_dir: Path) -> None:
    """Score the committed file again (e.g. timings on a quiet machine) without re-training."""
    meta_path = out_dir / "detector.json"
    if not (out_dir / "detector.onnx").exists() or not meta_path.exists():
        raise SystemExit(f"{out_dir} holds no detector.onnx + detector.json; train first with --out {out_dir}")
    meta = json.loads(meta_path.read_text())
    config = TrainConfig(**meta["trained"]["config"])
    meta["trained"]["eval"] = eval_record(evaluate_onnx(out_dir / "detector.onnx", config), config)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["trained"]["eval"]), flush=True)


if __name__ == "__main__":
    main()
