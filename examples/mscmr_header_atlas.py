"""MS-CMRSeg, header-only setting: segment each patient's LGE with the patient's own C0 labels as atlas.

This is the setting of the MvMM demo code: the atlas is the patient's C0 manual label map, placed on
the LGE by the image headers alone (no registration), smoothed into probabilities. For every patient
it compares, against the LGE manual labels (used for nothing else):

  atlas    argmax of that prior on the LGE grid
  em-lge   the mixture model on LGE alone
  em-all   the mixture model on LGE + C0 jointly

Usage (the data folder holds patientN_{LGE,C0}[_manual].nii.gz)::

    python examples/mscmr_header_atlas.py --data ../shared/data/mscmr --out mscmr-header [--patients 1-25]
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import click
import numpy as np

from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.data.subject import Subject
from mvmm.metrics import evaluate_labels
from mvmm.core.outputs import prepare_output_dir, write_json
from mvmm.segment import segment_subject

METHODS = ("atlas", "em-lge", "em-all")


def parse_range(text: str):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def run_patient(data: Path, n: int, sigma: float, device: str, mrf_beta: float):
    lge = Image.read(data / f"patient{n}_LGE.nii.gz", "LGE")
    c0 = Image.read(data / f"patient{n}_C0.nii.gz", "C0")
    c0_labels = Image.read(data / f"patient{n}_C0_manual.nii.gz", "C0_manual", argname="--atlas")
    truth = Image.read(data / f"patient{n}_LGE_manual.nii.gz", "LGE_manual", argname="--truth")
    atlas = Atlas.from_label_maps([c0_labels.data[0].numpy()], c0_labels.grid, CARDIAC_LABELS, sigma,
                                  source=f"patient{n}_C0_manual")
    spacing = tuple(reversed(lge.grid.spacing))
    truth_map = truth.data[0].numpy().astype(np.int64)
    rows, seconds = {}, {}
    start = time.perf_counter()
    prior = Subject([lge], atlas=atlas).sample().prior
    rows["atlas"] = evaluate_labels(np.asarray(CARDIAC_LABELS.values)[prior.argmax(0).numpy()], truth_map, spacing,
                                    CARDIAC_LABELS)
    seconds["atlas"] = time.perf_counter() - start
    for method, images in (("em-lge", [lge]), ("em-all", [lge, c0])):
        start = time.perf_counter()
        result = segment_subject(Subject(images, atlas=atlas), mrf_beta=mrf_beta, device=device,
                                         registration=None)
        rows[method] = evaluate_labels(result.label_map(), truth_map, spacing, CARDIAC_LABELS)
        seconds[method] = time.perf_counter() - start
    return rows, seconds


@click.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--patients", default="1-25", show_default=True)
@click.option("--sigma", default=2.0, show_default=True, help="Atlas smoothing (mm).")
@click.option("--mrf-beta", default=0.0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True)
def main(data, out, patients, sigma, mrf_beta, device, force):
    out = prepare_output_dir(out, force)
    records = []
    for n in parse_range(patients):
        rows, seconds = run_patient(data, n, sigma, device, mrf_beta)
        for method in METHODS:
            for structure, m in rows[method].items():
                records.append({"patient": n, "method": method, "structure": structure, "dice": m["dice"],
                                "hd95_mm": m["hd95"], "msd_mm": m["msd"], "seconds": seconds[method]})
        click.echo(f"patient {n:2d}: " + "  ".join(
            f"{meth} " + "/".join(f"{rows[meth][s]['dice']:.3f}" for s in ("Myo", "LV", "RV")) for meth in METHODS))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    summary = {}
    for method in METHODS:
        summary[method] = {}
        for structure in ("Myo", "LV", "RV"):
            dice = np.array([r["dice"] for r in records if r["method"] == method and r["structure"] == structure])
            summary[method][structure] = {"dice_mean": float(dice.mean()), "dice_sd": float(dice.std(ddof=1)) if len(dice) > 1 else 0.0}
        summary[method]["seconds_mean"] = float(np.mean([r["seconds"] for r in records if r["method"] == method]))
    write_json(out / "summary.json", {"patients": parse_range(patients), "sigma_mm": sigma, "mrf_beta": mrf_beta,
                                      "methods": summary})
    click.echo("\nmean LGE Dice (sd) over patients " + patients)
    click.echo(f"{'method':<8}" + "".join(f"{s:>16}" for s in ("Myo", "LV", "RV")) + f"{'s/patient':>11}")
    for method in METHODS:
        s = summary[method]
        click.echo(f"{method:<8}" + "".join(f"{s[k]['dice_mean']:>9.3f} ({s[k]['dice_sd']:.3f})" for k in ("Myo", "LV", "RV"))
                   + f"{s['seconds_mean']:>11.1f}")


if __name__ == "__main__":
    main()
