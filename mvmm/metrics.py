"""Overlap and surface-distance metrics per structure, in mm (spacing honoured)."""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

from mvmm.data.labels import LabelSet


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a mask: in the mask, with a face neighbour outside it (or off the grid)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``, and back.

    Parameters
    ----------
    a, b : np.ndarray of bool, shape [*S]
        Non-empty masks on one grid.
    spacing : sequence of float
        Voxel size in tensor order ``(D, H, W)`` / ``(H, W)``.
    """
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return to_b[sa], to_a[sb]


def structure_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """Dice, Hausdorff (HD), 95th-percentile HD and mean surface distance (MSD) of two masks.

    HD95 and MSD pool the distances of both directions (as MedPy's ``hd95`` and ``assd`` do).
    An empty mask gives Dice 0 (both empty: NaN) and NaN distances.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    dice = 2.0 * int((pred & truth).sum()) / total if total else math.nan
    if not pred.any() or not truth.any():
        return {"dice": dice, "hd": math.nan, "hd95": math.nan, "msd": math.nan}
    d_ab, d_ba = surface_distances(pred, truth, spacing)
    both = np.concatenate([d_ab, d_ba])
    return {"dice": dice, "hd": float(both.max()), "hd95": float(np.percentile(both, 95)), "msd": float(both.mean())}


def evaluate_labels(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                    labels: LabelSet) -> Dict[str, Dict[str, float]]:
    """Metrics for every foreground structure of ``labels``; label maps of shape [*S], spacing in tensor order."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for name, value in labels.foreground:
        p, t = pred == value, truth == value
        out[name] = {**structure_metrics(p, t, spacing),
                     "volume_pred_ml": float(p.sum()) * voxel_ml, "volume_truth_ml": float(t.sum()) * voxel_ml}
    return out


def pathology_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                      values: Dict[str, int]) -> Dict[str, Dict[str, float]]:
    """The MyoPS metrics: scar, and scar ∪ oedema (MyoPS's "oedema" region includes the scar).

    ``pred`` and ``truth`` hold pathology label values (``values``: ``{"scar": 2221, "oedema": 1220}``
    as MyoPS) and possibly other labels, which are ignored; shape [*S], spacing in tensor order.
    Returns ``{"scar": {...}, "scar+oedema": {...}}`` with :func:`structure_metrics` and volumes.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    regions = {"scar": [values["scar"]], "scar+oedema": [values["scar"], values["oedema"]]}
    out = {}
    for name, region in regions.items():
        p, t = np.isin(pred, region), np.isin(truth, region)
        out[name] = {**structure_metrics(p, t, spacing),
                     "volume_pred_ml": float(p.sum()) * voxel_ml, "volume_truth_ml": float(t.sum()) * voxel_ml}
    return out


def agreement(measured: Sequence[float], reference: Sequence[float]) -> Dict[str, float]:
    """Agreement of paired measurements: Pearson's ``r`` (NaN for fewer than three pairs or a constant
    side), the Bland–Altman ``bias`` (mean of measured − reference) and the 95 % limits of agreement
    ``low``, ``high`` (bias ∓ 1.96 sd of the differences; NaN for fewer than two pairs)."""
    m, r = np.asarray(measured, dtype=float), np.asarray(reference, dtype=float)
    diff = m - r
    corr = float(np.corrcoef(m, r)[0, 1]) if len(m) > 2 and m.std() > 0 and r.std() > 0 else math.nan
    bias = float(diff.mean()) if len(diff) else math.nan
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
    return {"r": corr, "bias": bias, "low": bias - 1.96 * sd, "high": bias + 1.96 * sd}
