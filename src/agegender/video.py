"""Frame-by-frame prediction on a camera or video file, drawn with the same overlay as the service."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
from rich.progress import Progress

from agegender.render import draw_faces


def open_capture(source: str) -> cv2.VideoCapture:
    """A camera index ("0") or a video file; fails with a message naming the source."""
    if not source.isdigit() and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such video file (or pass a camera index such as 0)")
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise ValueError(f"{source}: cannot be opened as a camera or video")
    return capture


def open_writer(out: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    codec = "mp4v" if out.suffix.lower() == ".mp4" else "MJPG"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*codec), fps, size)
    if not writer.isOpened():
        raise ValueError(f"{out}: cannot write video (use .mp4 or .avi)")
    return writer


def annotate_video(
    predictor, capture: cv2.VideoCapture, *, name: str, out: Path | None = None, max_frames: int = 0
) -> dict:
    """Predict every frame; write the annotated frames to `out`. Returns frames, faces and frames/s."""
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if max_frames:
        total = min(total or max_frames, max_frames)
    writer, frames, faces, fps = None, 0, 0, 0.0
    start = time.perf_counter()
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"Annotating {name}", total=total)
            while not max_frames or frames < max_frames:
                ok, frame = capture.read()
                if not ok:
                    break
                found = predictor.predict_image(frame)
                frames, faces = frames + 1, faces + len(found)
                fps = frames / (time.perf_counter() - start)
                if out:
                    if writer is None:
                        rate = capture.get(cv2.CAP_PROP_FPS) or 25.0
                        writer = open_writer(out, rate, (frame.shape[1], frame.shape[0]))
                    writer.write(draw_faces(frame, found, footer=f"{fps:.1f} fps"))
                progress.update(task, advance=1, description=f"Annotating {name}: {fps:.1f} fps")
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise ValueError(f"{name}: no frames could be read")
    return {"frames": frames, "faces": faces, "fps": fps}
