"""Where the heart is in a large field of view: the atlas's intensity template matched at every
translation of the image by masked normalised cross-correlation.

A scanner's short-axis stack shows the heart somewhere in a 300–400 mm field of view, with chest
wall, lungs, liver and zero-filled corners around it. The atlas starts at the field-of-view centre
(:meth:`mvmm.data.atlas.Atlas.placed_on`), and the likelihood's local search and registration reach
only ~10–20 mm from there. This module moves the start to where the atlas's intensity template (the
group-wise mean image of its subjects, :func:`mvmm.atlas_build.build_atlas` with ``images``) best
correlates with the image, over every in-plane translation at once: masked normalised
cross-correlation by FFT (Padfield, "Masked object registration in the Fourier domain", IEEE TIP
2012; SimpleITK's ``MaskedFFTNormalizedCorrelationImageFilter``), as ``antsAI`` searches a start for
ANTs. The correlation is computed where the template's mask (the atlas foreground and
:data:`TEMPLATE_MARGIN_MM` around it) meets the image's (voxels not exactly 0: scanners fill the
corners of a rotated field of view with 0), and a translation counts only when
:data:`MIN_OVERLAP` of the template's mask lies on the image.

Slice stacks are searched in-plane only: a stack is planned to cover the heart, and what is left
through-plane is the likelihood's local search's (``RegistrationSettings.atlas_search_mm``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from scipy import signal
from torch import nn

from mvmm.core.grid import Grid
from mvmm.data import io
from mvmm.data.anatomy import stack_axis
from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.roi import dilate_mm
from mvmm.data.subject import Subject
from mvmm.spatial.transforms import RigidTransform
from mvmm.spatial.warp import sample_image

log = logging.getLogger(__name__)

SEARCH_SPACING_MM = 4.0  # in-plane resolution of the search: the heart is ~100 mm across
# The template counts within this of the atlas foreground: its surroundings (lung, chest wall) tell
# the heart from other bright round things; chosen on MS-CMRSeg's development fold (patients 1, 6,
# 11, 16, 21 uncropped: mean distance of the found heart centre 4.6 mm at 20, 7.3 at 10, 7.9 at 40,
# 9.6 with the whole template; docs/mscmr.md)
TEMPLATE_MARGIN_MM = 20.0
MIN_OVERLAP = 0.9  # share of the template's mask that must lie on the image for a translation to count
SLICE_STACK_RATIO = 2.0  # a 3D grid whose stack spacing is this many times the in-plane one is a slice stack


@dataclass
class TemplateMatch:
    """The best translation of the template over the image.

    Attributes
    ----------
    shift_mm : np.ndarray, shape (ndim,)
        World translation (mm) that moves the atlas's content onto the image's best match.
    ncc : float
        Normalised cross-correlation there.
    ncc_start : float
        At no translation (nan where too little of the template's mask lies on the image).
    translations : int
        Translations that counted.
    seconds : float
    """

    shift_mm: np.ndarray
    ncc: float
    ncc_start: float
    translations: int
    seconds: float

    def as_dict(self) -> dict:
        return {"shift_mm": [round(float(x), 2) for x in self.shift_mm], "ncc": float(self.ncc),
                "ncc_start": None if np.isnan(self.ncc_start) else float(self.ncc_start),
                "translations": int(self.translations), "seconds": float(self.seconds)}


def _to_sitk(array, grid: Grid, origin) -> sitk.Image:
    """``array`` on ``grid`` as a float32 SimpleITK image whose origin is ``origin``."""
    return io._to_sitk(np.asarray(array, dtype=np.float32), replace(grid, origin=tuple(origin)))


def in_plane_only(grid: Grid) -> Optional[int]:
    """The stack axis (ITK order) of a 3D slice stack, which the search does not move along; None
    for 2D images and near-isotropic volumes (searched along every axis)."""
    if grid.ndim != 3:
        return None
    axis = stack_axis(grid)
    in_plane = min(s for a, s in enumerate(grid.spacing) if a != axis)
    return axis if grid.spacing[axis] >= SLICE_STACK_RATIO * in_plane else None


def match_template(image: Image, atlas: Atlas, sequence: str, transform: nn.Module) -> Optional[TemplateMatch]:
    """The translation of the atlas that best matches its ``sequence`` template to ``image``.

    Parameters
    ----------
    image : Image
        The case's image of that sequence (channel 0 is used); its world is the common space.
    atlas : Atlas
        With ``atlas.templates[sequence]``; placed in the world.
    sequence : str
        The template's name, as the atlas spells it.
    transform : nn.Module
        The atlas's start: maps common-space points into the atlas's world (pull-back).

    Returns
    -------
    TemplateMatch or None
        None when no translation keeps :data:`MIN_OVERLAP` of the template's mask on the image
        (the image is smaller than the atlas's heart and surroundings).
    """
    began = time.perf_counter()
    data = image.data[:1].detach().cpu()  # a search of a few hundred thousand voxels: on the CPU, as SimpleITK
    coarse = image.grid.coarsened(SEARCH_SPACING_MM)  # a slice stack keeps its slices
    ndim = coarse.ndim
    points = coarse.world_points(dtype=torch.float64)
    with torch.no_grad():
        # exactly 0 is padding (a rotated field of view's corners), not anatomy; linear sampling of
        # the indicator (the second channel) keeps a voxel only away from the padding's edge
        values, inside = sample_image(torch.cat([data, data != 0]).double(), image.grid, points)
    fixed_mask = (inside & (values[1] > 0.5)).numpy()
    # the template's box in common space: the atlas grid's corners pulled back by the start
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in atlas.grid.size], indexing="ij")).reshape(ndim, -1).T
    world = (atlas.grid.index_to_world_matrix @ np.c_[corners, np.ones(len(corners))].T)[:ndim].T
    with torch.no_grad():
        common = transform.inverse()(torch.as_tensor(world, dtype=torch.float64)).numpy()
    to_index = np.linalg.inv(coarse.direction_matrix @ np.diag(coarse.spacing))
    index = (to_index @ (common - np.asarray(coarse.origin)).T).T
    low, high = np.floor(index.min(0)).astype(int), np.ceil(index.max(0)).astype(int)
    box = Grid(tuple(int(x) for x in high - low + 1), coarse.spacing,
               tuple(coarse.index_to_world_matrix[:ndim] @ np.r_[low, 1.0]), coarse.direction)
    box_points = box.world_points(dtype=torch.float64)
    with torch.no_grad():
        template, template_inside = sample_image(atlas.templates[sequence][None].detach().cpu().double(),
                                                 atlas.grid, box_points, transform)
        background = atlas.probabilities[atlas.labels.background_index][None].detach().cpu().double()
        foreground, _ = sample_image(1.0 - background, atlas.grid, box_points, transform)
    spacing_zyx = tuple(reversed(box.spacing))
    mask = template_inside & dilate_mm(foreground[0] > 0.5, spacing_zyx, TEMPLATE_MARGIN_MM)
    stack = in_plane_only(image.grid)
    if stack is not None:  # through-plane the template counts only where the stack has slices
        along = np.arange(box.size[stack]) + low[stack]
        outside = torch.as_tensor((along < 0) | (along > coarse.size[stack] - 1))
        shape = [1] * ndim
        shape[ndim - 1 - stack] = -1  # tensor axes are reversed
        mask = mask & ~outside.reshape(shape)
    if int(mask.sum()) == 0 or not fixed_mask.any():
        return None
    # both images on the search grid's lattice, sharing its origin (the filter wants one physical
    # space); the template's offset `low` is added back below
    fixed_image = _to_sitk(values[0].numpy(), coarse, coarse.origin)
    moving_image = _to_sitk(template[0].numpy(), box, coarse.origin)
    correlation = sitk.MaskedFFTNormalizedCorrelationImageFilter()
    correlation.SetRequiredFractionOfOverlappingPixels(MIN_OVERLAP)
    ncc = sitk.GetArrayFromImage(correlation.Execute(
        fixed_image, moving_image, _to_sitk(fixed_mask, coarse, coarse.origin),
        _to_sitk(mask.numpy(), box, coarse.origin)))
    # output index j (ITK order) holds the template's voxel 0 on the image's voxel j − (m − 1);
    # at the start it sits on voxel `low`
    m = np.asarray(box.size)
    start_index = low + m - 1
    # the filter's own overlap rule is a fraction of the largest overlap there is, which an image smaller
    # than the template would pass: count the template's mask voxels on the image's mask at each
    # translation (the same layout as the filter's output: a full correlation)
    moving_mask = mask.numpy().astype(np.float64)
    overlap = signal.fftconvolve(fixed_mask.astype(np.float64), moving_mask[(slice(None, None, -1),) * ndim],
                                 mode="full")
    valid = (overlap >= MIN_OVERLAP * moving_mask.sum() - 0.5) & (ncc != 0)
    if stack is not None:
        keep = np.zeros_like(valid)
        axis = ndim - 1 - stack
        index_along = int(start_index[stack])
        if not 0 <= index_along < ncc.shape[axis]:
            return None
        sl = [slice(None)] * ndim
        sl[axis] = index_along
        keep[tuple(sl)] = True
        valid &= keep
    if not valid.any():
        return None
    scores = np.where(valid, ncc, -np.inf)
    best = np.array(np.unravel_index(int(np.argmax(scores)), ncc.shape))[::-1]  # ITK order
    at_start = tuple(start_index[::-1])
    inside_output = all(0 <= i < n for i, n in zip(at_start, ncc.shape))
    ncc_start = float(ncc[at_start]) if inside_output and valid[at_start] else float("nan")
    shift = coarse.direction_matrix @ (np.asarray(coarse.spacing) * (best - start_index))
    return TemplateMatch(shift, float(scores.max()), ncc_start, int(valid.sum()), time.perf_counter() - began)


def fov_atlas_start(subject: Subject, start: RigidTransform,
                    preferred: Optional[str] = None) -> Tuple[RigidTransform, Optional[dict]]:
    """``start`` translated to where the atlas's template of one of the case's sequences best matches
    that image over the field of view (:func:`match_template`), and a record of the search.

    The classical path's start (``RegistrationSettings.atlas_search_fov``) and the networks' placement
    on a scan much wider than their grid (:func:`mvmm.nets.data.prepare_case`) both come from here.

    Parameters
    ----------
    subject : Subject
        The case, with its atlas (placed in the world).
    start : RigidTransform
        The atlas's start (common space → atlas world).
    preferred : str, optional
        The sequence whose template to use when the atlas has several (default: the reference's).

    Returns
    -------
    (RigidTransform, dict or None)
        The moved start (learnable parameters, as a registration's start) and ``sequence``, ``image``
        and :meth:`TemplateMatch.as_dict`; ``start`` itself and None when the atlas has no template of
        the case's sequences or nothing could be matched.
    """
    atlas, reference = subject.atlas, subject.reference_image.grid
    sequence = atlas.template_for(subject.names, preferred or subject.reference)
    if sequence is None:
        # only worth a warning where the heart may well be off-centre: a field of view much wider
        # than the atlas's (an uncropped scan)
        (log.warning if reference.much_wider_than(atlas.grid) else log.info)(
            "the atlas %s has no intensity template of %s: the heart is not searched for over the field of "
            "view (the atlas starts at its centre; build the atlas with `mvmm atlas build --images` to search)",
            atlas.source, ", ".join(subject.names))
        return start, None
    name = next(n for n in subject.names if n.lower() == sequence.lower())
    match = match_template(subject.image(name), atlas, sequence, start)
    if match is None:
        log.info("the atlas's %s template is larger than %s's field of view: no search over it", sequence, name)
        return start, None
    ndim = reference.ndim
    with torch.no_grad():
        rotation = start.matrix_and_translation()[0]
        params = start.params.detach().clone()
        # T(x − s) = A (x − c) + c + t − A s: the atlas's content moves by s
        params[-ndim:] -= rotation @ torch.as_tensor(match.shift_mm, dtype=params.dtype)
    log.info("atlas moved %s mm to where its %s template best matches %s (NCC %.3f; %.3f at the start)",
             np.round(match.shift_mm, 1).tolist(), sequence, name, match.ncc, match.ncc_start)
    record = {"sequence": sequence, "image": name, **match.as_dict()}
    return RigidTransform(ndim, params=nn.Parameter(params), center=start.center), record
