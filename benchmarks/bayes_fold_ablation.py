"""Ablation of the Bayesian CNN's training settings on one development fold of MS-CMRSeg.

The patients are split into FOLDS folds as ``mvmm experiment mscmr --folds`` splits them (patient i of
the sorted list in fold i mod FOLDS). For the development fold (``--fold``), the atlas of the other
folds' LGE labels is built (or taken from an experiment folder's cache, ``--atlases``), a network is
trained on the other folds' images for each setting, and evaluated on the development fold's LGE labels:
``bayes`` (the network), ``bayes-refine`` (then ``--refine`` EM iterations, warp fixed) and ``bayes-icm``
(then the experiment's em-all registration and EM, from the network's warp); ``--em-all`` adds the
classical em-all with the same atlas. Settings chosen here are then used on the *other* folds only, whose
test patients this never sees (docs/mscmr.md, "Networks").

    python benchmarks/bayes_fold_ablation.py --data ../shared/data/mscmr --out runs/ablation \
        --smoothness 1 10 100 [--fold 0 --folds 5] [--epochs 100] [--json ablation.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


METHODS = ("bayes", "bayes-refine", "bayes-icm")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patients", default="1-25")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--smoothness", type=float, nargs="+", default=[1.0])
    parser.add_argument("--control-spacing", type=float, nargs="+", default=[10.0])
    parser.add_argument("--proportions", choices=["atlas", "learned"], nargs="+", default=["atlas"])
    parser.add_argument("--refine", type=int, default=20)
    parser.add_argument("--em-all", action="store_true", help="also the classical em-all with the fold's atlas")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from mvmm.core.settings import BayesNetSettings, ExperimentSettings, RegistrationSettings, TrainingSettings
    from mvmm.data.subject import Subject
    from mvmm.segment import segment_subject
    from mvmm.data.image import Image
    from mvmm.data.manifest import Manifest, parse_patients
    from mvmm.experiments.mscmr import _atlas_for
    from mvmm.metrics import evaluate_labels
    from mvmm.nets.data import subjects_from_manifest
    from mvmm.nets.model_dir import WEIGHTS, load_model
    from mvmm.amortized import segment_with_model
    from mvmm.training import train_bayes

    warnings.simplefilter("ignore")
    labels = Manifest.load("mscmr19").labels
    patients = sorted(parse_patients(args.patients))
    fold_of = {p: i % args.folds for i, p in enumerate(patients)}
    test = [p for p in patients if fold_of[p] == args.fold]
    train = [p for p in patients if fold_of[p] != args.fold]
    pool = {p: args.data / f"patient{p}_LGE_manual.nii.gz" for p in train}
    images = {s: {p: args.data / f"patient{p}_{s}.nii.gz" for p in train} for s in ("LGE", "C0")}
    atlas, _ = _atlas_for(pool, images, args.out, torch.device("cpu"), False, "affine")
    rows = subjects_from_manifest("mscmr19", args.data, train, ["LGE", "C0"])
    experiment = ExperimentSettings()
    em_all_registration = RegistrationSettings(atlas=experiment.register_atlas, images="none", images_init="header",
                                               template_metric="none", affine_weight=experiment.affine_weight)
    results = []
    if args.em_all:  # the classical joint model with the same fold atlas, for reference
        for p in test:
            case = [Image.read(args.data / f"patient{p}_{s}.nii.gz", s) for s in ("LGE", "C0")]
            truth = Image.read(args.data / f"patient{p}_LGE_manual.nii.gz", "truth").data[0].numpy().astype(int)
            start = time.perf_counter()
            seg = segment_subject(Subject(case, atlas=atlas.placed_on(case[0].grid),
                                          roi_margin_mm=experiment.roi_margin_mm),
                                  subtypes=["LGE:Myo=2"], learn_proportions=False, device="cpu", postprocess="cardiac",
                                  registration=replace(em_all_registration, atlas_search_mm=experiment.atlas_search_mm))
            dice = evaluate_labels(seg.label_map(), truth, tuple(reversed(case[0].grid.spacing)), labels)
            row = {"setting": "em-all", "patient": p, "seconds": time.perf_counter() - start,
                   "em-all": {s: dice[s]["dice"] for s in ("Myo", "LV", "RV")}}
            print("em-all", p, [round(row["em-all"][s], 3) for s in ("Myo", "LV", "RV")], flush=True)
            results.append(row)
    grid = [(s, c, p) for s in args.smoothness for c in args.control_spacing for p in args.proportions]
    for smoothness, spacing, proportions in grid:
        name = f"smooth{smoothness:g}_cp{spacing:g}_{proportions}"
        folder = args.out / name
        if not (folder / WEIGHTS).exists():
            train_bayes(rows, ["LGE", "C0"], atlas, folder,
                        BayesNetSettings(subtypes=["LGE:Myo=2"], control_spacing=spacing, proportions=proportions),
                        TrainingSettings(epochs=args.epochs, smoothness=smoothness), "cpu",
                        resume=(folder / "checkpoint.pt").exists(), force=True, progress=False)
        model = load_model(folder, "cpu")
        for p in test:
            case = [Image.read(args.data / f"patient{p}_{s}.nii.gz", s) for s in ("LGE", "C0")]
            truth = Image.read(args.data / f"patient{p}_LGE_manual.nii.gz", "truth").data[0].numpy().astype(int)
            spacing_mm = tuple(reversed(case[0].grid.spacing))
            row = {"setting": name, "smoothness": smoothness, "control_spacing": spacing,
                   "proportions": proportions, "patient": p}
            for method, refine in (("bayes", 0), ("bayes-refine", args.refine), ("bayes-icm", 0)):
                start = time.perf_counter()
                if method == "bayes-icm":  # the experiment's em-all registration and EM from the network's warp
                    seg = segment_with_model(case, model, postprocess="cardiac", device="cpu",
                                             registration=em_all_registration, roi_margin_mm=experiment.roi_margin_mm)
                else:
                    seg = segment_with_model(case, model, refine=refine, postprocess="cardiac", device="cpu")
                dice = evaluate_labels(seg.label_map(), truth, spacing_mm, labels)
                row[method] = {s: dice[s]["dice"] for s in ("Myo", "LV", "RV")}
                row[f"{method}_s"] = time.perf_counter() - start
            results.append(row)
            print(name, p, {m: [round(row[m][s], 3) for s in ("Myo", "LV", "RV")] for m in METHODS}, flush=True)
    summary = {}
    if args.em_all:
        summary["em-all"] = {s: float(np.mean([r["em-all"][s] for r in results if r["setting"] == "em-all"]))
                             for s in ("Myo", "LV", "RV")}
        print("em-all", " / ".join(f"{v:.3f}" for v in summary["em-all"].values()))
    for name in dict.fromkeys(r["setting"] for r in results if r["setting"] != "em-all"):
        rows_ = [r for r in results if r["setting"] == name]
        summary[name] = {m: {s: float(np.mean([r[m][s] for r in rows_])) for s in ("Myo", "LV", "RV")}
                         for m in METHODS}
        print(name, {m: " / ".join(f"{v:.3f}" for v in summary[name][m].values()) for m in summary[name]})
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "bayes_fold_ablation", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads, cpu",
            "fold": args.fold, "folds": args.folds, "test_patients": test, "epochs": args.epochs,
            "summary": summary, "patients": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
