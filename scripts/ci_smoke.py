"""CI's check of the README's first command, run as a new user would (throwaway HOME and state).

  python scripts/ci_smoke.py detect RECORD_COPY   # a sample-video frame through /v1/detect has detections;
                                                  # saves the instance record for the next step
  python scripts/ci_smoke.py gone RECORD_COPY     # after `edgebatch down`: no process, no port of it is left
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from app.instance import InstanceRecord, port_free
from app.state import StateDir


def detect(copy: Path) -> None:
    import cv2
    import httpx

    state = StateDir.default()
    record = InstanceRecord.load(state)
    assert record is not None and record.http_url, f"`edgebatch up` recorded no instance in {state.instance_file}"
    cap = cv2.VideoCapture(str(state.videos / "sample.mp4"))
    for _ in range(10):
        ok, frame = cap.read()
        assert ok, "the sample video has fewer than 10 frames"
    cap.release()
    ok, jpeg = cv2.imencode(".jpg", frame)
    r = httpx.post(f"{record.http_url}/v1/detect", content=jpeg.tobytes(),
                   headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, f"/v1/detect answered {r.status_code}: {r.text[:300]}"
    found = r.json()["detections"]
    assert found, "/v1/detect found nothing in a sample-video frame that has shapes in it"
    assert not (Path.home() / ".ray" / "auth_token").exists(), "up wrote a Ray token outside its state folder"
    copy.write_text(json.dumps(asdict(record)))
    print(f"smoke: {record.http_url}/v1/detect found {len(found)} objects in frame 10 of the sample video")


def gone(copy: Path) -> None:
    import psutil

    data = json.loads(copy.read_text())
    session, gcs = data.get("session_dir"), data["address"].rpartition(":")[2]
    assert session, "the instance record had no Ray session folder"
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if session in " ".join(p.info.get("cmdline") or []) or f"--gcs_server_port={gcs}" in (p.info.get("cmdline") or [])]
    assert not left, f"processes of the stopped instance are still running: {left}"
    held = [f"{name} {port}" for name, port in data["ports"].items() if port and not port_free(port)]
    assert not held, f"ports of the stopped instance are still bound: {held}"
    assert not StateDir.default().instance_file.exists(), "`edgebatch down` left the instance recorded"
    print(f"smoke: no process and no port of the stopped instance is left ({len(data['ports'])} ports checked)")


if __name__ == "__main__":
    {"detect": detect, "gone": gone}[sys.argv[1]](Path(sys.argv[2]))
