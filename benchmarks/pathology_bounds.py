"""What limits mvmm's scar and oedema on MS-CMRSeg / MyoPS: the myocardium, or the subtype decision?

For each patient of a finished three-sequence pathology experiment (``mvmm experiment mscmr --sequences
LGE C0 T2 --pathology``), em-all is fitted again with that experiment's settings and the atlas built
without the patient, and on the T2 grid (where the MyoPS labels are) this reports:

- ``scar``, ``scar+oedema``: Dice of mvmm's pathology masks (as the experiment reports them);
- ``myo``: Dice of mvmm's myocardium against the T2 manual labels;
- ``*_inside_myo``: the share of the manual region that mvmm labels myocardium at all — a bound on
  recall whatever the scar / oedema decision inside it;
- ``*_oracle_mvmm_myo``, ``*_oracle_manual_myo``: Dice of the best per-patient intensity threshold
  (LGE for scar, T2 for scar ∪ oedema; 49 quantiles) inside mvmm's myocardium and inside the manual
  one. These thresholds are chosen on each patient's own labels: an optimistic bound, not a method.

Usage::

    python benchmarks/pathology_bounds.py --experiment DIR [--patients 1-20,22-24] [--json bounds.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np

from cardiac_case import atlas_for

QUANTILES = np.linspace(0.02, 0.98, 49)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else float("nan")


def best_threshold_dice(values: np.ndarray, inside: np.ndarray, target: np.ndarray) -> float:
    """The best Dice with ``target`` of ``inside & (values > t)`` over thresholds at the quantiles of
    ``values`` inside (NaN when nothing is inside)."""
    if not inside.any():
        return float("nan")
    return max(dice(inside & (values > t), target) for t in np.quantile(values[inside], QUANTILES))


def patient_bounds(files, atlas_path: Path, settings) -> dict:
    from mvmm.data.atlas import Atlas
    from mvmm.data.image import Image
    from mvmm.data.labels import PATHOLOGY_LABELS
    from mvmm.experiments.mscmr import fit_em_all
    from mvmm.pathology import pathology_maps

    images = [Image.read(files.images[s], s) for s in settings.sequences]
    result = fit_em_all(images, Atlas.read([atlas_path]).placed_on(images[0].grid), settings)
    maps = pathology_maps(result, "T2")
    sample = result.sample_on("T2")
    label_map = result.label_map_on("T2")  # as mvmm writes labels_T2 (the pathological wall kept)
    values = {name: sample.images[sample.names.index(name)].cpu().numpy() for name in ("LGE", "T2")}
    covered = {name: sample.coverage[sample.names.index(name)].cpu().numpy() for name in ("LGE", "T2")}
    myo_value = result.labels.values[result.labels.names.index("Myo")]
    truth = Image.read(files.labels["T2"], "T2 manual").data[0].numpy().round().astype(np.int64)
    pathology = Image.read(files.pathology["T2"], "T2 pathology").data[0].numpy().round().astype(np.int64)
    mine, manual = label_map == myo_value, truth == myo_value
    regions = {"scar": (pathology == PATHOLOGY_LABELS["scar"], maps.mask["scar"], "LGE"),
               "scar+oedema": (pathology > 0, maps.mask["scar"] | maps.mask["oedema"], "T2")}
    row = {"myo": dice(mine, manual)}
    for name, (target, predicted, shown_by) in regions.items():
        if not target.any():
            continue
        row[name] = dice(predicted, target)
        row[f"{name}_inside_myo"] = float((target & mine).sum()) / float(target.sum())
        row[f"{name}_oracle_mvmm_myo"] = best_threshold_dice(values[shown_by], mine & covered[shown_by], target)
        row[f"{name}_oracle_manual_myo"] = best_threshold_dice(values[shown_by], manual & covered[shown_by], target)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, required=True,
                        help="A finished `mvmm experiment mscmr --sequences LGE C0 T2 --pathology` folder.")
    parser.add_argument("--data", type=Path, help="Default: the experiment's.")
    parser.add_argument("--patients", help="Default: the experiment's patients that have T2 pathology labels.")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    from mvmm.core.settings import ExperimentSettings
    from mvmm.data.manifest import Manifest, parse_patients, scan

    record = json.loads((args.experiment / "experiment.json").read_text())
    settings = ExperimentSettings(**record["settings"])
    if not settings.pathology or "T2" not in settings.sequences:
        raise SystemExit(f"--experiment: {args.experiment} is not a three-sequence --pathology run")
    data = args.data or Path(record["data"])
    found = scan(Manifest.load("mscmr19"), data, sequences=settings.sequences, label_sequences=["LGE", "T2"])
    patients = parse_patients(args.patients) if args.patients else sorted(
        p for p, f in found.patients.items() if "T2" in f.pathology and "T2" in f.labels)
    rows = {}
    for patient in patients:
        rows[patient] = patient_bounds(found.patients[patient], atlas_for(args.experiment, patient), settings)
        print(f"patient {patient}: " + " ".join(f"{k} {v:.3f}" for k, v in rows[patient].items()), file=sys.stderr,
              flush=True)
    keys = sorted({k for row in rows.values() for k in row})
    summary = {k: {"mean": float(np.nanmean([r[k] for r in rows.values() if k in r])),
                   "patients": sum(k in r for r in rows.values())} for k in keys}
    for key, value in summary.items():
        print(f"{key:32s} {value['mean']:.3f}  ({value['patients']} patients)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "pathology_bounds", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "command": "python benchmarks/pathology_bounds.py " + " ".join(sys.argv[1:]),
            "summary": summary, "rows": {str(p): r for p, r in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()
