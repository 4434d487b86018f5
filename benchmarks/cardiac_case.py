"""Seconds per MS-CMRSeg case, outputs included, with the time split; Dice against the manual labels.

Each patient is segmented by ``mvmm segment --images LGE C0 --atlas <its fold's atlas>`` (the
command's own code, called in this process), whose cardiac preset is the MS-CMRSeg experiment's
settings (atlas start search, rigid then affine atlas levels, EM, the cardiac clean-up), and every
output is written (label maps on both grids, posteriors, entropy, parameters, figures, report.json):
the seconds of a case run from reading its images to its last file. A fresh process's start-up
(imports) is measured once on its own (``startup_s``), as is the first use of ``torch.optim``, which
imports ``torch._dynamo`` (~1.3 s, once per process). The atlases are those of a
5-fold experiment folder (``mvmm experiment mscmr --folds 5``: each patient's atlas was built
from the other four folds' labels).

    python benchmarks/cardiac_case.py --experiment DIR [--data ../shared/data/mscmr] [--patients 1-25] \\
        [--lge-data ../shared/data/mscmr_full] [--sequences LGE C0] [--devices cpu,cuda] [--json case.json]

``--lge-data``: the LGE image and its manual labels from that folder (``mscmr_full``: the uncropped LGE
as the scanner gave it), the other sequences from ``--data``; ``--sequences LGE``: the LGE alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def atlas_for(experiment: Path, patient: int) -> Path:
    """The atlas of ``experiment`` that was built without ``patient`` (``atlas_KEY.nii.gz`` beside its
    ``atlas_KEY.json``)."""
    for sidecar in sorted((experiment / "atlases").glob("atlas_*.json")):
        if patient not in json.loads(sidecar.read_text())["build"]["patients"]:
            return sidecar.with_name(sidecar.stem + ".nii.gz")
    raise SystemExit(f"--experiment: no atlas in {experiment}/atlases leaves patient {patient} out")


def run_case(data: Path, atlas_path: Path, patient: int, device: str, out: Path, lge_data: Path = None,
             sequences=("LGE", "C0")) -> dict:
    """``mvmm segment`` on one patient, in this process; its seconds, time split and Dice."""
    import numpy as np

    from mvmm.cli import main as cli
    from mvmm.data.image import Image
    from mvmm.data.labels import LabelSet
    from mvmm.metrics import evaluate_labels

    lge_data = lge_data or data
    images = [str((lge_data if s == "LGE" else data) / f"patient{patient}_{s}.nii.gz") for s in sequences]
    start = time.perf_counter()
    cli(["segment", "--images", *images, "--names", *sequences, "--atlas", str(atlas_path), "--device", device,
         "--out", str(out), "--force", "--quiet"], standalone_mode=False)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    labels = LabelSet.from_dict(json.loads((out / "params.json").read_text())["labels"])
    prediction = Image.read(out / "labels.nii.gz", "labels").data[0].numpy().astype(np.int64)
    truth_image = Image.read(lge_data / f"patient{patient}_LGE_manual.nii.gz", "manual")
    truth = truth_image.data[0].numpy().astype(np.int64)
    metrics = evaluate_labels(prediction, truth, tuple(reversed(truth_image.grid.spacing)), labels)
    return {"patient": patient, "device": device, "seconds": seconds, "timings_s": report["timings_s"],
            "outer_iterations": len(report.get("registration", {}).get("history", []) or []),
            "dice": {s: m["dice"] for s, m in metrics.items()}}


def startup_seconds() -> float:
    """Seconds for a fresh interpreter to import mvmm's segmentation path (what every CLI call pays)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mvmm.segment, mvmm.cli"], check=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, required=True,
                        help="An mvmm experiment folder (its atlases: each patient's is one built without it).")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mscmr"))
    parser.add_argument("--patients", default="1-25")
    parser.add_argument("--lge-data", type=Path, help="The LGE images and labels from here (e.g. mscmr_full).")
    parser.add_argument("--sequences", nargs="+", default=["LGE", "C0"])
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    import numpy as np
    import torch

    from mvmm.data.manifest import parse_patients
    from mvmm.experiments.summary import median_time_split

    patients = parse_patients(args.patients)
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    import torch.optim  # noqa: F401
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (~1.3 s): not a case's
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for patient in patients:
                row = run_case(args.data, atlas_for(args.experiment, patient), patient, device, Path(tmp) / "out",
                               args.lge_data, args.sequences)
                rows.append(row)
                print(f"patient {patient} {device}: {row['seconds']:.2f} s, Dice "
                      + " ".join(f"{k} {v:.3f}" for k, v in row["dice"].items()), file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    summary = {}
    for device in devices:
        mine = [r for r in rows if r["device"] == device]
        seconds = [r["seconds"] for r in mine]
        split = median_time_split([r["timings_s"] for r in mine])
        summary[device] = {"median_s": float(np.median(seconds)), "mean_s": float(np.mean(seconds)),
                           "max_s": float(np.max(seconds)), "split_median_s": split,
                           "dice_mean": {s: float(np.mean([r["dice"][s] for r in mine])) for s in mine[0]["dice"]}}
        print(f"{device}: median {summary[device]['median_s']:.2f} s, max {summary[device]['max_s']:.2f} s; Dice "
              + " ".join(f"{k} {v:.3f}" for k, v in summary[device]["dice_mean"].items()))
        print("  split (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
    startup = startup_seconds()
    print(f"start-up of a fresh process (imports): {startup:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/cardiac_case.py " + " ".join(sys.argv[1:]), "startup_s": startup,
            "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
