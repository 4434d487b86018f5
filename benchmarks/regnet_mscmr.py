"""The registration network on MS-CMRSeg, cross-validated: C0 → LGE of each patient.

For each fold (patient i of the sorted list in fold i mod FOLDS), a registration network is trained on
the other folds' (LGE, C0) pairs — images only — and applied to the fold's pairs. Each moving C0's
manual labels are brought onto the LGE grid (nearest neighbour) through (a) the headers, (b) the
network's SVF, (c) the optimising ``mvmm register --transform ffd --metric mi``, and compared with the
LGE's manual labels (Dice per structure; labels are read for nothing else). Seconds per pair:
the network's forward pass (files read, network grid, prediction) and the optimisation.

    python benchmarks/regnet_mscmr.py --data ../shared/data/mscmr --patients 1-25 --folds 5 \
        --out runs/regnet-cv5 [--epochs 100] [--json regnet.json]

Trained models are kept in OUT/foldF (a finished one is reused, an interrupted one resumed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

STRUCTURES = {"Myo": 200, "LV": 500, "RV": 600}


def dice_through(transform, fixed_truth, moving_truth) -> dict:
    from mvmm.spatial.transforms import map_grid
    from mvmm.spatial.warp import sample_image

    with torch.no_grad():
        values, _ = sample_image(moving_truth.data.float(), moving_truth.grid, map_grid(transform, fixed_truth.grid),
                                 mode="nearest")
    a, b = fixed_truth.data[0].round().long(), values[0].round().long()
    return {name: float(2 * ((a == v) & (b == v)).sum() / max(int((a == v).sum() + (b == v).sum()), 1))
            for name, v in STRUCTURES.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--patients", default="1-25")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--metric", choices=["mi", "ncc"], default="mi")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from mvmm.core.settings import PairwiseSettings, RegNetSettings, TrainingSettings
    from mvmm.data.image import Image
    from mvmm.data.manifest import parse_patients
    from mvmm.nets.data import subjects_from_manifest
    from mvmm.nets.model_dir import WEIGHTS, load_model
    from mvmm.register import PairwiseRegistration, predict_registration
    from mvmm.spatial.transforms import IdentityTransform
    from mvmm.training import train_regnet

    warnings.simplefilter("ignore")
    patients = parse_patients(args.patients)
    rows = {int(r.name[7:]): r for r in subjects_from_manifest("mscmr19", args.data, patients, ["LGE", "C0"])}
    fold_of = {p: i % args.folds for i, p in enumerate(sorted(rows))}
    results, training = [], {}
    for fold in range(args.folds):
        folder = args.out / f"fold{fold}"
        train = [rows[p] for p in sorted(rows) if fold_of[p] != fold]
        if not (folder / WEIGHTS).exists():
            resume = (folder / "checkpoint.pt").exists()
            report = train_regnet(train, "LGE", "C0", folder, RegNetSettings(metric=args.metric),
                                  TrainingSettings(epochs=args.epochs), args.device, resume=resume, force=True,
                                  progress=False)
            training[fold] = {"seconds": report["seconds"], "epochs": report["epochs"],
                              "final_loss": report["final_loss"], "patients": [r.name for r in train]}
        model = load_model(folder, args.device)
        for p in sorted(q for q in rows if fold_of[q] == fold):
            lge_truth = Image.read(args.data / f"patient{p}_LGE_manual.nii.gz", "LGE truth")
            c0_truth = Image.read(args.data / f"patient{p}_C0_manual.nii.gz", "C0 truth")
            start = time.perf_counter()
            fixed, moving = Image.read(rows[p].images["LGE"], "LGE"), Image.read(rows[p].images["C0"], "C0")
            network, _, _ = predict_registration(fixed, moving, model, torch.device(args.device))
            network_s = time.perf_counter() - start
            start = time.perf_counter()
            ffd = PairwiseRegistration(fixed, moving, PairwiseSettings(transform="ffd", metric="mi"),
                                       device=torch.device(args.device)).run()
            ffd_s = time.perf_counter() - start
            row = {"patient": p, "fold": fold, "network_s": network_s, "ffd_s": ffd_s,
                   "headers": dice_through(IdentityTransform(), lge_truth, c0_truth),
                   "network": dice_through(network, lge_truth, c0_truth),
                   "ffd": dice_through(ffd.transform, lge_truth, c0_truth)}
            results.append(row)
            print(p, {k: {s: round(v, 3) for s, v in row[k].items()} for k in ("headers", "network", "ffd")},
                  f"{network_s:.2f} s / {ffd_s:.1f} s", flush=True)
    summary = {m: {s: float(np.mean([r[m][s] for r in results])) for s in STRUCTURES}
               for m in ("headers", "network", "ffd")}
    report = {"benchmark": "regnet_mscmr", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads, device {args.device}",
              "torch": torch.__version__, "folds": args.folds, "epochs": args.epochs, "metric": args.metric,
              "mean_dice": summary, "network_s_median": float(np.median([r["network_s"] for r in results])),
              "ffd_s_median": float(np.median([r["ffd_s"] for r in results])), "training": training,
              "patients": results}
    for method, values in summary.items():
        print(f"{method:<8}", " / ".join(f"{values[s]:.3f}" for s in STRUCTURES))
    print(f"seconds per pair (median): network {report['network_s_median']:.2f}, ffd {report['ffd_s_median']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
