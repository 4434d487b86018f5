"""The joint solver: EM on the appearance ⇄ gradient steps on the geometry (ICM), coarse to fine.

See docs/design.md ("One model, several solvers"). With the transforms fixed, a few EM steps update
the tissue parameters; with those fixed, a few gradient steps on the transform parameters increase
``log L − λ · bending energy − μ · linear distortion`` through autograd (``torch.grid_sample``
warps). Levels go coarse to fine by the loop every solver shares (:mod:`mvmm.spatial.coarse_to_fine`):
rigid → affine → FFD or SVF with the control spacing halving. The atlas, the non-reference images,
or both move; the reference image defines the common space Ω and never moves.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mvmm.core.grid import Grid
from mvmm.core.settings import RegistrationSettings  # noqa: F401 (defined there, re-exported here)
from mvmm.data.anatomy import in_plane_radius
from mvmm.core.errors import InputError
from mvmm.data.image import Image
from mvmm.data.roi import region_box
from mvmm.data.subject import CaseSample, Subject
from mvmm.data.template_search import fov_atlas_start
from mvmm.mixture.model import ConvergenceWarning, MultivariateMixture
from mvmm.register import PairwiseRegistration, PairwiseSettings
from mvmm.spatial.coarse_to_fine import MovingTransform, run_outer_iterations
from mvmm.spatial.init import initial_linear_transform
from mvmm.spatial.optim import descend_keeping_best
from mvmm.spatial.regularizers import jacobian_statistics, linear_distortion, spline_bending_energy, warn_if_folded
from mvmm.spatial.transforms import RigidTransform

log = logging.getLogger(__name__)

# The levels run on the reference grid cut to the region of interest at the start and this margin
# (mm) around it: room for the atlas to move, while the time follows the heart, not the field of view
WORK_GRID_MARGIN_MM = 30.0


def template_sequence(subject: Subject, settings: RegistrationSettings) -> Optional[str]:
    """The atlas template that places the atlas (:class:`RegistrationSettings`' ``template_*``), or None."""
    if subject.atlas is None or settings.template_metric == "none" or not subject.atlas.templates:
        return None
    preferred = settings.template_sequence or subject.reference
    if settings.template_sequence and subject.atlas.template_for([settings.template_sequence]) is None:
        raise InputError(f"RegistrationSettings.template_sequence: the atlas has no {settings.template_sequence!r} "
                         f"template (it has {', '.join(subject.atlas.templates)})")
    sequence = subject.atlas.template_for(subject.names, preferred)
    if settings.template_sequence and sequence.lower() not in [n.lower() for n in subject.names]:
        raise InputError(f"RegistrationSettings.template_sequence: no image of the case is named "
                         f"{settings.template_sequence!r} (images: {', '.join(subject.names)})")
    return sequence


def default_registration(subject: Subject, **overrides) -> RegistrationSettings:
    """What ``mvmm segment`` and :func:`mvmm.segment.segment_subject` do unless told otherwise:
    :class:`RegistrationSettings`' defaults, with ``atlas="none"`` when the subject has no atlas."""
    if subject.atlas is None and overrides.get("atlas") is None:
        overrides["atlas"] = "none"
    return RegistrationSettings(**{k: v for k, v in overrides.items() if v is not None})


@dataclass
class RegistrationResult:
    """Transforms found by the joint solver and how log L evolved.

    Attributes
    ----------
    transforms : dict of name to nn.Module
        Fixed transforms (no learnable parameters) from the common space into each moving
        image's (and ``"atlas"``'s) world space.
    history : list of dict
        One entry per outer iteration: level, iteration, mean log L per voxel after its EM steps
        (on the registration grid) and after its gradient steps.
    jacobian : dict, optional
        Statistics of ``det ∇T_atlas`` on the common grid when the atlas deforms.
    template : dict, optional
        How the atlas's template placed it: sequence, metric, transform, loss before and after,
        seconds (and the deformation's Jacobian statistics).
    seconds : dict of str to float
        Where the time went: ``fov search`` (the heart's search over the field of view),
        ``search`` (the atlas start search), ``template``, and ``level NAME`` for each level of
        the schedule.
    fov_search : dict, optional
        What the search over the field of view found (``RegistrationSettings.atlas_search_fov``):
        the template's sequence and image, the shift (mm), the correlation there and at the start.
    work_grid : dict, optional
        The part of the reference grid the levels ran on (``size``, and ``of`` the reference's size)
        when the region of interest let them skip the rest of the field of view.
    """

    transforms: Dict[str, nn.Module]
    history: List[dict] = field(default_factory=list)
    jacobian: Optional[dict] = None
    template: Optional[dict] = None
    seconds: Dict[str, float] = field(default_factory=dict)
    fov_search: Optional[dict] = None
    work_grid: Optional[dict] = None


class JointSolver:
    """Fit a mixture model and the transforms of a subject together.

    Parameters
    ----------
    model : MultivariateMixture
        The appearance model (settings only; the solver fits it, warm-starting between steps).
    settings : RegistrationSettings
    device : torch.device
    progress : bool
        A progress bar over outer iterations.
    """

    def __init__(self, model: MultivariateMixture, settings: RegistrationSettings, device, progress: bool = False):
        self.model = model
        self.settings = settings
        self.device = torch.device(device)
        self.progress = progress

    def run(self, subject: Subject, atlas_start: Optional[tuple] = None) -> RegistrationResult:
        """Register and fit; ``self.model`` ends fitted on the registration grid (refit it on the full one).

        ``atlas_start``: ``(linear, deformation)`` where the atlas starts (e.g. a network's placement and
        velocity field; the deformation is held and the levels refine the linear map after it)
        instead of its template, search or header placement.
        """
        s = self.settings
        s.check_subject(subject)
        work = copy.copy(subject)
        work.transforms = dict(subject.transforms)
        reference = subject.reference_image.grid
        radius = in_plane_radius(reference)
        moving_images = [n for n in subject.names if n != subject.reference]
        image_deformations = self._network_image_starts(subject, moving_images) if s.images_model else {}
        start = {name: self._initial_image_transform(subject, name) for name in moving_images
                 if name not in image_deformations} if s.images != "none" else {}
        for name in image_deformations:  # the network placed it: a linear start at the headers, held or refined
            start[name] = RigidTransform(reference.ndim, center=reference.center_world())
            if s.images == "none":
                start[name].requires_grad_(False)
        deformation_start, template, fov_search = None, None, None
        seconds: Dict[str, float] = {}
        if subject.atlas is not None and atlas_start is not None:
            linear, deformation_start = atlas_start
            start["atlas"] = linear.with_params(nn.Parameter(linear.params.detach().clone()))
        elif subject.atlas is not None:
            start["atlas"] = initial_linear_transform("rigid", reference, subject.atlas.grid, s.atlas_init)
            if s.atlas_search_fov and s.atlas != "none":
                began = time.perf_counter()
                start["atlas"], fov_search = fov_atlas_start(subject, start["atlas"], s.template_sequence)
                seconds["fov search"] = time.perf_counter() - began
        # the levels run on the part of the reference the region of interest can reach
        work.transforms.update(start)
        work_grid, work_box = self._work_grid(work, reference)
        coarse = work_grid.coarsened(s.grid_spacing)
        # An atlas with a coarse stage (the linear mean of a non-linearly built atlas): the search and the
        # coarse levels place that blurrier one, whose basin is wider; the full-resolution level the sharp one.
        sharp_atlas = subject.atlas
        coarse_atlas = sharp_atlas.coarse_stage() if sharp_atlas is not None else None
        work.atlas = coarse_atlas
        if subject.atlas is not None and atlas_start is None:
            sequence = template_sequence(subject, s)
            if sequence is not None:
                start["atlas"], deformation_start, template = self._template_placement(subject, sequence,
                                                                                       start["atlas"])
            elif s.atlas_search_mm > 0 and s.atlas != "none":
                began = time.perf_counter()
                start["atlas"] = self.searched_atlas_start(work, start["atlas"], coarse)
                seconds["search"] = time.perf_counter() - began
        if "atlas" in start and s.atlas == "none":
            # placed, not moved: a learnable start would put every prior in autograd's graph
            start["atlas"].requires_grad_(False)
        deformations = {"atlas": deformation_start, **image_deformations}
        moving = {name: MovingTransform(linear, reference, radius, deformations.get(name))
                  for name, linear in start.items()}
        history: List[dict] = []
        levels = s.levels()
        bar = tqdm(total=len(levels) * s.max_outer, desc="registration", unit="outer", disable=not self.progress,
                   leave=False)
        for level in levels:
            began = time.perf_counter()
            grid = work_grid if level.full_resolution else coarse
            work.atlas = sharp_atlas if level.full_resolution else coarse_atlas
            learning = {name: list(state.begin(level.kinds["atlas" if name == "atlas" else "images"],
                                               level.control_spacing, self.device))
                        for name, state in moving.items()}
            params = [p for ps in learning.values() for p in ps]
            images_move = any(ps for name, ps in learning.items() if name != "atlas")
            if not params:  # nothing learns at this level (e.g. a rigid level after an affine template placement)
                bar.total -= s.max_outer
                continue
            work.transforms.update({name: state.transform for name, state in moving.items()})
            deformation = moving["atlas"].learning_deformation() if "atlas" in moving else None
            affine = [t for t in (state.learning_affine() for state in moving.values()) if t is not None]
            # a deforming atlas would redraw its own region of interest (and could gain by it): a
            # non-linear level keeps the region the atlas gave at the level's start
            region = work.region_of_interest(grid, self.device) if deformation is not None else None

            def outer_iteration(outer: int, step_mm: float) -> dict:
                # the run's first EM fits from scratch; later ones continue for a few steps
                after_em, sample = self._em_steps(work, grid, region, continue_fit=bool(history) or outer > 1)
                # a fresh Adam each time (its momentum would point along the landscape before
                # the EM step), with a step that shrinks as the level converges
                after_grad, penalty = self._gradient_steps(work, grid, sample, params, step_mm, deformation, affine,
                                                           images_move)
                return {"log_likelihood": after_em, "log_likelihood_after_registration": after_grad,
                        "penalty": penalty}

            def shown(record: dict) -> None:
                bar.update(1)
                bar.set_postfix(level=level.name, logL=f"{record['log_likelihood']:.4f}")

            level_history = run_outer_iterations(outer_iteration, s.loop(), "log_likelihood", level.name, shown)
            seconds[f"level {level.name}"] = time.perf_counter() - began
            history += level_history
            # a level that converged early takes its unused iterations off the total, so the bar's
            # total is the true count when the solve ends (it does not jump)
            bar.total -= s.max_outer - len(level_history)
            bar.refresh()
            for state in moving.values():
                state.end(self.device)
            log.info("registration level %s: %d outer iterations, mean log-likelihood %.5f", level.name,
                     len(level_history), history[-1]["log_likelihood"])
        bar.close()
        work.atlas = sharp_atlas
        transforms = {name: state.transform for name, state in moving.items()}
        jacobian = None
        if "atlas" in moving and moving["atlas"].deformation is not None:
            jacobian = jacobian_statistics(moving["atlas"].deformation, reference, device=self.device)
            warn_if_folded(jacobian, f"the atlas's {s.atlas.upper()}")
        if template is not None:
            seconds["template"] = template["seconds"]
        if work_box is not None:
            work.transforms.update(transforms)
            self._check_work_grid(work, reference, work_box)
        work_record = None if work_box is None else {"size": list(work_grid.size), "of": list(reference.size)}
        return RegistrationResult(transforms, history, jacobian, template, seconds, fov_search, work_record)

    def _work_box(self, work: Subject, reference: Grid, margin_mm: float):
        """Index box ``(low, high)`` (inclusive, ITK order) of ``reference`` around the region of
        interest as the atlas is placed now, with ``margin_mm`` around it; None without a region."""
        if work.atlas is None or work.roi_margin_mm is None or work.transforms.get("atlas") is None:
            return None
        coarse = reference.coarsened(max(self.settings.grid_spacing, WORK_GRID_MARGIN_MM / 4))
        with torch.no_grad():
            region = work.region_of_interest(coarse, self.device)
        if region is None or not bool(region.any()):
            return None
        return region_box(region, coarse, reference, margin_mm)

    def _work_grid(self, work: Subject, reference: Grid):
        """The reference grid cut to the region of interest as the atlas starts and
        :data:`WORK_GRID_MARGIN_MM` around it, and that index box; the reference itself and None
        without a region, or where the box covers it anyway."""
        box = self._work_box(work, reference, WORK_GRID_MARGIN_MM)
        if box is None or (np.all(box[0] == 0) and np.all(box[1] == np.asarray(reference.size) - 1)):
            return reference, None
        return reference.subgrid(*box), box

    def _check_work_grid(self, work: Subject, reference: Grid, work_box) -> None:
        """Warn when the registered atlas's region of interest reaches beyond the part of the reference
        the levels ran on, ``work_box`` (the atlas moved further than :data:`WORK_GRID_MARGIN_MM`)."""
        box = self._work_box(work, reference, 0.0)
        if box is None:
            return
        if np.any(box[0] < work_box[0]) or np.any(box[1] > work_box[1]):
            log.warning("the atlas moved more than %g mm from where it started: part of its region of interest lay "
                        "outside the part of the field of view the registration ran on", WORK_GRID_MARGIN_MM)

    def _template_placement(self, subject: Subject, sequence: str, start: RigidTransform):
        """Register the atlas's ``sequence`` template to the case's image of that sequence (the fixed
        image; the template moves), from ``start``; returns the linear map, the deformation (or None)
        and a record."""
        s = self.settings
        if s.atlas == "rigid" and s.template_transform != "rigid":
            raise InputError(f"RegistrationSettings.atlas: a rigid atlas cannot continue the template's "
                             f"{s.template_transform} placement; use `RegistrationSettings.atlas`=affine or more, "
                             f"or `RegistrationSettings.template_transform`=rigid")
        began = time.perf_counter()
        name = next(n for n in subject.names if n.lower() == sequence.lower())
        atlas = subject.atlas
        moving = Image(atlas.templates[sequence].unsqueeze(0), atlas.grid, f"{sequence} template", atlas.source)
        settings = PairwiseSettings(transform=s.template_transform, metric=s.template_metric, init="header",
                                    control_spacing=s.control_spacing, ffd_levels=s.ffd_levels,
                                    grid_spacing=s.grid_spacing)
        registration = PairwiseRegistration(subject.image(name), moving, settings, moving_mask=None,
                                            device=self.device, linear=start.with_params(start.params.detach().clone()))
        result = registration.run()
        if result.jacobian is not None:
            warn_if_folded(result.jacobian, f"the atlas template's {s.template_transform.upper()}")
        record = {"sequence": sequence, "image": name, "metric": s.template_metric,
                  "transform": s.template_transform, "loss_before": result.loss_before,
                  "loss_after": result.loss_after, "jacobian": result.jacobian,
                  "seconds": time.perf_counter() - began}
        log.info("atlas placed by its %s template on %s (%s %s: loss %.4f -> %.4f)", sequence, name,
                 s.template_transform, s.template_metric, result.loss_before, result.loss_after)
        return registration.linear, registration.deformation, record

    def _network_image_starts(self, subject: Subject, names: List[str]) -> dict:
        """The deformations a registration network (``images_model``) predicts for the moving images
        whose sequence it was trained on (fixed: the reference's); none other is touched."""
        from mvmm.nets.model_dir import load_model
        from mvmm.register import predict_registration

        model = load_model(self.settings.images_model, self.device)
        model.config.require("regnet", self.settings.images_model)
        fixed, moving = (n.lower() for n in model.config.images)
        if subject.reference.lower() != fixed:
            raise InputError(f"RegistrationSettings.images_model: the network registers onto {model.config.images[0]}, "
                             f"but the reference is {subject.reference!r}")
        starts = {}
        for name in names:
            if name.lower() == moving:
                svf, before, after = predict_registration(subject.reference_image, subject.image(name), model,
                                                          self.device)
                log.info("%s placed by the registration network %s (loss %.4f -> %.4f)", name,
                         self.settings.images_model, before, after)
                starts[name] = svf
        if not starts:
            raise InputError(f"RegistrationSettings.images_model: the network moves {model.config.images[1]}, which "
                             f"is not among the images ({', '.join(subject.names)})")
        return starts

    def _initial_image_transform(self, subject: Subject, name: str) -> RigidTransform:
        """Identity (headers), or a rigid MI registration of image ``name`` to the reference."""
        reference = subject.reference_image
        if self.settings.images_init == "header":
            return RigidTransform(reference.grid.ndim, center=reference.grid.center_world())
        settings = PairwiseSettings(transform="rigid", metric="mi", init="header",
                                    grid_spacing=self.settings.grid_spacing)
        moving = subject.images[subject.names.index(name)]
        result = PairwiseRegistration(reference, moving, settings, moving_mask=subject.masks.get(name),
                                      device=self.device).run()
        log.info("%s placed on %s by rigid MI registration (MI %.4f -> %.4f)", name, subject.reference,
                 -result.loss_before, -result.loss_after)
        return result.transform

    def searched_atlas_start(self, work: Subject, start: RigidTransform, grid: Grid) -> RigidTransform:
        """The best of ``start`` moved by −d, 0, +d mm along each reference axis (by a fresh model's log L)."""
        d, ndim = self.settings.atlas_search_mm, grid.ndim
        axes = work.reference_image.grid.direction_matrix
        scores = []
        with torch.no_grad():  # the images stay: sampled once, each placement resamples the prior alone
            fixed = work.sample(grid, self.device, check=False, roi=False)
        for steps in itertools.product((-1, 0, 1), repeat=ndim):
            params = start.params.detach().clone()
            params[-ndim:] += torch.as_tensor(axes @ (d * np.asarray(steps, dtype=np.float64)), dtype=params.dtype,
                                              device=params.device)
            candidate = RigidTransform(ndim, params=params, center=start.center)
            work.transforms["atlas"] = candidate
            model = self.model.unfitted_copy()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prior = work.sample_atlas(grid, self.device)
                model.fit(fixed.images, work.within_roi(fixed.coverage, prior, grid), prior, grid.spacing,
                          max_iter=self.settings.search_em_steps, progress=False)
            scores.append((model.lower_bounds_[-1], steps, candidate))
        best = max(scores, key=lambda item: item[0])
        log.info("atlas start: best of %d placements ±%g mm is %s (log L %.4f; unmoved %.4f)", len(scores), d,
                 [int(x) * d for x in best[1]], best[0], scores[len(scores) // 2][0])
        return best[2]

    def _em_steps(self, work: Subject, grid: Grid, region: Optional[torch.Tensor], continue_fit: bool):
        """EM on the case as the transforms place it now; the mean log L after, and the sample it fitted."""
        with torch.no_grad():
            sample = work.sample(grid, self.device, check=False, region=region)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                # the registration's bar counts outer iterations: no EM bar of its own for each step
                if continue_fit:
                    self.model.fit(sample.images, sample.coverage, sample.prior, grid.spacing,
                                   max_iter=self.settings.em_steps, init_params=self.model.params_, progress=False)
                else:
                    self.model.fit(sample.images, sample.coverage, sample.prior, grid.spacing, progress=False)
        return self.model.lower_bounds_[-1], sample

    def _gradient_steps(self, work: Subject, grid: Grid, fixed: CaseSample, params: List[nn.Parameter],
                        lr: float, deformation, affine: List[nn.Module], images_move: bool = True) -> float:
        """Descent steps on ``−log L + λ · bending + μ · Σ_affine distortion`` with the appearance
        fixed; returns the final log L and penalty (the level's objective is their difference).

        ``fixed`` is the case as the EM step just sampled it: its coverage (the region of interest
        included) is held over the steps. When only the atlas moves, the images' ``log p(I(x) | k)``
        does not change over the steps either: it is computed once, and each step resamples and
        differentiates the prior alone."""
        s = self.settings
        bending_grid = (work.reference_image.grid.resampled(min(deformation.control_spacing) / 2)
                        if deformation is not None else None)
        # Coverage stays as the EM step saw it: with it free, the objective would change by whole
        # voxels entering or leaving a field of view, which the gradient cannot see.
        with torch.no_grad():
            coverage = fixed.coverage
            if not images_move:  # the counted voxels only, [N or K, V]: the rest adds nothing to log L
                counted = coverage.any(dim=0)
                images, coverage = fixed.images[:, counted], coverage[:, counted]
                log_lik = self.model.tissue_log_likelihood(images, coverage)
                points = grid.world_points(device=self.device)[counted]

        def penalty():
            total = torch.zeros((), device=self.device)
            if deformation is not None and s.bending_weight > 0:
                total = total + s.bending_weight * spline_bending_energy(deformation, bending_grid).to(total)
            for transform in affine if s.affine_weight > 0 else ():
                total = total + s.affine_weight * linear_distortion(transform).to(total)
            return total

        def log_likelihood():
            if not images_move:
                return self.model.log_likelihood(images, coverage, work.sample_atlas(grid, self.device, points),
                                                 tissue_log_lik=log_lik)
            sample = work.sample(grid, self.device, check=False, roi=False)
            return self.model.log_likelihood(sample.images, coverage, sample.prior)

        def closure():
            log_l = log_likelihood()
            loss = penalty().to(log_l) - log_l
            loss.backward()
            return loss.detach()

        descend_keeping_best(params, closure, s.grad_steps, lr)
        with torch.no_grad():
            return float(log_likelihood()), float(penalty())
