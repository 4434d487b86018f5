"""Group-wise atlas building: register label maps to their evolving mean, then average them.

Each label map becomes K one-hot channels on its own grid. A template grid is laid over all of
them; every map gets a transform (template space → the map's world), starting at the identity.
Level by level (rigid → affine → FFD or SVF, the schedule every solver shares), ``rounds`` times: the template is
the coverage-weighted mean of the warped one-hot maps (a map says nothing outside its field of
view — a stack of short-axis slices does not cover the apex or base it did not image), every map
is registered to it (SSD of one-hot maps), and the drift common to all transforms is removed so
that the template stays at the mean shape. The final mean, smoothed, is the probabilistic atlas.
With non-linear levels the mean before them (linearly aligned maps, smoothed alike) is kept as the
atlas's coarse stage (``Atlas.coarse``): the joint solver places that blurrier one first.

Frames: in ``"world"`` the maps are related by their headers (same scanner space, e.g. images of
one subject or data already in a standard space). In ``"axes"`` each map is first expressed in its
own image axes with its anatomy's centroid at the origin — for short-axis cardiac stacks of
different patients, whose headers place them anywhere in different scanners, the image axes are
the anatomically shared frame. Such an atlas is saved with ``frame: axes`` and placed on a target
by the target's axes and field-of-view centre (:meth:`mvmm.data.atlas.Atlas.placed_on`); its frame's
origin is the maps' mean field-of-view centre relative to their anatomy, so the anatomy lands where it
sits, on average, in the maps' fields of view.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from mvmm.data import io
from mvmm.data.anatomy import short_axis_frame, spacing_along
from mvmm.data.atlas import Atlas
from mvmm.core.grid import Grid
from mvmm.core.settings import GroupwiseSettings  # noqa: F401 (defined there, re-exported here)
from mvmm.data.image import Image
from mvmm.data.labels import LabelSet, label_values
from mvmm.core.errors import InputError
from mvmm.register import PairwiseRegistration
from mvmm.spatial.nonlinear import BSplineTransform
from mvmm.spatial.regularizers import jacobian_statistics, warn_if_folded
from mvmm.spatial.transforms import AffineTransform, LinearTransform, RigidTransform, SequentialTransform, map_grid
from mvmm.spatial.warp import sample_image

log = logging.getLogger(__name__)

MIN_TEMPLATE_SPACING_MM = 1.5


def read_label_maps(paths: Sequence, labels: Optional[LabelSet], frame: str,
                    argname: str = "paths") -> Tuple[List[Image], LabelSet]:
    """Read integer label maps as one-hot images ``[K, *S]`` (in ``frame``) with one label set.

    Raises InputError naming the file for a missing file, a non-integer map, a map with no
    labelled voxel, a dimension that differs from the first map's, or values outside ``labels``.
    """
    if len(paths) < 1:
        raise InputError(f"{argname}: give at least one label map")
    arrays = []
    found = set()
    for path in paths:
        array, grid, _ = io.read_array(path, argname)
        if array.ndim != grid.ndim:
            raise InputError(f"{argname}: {path} is not a scalar label map (array shape {array.shape})")
        values = label_values(array, path, argname)
        if arrays and grid.ndim != arrays[0][1].ndim:
            raise InputError(f"{argname}: {path} is {grid.ndim}D but {paths[0]} is {arrays[0][1].ndim}D")
        if labels is not None:
            labels.check_values(sorted(values), path, argname)
        found |= values
        arrays.append((array.astype(np.int64), grid, str(path)))
    labels = labels if labels is not None else LabelSet.from_values(found)
    maps = []
    for array, grid, path in arrays:
        if not np.any(array != labels.values[labels.background_index]):
            raise InputError(f"{argname}: {path} has no labelled voxel (only background)")
        onehot = np.stack([(array == v).astype(np.float32) for v in labels.values])
        grid = _in_axes_frame(grid, array, labels) if frame == "axes" else grid
        maps.append(Image(torch.from_numpy(onehot), grid, f"map {len(maps) + 1}", path))
    return maps, labels


def _foreground_centroid_index(array: np.ndarray, labels: LabelSet) -> np.ndarray:
    """Centroid (continuous ITK index) of the labelled voxels of ``array`` (NumPy axis order)."""
    fg = np.argwhere(array != labels.values[labels.background_index]).astype(np.float64)
    return fg.mean(0)[::-1]


def _axes_frame_matrix(grid: Grid, array: np.ndarray, labels: LabelSet) -> np.ndarray:
    """The rigid map ``[ndim + 1, ndim + 1]`` from world into the label map's heart frame
    (:func:`mvmm.data.anatomy.short_axis_frame`, the same for any storage order) with the anatomy's
    centroid at the origin (during building)."""
    frame = short_axis_frame(grid)
    centroid = (grid.index_to_world_matrix @ np.append(_foreground_centroid_index(array, labels), 1.0))[:-1]
    matrix = np.eye(grid.ndim + 1)
    matrix[:-1, :-1], matrix[:-1, -1] = frame.T, -frame.T @ centroid
    return matrix


def _in_axes_frame(grid: Grid, array: np.ndarray, labels: LabelSet) -> Grid:
    """``grid`` re-expressed in its heart's frame (:func:`_axes_frame_matrix`)."""
    return grid.moved(_axes_frame_matrix(grid, array, labels))


def _foreground_points(image: Image) -> torch.Tensor:
    """World points ``[M, ndim]`` of the labelled voxels (channel 0 is background)."""
    fg = image.data[0] < 0.5
    return image.grid.world_points(dtype=torch.float64)[fg]


def template_grid(maps: Sequence[Image], settings: GroupwiseSettings) -> Grid:
    """A grid, with the frame's axes, over the labelled anatomy of every map plus the margin."""
    ndim = maps[0].grid.ndim
    direction = np.eye(ndim) if settings.frame == "axes" else maps[0].grid.direction_matrix
    along_axes = np.concatenate([_foreground_points(m).numpy() @ direction for m in maps])
    low, high = along_axes.min(0) - settings.margin_mm, along_axes.max(0) + settings.margin_mm
    if settings.spacing is not None:
        spacing = np.broadcast_to(np.asarray(settings.spacing, dtype=np.float64), (ndim,))
    else:  # each map's spacing along the template's axes (its storage order may differ)
        spacing = np.maximum(np.median([spacing_along(direction, m.grid) for m in maps], axis=0),
                             MIN_TEMPLATE_SPACING_MM)
    size = np.ceil((high - low) / spacing).astype(int) + 1
    reference = Grid(tuple(size), tuple(spacing), tuple(np.zeros(ndim)), tuple(direction.ravel()))
    return reference.with_size(size, spacing, direction @ ((low + high) / 2))


def mean_of_maps(maps: Sequence[Image], transforms: Sequence, grid: Grid,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coverage-weighted mean ``[K, *S]`` of the warped one-hot maps and the coverage count ``[*S]``.

    Where no map reaches, the mean is background.
    """
    total, count = None, torch.zeros(grid.shape, device=device)
    with torch.no_grad():
        for image, transform in zip(maps, transforms):
            values, inside = sample_image(image.data.to(device), image.grid, map_grid(transform, grid, device))
            weighted = values * inside
            total = weighted if total is None else total + weighted
            count += inside
    mean = total / count.clamp_min(1)
    mean[0] = torch.where(count > 0, mean[0], torch.ones_like(mean[0]))
    return mean, count


def overlap_with_template(maps: Sequence[Image], transforms: Sequence, grid: Grid, labels: LabelSet,
                          mean: torch.Tensor, device=None) -> Dict[str, float]:
    """Mean Dice, per structure, between each warped map and the template ``mean [K, *S]`` (both argmax)."""
    template = mean.argmax(0)
    scores = {name: [] for i, name in enumerate(labels.names) if i != labels.background_index}
    with torch.no_grad():
        for image, transform in zip(maps, transforms):
            values, inside = sample_image(image.data.to(device), image.grid, map_grid(transform, grid, device))
            warped = values.argmax(0)
            for k, name in enumerate(labels.names):
                if k == labels.background_index:
                    continue
                a, b = (warped == k) & inside, (template == k) & inside
                denominator = int(a.sum() + b.sum())
                if denominator:
                    scores[name].append(2.0 * int((a & b).sum()) / denominator)
    return {name: float(np.mean(v)) if v else float("nan") for name, v in scores.items()}


def _affine_about(matrix: torch.Tensor, centre: np.ndarray) -> AffineTransform:
    """The affine map of homogeneous ``matrix`` as an AffineTransform about ``centre``."""
    n = matrix.shape[0] - 1
    a, b = matrix[:n, :n], matrix[:n, n]
    c = torch.as_tensor(centre, dtype=matrix.dtype)
    params = torch.cat([(a - torch.eye(n, dtype=a.dtype)).reshape(-1), a @ c + b - c])
    return AffineTransform(n, params=params.detach().clone(), center=centre)


def _remove_mean_linear(linear: List[LinearTransform], kind: str, centre: np.ndarray) -> List[LinearTransform]:
    """Compose every transform with the inverse of the group's mean, so the template stays at the mean.

    Affine: the mean of the homogeneous matrices is removed exactly. Rigid: only the mean
    translation (a rigid map composed with a mean of rotations would not stay rigid).
    """
    if kind == "affine":
        mean = torch.stack([t.affine().detach().cpu().double() for t in linear]).mean(0)
        inverse = torch.linalg.inv(mean)
        return [_affine_about(t.affine().detach().cpu().double() @ inverse, centre) for t in linear]
    out = []
    mean_shift = torch.stack([t.params.detach().cpu().double()[-t.ndim:] for t in linear]).mean(0)
    for t in linear:
        rotation, _ = t.matrix_and_translation()
        params = t.params.detach().cpu().double().clone()
        params[-t.ndim:] -= rotation.detach().cpu().double() @ mean_shift
        out.append(RigidTransform(t.ndim, params=params, center=t.center))
    return out


def _remove_mean_deformation(deformations: List[BSplineTransform]) -> List[BSplineTransform]:
    """Subtract the mean spline coefficients (control-point displacements of an FFD, velocities of an
    SVF; to first order, composing with the inverse of the mean deformation)."""
    mean = torch.stack([f.params.detach() for f in deformations]).mean(0)
    return [f.with_params((f.params.detach() - mean).clone()) for f in deformations]


def _placement(original: Grid, moved: Grid) -> np.ndarray:
    """The rigid map ``[ndim + 1, ndim + 1]`` that took ``original``'s voxels to ``moved``'s (``Grid.moved``)."""
    return moved.index_to_world_matrix @ np.linalg.inv(original.index_to_world_matrix)


def mean_templates(images: Mapping[str, Sequence[Optional[str]]], maps: Sequence[Image], transforms: Sequence,
                   grid: Grid, mean: torch.Tensor, labels: LabelSet, device=None,
                   argname: str = "images") -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Mean intensity template ``[*S]`` per sequence, through the label maps' group-wise transforms.

    ``images[seq][i]`` is the image of sequence ``seq`` of the subject of label map ``i`` (None where
    that subject has none), in its scanner world: it goes into the map's frame as the map did, then
    through the map's transform onto ``grid``. Each image is normalised robustly where it covers the
    template's labelled anatomy (``mean``'s foreground above one half): minus its median there, over
    the spread between the 5th and 95th percentiles — scanners and sequences differ in units and
    gain, not in how the anatomy's contrasts are ordered. The template is the coverage-weighted mean
    of the normalised images (0, the median, where none reaches).

    Returns the templates and how many images went into each.
    """
    anatomy = (1.0 - mean[labels.background_index]) > 0.5
    templates, counts = {}, {}
    for sequence, paths in images.items():
        if len(paths) != len(maps):
            raise InputError(f"{argname}: {len(paths)} {sequence} images for {len(maps)} label maps; give one per "
                             f"label map, in the same order")
        total = torch.zeros(grid.shape, device=device)
        count = torch.zeros(grid.shape, device=device)
        used = 0
        for path, label_map, transform in zip(paths, maps, transforms):
            if path is None:
                continue
            image = Image.read(path, sequence, argname)
            image.check_intensities(argname)
            if image.grid.ndim != grid.ndim:
                raise InputError(f"{argname}: {path} is {image.grid.ndim}D but the label maps are {grid.ndim}D")
            placed = image.grid.moved(_placement(io.read_grid(label_map.source, argname), label_map.grid))
            with torch.no_grad():
                values, inside = sample_image(image.data.to(device), placed, map_grid(transform, grid, device))
            region = inside & anatomy.to(inside.device)
            if int(region.sum()) < 10:
                log.warning("%s image %s does not cover the labelled anatomy of its label map %s: left out of the "
                            "template", sequence, path, label_map.source)
                continue
            low, middle, high = torch.quantile(values[0][region].float(), torch.tensor([0.05, 0.5, 0.95],
                                                                                      device=values.device))
            normalised = (values[0] - middle) / max(float(high - low), 1e-6)
            total += normalised * inside
            count += inside
            used += 1
        if used == 0:
            raise InputError(f"{argname}: no {sequence} image covers the anatomy of its label map")
        templates[sequence] = (total / count.clamp_min(1)).cpu()
        counts[sequence] = used
    return templates, counts


def _smoothed(mean: torch.Tensor, grid: Grid, sigma_mm: float) -> torch.Tensor:
    if sigma_mm <= 0:
        return mean
    sigma_vox = [sigma_mm / s for s in reversed(grid.spacing)]
    array = mean.cpu().numpy()
    smooth = np.stack([ndimage.gaussian_filter(channel, sigma_vox, mode="nearest") for channel in array])
    smooth /= np.clip(smooth.sum(0, keepdims=True), 1e-12, None)
    return torch.from_numpy(smooth.astype(np.float32))


def build_atlas(paths: Sequence, settings: GroupwiseSettings, labels: Optional[LabelSet] = None, device=None,
                progress: bool = False, images: Optional[Mapping[str, Sequence[Optional[str]]]] = None
                ) -> Tuple[Atlas, dict]:
    """Build a probabilistic atlas from label maps (any grids), registering them group-wise.

    With ``images`` (``{sequence: [image of map 1's subject, ...]}``, None for a subject without that
    sequence), the atlas also carries a mean intensity template per sequence
    (:func:`mean_templates`), on its grid: the images follow their label map's transforms.

    Returns
    -------
    atlas : Atlas
        On the template grid, in ``settings.frame``.
    report : dict
        Settings, the inputs, and the mean Dice of the maps with the template (per structure)
        at the initial (centroid) placement and at the end.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    for sequence, sequence_paths in (images or {}).items():  # fail now, not after the registration
        if len(sequence_paths) != len(paths):
            raise InputError(f"images: {len(sequence_paths)} {sequence} images for {len(paths)} label maps; give "
                             f"one per label map, in the same order")
    maps, labels = read_label_maps(paths, labels, settings.frame)
    grid = template_grid(maps, settings)
    centre = grid.center_world()
    # maps start where their frame puts them: the headers (world), or centroids on the origin (axes)
    linear: List[LinearTransform] = [RigidTransform(grid.ndim, center=centre) for _ in maps]
    deformations: List[Optional[BSplineTransform]] = [None] * len(maps)

    def transforms():
        return [SequentialTransform(f, t) if f is not None else t for f, t in zip(deformations, linear)]

    before = overlap_with_template(maps, transforms(), grid, labels, mean_of_maps(maps, transforms(), grid, device)[0],
                                   device)
    pairwise = settings.pairwise()
    levels = pairwise.levels() if settings.register != "none" else []
    bar = tqdm(total=len(levels) * settings.rounds * len(maps), desc="group-wise registration", unit="map",
               disable=not progress, leave=False)
    linear_mean = None  # the mean before the first non-linear level: the atlas's coarse stage
    for level in levels:
        for _ in range(settings.rounds):
            mean, count = mean_of_maps(maps, transforms(), grid, device)
            if level.control_spacing is not None and linear_mean is None:
                linear_mean = mean
            template = Image(mean, grid, "template")
            covered = Image((count > 0).float().unsqueeze(0), grid, "template coverage")
            for i, image in enumerate(maps):
                registration = PairwiseRegistration(template, image, pairwise, fixed_mask=covered, device=device,
                                                    linear=linear[i], deformation=deformations[i])
                registration.run_level(level)
                linear[i], deformations[i] = registration.linear, registration.deformation
                bar.update(1)
            kind = level.kinds["moving"]
            if level.control_spacing is not None:
                deformations = _remove_mean_deformation(deformations)
            else:
                linear = _remove_mean_linear(linear, kind, centre)
        log.info("group-wise level %s done", level.name)
    bar.close()
    mean, _ = mean_of_maps(maps, transforms(), grid, device)
    after = overlap_with_template(maps, transforms(), grid, labels, mean, device)
    report = {"settings": asdict(settings), "inputs": [str(p) for p in paths],
              "dice_with_template": {"initial": before, "final": after}}
    probabilities = _smoothed(mean, grid, settings.sigma_mm)
    templates = {}
    if images:
        templates, used = mean_templates(images, maps, transforms(), grid, mean, labels, device)
        report["templates"] = {sequence: {"images": used[sequence], "inputs": [str(p) if p else None for p in ps]}
                               for sequence, ps in images.items()}
    source = f"group-wise ({settings.register}) mean of {len(maps)} label maps"
    if any(f is not None for f in deformations):
        # each map's deformation, checked for folding as the pairwise and joint solvers check theirs
        jacobians = [jacobian_statistics(f, grid, device=device) for f in deformations]
        for path, stats in zip(paths, jacobians):
            warn_if_folded(stats, f"the group-wise {settings.register.upper()} of {path}")
        report["ffd_jacobians"] = jacobians
    if settings.frame == "axes":
        # Where the anatomy sits in its field of view, on average over the maps (in an axes map the
        # anatomy's centroid is the origin, so its FoV centre is at −offset): the frame's origin is
        # moved to that mean FoV centre, and placing the atlas on a target's FoV centre puts the
        # anatomy where it usually is in such images (e.g. towards the base of a short-axis stack).
        offset = -np.mean([m.grid.center_world() for m in maps], axis=0)
        grid = Grid(grid.size, grid.spacing, tuple(np.asarray(grid.origin) + offset), grid.direction)
        report["anatomy_offset_from_fov_centre_mm"] = offset.tolist()
    report["grid"] = grid.to_dict()
    coarse = _smoothed(linear_mean, grid, settings.sigma_mm) if linear_mean is not None else None
    atlas = Atlas(probabilities, grid, labels, source, settings.frame, templates, coarse)
    return atlas, report
