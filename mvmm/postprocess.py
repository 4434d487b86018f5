"""Anatomical clean-up of cardiac label maps, applied after the argmax of the posterior.

A tissue-intensity model labels what looks like muscle as myocardium, so papillary muscles and
trabeculae inside the left-ventricular cavity come out as ``Myo``. MS-CMRSeg's manual labels count
them as blood pool (one of the two conventions SCMR's post-processing guidelines allow for volumetry).
``cardiac`` post-processing applies that convention and removes islands:

1. each foreground structure keeps its largest 3D connected component (face connectivity); the
   other components become background;
2. slice by slice, the blood pool (``LV``) is closed: voxels it encloses become blood pool, and so do
   wall (``Myo``) voxels inside its convex hull — never background or another structure, and never
   wall voxels the caller keeps (``keep``: where the model finds scar or oedema,
   :func:`mvmm.pathology.pathological_wall` — enhanced wall at the endocardium is myocardium, not a
   papillary muscle).

Slices are taken across the stack axis (``slice_axis``; ``mvmm segment`` passes the grid's stack
axis, :func:`mvmm.data.anatomy.stack_axis`, so the result does not depend on the storage order); a 2D
map is one slice. The step assumes short-axis slices and is opt-in in ``mvmm segment``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from mvmm.data.labels import LabelSet
from mvmm.core.errors import require_choice
from mvmm.core.settings import POSTPROCESSING



def keep_largest_components(labels: np.ndarray, values, background: int = 0) -> np.ndarray:
    """Each structure in ``values`` keeps its largest connected component; the rest become ``background``.

    Parameters
    ----------
    labels : ndarray of int, shape [*S]
    values : iterable of int
        Label values to clean (usually every foreground value).
    background : int

    Returns
    -------
    ndarray, shape [*S] (a copy)
    """
    out = labels.copy()
    for value in values:
        mask = labels == value
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[mask & (components != 1 + int(np.argmax(sizes)))] = background
    return out


def _inside_hull(points: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Which ``candidates`` ``[M, 2]`` lie in the convex hull of ``points`` ``[N, 2]`` (all False if it is flat)."""
    try:
        hull = ConvexHull(points)
    except QhullError:  # fewer than three points, or all on one line: no interior
        return np.zeros(len(candidates), dtype=bool)
    # hull.equations: rows (a, b, c) with a·x + b·y + c <= 0 inside
    return np.all(candidates @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9, axis=1)


def close_blood_pool(labels: np.ndarray, pool: int, wall: int, slice_axis: int = 0,
                     keep: Optional[np.ndarray] = None) -> np.ndarray:
    """Per slice, voxels enclosed by ``pool`` and ``wall`` voxels inside its convex hull become ``pool``.

    Parameters
    ----------
    labels : ndarray of int, shape [Z, Y, X] or [Y, X]
    pool, wall : int
        Label values of the blood pool (e.g. LV, 500) and of the wall around it (e.g. Myo, 200).
    slice_axis : int
        The array axis across which a 3D map is cut into slices.
    keep : ndarray of bool, shape of ``labels``, optional
        Wall voxels that stay wall inside the hull (pathological wall).

    Returns
    -------
    ndarray, same shape (a copy)
    """
    out = labels.copy()
    slices = np.moveaxis(out, slice_axis, 0) if out.ndim == 3 else out[None]
    kept = np.zeros(out.shape, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    kept = np.moveaxis(kept, slice_axis, 0) if out.ndim == 3 else kept[None]
    for plane, plane_kept in zip(slices, kept):  # views into ``out``
        cavity = plane == pool
        if not cavity.any():
            continue
        plane[ndimage.binary_fill_holes(cavity) & ~cavity] = pool
        candidates = np.argwhere((plane == wall) & ~plane_kept)
        if len(candidates):
            inside = _inside_hull(np.argwhere(plane == pool).astype(float), candidates.astype(float))
            plane[tuple(candidates[inside].T)] = pool
    return out


def check_postprocess(method: str, label_set: LabelSet) -> None:
    """Raise InputError unless ``method`` is one of :data:`POSTPROCESSING` and ``label_set`` has what it needs."""
    require_choice(method, POSTPROCESSING, "postprocess")
    if method == "cardiac":
        for name in ("LV", "Myo"):
            label_set.index(name, "postprocess")


def postprocess_labels(labels: np.ndarray, label_set: LabelSet, method: str, slice_axis: int = 0,
                       keep_wall: Optional[np.ndarray] = None) -> np.ndarray:
    """Apply post-processing ``method`` (one of :data:`POSTPROCESSING`) to a label map ``[*S]``.

    ``"cardiac"`` needs tissues named ``LV`` and ``Myo`` in ``label_set``; ``slice_axis`` is the array
    axis across the short-axis slices; ``keep_wall`` (bool ``[*S]``): ``Myo`` voxels the blood pool's
    closing leaves as they are (:func:`close_blood_pool`'s ``keep``).
    """
    check_postprocess(method, label_set)
    if method == "none":
        return labels
    value = dict(zip(label_set.names, label_set.values))
    background = label_set.values[label_set.background_index]
    cleaned = keep_largest_components(labels, [v for _, v in label_set.foreground], background)
    return close_blood_pool(cleaned, value["LV"], value["Myo"], slice_axis, keep_wall)
