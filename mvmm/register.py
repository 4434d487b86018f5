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
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from mvmm.data import io
from mvmm.core.grid import Grid
from mvmm.core.settings import PairwiseSettings  # noqa: F401 (defined there, re-exported here)
from mvmm.data.anatomy import in_plane_radius
from mvmm.data.image import Image
from mvmm.core.devices import resolve_device
from mvmm.core.errors import InputError
from mvmm.core.outputs import check_output_dir, staged_output_dir, write_json
from mvmm.data.transform_files import save_transforms
from mvmm.spatial.init import initial_linear_transform
from mvmm.spatial.coarse_to_fine import Level, MovingTransform, run_outer_iterations
from mvmm.spatial.nonlinear import BSplineTransform
from mvmm.spatial.optim import descend_keeping_best
from mvmm.spatial.regularizers import jacobian_statistics, spline_bending_energy, warn_if_folded
from mvmm.spatial.similarity import check_mask, similarity_loss
from mvmm.spatial.transforms import LinearTransform, map_grid
from mvmm.spatial.warp import sample_image

log = logging.getLogger(__name__)



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
    fixed, moving = _read_pair(fixed_path, moving_path)
    torch_device = resolve_device(device)
    start = time.perf_counter()
    registration = PairwiseRegistration(fixed, moving, settings, _read_mask(fixed_mask, fixed, "fixed_mask"),
                                        _read_mask(moving_mask, moving, "moving_mask"), torch_device)
    result = registration.run(progress)
    seconds = time.perf_counter() - start
    report = {"fixed": str(fixed_path), "moving": str(moving_path), "settings": asdict(settings),
              "device": str(torch_device), "seconds": seconds, "loss_before": result.loss_before,
              "loss_after": result.loss_after, "history": result.history, "jacobian": result.jacobian}
    return _write_registration(out_dir, force, fixed, moving, result.transform, report, torch_device)


def _read_pair(fixed_path, moving_path):
    fixed = Image.read(fixed_path, "fixed", "fixed_path")
    moving = Image.read(moving_path, "moving", "moving_path")
    for image, arg in ((fixed, "fixed_path"), (moving, "moving_path")):
        image.check_intensities(arg)
    if fixed.grid.ndim != moving.grid.ndim:
        raise InputError(f"moving_path: {moving_path} is {moving.grid.ndim}D but `fixed_path` {fixed_path} is "
                         f"{fixed.grid.ndim}D")
    return fixed, moving


def _write_registration(out_dir, force: bool, fixed: Image, moving: Image, transform: nn.Module, report: dict,
                        device) -> dict:
    """``transforms/`` (the transform named ``moving``), ``moved.nii.gz`` and ``report.json``, staged."""
    with torch.no_grad():
        moved, _ = sample_image(moving.data.to(device), moving.grid, map_grid(transform, fixed.grid, device))
    report = {**report, "outputs": {"transforms": "transforms/transforms.json", "moved": "moved.nii.gz"}}
    with staged_output_dir(out_dir, force, verify=io.verify_written) as out:
        save_transforms(out / "transforms", {"moving": transform}, fixed.grid)
        io.write_array(out / "moved.nii.gz", moved[0].cpu().numpy(), fixed.grid)
        write_json(out / "report.json", report)
    return report


def predict_registration(fixed: Image, moving: Image, model, device) -> tuple:
    """The transform a registration network (``mvmm train regnet``) predicts for a pair, fixed world →
    moving world, and its loss on the network grid before and after (headers vs prediction)."""
    from mvmm.nets.data import prepare_pair, stack_cases
    from mvmm.nets.regnet import RegPrediction

    model.config.require("regnet", model.path)
    net = model.net.to(device)
    case = prepare_pair(fixed, moving, model.config.network, device)
    with torch.no_grad():
        batch = {k: v.to(device) for k, v in stack_cases([case]).items()}
        prediction = net(batch)
        after = float(net.loss(batch, prediction, 0.0)["data"])
        zero = torch.zeros_like(prediction.velocity)
        unmoved = RegPrediction(zero, net.svf(zero), batch["images"][:, 1:], batch["coverage"][:, 1:].float())
        before = float(net.loss(batch, unmoved, 0.0)["data"])
    return net.world_svf(prediction.velocity[0], case.grid, prediction.svf.displacement_field()[0]), before, after


def register_with_model(fixed_path, moving_path, model, out_dir, device: str = "auto", force: bool = False) -> dict:
    """``mvmm register --model``: the registration network's transform in one forward pass; the same
    outputs as :func:`register_files`."""
    from mvmm.nets.model_dir import LoadedModel, load_model

    check_output_dir(out_dir, force)
    fixed, moving = _read_pair(fixed_path, moving_path)
    torch_device = resolve_device(device)
    start = time.perf_counter()
    if not isinstance(model, LoadedModel):
        model = load_model(model, torch_device)
    transform, before, after = predict_registration(fixed, moving, model, torch_device)
    seconds = time.perf_counter() - start
    jacobian = jacobian_statistics(transform, fixed.grid, device=torch_device)
    warn_if_folded(jacobian, "the network's SVF")
    report = {"fixed": str(fixed_path), "moving": str(moving_path), "model": str(model.path),
              "metric": model.config.network.metric, "device": str(torch_device), "seconds": seconds,
              "loss_before": before, "loss_after": after, "jacobian": jacobian}
    return _write_registration(out_dir, force, fixed, moving, transform, report, torch_device)
