"""Tables and figures of an experiment folder: results.csv, summary.json, summary.md, Dice box plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from mvmm.data.labels import LabelSet
from mvmm.core.outputs import atomic_path, write_json
from mvmm.metrics import agreement
from mvmm.report import agreement_figure, box_plot, paired_figure

COLUMNS = ("patient", "method", "structure", "dice", "hd95_mm", "msd_mm", "seconds")


def _mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def write_summary(out: Path, patients: Sequence[int], methods: Sequence[str], labels: LabelSet,
                  extra: Optional[dict] = None) -> dict:
    """Collect ``out/patients/patientN.json`` of ``patients`` into the tables and figures; returns the
    summary (with ``extra`` entries, e.g. the networks' training, added)."""
    records = [json.loads((out / "patients" / f"patient{p}.json").read_text()) for p in patients]
    structures = [name for name, _ in labels.foreground]
    rows: List[dict] = []
    for r in records:
        for m in methods:
            for s in structures:
                metric = r["metrics"][m][s]
                rows.append({"patient": r["patient"], "method": m, "structure": s, "dice": metric["dice"],
                             "hd95_mm": metric["hd95"], "msd_mm": metric["msd"], "seconds": r["seconds"][m]})
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    index = out / "experiment.json"
    summary = {"patients": list(patients), "methods": {}, "seconds_per_patient": {},
               "atlas_build_seconds_mean": _mean([r["atlas_build_seconds"] for r in records]),
               "settings": json.loads(index.read_text()).get("settings") if index.exists() else None}
    for m in methods:
        summary["methods"][m] = {}
        for s in structures:
            dice = [row["dice"] for row in rows if row["method"] == m and row["structure"] == s]
            finite = [d for d in dice if math.isfinite(d)]
            summary["methods"][m][s] = {
                "dice_mean": _mean(dice), "dice_sd": float(np.std(finite)) if finite else math.nan,
                "dice_median": float(np.median(finite)) if finite else math.nan,
                "hd95_mean": _mean([row["hd95_mm"] for row in rows if row["method"] == m and row["structure"] == s]),
                "msd_mean": _mean([row["msd_mm"] for row in rows if row["method"] == m and row["structure"] == s])}
        seconds = [r["seconds"][m] for r in records]
        summary["seconds_per_patient"][m] = _mean(seconds)
        summary.setdefault("seconds_per_patient_median", {})[m] = float(np.median(seconds)) if seconds else math.nan
        summary.setdefault("seconds_per_patient_max", {})[m] = float(np.max(seconds)) if seconds else math.nan
    # the fits that warned they had lost the anatomy (mvmm.segment.check_posterior_shift), by method
    summary["low_posterior_shift"] = {m: [r["patient"] for r in records if r.get("quality", {}).get(m, {}).get("low")]
                                      for m in methods if any(m in r.get("quality", {}) for r in records)}
    split = median_time_split([r.get("em_all_timings_s") for r in records])
    if split:
        summary["em_all_time_split_median_s"] = split
    if "atlas" in methods and "em-all" in methods:
        # what the mixture adds to its own prior, patient by patient
        by = {m: {s: [r["metrics"][m][s]["dice"] for r in records] for s in structures} for m in ("atlas", "em-all")}
        summary["em_all_vs_atlas"] = {
            s: {"gained": int(np.sum(np.asarray(by["em-all"][s]) > np.asarray(by["atlas"][s]))),
                "lost": int(np.sum(np.asarray(by["em-all"][s]) < np.asarray(by["atlas"][s]))),
                "mean_gain": _mean(np.asarray(by["em-all"][s]) - np.asarray(by["atlas"][s]))} for s in structures}
        paired_figure(out / "figures" / "em_vs_prior.png", by["atlas"], by["em-all"], [r["patient"] for r in records],
                      "Dice of the prior alone (atlas)", "Dice of em-all",
                      title="What the mixture adds to its prior, per patient")
    native = {}  # em-all's labels on each other sequence's own grid, against its manual labels
    for r in records:
        for sequence, metrics in r.get("native_metrics", {}).items():
            for s in structures:
                native.setdefault(sequence, {}).setdefault(s, []).append(metrics[s]["dice"])
    if native:
        summary["em_all_native"] = {q: {s: {"dice_mean": _mean(d), "patients": len(d)} for s, d in by.items()}
                                    for q, by in native.items()}
    with_pathology = [r for r in records if r.get("pathology")]
    if with_pathology:
        summary["pathology"] = _pathology_summary(with_pathology)
        agreement_figure(out / "figures" / "pathology_volumes.png",
                         {region: (v["volume_pred_ml"], v["volume_truth_ml"]) for region, v in summary["pathology"].items()},
                         title="em-all's pathology volumes on the T2 grid against the MyoPS labels")
    summary.update(extra or {})
    write_json(out / "summary.json", summary)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(_markdown(summary, structures, methods))
    box_plot(out / "figures" / "dice_boxplot.png",
             {m: {s: [row["dice"] for row in rows if row["method"] == m and row["structure"] == s]
                  for s in structures} for m in methods},
             title=f"LGE Dice over {len(records)} patients")
    return summary


def _pathology_summary(records: List[dict]) -> dict:
    """Per region (scar, scar+oedema): Dice over the patients whose manual labels have it, the volumes,
    their correlation and Bland–Altman bias and limits."""
    out = {}
    for region in ("scar", "scar+oedema"):
        metrics = [r["pathology"][region] for r in records]
        pred = [m["volume_pred_ml"] for m in metrics]
        truth = [m["volume_truth_ml"] for m in metrics]
        dice = [m["dice"] for m in metrics if m["volume_truth_ml"] > 0]
        volumes = agreement(pred, truth)
        out[region] = {"dice_mean": _mean(dice), "dice_median": float(np.median(dice)) if dice else math.nan,
                       "patients_with_manual": len(dice), "patients": [r["patient"] for r in records],
                       "volume_pred_ml": pred, "volume_truth_ml": truth, "volume_r": volumes["r"],
                       "bias_ml": volumes["bias"], "limits_ml": [volumes["low"], volumes["high"]]}
    return out


def median_time_split(timings: Sequence[Optional[dict]]) -> Dict[str, float]:
    """Median seconds of each step over the cases that recorded them (``timings_s`` of a Segmentation;
    a split such as ``registration_split_s`` flattened into ``registration: NAME``); steps some case
    lacks are left out."""
    values: Dict[str, List[float]] = {}
    for t in timings:
        for key, value in (t or {}).items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                name = key if sub is None else f"{key.removesuffix('_split_s')}: {sub}"
                values.setdefault(name, []).append(float(v))
    return {k: float(np.median(v)) for k, v in values.items() if len(v) == len(timings)}


def _markdown(summary: dict, structures: Sequence[str], methods: Sequence[str]) -> str:
    head = "| method | " + " | ".join(f"{s} Dice (sd)" for s in structures) + " | " \
        + " | ".join(f"{s} HD95 mm" for s in structures) + " | s / patient: mean (median, max) |"
    lines = [f"MS-CMRSeg, LGE, {len(summary['patients'])} patients: mean Dice (sd) and mean HD95 against the "
             "manual labels.", "", head, "|" + "---|" * (2 * len(structures) + 2)]
    for m in methods:
        stats = summary["methods"][m]
        lines.append(f"| {m} | " + " | ".join(f"{stats[s]['dice_mean']:.3f} ({stats[s]['dice_sd']:.3f})"
                                              for s in structures)
                     + " | " + " | ".join(f"{stats[s]['hd95_mean']:.1f}" for s in structures)
                     + f" | {summary['seconds_per_patient'][m]:.1f} ({summary['seconds_per_patient_median'][m]:.1f}, "
                       f"{summary['seconds_per_patient_max'][m]:.1f}) |")
    if "em_all_vs_atlas" in summary:
        lines += ["", "em-all against its own prior alone (atlas), per patient: " + "; ".join(
            f"{s} higher in {v['gained']}, lower in {v['lost']}, mean {v['mean_gain']:+.3f}"
            for s, v in summary["em_all_vs_atlas"].items()) + " (figures/em_vs_prior.png)."]
    for sequence, stats in summary.get("em_all_native", {}).items():
        lines += ["", f"em-all on the {sequence} grid against the {sequence} manual labels "
                  f"({stats[structures[0]]['patients']} patients): mean Dice "
                  + " / ".join(f"{s} {stats[s]['dice_mean']:.3f}" for s in structures) + "."]
    for region, v in summary.get("pathology", {}).items():
        lines += ["", f"em-all {region} on the T2 grid against the MyoPS labels: mean Dice {v['dice_mean']:.3f} "
                  f"(median {v['dice_median']:.3f}) over the {v['patients_with_manual']} patients whose labels have "
                  f"it; volumes r = {v['volume_r']:.2f}, bias {v['bias_ml']:+.2f} ml, limits of agreement "
                  f"{v['limits_ml'][0]:+.2f} / {v['limits_ml'][1]:+.2f} ml (figures/pathology_volumes.png)."]
    if summary.get("low_posterior_shift"):
        lines += ["", "Fits that warned the images moved their posterior little from the atlas (most likely the wrong "
                  "anatomy): " + "; ".join(f"{m} {', '.join(map(str, p)) or 'none'}"
                                           for m, p in summary["low_posterior_shift"].items()) + "."]
    if summary.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"patient {n}: {why}" for n, why in summary["skipped"].items()) + "."]
    if summary.get("em_all_time_split_median_s"):
        lines += ["", "em-all's time by step, median over the patients (s): " + "; ".join(
            f"{k.removesuffix('_s')} {v:.2f}" for k, v in summary["em_all_time_split_median_s"].items()) + "."]
    lines += ["", f"Atlas building (group-wise, per atlas): {summary['atlas_build_seconds_mean']:.0f} s on average; "
              "not counted in s / patient."]
    if summary["settings"]:
        lines += ["", "Settings (experiment.json): " + "; ".join(
            f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in summary["settings"].items()) + "."]
    lines.append("")
    return "\n".join(lines)
