"""One case: the named source images of a subject, their optional masks and the atlas.

``Subject`` checks that its parts can be used together; ``Subject.sample`` puts them on one grid
(by default the reference image's) and returns the tensors the mixture model reads, including each
image's coverage mask (hetero-coverage: where its own field of view, and mask, reach).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from mvmm.data.atlas import Atlas
from mvmm.core.grid import Grid
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS, LabelSet
from mvmm.data.roi import atlas_roi
from mvmm.core.errors import InputError
from mvmm.spatial.transforms import IdentityTransform, map_grid

log = logging.getLogger(__name__)


@dataclass
class CaseSample:
    """A case resampled onto one grid.

    Attributes
    ----------
    images : torch.Tensor, float32, shape [N, *S]
        Intensities of the N images, S = ``grid.shape``.
    coverage : torch.Tensor, bool, shape [N, *S]
        Where image i covers the voxel (inside its field of view and its mask).
    prior : torch.Tensor or None, float32, shape [K, *S]
        Atlas probabilities; None for a plain mixture.
    grid : Grid
    names : list of str, length N
    labels : LabelSet
    """

    images: torch.Tensor
    coverage: torch.Tensor
    prior: Optional[torch.Tensor]
    grid: Grid
    names: List[str]
    labels: LabelSet


@dataclass
class Subject:
    """The images, masks and atlas of one case.

    Parameters
    ----------
    images : sequence of Image
        The source images; names must be unique.
    atlas : Atlas, optional
        Spatial prior; without one the model is a plain mixture.
    masks : mapping of image name to Image, optional
        Restricts where an image counts (hetero-coverage); any grid, nonzero = inside.
    reference : str, optional
        Name of the image whose grid is the common space Ω (default: the first image).
    transforms : mapping of name to nn.Module, optional
        Maps common-space world points into each image's (or ``"atlas"``'s) world space;
        identity where not given (images placed by their headers).
    labels : LabelSet, optional
        Classes of a plain mixture (no atlas); default the built-in cardiac set. With an atlas,
        the atlas's labels are used.
    roi_margin_mm : float, optional
        Restrict the likelihood to within this many mm of where the (moved) atlas allows a
        foreground tissue (:mod:`mvmm.data.roi`); None: everywhere an image covers.
    """

    images: Sequence[Image]
    atlas: Optional[Atlas] = None
    masks: Mapping[str, Image] = field(default_factory=dict)
    reference: Optional[str] = None
    transforms: Dict[str, nn.Module] = field(default_factory=dict)
    labels: Optional[LabelSet] = None
    roi_margin_mm: Optional[float] = None

    def __post_init__(self):
        self.images = list(self.images)
        if not self.images:
            raise InputError("images: at least one image is needed")
        names = [im.name for im in self.images]
        if len(set(names)) != len(names):
            raise InputError(f"images: image names must be unique, got {names}")
        if self.reference is None:
            self.reference = names[0]
        if self.reference not in names:
            raise InputError(f"reference: {self.reference!r} is not one of the image names {names}")
        dims = {im.name: im.grid.ndim for im in self.images}
        if len(set(dims.values())) > 1:
            raise InputError(f"images: 2D and 3D images cannot share one space: dimensions {dims} "
                             f"(a 2D image has no position along a third axis)")
        for im in self.images:
            im.check_intensities()
        for name, mask in self.masks.items():
            if name not in names:
                raise InputError(f"masks: {name!r} is not one of the image names {names}")
            if mask.grid.ndim != dims[name]:
                raise InputError(f"masks: mask of {name!r} ({mask.source}) is {mask.grid.ndim}D, "
                                 f"its image is {dims[name]}D")
            if not bool((mask.data > 0).any()):
                raise InputError(f"masks: mask of {name!r} ({mask.source}) is empty (no nonzero voxel)")
            image_grid = self.images[names.index(name)].grid
            if not mask.grid.same_geometry(image_grid):
                log.info("mask of %r (%s) is on another grid than its image: it is resampled by the headers "
                         "(world positions, nearest neighbour)", name, mask.source)
        if self.roi_margin_mm is not None:
            if self.atlas is None:
                raise InputError("roi_margin_mm: a region of interest around the atlas needs an atlas")
            if not math.isfinite(self.roi_margin_mm) or self.roi_margin_mm < 0:
                raise InputError(f"roi_margin_mm: must be a number of mm ≥ 0, got {self.roi_margin_mm}")
        if self.atlas is not None and self.atlas.grid.ndim != self.ndim:
            raise InputError(f"atlas: the atlas ({self.atlas.source}) is {self.atlas.grid.ndim}D, "
                             f"the images are {self.ndim}D")

    @property
    def class_labels(self) -> LabelSet:
        """The tissue classes: the atlas's, else ``labels``, else the built-in cardiac set."""
        if self.atlas is not None:
            return self.atlas.labels
        return self.labels if self.labels is not None else CARDIAC_LABELS

    @property
    def ndim(self) -> int:
        return self.images[0].grid.ndim

    @property
    def names(self) -> List[str]:
        return [im.name for im in self.images]

    @property
    def reference_image(self) -> Image:
        return self.images[self.names.index(self.reference)]

    def image(self, name: str) -> Image:
        if name not in self.names:
            raise InputError(f"image name {name!r} is not one of {self.names}")
        return self.images[self.names.index(name)]

    def transform(self, name: str) -> nn.Module:
        return self.transforms.get(name, IdentityTransform())

    def sample(self, grid: Optional[Grid] = None, device=None, points: Optional[torch.Tensor] = None,
               check: bool = True, roi: bool = True, region: Optional[torch.Tensor] = None) -> CaseSample:
        """Resample images, coverage masks and atlas prior onto ``grid`` (default: the reference's).

        Parameters
        ----------
        grid : Grid, optional
            Where to sample; its voxel centres are common-space points.
        device : torch.device or str, optional
        points : torch.Tensor, shape [*grid.shape, ndim], optional
            Common-space points to sample at instead of ``grid``'s voxel centres, e.g. the voxels of
            image i's own grid pulled back through ``T_i⁻¹`` (``grid`` then only names their layout).
        check : bool
            Check overlaps (and warn on a poorly covering atlas); the joint solver skips this on
            its repeated gradient steps. The values keep the transforms' autograd graph.
        roi : bool
            Apply ``roi_margin_mm`` to the coverage; a caller that holds the coverage fixed (the
            joint solver's gradient steps) skips the dilation.
        region : torch.Tensor, bool, shape [*grid.shape], optional
            With ``roi``: this region of interest (see :meth:`region_of_interest`) instead of the one
            the atlas gives where it is now, so that a deforming atlas cannot redraw the voxels it
            is scored on.

        Raises
        ------
        InputError
            If an image, its mask, or the atlas does not overlap the points at all.
        """
        grid = grid or self.reference_image.grid
        device = torch.device(device) if device is not None else torch.device("cpu")

        centres = grid.world_points(device=device) if points is None else None

        def moved(name: str) -> torch.Tensor:  # the points in the world of image (or atlas) ``name``
            transform = self.transform(name)
            return map_grid(transform, grid, points=centres) if points is None else transform(points)

        values, coverage = [], []
        for im in self.images:
            image_points = moved(im.name)
            v, inside = im.sample(image_points)
            if im.name in self.masks:
                m, m_inside = self.masks[im.name].sample(image_points, mode="nearest")
                inside = inside & m_inside & (m[0] > 0)
            if check and not bool(inside.any()):
                raise InputError(f"images: image {im.name!r} ({im.source}) does not overlap the common "
                                 f"grid of {self.reference!r} at all (check its header's origin/direction, "
                                 f"or its mask)")
            values.append(v[0])
            coverage.append(inside)
        coverage = torch.stack(coverage)
        prior = None
        if self.atlas is not None:
            prior, inside = self.atlas.sample(moved("atlas"))
            share = float(inside.float().mean()) if check else 1.0
            if share == 0.0:
                raise InputError(f"atlas: the atlas ({self.atlas.source}) does not overlap the common grid "
                                 f"of {self.reference!r} at all")
            # on the common grid only, and not when the fit is meant to stay near the atlas (a scanner's
            # field of view is several times the heart's)
            if share < 0.5 and self.roi_margin_mm is None and grid.same_geometry(self.reference_image.grid):
                log.warning("the atlas (%s) covers only %.0f%% of the common grid; outside it the prior is "
                            "background", self.atlas.source, 100 * share)
            if roi and self.roi_margin_mm is not None:
                coverage = self.within_roi(coverage, prior, grid, region)
                if check and not bool(coverage.any()):
                    raise InputError(f"roi_margin_mm: no voxel covered by the images lies within "
                                     f"{self.roi_margin_mm:g} mm of the atlas foreground ({self.atlas.source}); "
                                     f"the atlas is placed off the images")
        return CaseSample(torch.stack(values), coverage, prior, grid, self.names, self.class_labels)

    def sample_atlas(self, grid: Grid, device=None, points: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The atlas prior alone, through its transform (autograd kept), as :meth:`sample` gives it,
        for a caller whose images stay where they are.

        Parameters
        ----------
        grid : Grid
            Where to sample (its voxel centres are common-space points).
        device : torch.device or str, optional
        points : torch.Tensor, shape [V, ndim], optional
            Common-space points to sample at instead, e.g. the voxels of a region of interest: the
            joint solver's gradient steps interpolate, and differentiate, the prior where the
            likelihood counts and nowhere else.

        Returns
        -------
        torch.Tensor, shape [K, *grid.shape], or [K, V] at ``points``
        """
        if self.atlas is None:
            raise ValueError("Subject.sample_atlas: the subject has no atlas to sample")  # a caller's bug, not input
        device = torch.device(device) if device is not None else torch.device("cpu")
        if points is None:
            return self.atlas.sample(map_grid(self.transform("atlas"), grid, device))[0]
        # as a [V, 1, …, 1] grid of points: grid_sample wants one axis per spatial axis
        moved = self.transform("atlas")(points).reshape((-1,) + (1,) * (grid.ndim - 1) + (grid.ndim,))
        return self.atlas.sample(moved)[0].flatten(1)

    def within_roi(self, coverage: torch.Tensor, prior: torch.Tensor, grid: Grid,
                   region: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``coverage [N, *S]`` cut to the region of interest (``roi_margin_mm`` around the foreground of
        ``prior [K, *S]``, or ``region``); unchanged without a margin. What :meth:`sample` applies."""
        if self.roi_margin_mm is None:
            return coverage
        region = self._roi_of(prior, grid) if region is None else region.to(prior.device)
        return coverage & region

    def region_of_interest(self, grid: Grid, device=None) -> Optional[torch.Tensor]:
        """Voxels of ``grid`` within ``roi_margin_mm`` of the atlas foreground as the atlas is placed
        now, ``[*grid.shape]`` bool; None without an atlas or a margin (every voxel counts)."""
        if self.atlas is None or self.roi_margin_mm is None:
            return None
        with torch.no_grad():
            prior, _ = self.atlas.sample(map_grid(self.transform("atlas"), grid, device))
        return self._roi_of(prior, grid)

    def _roi_of(self, prior: torch.Tensor, grid: Grid) -> torch.Tensor:
        spacing = tuple(reversed(grid.spacing))
        return atlas_roi(prior, self.atlas.labels.background_index, spacing, self.roi_margin_mm)
