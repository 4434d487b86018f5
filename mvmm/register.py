"""Pairwise registration: find the transform that maps a fixed image's space into a moving image's.

Coarse to fine, by the loop all solvers share (:mod:`mvmm.spatial.coarse_to_fine`): rigid → affine →
FFD or SVF levels (control spacing halving), on the fixed grid resampled to ``grid_spacing`` mm; at
each level, outer iterations of Adam steps (best point kept, step shrinking) on ``similarity +
λ · bending energy`` until the loss stops changing. The overlap mask is frozen within an outer
iteration, so that voxels entering or leaving the moving field of view do not make the loss jump
under the optimiser.

:class:`PairwiseRegistration` keeps its state (linear transform and deformation) between levels,
which is what group-wise atlas building uses; :func:`register_files` is ``mvmm register``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mvmm.data import io
from mvmm.core.grid import Grid
from mvmm.data.anatomy import in_plane_radius
from mvmm.data.image import Image
from mvmm.core.devices import resolve_device
from mvmm.core.errors import InputError, require_field_choice, require_positive
from mvmm.core.outputs import check_output_dir, staged_output_dir, write_json
from mvmm.data.transform_files import save_transforms
from mvmm.spatial.init import INIT_METHODS, initial_linear_transform
from mvmm.spatial.coarse_to_fine import (LINEAR_KINDS, NONLINEAR_KINDS, Level, MovingTransform, OuterLoop,
                                         run_outer_iterations, schedule)
from mvmm.spatial.nonlinear import BSplineTransform
from mvmm.spatial.optim import descend_keeping_best
from mvmm.spatial.regularizers import jacobian_statistics, spline_bending_energy, warn_if_folded
from mvmm.spatial.similarity import METRICS, check_mask, similarity_loss
from mvmm.spatial.transforms import LinearTransform, map_grid
from mvmm.spatial.warp import sample_image

log = logging.getLogger(__name__)

TRANSFORM_KINDS = LINEAR_KINDS + NONLINEAR_KINDS


@dataclass
class PairwiseSettings:
    """How a pair is registered.

    Attributes
    ----------
    transform : {"rigid", "affine", "ffd", "svf"}
        The final transform model (``"affine"`` runs rigid first, ``"ffd"`` rigid, affine, FFD;
        ``"svf"`` rigid, affine, a diffeomorphic stationary velocity field).
    metric : {"mi", "ncc", "ssd", "dice"}
        Similarity (see :mod:`mvmm.spatial.similarity`).
    init : {"geometry", "moments", "header"}
        Initial translation: field-of-view centres, intensity centres of mass, or none.
    control_spacing : float
        Control spacing (mm) of the first FFD/SVF level; halved at each further one.
    ffd_levels : int
        Non-linear (FFD or SVF) levels.
    bending_weight : float
        λ of the bending energy (mm⁻² per voxel) against the similarity.
    grid_spacing : float
        The loss is evaluated on the fixed grid resampled so no axis is finer than this (mm).
    full_resolution : bool
        Repeat the last level on the full fixed grid.
    steps, max_outer : int
        Adam steps per outer iteration; outer iterations per level at most.
    step_mm, step_decay, min_step_mm, tol : float
        First step (≈ mm of motion), its decay per outer iteration and floor; a level stops when
        the loss changes by less than ``tol`` (relative) over an outer iteration.
    bins, window : int
        Histogram bins of MI; window (voxels) of local NCC.
    """

    transform: str = "affine"
    metric: str = "mi"
    init: str = "geometry"
    control_spacing: float = 40.0
    ffd_levels: int = 2
    bending_weight: float = 1000.0
    grid_spacing: float = 2.0
    full_resolution: bool = False
    steps: int = 15
    max_outer: int = 10
    step_mm: float = 2.0
    step_decay: float = 0.6
    min_step_mm: float = 0.05
    tol: float = 1e-4
    bins: int = 32
    window: int = 9

    def __post_init__(self):
        require_field_choice(self, "transform", TRANSFORM_KINDS)
        require_field_choice(self, "metric", METRICS)
        require_field_choice(self, "init", INIT_METHODS)
        require_positive(self, ("control_spacing", "grid_spacing", "step_mm", "min_step_mm"))
        require_positive(self, ("bending_weight",), strict=False)
        if self.bins < 4:
            raise InputError(f"PairwiseSettings.bins: expected at least 4, got {self.bins}")

    def loop(self) -> OuterLoop:
        return OuterLoop(self.steps, self.max_outer, self.step_mm, self.step_decay, self.min_step_mm, self.tol)

    def levels(self) -> List[Level]:
        """The coarse-to-fine schedule of ``transform`` (the moving image is ``"moving"``)."""
        return schedule({"moving": self.transform}, self.control_spacing, self.ffd_levels, self.full_resolution)


@dataclass
class PairwiseResult:
    """The transform found and how the loss went.

    Attributes
    ----------
    transform : nn.Module
        Fixed transform mapping fixed-space world points (mm) into the moving image's world.
    history : list of dict
        Per outer iteration: level, outer, loss (on that level's grid).
    loss_before, loss_after : float
        Similarity on the registration grid at the initial placement and at the end (without λ·bending).
    jacobian : dict, optional
        Statistics of ``det ∇T`` of the deformation (FFD or SVF) on the fixed grid.
    """

    transform: nn.Module
    history: List[dict]
    loss_before: float
    loss_after: float
    jacobian: Optional[dict] = None


class PairwiseRegistration:
    """Registration state of one moving image against one fixed image.

    Parameters
    ----------
    fixed, moving : Image
        Data ``[C, *S]`` with their grids; the channels of both must match for ``ssd``/``dice``.
    settings : PairwiseSettings
    fixed_mask, moving_mask : Image, optional
        Where each image counts (nonzero = use), on any grid in that image's world.
    device : torch.device
    linear : LinearTransform, optional
        Starting linear transform (default: ``settings.init``).
    deformation : FreeFormDeformation or StationaryVelocityField, optional
        Starting deformation (on ``fixed.grid``), applied before ``linear``.
    """

    def __init__(self, fixed: Image, moving: Image, settings: PairwiseSettings, fixed_mask: Optional[Image] = None,
                 moving_mask: Optional[Image] = None, device=None, linear: Optional[LinearTransform] = None,
                 deformation: Optional[BSplineTransform] = None):
        self.settings = settings
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.fixed, self.moving = fixed.to(self.device), moving.to(self.device)
        self.fixed_mask = fixed_mask.to(self.device) if fixed_mask is not None else None
        self.moving_mask = moving_mask.to(self.device) if moving_mask is not None else None
        self.loss_fn = similarity_loss(settings.metric, settings.bins, settings.window)
        self.coarse = fixed.grid.coarsened(settings.grid_spacing)
        radius = in_plane_radius(fixed.grid)
        if linear is None:
            linear = initial_linear_transform("rigid", fixed.grid, moving.grid, settings.init,
                                              fixed.data, moving.data)
        self.state = MovingTransform(linear.to(self.device), fixed.grid, radius,
                                     deformation.to(self.device) if deformation is not None else None)
        self._fixed_on: Dict[Grid, tuple] = {}

    @property
    def linear(self) -> LinearTransform:
        return self.state.linear

    @property
    def deformation(self) -> Optional[BSplineTransform]:
        return self.state.deformation

    @property
    def transform(self) -> nn.Module:
        """Current transform (fixed space → moving world)."""
        return self.state.transform

    def _fixed_values(self, grid: Grid):
        """Fixed values ``[C, *S]`` and fixed-side mask ``[*S]`` on ``grid`` (cached)."""
        if grid not in self._fixed_on:
            points = grid.world_points(device=self.device)
            values, inside = self.fixed.sample(points)
            if self.fixed_mask is not None:
                m, m_inside = self.fixed_mask.sample(points, mode="nearest")
                inside = inside & m_inside & (m[0] != 0)
            self._fixed_on[grid] = (values, inside)
        return self._fixed_on[grid]

    def _moving_values(self, grid: Grid, transform: nn.Module):
        """Moving values ``[C, *S]`` and moving-side mask ``[*S]`` at ``grid``'s voxels through ``transform``."""
        points = map_grid(transform, grid, self.device)
        values, inside = sample_image(self.moving.data, self.moving.grid, points)
        if self.moving_mask is not None:
            with torch.no_grad():
                m, m_inside = self.moving_mask.sample(points, mode="nearest")
            inside = inside & m_inside & (m[0] != 0)
        return values, inside

    def overlap(self, grid: Optional[Grid] = None) -> torch.Tensor:
        """Voxels of ``grid`` (default: the registration grid) where both images count, ``[*S]`` bool."""
        grid = grid or self.coarse
        _, fixed_inside = self._fixed_values(grid)
        with torch.no_grad():
            _, moving_inside = self._moving_values(grid, self.transform)
        return fixed_inside & moving_inside

    def similarity(self, grid: Optional[Grid] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The similarity loss at the current transform (differentiable in its parameters)."""
        grid = grid or self.coarse
        fixed_values, fixed_inside = self._fixed_values(grid)
        moving_values, moving_inside = self._moving_values(grid, self.transform)
        if mask is None:
            mask = fixed_inside & moving_inside
        return self.loss_fn(fixed_values, moving_values, mask)

    def run_level(self, level: Level) -> List[dict]:
        """Optimise one level of the schedule (its ``kinds["moving"]``) from the current state."""
        s = self.settings
        grid = self.fixed.grid if level.full_resolution else self.coarse
        params = self.state.begin(level.kinds.get("moving"), level.control_spacing, self.device)
        deformation = self.state.learning_deformation()
        bending_grid = (self.fixed.grid.resampled(min(deformation.control_spacing) / 2)
                        if deformation is not None and s.bending_weight > 0 else None)

        def objective(mask):
            loss = self.similarity(grid, mask)
            if bending_grid is not None:
                loss = loss + s.bending_weight * spline_bending_energy(deformation, bending_grid)
            return loss

        def outer_iteration(outer: int, step_mm: float) -> dict:
            mask = self.overlap(grid)
            check_mask(mask, f"registration of {self.moving.name} to {self.fixed.name}")

            def closure():
                loss = objective(mask)
                loss.backward()
                return loss.detach()

            return {"loss": descend_keeping_best(params, closure, s.steps, step_mm)}

        history = run_outer_iterations(outer_iteration, s.loop(), "loss", level.name)
        self.state.end(self.device)
        return history

    def run(self, progress: bool = False) -> PairwiseResult:
        """All levels of ``settings.transform``, coarse to fine."""
        s = self.settings
        with torch.no_grad():
            before = float(self.similarity())
        history = []
        for level in tqdm(s.levels(), desc="registration", unit="level", disable=not progress, leave=False):
            history += self.run_level(level)
            log.info("level %s: %d outer iterations, loss %.5f", level.name, history[-1]["outer"],
                     history[-1]["loss"])
        with torch.no_grad():
            after = float(self.similarity())
        jacobian = None
        if self.deformation is not None:
            jacobian = jacobian_statistics(self.deformation, self.fixed.grid, device=self.device)
            warn_if_folded(jacobian, f"the {s.transform.upper()}")
        return PairwiseResult(self.transform, history, before, after, jacobian)


def _read_mask(path, image: Image, argname: str) -> Optional[Image]:
    if path is None:
        return None
    mask = Image.read(path, f"{image.name} mask", argname)
    if mask.grid.ndim != image.grid.ndim:
        raise InputError(f"{argname}: {path} is {mask.grid.ndim}D but {image.source} is {image.grid.ndim}D")
    if not bool((mask.data != 0).any()):
        raise InputError(f"{argname}: {path} is empty (no nonzero voxel)")
    return mask


def register_files(fixed_path, moving_path, out_dir, settings: PairwiseSettings, fixed_mask=None,
                   moving_mask=None, device: str = "auto", force: bool = False, progress: bool = True) -> dict:
    """``mvmm register``: register two image files and write the transform, the moved image and a report.

    Writes into ``out_dir``: ``transforms/`` (``transforms.json`` naming the transform ``moving``;
    ITK ``.tfm`` for the linear part, a displacement-field NIfTI for an FFD), ``moved.nii.gz``
    (the moving image resampled onto the fixed grid) and ``report.json``. Returns the report.
    """
    check_output_dir(out_dir, force)  # fail before any work; the outputs are staged at the end
    fixed = Image.read(fixed_path, "fixed", "fixed_path")
    moving = Image.read(moving_path, "moving", "moving_path")
    for image, arg in ((fixed, "fixed_path"), (moving, "moving_path")):
        image.check_intensities(arg)
    if fixed.grid.ndim != moving.grid.ndim:
        raise InputError(f"moving_path: {moving_path} is {moving.grid.ndim}D but `fixed_path` {fixed_path} is "
                         f"{fixed.grid.ndim}D")
    torch_device = resolve_device(device)
    start = time.perf_counter()
    registration = PairwiseRegistration(fixed, moving, settings, _read_mask(fixed_mask, fixed, "fixed_mask"),
                                        _read_mask(moving_mask, moving, "moving_mask"), torch_device)
    result = registration.run(progress)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        moved, _ = sample_image(moving.data.to(torch_device), moving.grid,
                                map_grid(result.transform, fixed.grid, torch_device))
    report = {"fixed": str(fixed_path), "moving": str(moving_path), "settings": asdict(settings),
              "device": str(torch_device), "seconds": seconds, "loss_before": result.loss_before,
              "loss_after": result.loss_after, "history": result.history, "jacobian": result.jacobian,
              "outputs": {"transforms": "transforms/transforms.json", "moved": "moved.nii.gz"}}
    with staged_output_dir(out_dir, force, verify=io.verify_written) as out:
        save_transforms(out / "transforms", {"moving": result.transform}, fixed.grid)
        io.write_array(out / "moved.nii.gz", moved[0].cpu().numpy(), fixed.grid)
        write_json(out / "report.json", report)
    return report
