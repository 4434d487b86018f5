"""Evaluation of label-map files: checks that they can be compared, then per-structure metrics."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from mvmm.data import io
from mvmm.data.labels import CARDIAC_LABELS, PATHOLOGY_LABELS, LabelSet
from mvmm.core.errors import InputError
from mvmm.metrics import evaluate_labels, pathology_metrics


def _read_label_map(path, argname: str):
    array, grid, _ = io.read_array(path, argname)
    if array.ndim != grid.ndim:
        raise InputError(f"{argname}: {path} is not a scalar label map (array shape {array.shape})")
    if not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0):
        raise InputError(f"{argname}: {path} has non-integer values; expected a label map")
    return array.astype(np.int64), grid


def evaluate_label_files(pred_path, truth_path, labels: Optional[LabelSet] = None) -> Dict[str, Dict[str, float]]:
    """Dice, HD, HD95 and MSD (mm) per foreground structure of ``labels``; for MyoPS label maps, also
    the pathology's.

    Parameters
    ----------
    pred_path, truth_path : path
        Label maps on one grid (same size, spacing, origin and direction).
    labels : LabelSet, optional
        Default: the values found in either map (cardiac names for 0/200/500/600). Values found in
        the maps but absent from ``labels`` are an error, except MyoPS's pathology values
        (:data:`mvmm.data.labels.PATHOLOGY_LABELS`: 2221 scar, 1220 oedema): where either map has
        them, the result also holds ``"scar"`` and ``"scar+oedema"`` (:func:`mvmm.metrics.pathology_metrics`),
        and pathology counts as myocardium (Myo, 200) for the structures.
    """
    pred, pred_grid = _read_label_map(pred_path, "pred_path")
    truth, truth_grid = _read_label_map(truth_path, "truth_path")
    pathology = {}
    pathology_values = list(PATHOLOGY_LABELS.values())
    if np.isin(pred, pathology_values).any() or np.isin(truth, pathology_values).any():
        if not pred_grid.same_geometry(truth_grid):
            raise InputError(f"truth_path: {truth_path} is not on the grid of `pred_path` {pred_path}; resample first")
        pathology = pathology_metrics(pred, truth, tuple(reversed(truth_grid.spacing)), PATHOLOGY_LABELS)
        myocardium = (labels.values[labels.names.index("Myo")] if labels is not None and "Myo" in labels.names
                      else CARDIAC_LABELS.values[CARDIAC_LABELS.names.index("Myo")])
        pred, truth = (np.where(np.isin(a, pathology_values), myocardium, a) for a in (pred, truth))
        if not (set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())) - {0, myocardium}:
            return pathology  # pathology maps alone (as MyoPS's *_pathology files): no structure to compare
    if not pred_grid.same_geometry(truth_grid):
        raise InputError(f"truth_path: {truth_path} is not on the grid of `pred_path` {pred_path} "
                         f"(size {pred_grid.size} vs {truth_grid.size}, spacing {pred_grid.spacing} vs "
                         f"{truth_grid.spacing}, origin {pred_grid.origin} vs {truth_grid.origin}); resample first")
    found = set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())
    if labels is None:
        labels = LabelSet.from_values(found | {0})
    unknown = found - set(labels.values)
    if unknown:
        raise InputError(f"labels: the label maps contain values {sorted(unknown)} that are not in "
                         f"{labels.as_dict()}")
    return {**evaluate_labels(pred, truth, tuple(reversed(truth_grid.spacing)), labels), **pathology}


def metrics_table(results: Mapping[str, Dict[str, float]], columns=("dice", "hd95", "msd", "hd")) -> str:
    """A plain-text table: one row per structure, metrics as columns (distances in mm)."""
    header = f"{'structure':<10}" + "".join(f"{c + (' mm' if c != 'dice' else ''):>11}" for c in columns)
    rows = [header, "-" * len(header)]
    for name, m in results.items():
        rows.append(f"{name:<10}" + "".join(f"{m[c]:>11.3f}" for c in columns))
    return "\n".join(rows)
