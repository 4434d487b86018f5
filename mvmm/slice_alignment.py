"""Each slice of a non-reference stack moved in its own plane, to where the rest of the case says it belongs.

A cardiac short-axis stack is acquired one slice per breath-hold, so its slices sit a few mm off one another
and off the reference image's, in-plane; the headers cannot know, and a global map of the stack (rigid,
affine) cannot follow slices that moved each their own way. Given a fitted model and a prior placed on the
reference, the content of slice j of image i (its voxels y) is put at the common points ``T_i⁻¹(y) + t_j``,
with ``t_j`` the in-plane shift (whole voxels of image i, within ``radius_mm``) that maximises

    Σ_{y in slice j, near the heart} log Σ_k q_k(T_i⁻¹(y) + t_j) p(I_i(y) | k),

where q is the model's posterior from the *other* images and the prior at those points (image i left out)
and p(I_i | k) image i's own tissue density under the fitted θ: the likelihood of the slice's intensities
given what the rest of the case says lies where it would be moved. The same mixture likelihood EM fits
(:mod:`mvmm.mixture.functional` through the model), evaluated on a search grid rather than followed by
gradient steps: a slice's likelihood is flat at sub-voxel shifts and has several maxima a few mm apart.
The result composes with image i's transform (:class:`mvmm.spatial.transforms.SliceShiftTransform`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import numpy as np
import torch

from mvmm.data.anatomy import stack_axis
from mvmm.data.subject import Subject
from mvmm.spatial.transforms import SequentialTransform, SliceShiftTransform

# where the prior's foreground is above this, a slice's voxels count in its score (a region that does not move
# with the candidate shifts, so that the scores of one slice compare)
HEART_FOREGROUND = 0.01


def _candidates(radius_voxels: Tuple[int, int], step: int) -> np.ndarray:
    """In-plane voxel steps ``[M, 2]`` on a lattice of ``step`` within the ellipse of the radii, the smallest first
    (so that of equal scores the smallest shift wins, no shift first of all)."""
    rx, ry = radius_voxels
    steps = [(dx, dy) for dx in range(-(rx // step) * step, rx + 1, step) for dy in range(-(ry // step) * step, ry + 1, step)
             if _inside((dx, dy), radius_voxels)]
    return np.asarray(sorted(steps, key=lambda s: (s[0] ** 2 + s[1] ** 2, s)), dtype=np.int64)


def _inside(steps, radius_voxels) -> bool:
    return (steps[0] / max(radius_voxels[0], 1)) ** 2 + (steps[1] / max(radius_voxels[1], 1)) ** 2 <= 1.0 + 1e-9


# the refinement around each slice's best lattice point: no move first (it wins ties), then the 8 neighbours
NEIGHBOURS = np.array([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)], dtype=np.int64)


@torch.no_grad()
def align_slices(subject: Subject, model, name: str, radius_mm: float,
                 device=None) -> Tuple[Optional[SliceShiftTransform], dict]:
    """Per-slice in-plane shifts of image ``name`` of a fitted case (see the module docstring).

    Parameters
    ----------
    subject : Subject
        The case, with its prior (``subject.atlas``) and image transforms as the fit used them.
    model : MultivariateMixture
        Fitted on ``subject``'s images (its θ give the densities and, with the prior, the other images' posterior).
    name : str
        A non-reference 3D image of several slices.
    radius_mm : float
        The largest shift tried, in mm (> 0).
    device : torch.device or str, optional

    Returns
    -------
    (SliceShiftTransform or None, dict)
        The shifts (None when the image has no slice near the heart) and a report: ``shifts_mm`` ``[n, 3]``
        (world, image ``name``'s space), ``shifts_voxels`` ``[n, 2]``, ``gain`` ``[n]`` (the log-likelihood over
        the unshifted slice's, nats).
    """
    if subject.atlas is None:
        raise ValueError("subject: aligning slices needs a prior (subject.atlas)")
    if name == subject.reference:
        raise ValueError(f"name: {name!r} is the reference image; its slices define the common grid")
    if not radius_mm > 0:
        raise ValueError(f"radius_mm: expected > 0, got {radius_mm}")
    full = subject.image(name).grid
    if full.ndim != 3:
        return None, {"skipped": "not a 3D stack"}
    axis = stack_axis(full)
    i = subject.names.index(name)
    old = subject.transforms.get(name)
    back = old.inverse() if old is not None else None  # image world → common space

    def common_points(grid, shift=None):
        points = grid.world_points(device=device, dtype=torch.float32)
        if shift is not None:
            points = points + torch.as_tensor(shift, dtype=points.dtype, device=points.device)
        return back(points) if back is not None else points

    # crop to the region of interest around the heart (a scanner's field of view is mostly elsewhere)
    whole = subject.sample(full, device=device, points=common_points(full))
    covered = whole.coverage[i].cpu().numpy()
    if not covered.any():
        return None, {"skipped": "no voxel near the heart"}
    nz = np.argwhere(covered)  # array order (z, y, x)
    low = [int(nz[:, 2 - d].min()) for d in range(3)]
    high = [int(nz[:, 2 - d].max()) for d in range(3)]
    grid = full.subgrid(low, high)
    plane = [d for d in range(3) if d != axis]
    radius_voxels = tuple(int(np.floor(radius_mm / full.spacing[d])) for d in plane)
    direction = np.asarray(full.direction_matrix)

    def world(steps: np.ndarray) -> np.ndarray:  # voxel steps [..., 2] → image-world mm [..., 3]
        return steps[..., 0, None] * direction[:, plane[0]] * full.spacing[plane[0]] \
            + steps[..., 1, None] * direction[:, plane[1]] * full.spacing[plane[1]]

    start = subject.sample(grid, device=device, points=common_points(grid))
    region = start.coverage[i] & ((1 - start.prior[subject.atlas.labels.background_index]) > HEART_FOREGROUND)
    slice_dim = grid.ndim - 1 - axis  # array dimension of the stack axis
    other = [d for d in range(grid.ndim) if d != slice_dim]
    view = [1] * grid.ndim + [3]
    view[slice_dim] = -1

    def score(steps: np.ndarray) -> torch.Tensor:
        """The log-likelihood of each slice ``[n]`` with slice j moved by ``steps[j]`` voxels ``[n, 2]``."""
        shift = torch.as_tensor(world(steps), dtype=torch.float32).reshape(view)
        moved = subject.sample(grid, device=device, points=common_points(grid, shift))
        images, coverage = moved.images.clone(), moved.coverage.clone()
        images[i], coverage[i] = start.images[i], start.coverage[i]  # the slice's own voxels stay
        without = coverage.clone()
        without[i] = False
        only = torch.zeros_like(coverage)
        only[i] = coverage[i]
        others = model.predict_proba(images, without, moved.prior, grid.spacing)
        own = model.tissue_log_likelihood(images, only)
        per_voxel = torch.logsumexp(others.clamp_min(1e-12).log() + own, dim=0)
        return torch.where(region, per_voxel, torch.zeros_like(per_voxel)).double().sum(dim=other).cpu()

    n_crop = grid.size[axis]
    # coarse to fine: every slice on a lattice of 2 voxels, then each slice's 8 neighbours around its best
    lattice = _candidates(radius_voxels, 2)
    coarse = torch.stack([score(np.repeat(c[None], n_crop, 0)) for c in lattice])  # [M, n]
    chosen = lattice[coarse.argmax(dim=0).numpy()]  # [n, 2]
    fine = []
    for d in NEIGHBOURS:
        steps = chosen + d
        ok = np.array([_inside(s_, radius_voxels) for s_ in steps])
        value = score(np.where(ok[:, None], steps, chosen))
        fine.append(torch.where(torch.as_tensor(ok), value, torch.full_like(value, -np.inf)))
    pick = torch.stack(fine).argmax(dim=0).numpy()
    best = chosen + NEIGHBOURS[pick]
    gained = torch.stack(fine).amax(dim=0) - coarse[0]  # the lattice's first point is no move
    n = full.size[axis]
    shifts = np.zeros((n, 3))
    steps = np.zeros((n, 2), dtype=np.int64)
    gain = np.zeros(n)
    first = low[axis]  # the crop's first slice in the full stack
    shifts[first:first + n_crop] = world(best)
    steps[first:first + n_crop] = best
    gain[first:first + n_crop] = gained.numpy()
    report = {"radius_mm": float(radius_mm), "shifts_mm": shifts.round(3).tolist(), "shifts_voxels": steps.tolist(),
              "gain": gain.round(2).tolist()}
    return SliceShiftTransform(full, axis, torch.as_tensor(shifts)), report


def with_aligned_slices(subject: Subject, model, names, radius_mm: float, device=None) -> Tuple[Subject, dict]:
    """``subject`` with each of the images ``names`` moved slice by slice (:func:`align_slices`, each against the
    case as it was), composed after its transform; and the reports by image."""
    transforms, reports = dict(subject.transforms), {}
    for name in names:
        shift, reports[name] = align_slices(subject, model, name, radius_mm, device)
        if shift is not None:
            old = subject.transforms.get(name)
            transforms[name] = shift if old is None else SequentialTransform(old, shift)
    return replace(subject, transforms=transforms), reports
