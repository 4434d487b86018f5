"""The networks of issue 20 on MS-CMRSeg, cross-validated as ``mvmm experiment mscmr --folds`` splits.

Patient i of the sorted list is in fold i mod FOLDS; each fold's networks are trained on the other
folds' patients and segment the fold's. Methods (``--methods``):

- ``acwe-c0``, ``acwe-lge``: the Chan–Vese CNN, unsupervised, two classes, on C0 (resp. LGE) alone;
  its bright class against the blood pool (LV ∪ RV) of that sequence's manual labels, on its grid.
- ``acwe-c0-roi``, ``acwe-lge-roi``: the same with the fold's atlas bounding the region (within 10 mm
  of its placed foreground; two unnamed phases, no prior term).
- ``acwe-semi``: LGE + C0, four classes with the fold's group-wise atlas (the experiment's, built from
  the training folds' LGE labels) and the labels of the first ``--labelled`` training patients,
  ``--semi-variances fitted`` (chosen on fold 0); Dice Myo / LV / RV on the LGE grid.
- ``vae-acdc``, ``vae-folds``: the segmentation network on the anatomical prior (LGE + C0), its prior
  trained on ACDC labels only (``--acdc``, once: no MS-CMRSeg label is used anywhere in training), or
  on the training folds' LGE labels; each also with ``--refine`` EM iterations (``-refine`` rows) and
  with the joint solver moving the decoded prior (``-register`` rows: ``bayes-refine``'s registration,
  :func:`mvmm.experiments.mscmr.network_refinement`), and ``--samples`` latent samples whose entropy is
  scored as a detector of the wrong voxels (area under the ROC curve, within 10 mm of the manual or
  predicted heart) for the network's map and for the registered one (its samples moved with it). Every row is cleaned up as ``mvmm segment --model`` does for cardiac labels
  (its preset: ``cardiac``, and the 5 mm region for the registration). With ``--atlas-set DIR``
  (``--atlas-set-labels`` naming its values), ``-set`` rows too: the network's answer guides the set's label
  maps and the model is fitted on their average (``mvmm segment --model M --atlas-set DIR --atlas-set-guide
  fit``, 0.22.0); with ``--set-guides both`` (the default) also ``-register-set`` rows, where the registered fit's
  posterior guides them (``... --register-atlas affine``, 0.20.0; the experiment's ``vae-seg-refine``); with
  ACDC's folder and ``vae-acdc`` still no MS-CMRSeg label is used. Subjects named as a test patient
  (``patientN``) are left out of the set. Every vae row also scores its posterior's entropy (the
  ``entropy.nii.gz`` that ``segment`` writes) the same way; ``--variants`` runs only the rows named.

Every figure is the mean over the patients; seconds per case are files to labels. Labels of test
patients are read for scoring only.

    python benchmarks/amortized_mscmr.py --data ../shared/data/mscmr --out runs/amortized \
        --methods acwe-c0 acwe-lge acwe-semi [--epochs 100] [--atlases runs/cv5b/atlases] [--json out.json]
    python benchmarks/amortized_mscmr.py --data ../shared/data/mscmr --out runs/amortized \
        --methods vae-acdc vae-folds --acdc ../shared/data/acdc [--em-all runs/cv5b]
    python benchmarks/amortized_mscmr.py --data ../shared/data/mscmr --out runs/amortized --methods vae-acdc \
        --acdc ../shared/data/acdc --atlas-set ../shared/data/acdc --atlas-set-labels RV=1,Myo=2,LV=3
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

STRUCTURES = {"Myo": 200, "LV": 500, "RV": 600}
ATLAS_METHODS = ("acwe-semi", "acwe-c0-roi", "acwe-lge-roi")
BLOOD_POOL = (500, 600)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return float(2 * (a & b).sum() / total) if total else 1.0


def fold_atlas(train, files, out: Path, device):
    """The experiment's group-wise atlas of the training patients' LGE labels (LGE and C0 templates),
    from its cache in ``out/atlases`` (copy an experiment's atlases there to reuse them)."""
    from mvmm.experiments.mscmr import _atlas_for

    pool = {p: files[p].labels["LGE"] for p in train}
    images = {s: {p: files[p].images[s] for p in train} for s in ("LGE", "C0")}
    atlas, _ = _atlas_for(pool, images, out, device, False, "affine")
    return atlas


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (Mann–Whitney, ties averaged)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def near_heart(truth: np.ndarray, labels: np.ndarray, spacing_zyx, margin_mm: float = 10.0) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    foreground = (truth != 0) | (labels != 0)
    return distance_transform_edt(~foreground, sampling=spacing_zyx) <= margin_mm


def uncertainty_figure(path: Path, image: np.ndarray, truth: np.ndarray, labels: np.ndarray, entropy: np.ndarray,
                       title: str) -> None:
    from matplotlib.figure import Figure

    z = int(np.argmax((truth != 0).sum(axis=(1, 2))))
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 4)
    for ax, (name, array, cmap) in zip(axes, [("LGE", image, "gray"), ("manual", truth, "viridis"),
                                              ("vae-seg", labels, "viridis"), ("entropy (nats)", entropy, "magma")]):
        shown = ax.imshow(array[z], cmap=cmap, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
        if name.startswith("entropy"):
            fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)


def vae_models(method, fold, train, files, args, prior_acdc):
    """The fold's vae-seg model (trained if missing) and the prior it sits on."""
    from mvmm.core.settings import PriorVaeSettings, TrainingSettings, VaeSegSettings
    from mvmm.nets.data import SubjectRow
    from mvmm.nets.model_dir import WEIGHTS
    from mvmm.training import train_prior, train_vae_seg

    report = {}
    if method == "vae-acdc":
        prior = prior_acdc
    else:
        prior = args.out / method / f"prior{fold}"
        if not (prior / WEIGHTS).exists():
            r = train_prior([files[p].labels["LGE"] for p in train], "Myo=200,LV=500,RV=600", prior, PriorVaeSettings(),
                            TrainingSettings(epochs=args.prior_epochs, batch_size=4), args.device,
                            resume=(prior / "checkpoint.pt").exists(), force=True, progress=False)
            report["prior_seconds"] = r["seconds"]
    folder = args.out / method / f"fold{fold}"
    if not (folder / WEIGHTS).exists():
        rows = [SubjectRow(f"patient{p}", {s: files[p].images[s] for s in ("LGE", "C0")}) for p in train]
        r = train_vae_seg(rows, ["LGE", "C0"], prior, folder, VaeSegSettings(subtypes=["LGE:Myo=2"]),
                          TrainingSettings(epochs=args.epochs), args.device, resume=(folder / "checkpoint.pt").exists(),
                          force=True, progress=False)
        report.update({"seconds": r["seconds"], "final_loss": r["final_loss"]})
    return folder, report


def acdc_prior(args):
    from mvmm.core.settings import PriorVaeSettings, TrainingSettings
    from mvmm.nets.model_dir import WEIGHTS
    from mvmm.training import train_prior

    prior = args.out / "prior-acdc"
    report = {}
    if not (prior / WEIGHTS).exists():
        maps = sorted(args.acdc.glob("*_gt.nii.gz"))
        # MS-CMRSeg's values first: the maps the model yields hold them (only ACDC's 1/2/3 occur in training)
        r = train_prior(maps, "Myo=200,LV=500,RV=600,RV=1,Myo=2,LV=3", prior, PriorVaeSettings(),
                        TrainingSettings(epochs=args.prior_epochs, batch_size=4), args.device,
                        resume=(prior / "checkpoint.pt").exists(), force=True, progress=False)
        report = {"seconds": r["seconds"], "maps": len(maps), "final_loss": r["final_loss"]}
        print("ACDC prior trained in", round(r["seconds"]), "s on", len(maps), "maps", flush=True)
    return prior, report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--patients", default="1-25")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", default=None, help="e.g. 0: run these folds only (development)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=["acwe-c0", "acwe-lge", "acwe-semi"])
    parser.add_argument("--labelled", type=int, default=5)
    parser.add_argument("--length-weight", type=float, default=None)
    parser.add_argument("--variances", choices=["equal", "fitted"], default=None)
    parser.add_argument("--semi-variances", choices=["equal", "fitted"], default="fitted",
                        help="acwe-semi's (fitted: chosen on fold 0)")
    parser.add_argument("--atlases", type=Path, help="an experiment's atlases folder to reuse")
    parser.add_argument("--acdc", type=Path, help="ACDC folder (*_gt.nii.gz) for vae-acdc's prior")
    parser.add_argument("--prior-epochs", type=int, default=100)
    parser.add_argument("--refine", type=int, default=20, help="EM iterations of the -refine rows")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--em-all", type=Path, help="an experiment folder (same folds) whose em-all Dice to show beside")
    parser.add_argument("--atlas-set", type=Path,
                        help="labelled images (folder or CSV) for the -set (and -register-set) rows")
    parser.add_argument("--atlas-set-labels", help="their label values named by tissue, e.g. RV=1,Myo=2,LV=3")
    parser.add_argument("--set-guides", choices=["network", "both"], default="both",
                        help="-set rows (the network's answer guides the set) only, or -register-set rows too")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="only these rows of the vae methods, e.g. vae-acdc-register-set (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.variants is not None:  # a misspelt row would otherwise run nothing for that method, silently
        suffixes = ["", "-refine", "-register"] + (["-set", "-register-set"] if args.atlas_set else [])
        rows_known = [m + s for m in args.methods if m.startswith("vae-") for s in suffixes]
        unknown = sorted(set(args.variants) - set(rows_known))
        if unknown:
            parser.error(f"--variants: no such row {', '.join(unknown)} (rows of these --methods and --atlas-set: "
                         f"{', '.join(rows_known)})")
    from mvmm.core.settings import AcweNetSettings, ExperimentSettings, TrainingSettings
    from mvmm.data.image import Image
    from mvmm.experiments.mscmr import network_refinement
    from mvmm.segment import atlas_set_entries, model_preset_values
    from mvmm.data.manifest import Manifest, parse_patients, scan
    from mvmm.nets.data import SubjectRow
    from mvmm.nets.model_dir import WEIGHTS, load_model
    from mvmm.amortized import segment_with_model
    from mvmm.training import train_acwe

    warnings.simplefilter("ignore")
    manifest = Manifest.load("mscmr19")
    patients = parse_patients(args.patients)
    files = scan(manifest, args.data, patients, ["LGE", "C0"], ["LGE", "C0"]).patients
    fold_of = {p: i % args.folds for i, p in enumerate(sorted(patients))}
    folds = range(args.folds) if args.only_folds is None else [int(f) for f in args.only_folds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.atlases and not (args.out / "atlases").exists():
        shutil.copytree(args.atlases, args.out / "atlases")
    network = AcweNetSettings(**{k: v for k, v in (("length_weight", args.length_weight),
                                                   ("variances", args.variances)) if v is not None})
    rows, training = [], {}
    prior_acdc = None
    if "vae-acdc" in args.methods:
        prior_acdc, training["prior-acdc"] = acdc_prior(args)
    (args.out / "figures").mkdir(exist_ok=True)
    for fold in folds:
        train = [p for p in sorted(patients) if fold_of[p] != fold]
        test = [p for p in sorted(patients) if fold_of[p] == fold]
        for method in [m for m in args.methods if m.startswith("vae-")]:
            folder, report = vae_models(method, fold, train, files, args, prior_acdc)
            if report:
                training[f"{method}/fold{fold}"] = report
                print(method, "fold", fold, "trained", {k: round(v) for k, v in report.items() if "seconds" in k},
                      flush=True)
            model = load_model(folder, args.device)
            preset = model_preset_values("auto", model.config.labels)  # what `segment --model` applies
            variants = {"": {"samples": args.samples}, "-refine": {"refine": args.refine},
                        "-register": {"registration": network_refinement(ExperimentSettings()),
                                      "roi_margin_mm": preset["roi_margin_mm"], "samples": args.samples}}
            if args.atlas_set:
                tested = {f"patient{p}" for p in test}
                entries = [e for e in atlas_set_entries(args.atlas_set, "LGE", args.atlas_set_labels, labels_only=True)
                           if e.subject not in tested]
                # the set's label maps on the network's answer (0.22.0) and on the registered fit (0.20.0, the
                # experiment's vae-seg-refine; --set-guides both)
                variants["-set"] = {"samples": 0, "atlas_set": entries}
                if args.set_guides == "both":
                    variants["-register-set"] = {**variants["-register"], "samples": 0, "atlas_set": entries}
            if args.variants is not None:
                variants = {k: v for k, v in variants.items() if (method + k) in args.variants}
            for p in test:
                truth = Image.read(files[p].labels["LGE"], "truth").data[0].numpy().round().astype(np.int64)
                spacing = tuple(reversed(Image.read(files[p].images["LGE"], "LGE").grid.spacing))
                for suffix, how in variants.items():
                    start = time.perf_counter()
                    images = [Image.read(files[p].images[s], s) for s in ("LGE", "C0")]
                    result = segment_with_model(images, model, postprocess=preset["postprocess"], device=args.device,
                                                **how)
                    labels = result.label_map()
                    seconds = time.perf_counter() - start
                    name = method + suffix
                    row = {"method": name, "patient": p, "fold": fold, "seconds": seconds,
                           "dice": {n: dice(labels == v, truth == v) for n, v in STRUCTURES.items()}}
                    # the errors of the map the entropy is of: the method's, before the clean-up; the posterior's
                    # entropy is what `segment` writes (entropy.nii.gz) for every row, the samples' with --samples
                    raw = replace(result, postprocess="none").label_map()
                    near = near_heart(truth, raw, spacing)
                    wrong = raw != truth
                    row["auroc_posterior_entropy"] = auroc(result.entropy().cpu().numpy()[near], wrong[near])
                    if how.get("samples"):
                        entropy = result.extra_maps["uncertainty_entropy"].cpu().numpy()
                        row["auroc_sample_entropy"] = auroc(entropy[near], wrong[near])
                        if p == test[0]:
                            uncertainty_figure(args.out / "figures" / f"{name}_patient{p}.png", images[0].data[0].numpy(),
                                               truth, raw, entropy, f"{name}, patient {p} (fold {fold})")
                    rows.append(row)
                    print(name, p, {k: round(v, 3) for k, v in row["dice"].items()},
                          {k: round(v, 3) for k, v in row.items() if k.startswith("auroc")}, f"{seconds:.2f} s", flush=True)
        for method in [m for m in args.methods if m.startswith("acwe-")]:
            sequences = {"acwe-c0": ["C0"], "acwe-lge": ["LGE"], "acwe-c0-roi": ["C0"], "acwe-lge-roi": ["LGE"],
                         "acwe-semi": ["LGE", "C0"]}[method]
            folder = args.out / method / f"fold{fold}"
            if not (folder / WEIGHTS).exists():
                labelled = train[:args.labelled] if method == "acwe-semi" else []
                train_rows = [SubjectRow(f"patient{p}", {s: files[p].images[s] for s in sequences},
                                         files[p].labels["LGE"] if p in labelled else None) for p in train]
                atlas = fold_atlas(train, files, args.out, args.device) if method in ATLAS_METHODS else None
                own = replace(network, classes=2) if method.endswith("-roi") else network
                own = replace(own, variances=args.semi_variances) if method == "acwe-semi" else own
                report = train_acwe(train_rows, sequences, folder, own, TrainingSettings(epochs=args.epochs),
                                    atlas=atlas, labelled=[f"patient{p}" for p in labelled],
                                    device=args.device, resume=(folder / "checkpoint.pt").exists(), force=True,
                                    progress=False)
                training[f"{method}/fold{fold}"] = {"seconds": report["seconds"], "epochs": report["epochs"],
                                                    "final_loss": report["final_loss"], "labelled": labelled}
                print(method, "fold", fold, f"trained in {report['seconds']:.0f} s", flush=True)
            model = load_model(folder, args.device)
            for p in test:
                start = time.perf_counter()
                images = [Image.read(files[p].images[s], s) for s in sequences]
                result = segment_with_model(images, model, device=args.device)
                labels = result.label_map()
                seconds = time.perf_counter() - start
                truth = Image.read(files[p].labels[sequences[0]], "truth").data[0].numpy().round().astype(np.int64)
                row = {"method": method, "patient": p, "fold": fold, "seconds": seconds}
                if method == "acwe-semi":
                    row["dice"] = {n: dice(labels == v, truth == v) for n, v in STRUCTURES.items()}
                else:
                    row["dice"] = {"blood pool": dice(labels == 1, np.isin(truth, BLOOD_POOL))}
                rows.append(row)
                print(method, p, {k: round(v, 3) for k, v in row["dice"].items()}, f"{seconds:.2f} s", flush=True)
    summary = {}
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        keys = mine[0]["dice"].keys()
        summary[method] = {"dice": {k: float(np.mean([r["dice"][k] for r in mine])) for k in keys},
                           "seconds_median": float(np.median([r["seconds"] for r in mine])), "patients": len(mine)}
        for key in ("auroc_sample_entropy", "auroc_posterior_entropy"):
            if key in mine[0]:
                summary[method][key] = float(np.nanmean([r[key] for r in mine]))
        if args.em_all and method.startswith(("acwe-semi", "vae-")):
            em = [json.loads((args.em_all / "patients" / f"patient{r['patient']}.json").read_text())["metrics"]["em-all"]
                  for r in mine]
            summary[method]["em_all_same_patients"] = {k: float(np.mean([e[k]["dice"] for e in em])) for k in STRUCTURES}
    report = {"benchmark": "amortized_mscmr", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads, device {args.device}",
              "torch": torch.__version__, "folds": args.folds, "only_folds": args.only_folds, "epochs": args.epochs,
              "network": network.__dict__, "summary": summary, "training": training, "patients": rows}
    for method, values in summary.items():
        print(f"{method:<15}", {k: round(v, 3) for k, v in values["dice"].items()},
              f"{values['seconds_median']:.2f} s / case", values.get("em_all_same_patients", ""),
              {k: round(v, 3) for k, v in values.items() if k.startswith("auroc")})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
