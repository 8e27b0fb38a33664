"""The demo detector and the synthetic scenes it is trained and checked on.

Importing this package never imports torch: only ``app.demo.network`` and ``app.demo.train``
(re-training, the ``demo`` extra) do. The trained asset lives in ``assets/``.
"""

from pathlib import Path

from app.demo.synthetic import LABELS, GroundTruth, MovingScene, letterbox, render_scene, to_model_input
from app.demo.video import read_ground_truth, write_sample_video

ASSETS_DIR = Path(__file__).parent / "assets"
DETECTOR_ONNX = ASSETS_DIR / "detector.onnx"
DETECTOR_META = ASSETS_DIR / "detector.json"

__all__ = [
    "ASSETS_DIR", "DETECTOR_META", "DETECTOR_ONNX", "LABELS", "GroundTruth", "MovingScene",
    "letterbox", "read_ground_truth", "render_scene", "to_model_input", "write_sample_video",
]
