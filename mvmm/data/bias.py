"""Intensity non-uniformity (bias field) correction of a case's images before the mixture sees them.

Surface coils make a cardiac MR image brighter near the coil (the anterior wall, the RV) than far from
it (the inferior wall): one tissue then spreads over a range of intensities that the mixture's one
Gaussian per tissue (and subtype) reads as different tissues — scar where the normal wall is only
brighter, blood where it is darker. SAMSEG fits a bias field inside its EM; ANTs users run N4 first.
mvmm does the latter, with SimpleITK's N4 (Tustison et al., "N4ITK: improved N3 bias correction",
IEEE TMI 2010): each image is divided by the smooth multiplicative field N4 estimates on a shrunken
copy (fitted on every positive voxel: SimpleITK's example's Otsu foreground keeps only the bright
blood of a cardiac crop and, shrunk, missed a known shading on the phantom entirely; on MS-CMRSeg's
development fold both gave the same Dice), the field evaluated at the image's own resolution. Voxels
that are exactly 0 (a rotated field of view's padding) stay 0.

Which settings: the shrink factor and iterations are N4's usual ones (ANTs ``-s 4``, 50 iterations
per level on three levels), fixed a priori; shrinking by 4 rather than 2 was chosen on MS-CMRSeg's
development fold (patients 1, 6, 11, 16, 21: same Dice or better, 2 s instead of 6 s per case for LGE +
C0). It is an option (``segment --bias-correction n4``), not the cardiac preset's: on MS-CMRSeg's other
patients it helped LGE + C0 a little and cost LGE + C0 + T2 more (docs/mscmr.md, "Bias field").
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Tuple

import numpy as np
import SimpleITK as sitk
import torch

from mvmm.core.errors import InputError
from mvmm.core.grid import Grid
from mvmm.core.settings import BIAS_CORRECTIONS
from mvmm.data import io
from mvmm.data.image import Image
from mvmm.data.subject import Subject
from mvmm.data.template_search import in_plane_only

log = logging.getLogger(__name__)

N4_SHRINK = 4  # along every axis but a slice stack's
N4_ITERATIONS = (50, 50, 50)  # per fitting level (N4's default schedule has four levels of 50)


def shrink_factors(grid: Grid) -> list:
    """N4's shrink factor per axis (ITK order): :data:`N4_SHRINK`, but 1 along a slice stack's thick
    axis (:func:`mvmm.data.template_search.in_plane_only`; shrinking 5–10 mm slices would leave too few
    to fit a field through)."""
    stack = in_plane_only(grid)
    return [1 if axis == stack else N4_SHRINK for axis in range(grid.ndim)]


def fitting_mask(image: sitk.Image) -> sitk.Image:
    """The voxels N4 fits the field on: every positive one. N4 fits the log of the intensities, so
    only positive voxels can take part (noise around a dark background dips below 0, a rotated field
    of view's padding is exactly 0); the others are divided by the field like the rest."""
    return sitk.Cast(image > 0, sitk.sitkUInt8)


def n4_corrected(image: Image, argname: str = "bias_correction") -> Tuple[Image, float]:
    """``image`` divided by its N4 bias field, and the field's spread (max / min over the foreground).

    Parameters
    ----------
    image : Image
        One or more channels ``[C, *S]``; each is corrected on its own.
    argname : str
        The parameter that asked for the correction (in error messages).

    Raises
    ------
    InputError
        If the image has no positive voxel to fit a field on.
    """
    channels, spread = [], 1.0
    for c in range(image.data.shape[0]):
        array = image.data[c].detach().cpu().numpy().astype(np.float32)
        full = io._to_sitk(array, image.grid)
        small = sitk.Shrink(full, shrink_factors(image.grid))
        mask = fitting_mask(small)
        if not sitk.GetArrayViewFromImage(mask).any():
            raise InputError(f"{argname}: image {image.name!r} ({image.source}) has no foreground for N4 to fit "
                             f"(no positive voxel); set `{argname}` to none for it")
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
        corrector.Execute(small, mask)
        field = np.exp(sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(full)))
        channels.append(torch.from_numpy(array / field).to(image.data.dtype))
        foreground = array > 0
        if foreground.any():
            spread = max(spread, float(field[foreground].max() / field[foreground].min()))
    return Image(torch.stack(channels).to(image.data.device), image.grid, image.name, image.source), spread


def bias_corrected(subject: Subject, method: str) -> Tuple[Subject, dict]:
    """``subject`` with every image corrected by ``method`` (:data:`BIAS_CORRECTIONS`), and a record:
    ``method``, ``seconds`` and, per image, the field's spread (max / min over its nonzero voxels)."""
    if method not in BIAS_CORRECTIONS:
        raise InputError(f"bias_correction: expected one of {', '.join(BIAS_CORRECTIONS)}, got {method!r}")
    if method == "none":
        return subject, {"method": "none"}
    began = time.perf_counter()
    images, spreads = [], {}
    for image in subject.images:
        corrected, spreads[image.name] = n4_corrected(image)
        images.append(corrected)
    seconds = time.perf_counter() - began
    log.info("N4 bias correction in %.1f s (field max/min: %s)", seconds,
             ", ".join(f"{name} {value:.2f}" for name, value in spreads.items()))
    return replace(subject, images=images), {"method": method, "seconds": seconds, "field_spread": spreads}
