"""tf.distribute multi-worker training (2 workers on 2 hosts) vs one worker: throughput and val age MAE.

Run: .venv/bin/python benchmarks/multiworker.py [--quick]
Writes benchmarks/results/multiworker.json (its "mode": quick or full). `measure(quick)` returns the
same dict; benchmarks/scale_out.py includes it.

One project (git + DVC, as tests/conftest.make_project_repo builds it) ingests and preprocesses a
subset of utkface-part1 + utkface-parts23 (every k-th chip by name; --quick: 400 of part 1), and
is copied three times. `agegender train` runs once pinned to core 0 (one worker), then on two
test hosts (network namespaces, tests/hosts.py) with TF_CONFIG naming their bridge addresses, the
chief pinned to core 0 and the worker to core 1. Throughput is the chief's train_images_per_s
(epochs x train images / fit seconds, first epoch's tracing and the wait for the other worker
included); the machine's other work shares the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import BIN, copy_repo, make_project_repo, run, set_params  # noqa: E402
from tests.hosts import network_hosts  # noqa: E402

from agegender.distributed import tf_config  # noqa: E402

DATASETS = [ROOT.parent / "shared" / "datasets" / name for name in ("utkface-part1", "utkface-parts23")]
QUICK = {"images": 400, "image_size": 32, "width": 8, "epochs": 3, "batch_size": 32}
FULL = {"images": 3000, "image_size": 48, "width": 16, "epochs": 4, "batch_size": 64}
PORT = 12345


def chips(count: int) -> list[Path]:
    """Every k-th well-formed chip by name across the datasets (--quick: part 1 only)."""
    folders = DATASETS[:1] if count <= 400 else DATASETS
    files = sorted(p for folder in folders for p in folder.iterdir() if p.name.count("_") == 3)
    return files[:: max(len(files) // count, 1)][:count]


def prepared_project(folder: Path, settings: dict) -> Path:
    folder.mkdir()
    repo = make_project_repo(folder)
    train = {"width": settings["width"], "epochs": settings["epochs"], "batch_size": settings["batch_size"]}
    set_params(
        repo,
        {
            "preprocess": {"image_size": settings["image_size"]},
            "train": {**train, "warmup_epochs": 0, "patience": settings["epochs"]},
            "candidates": [{"name": "default", "train": {}}],
        },
    )
    images = folder / "images"
    images.mkdir()
    for path in chips(settings["images"]):
        shutil.copyfile(path, images / path.name)
    run(str(BIN / "agegender"), "data", "ingest", str(images), cwd=repo)
    run(str(BIN / "dvc"), "repro", "preprocess", cwd=repo)
    return repo


def metrics(repo: Path) -> dict:
    values = json.loads((repo / "artifacts" / "model" / "metrics.json").read_text())
    keep = ("val_age_mae", "val_gender_accuracy", "train_seconds", "train_images_per_s", "epochs_run")
    return {key: values[key] for key in keep}


def train_two_hosts(chief: Path, worker: Path, logs: Path) -> None:
    with network_hosts(["chief", "worker"]) as hosts:
        workers = [f"{hosts[name].address}:{PORT}" for name in ("chief", "worker")]
        processes = []
        for index, (name, repo) in enumerate((("chief", chief), ("worker", worker))):
            processes.append(
                hosts[name].start(
                    ["taskset", "-c", str(index), BIN / "agegender", "train"],
                    cwd=repo,
                    env={**os.environ, "TF_CONFIG": tf_config(workers, index)},
                    log=logs / f"{name}.log",
                )
            )
        for process in processes:
            if process.wait(timeout=3600) != 0:
                raise RuntimeError(f"multi-worker training failed: see {logs}")


def measure(quick: bool) -> dict:
    """One worker on one core vs two workers (one core each, two hosts): throughput and val age MAE."""
    settings = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="agegender-multiworker-") as tmp:
        base = Path(tmp)
        template = prepared_project(base / "template", settings)
        single, chief, worker = (copy_repo(template, base / name) for name in ("single", "chief", "worker"))
        print(f"training on one core ({settings})", flush=True)
        run("taskset", "-c", "0", str(BIN / "agegender"), "train", cwd=single)
        print("training on two hosts, one core each", flush=True)
        train_two_hosts(chief, worker, base)
        one, two = metrics(single), metrics(chief)
        split = json.loads((template / "artifacts" / "prepared" / "stats.json").read_text())["splits"]
    return {
        "mode": "quick" if quick else "full",
        "settings": settings,
        "train_images": split["train"]["count"],
        "val_images": split["val"]["count"],
        "one_worker": one,
        "two_workers": two,
        "speedup": round(two["train_images_per_s"] / one["train_images_per_s"], 2),
        "val_age_mae_gap": round(two["val_age_mae"] - one["val_age_mae"], 3),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 part-1 chips at 32 px, 3 epochs")
    result = measure(parser.parse_args().quick)
    out = ROOT / "benchmarks" / "results" / "multiworker.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
