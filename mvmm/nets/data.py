"""Subjects as a network sees them: each case resampled once onto its *network grid*.

The network grid of a case has a fixed size and spacing (:class:`~mvmm.core.settings.BayesNetSettings`),
the axes of the heart's frame of its reference image (:func:`mvmm.data.anatomy.short_axis_frame`:
the same for any storage order of the file) and its centre at the reference's field-of-view centre —
the crops networks are trained on are centred on the heart. On a scan much wider than the grid (an
uncropped one, :meth:`mvmm.core.grid.Grid.much_wider_than`) the grid moves with the atlas's start as
the classical path finds it (:func:`mvmm.amortized.network_start`: the atlas's intensity template
over the field of view, then the likelihood's local search).
Every case's network grid is therefore the same array layout, related to the others by a rigid map,
and a network can work in the *canonical* copy of that grid (origin at its centre, identity axes):
a velocity field predicted there, in the grid's axes, is rotated onto a case's world by
:func:`world_velocity`.

On that grid a case is (all float32 unless said):

- images ``[N, *S]``, each normalised, ``(x − median) / (p95 − p5)``, over its own voxels near the
  heart (:func:`normalised`; 0 where the image does not cover);
- coverage ``[N, *S]`` bool (hetero-coverage: an input of the network and a term of the likelihood);
- prior ``[K, *S]``: the atlas as the classical path places it before any registration (heart frame
  and field-of-view centre, :func:`mvmm.spatial.init.initial_linear_transform`; on a much wider
  scan, where the search put it);
- region ``[*S]`` bool: within ``roi_margin_mm`` of that prior's foreground, where the loss counts.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mvmm.core.errors import InputError
from mvmm.core.grid import Grid
from mvmm.core.settings import NetworkSettings, RegistrationSettings
from mvmm.data.anatomy import short_axis_frame
from mvmm.data.image import Image
from mvmm.data.labels import LabelSet
from mvmm.data.manifest import Manifest, scan
from mvmm.data.roi import atlas_roi
from mvmm.data.subject import Subject
from mvmm.spatial.init import initial_linear_transform
from mvmm.spatial.transforms import LinearTransform

log = logging.getLogger(__name__)

NORMALISATION = ("per image: (x - median) / (p95 - p5) over the image's own voxels (those on the network grid "
                 "for an image much wider than it)")
_PERCENTILE_SAMPLE = 1 << 20  # voxels read for the percentiles of a large image (a fixed stride: deterministic)


def intensity_normalisation(values: torch.Tensor) -> Tuple[float, float]:
    """``(offset, scale)`` with which intensities become ``(x − offset) / scale``: the median and the
    5–95th percentile spread of ``values`` (any shape; robust to units and to outliers)."""
    values = values.reshape(-1)
    stride = max(1, values.numel() // _PERCENTILE_SAMPLE)
    values = values[::stride].double().cpu().numpy()
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    scale = float(p95 - p5)
    if not scale > 0:
        scale = float(values.std()) or 1.0
    return float(p50), scale


def normalised(images: Sequence[Image], values: torch.Tensor, coverage: torch.Tensor, grid: Grid):
    """``values [N, *S]`` (the N ``images`` sampled on the network ``grid``) normalised per image by
    :func:`intensity_normalisation`, 0 where uncovered (float32); and the offsets, scales ``[N]`` (float64).

    The statistics are of the image's voxels around the heart: all of the file's for an image about
    the grid's size (the crops networks are trained on), and its covered voxels on ``grid`` for one
    much wider (an uncropped scan, mostly air, chest wall and zero-filled corners — its file's
    statistics would not be the crop's).
    """
    norms = [intensity_normalisation(values[i][coverage[i]] if image.grid.much_wider_than(grid)
                                     and bool(coverage[i].any()) else image.data[0])
             for i, image in enumerate(images)]
    offsets = torch.tensor([n[0] for n in norms], dtype=torch.float64)
    scales = torch.tensor([n[1] for n in norms], dtype=torch.float64)
    shape = (-1,) + (1,) * (values.dim() - 1)
    scaled = (values.double() - offsets.reshape(shape).to(values.device)) / scales.reshape(shape).to(values.device)
    return torch.where(coverage, scaled, torch.zeros_like(scaled)).float(), offsets, scales


def network_grid(reference: Grid, settings: NetworkSettings, center=None) -> Grid:
    """The network grid of a case whose reference image is on ``reference`` (see the module notes),
    centred on world point ``center`` (default: the reference's field-of-view centre)."""
    frame = short_axis_frame(reference)
    axes = Grid(tuple(settings.grid_size), tuple(settings.grid_spacing), (0.0,) * reference.ndim,
                tuple(frame.ravel()))
    return axes.with_size(settings.grid_size, settings.grid_spacing,
                          reference.center_world() if center is None else tuple(float(c) for c in center))


def canonical_grid(settings: NetworkSettings) -> Grid:
    """The network grid with its centre at the origin and identity axes (shared by every case)."""
    ndim = len(settings.grid_size)
    identity = Grid(tuple(settings.grid_size), tuple(settings.grid_spacing), (0.0,) * ndim,
                    tuple(np.eye(ndim).ravel()))
    return identity.with_size(settings.grid_size, settings.grid_spacing, (0.0,) * ndim)


def world_velocity(coefficients: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Velocity coefficients ``[(B,) ndim, *control]`` in the canonical grid's axes, as world vectors
    for a case whose network grid is ``grid`` (its axes are the columns of the direction matrix)."""
    rotation = torch.as_tensor(grid.direction_matrix, dtype=coefficients.dtype, device=coefficients.device)
    channels = -len(grid.shape) - 1
    return torch.movedim(torch.movedim(coefficients, channels, -1) @ rotation.T, -1, channels)


@dataclass
class NetworkCase:
    """One subject on its network grid (see the module notes for the tensors).

    ``prior`` and ``placement`` are None for a case without an atlas (the Chan–Vese network may go
    without); ``labels`` ``[*S]`` int64 holds the class index of each voxel of a labelled training case
    (−1: unknown or outside the label map) and −1 everywhere for an unlabelled one (None when the
    network takes no labels).
    """

    name: str
    images: torch.Tensor
    coverage: torch.Tensor
    prior: Optional[torch.Tensor]
    region: torch.Tensor
    grid: Grid
    offsets: torch.Tensor  # [N] float64: x = offset + scale · normalised
    scales: torch.Tensor  # [N] float64
    placement: Optional[LinearTransform]  # the atlas's rigid start, common space → atlas
    labels: Optional[torch.Tensor] = None
    fov_search: Optional[dict] = None  # how the template search placed a much wider scan's grid (None: not searched)

    @property
    def fields(self) -> Tuple[str, ...]:
        """What a batch stacks (:func:`stack_cases`)."""
        return tuple(f for f in ("images", "coverage", "prior", "region", "labels") if getattr(self, f) is not None)


def atlas_placement(subject: Subject) -> LinearTransform:
    """The atlas's start as the classical path makes it (:class:`~mvmm.core.settings.RegistrationSettings`'
    ``atlas_init``), fixed: the network learns what follows."""
    placement = initial_linear_transform("rigid", subject.reference_image.grid, subject.atlas.grid,
                                         RegistrationSettings().atlas_init)
    placement.requires_grad_(False)
    return placement


def _warn_if_uncropped(reference: Image, grid: Grid) -> None:
    """Warn when the reference's field of view is much wider than the network grid, which sits at its
    centre (no start was found for it: see :func:`prepare_case`)."""
    if reference.grid.much_wider_than(grid):
        log.warning("%s: its field of view (%s mm) is much wider than the network grid (%s mm), which sits at its "
                    "centre: the heart was not searched for (that needs an atlas with an intensity template of "
                    "the case's sequences); crop the images around the heart first, or use the classical path (no "
                    "model), which finds it", reference.source,
                    " x ".join(f"{e:.0f}" for e in reference.grid.extent_mm()),
                    " x ".join(f"{e:.0f}" for e in grid.extent_mm()))


def content_shift(before: LinearTransform, after: LinearTransform, atlas_grid: Grid) -> np.ndarray:
    """World translation (mm, shape ``(ndim,)``) by which the atlas's centre moves on the image when its
    placement (common space → atlas) changes from ``before`` to ``after``."""
    centre = torch.as_tensor(atlas_grid.center_world(), dtype=torch.float64)[None]
    with torch.no_grad():  # each transform where its parameters are (the device may differ)
        at = [t.inverse()(centre.to(device=t.params.device, dtype=t.params.dtype))[0].cpu().double()
              for t in (before, after)]
    return (at[1] - at[0]).numpy()


def prepare_case(subject: Subject, settings: NetworkSettings, device=None, require_atlas: bool = True,
                 start: Optional[LinearTransform] = None, fov_search: Optional[dict] = None) -> NetworkCase:
    """Resample ``subject`` onto its network grid, normalised; see the module notes.

    With an atlas, it is placed as the classical path places it before any search and the region is
    within ``settings.roi_margin_mm`` of its foreground; without one (``require_atlas=False``), the
    region is wherever an image covers the grid. ``start``: the atlas's placement found for a scan much
    wider than the grid (:func:`mvmm.amortized.network_start`); the grid moves with the atlas, as a
    crop is centred on the heart, and ``fov_search`` (how it was found) is kept with the case.
    """
    if subject.atlas is None and require_atlas:
        raise InputError("atlas: the Bayesian segmentation network needs an atlas (its prior is warped)")
    reference = subject.reference_image.grid
    grid = network_grid(reference, settings)
    placement = atlas_placement(subject) if subject.atlas is not None else None
    if start is not None and placement is not None:
        grid = network_grid(reference, settings,
                            reference.center_world() + content_shift(placement, start, subject.atlas.grid))
        placement = start.requires_grad_(False)
    else:
        _warn_if_uncropped(subject.reference_image, grid)
        fov_search = None
    placed = subject if placement is None else replace(subject, transforms={**subject.transforms, "atlas": placement},
                                                        roi_margin_mm=None)
    with torch.no_grad():
        sample = placed.sample(grid, device, check=True)
    images, offsets, scales = normalised(subject.images, sample.images, sample.coverage, grid)
    region = sample.coverage.any(0)
    if placement is not None:
        region = atlas_roi(sample.prior, subject.atlas.labels.background_index, tuple(reversed(grid.spacing)),
                           settings.roi_margin_mm) & region
        if not bool(region.any()):
            raise InputError(f"images: no voxel of {subject.reference} covered by the images lies within "
                             f"{settings.roi_margin_mm:g} mm of the atlas foreground ({subject.atlas.source})")
    prior = sample.prior.float() if sample.prior is not None else None
    return NetworkCase(subject.reference_image.source, images, sample.coverage, prior, region, grid,
                       offsets, scales, placement, fov_search=fov_search)


def case_labels(label_image: Image, grid: Grid, labels: LabelSet, argname: str = "labels") -> torch.Tensor:
    """A label map sampled (nearest) on a network grid as class indices ``[*S]`` int64 (−1 outside it).

    Raises InputError naming ``argname`` for values ``labels`` does not have.
    """
    return class_indices(label_image, grid, {v: k for k, v in enumerate(labels.values)}, argname,
                         f"are not in the label set {labels.as_dict()}")


def class_indices(label_image: Image, grid: Grid, index_of: Dict[int, int], argname: str, unknown_is: str) -> torch.Tensor:
    """``label_image`` sampled (nearest) on ``grid`` as class indices ``[*S]`` int64 by ``index_of``
    (value → index), −1 outside the map; a value of the map that ``index_of`` lacks is an InputError
    naming ``argname`` (``unknown_is``: what such values are, for the message)."""
    unknown = sorted(set(int(v) for v in torch.unique(label_image.data[0].round().long())) - set(index_of))
    if unknown:
        raise InputError(f"{argname}: {label_image.source} has label values {unknown} that {unknown_is}")
    with torch.no_grad():
        values, inside = label_image.sample(grid.world_points(), mode="nearest")
    values = values[0].round().long()
    index = torch.full_like(values, -1)
    for value, k in index_of.items():
        index[(values == value) & inside] = k
    return index


@dataclass
class LabelCase:
    """A label map on its prior grid (the network grid centred on the map's foreground): ``labels``
    ``[*S]`` int64 class indices, −1 outside the map."""

    name: str
    labels: torch.Tensor
    grid: Grid

    fields = ("labels",)


def label_frame_grid(label_image: Image, settings: NetworkSettings) -> Grid:
    """The network grid of a label map, centred on its foreground's centroid (not its field of view's)."""
    axes = network_grid(label_image.grid, settings)
    values = label_image.data[0]
    foreground = values.round() != 0
    if not bool(foreground.any()):
        raise InputError(f"labels: {label_image.source} has no foreground label")
    centre = label_image.grid.world_points(dtype=torch.float64)[foreground.to("cpu")].mean(0)
    return axes.with_size(settings.grid_size, settings.grid_spacing, centre.tolist())


def prepare_label_case(label_image: Image, settings: NetworkSettings, index_of: Dict[int, int]) -> LabelCase:
    """A label map on its prior grid, its values turned into class indices by ``index_of``
    (value → index; every value of the map must be there, 0 is the background's)."""
    grid = label_frame_grid(label_image, settings)
    index = class_indices(label_image, grid, index_of, "label_names", f"no name maps (named: {sorted(index_of)})")
    return LabelCase(label_image.source, index, grid)


@dataclass
class PairCase:
    """A fixed and a moving image on the fixed image's network grid, placed by their headers.

    ``images [2, *S]`` (fixed, moving; normalised, 0 where uncovered), ``coverage [2, *S]`` bool.
    """

    name: str
    images: torch.Tensor
    coverage: torch.Tensor
    grid: Grid

    fields = ("images", "coverage")


def prepare_pair(fixed: Image, moving: Image, settings: NetworkSettings, device=None) -> PairCase:
    """Resample a pair onto the fixed image's network grid (headers only), each image normalised."""
    grid = network_grid(fixed.grid, settings)
    with torch.no_grad():
        sample = Subject([fixed, moving]).sample(grid, device, check=True)
    images, _, _ = normalised([fixed, moving], sample.images, sample.coverage, grid)
    return PairCase(moving.source, images, sample.coverage, grid)


def stack_cases(cases: Sequence) -> Dict[str, torch.Tensor]:
    """A batch of the cases' ``fields``: e.g. ``images``, ``coverage`` ``[B, N, *S]``, ``prior``
    ``[B, K, *S]``, ``region`` ``[B, *S]`` of :class:`NetworkCase`."""
    return {name: torch.stack([getattr(c, name) for c in cases]) for name in cases[0].fields}


# ---------------------------------------------------------------------------- augmentation
def augment(batch: Dict[str, torch.Tensor], grid: Grid, rotation_deg: float, shift_mm: float, scale: float,
            generator: torch.Generator, moving: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """Random intensity change per image and a random motion of the images (not of the prior).

    ``moving``: the image channels that move (default: all; a registration network moves only its
    moving image, so that the pair is misaligned by a known kind of motion).

    Intensities: ``a x + b`` with ``a ∈ [0.9, 1.1]``, ``b ∈ [−0.05, 0.05]`` (normalised units). Motion:
    rotation about the last (stack) axis by ±``rotation_deg``, scaling in that plane by ±``scale``,
    a shift of ±``shift_mm`` along each axis (a third of it through the stack), about the grid's
    centre; images linearly, coverage by nearest neighbour (so hetero-coverage moves with its image).
    """
    if "images" not in batch:  # label maps alone (the prior VAE): the motion only
        return {**batch, "labels": moved_labels(batch["labels"], random_flow(batch["labels"].shape[0], grid,
                                                rotation_deg, shift_mm, scale, generator, batch["labels"].device))}
    images, coverage = batch["images"], batch["coverage"]
    b, n, ndim = images.shape[0], images.shape[1], grid.ndim
    dev = images.device

    def uniform(*shape):
        return torch.rand(shape, generator=generator).to(dev) * 2 - 1

    gain, bias = 1 + 0.1 * uniform(b, n), 0.05 * uniform(b, n)
    shape = (b, n) + (1,) * ndim
    images = torch.where(coverage, images * gain.reshape(shape) + bias.reshape(shape), torch.zeros_like(images))
    flow = random_flow(b, grid, rotation_deg, shift_mm, scale, generator, dev)
    moved = F.grid_sample(images, flow, mode="bilinear", padding_mode="zeros", align_corners=True)
    covered = F.grid_sample(coverage.float(), flow, mode="nearest", padding_mode="zeros", align_corners=True) > 0.5
    moved = torch.where(covered, moved, torch.zeros_like(moved))
    out = {"labels": moved_labels(batch["labels"], flow)} if "labels" in batch else {}  # with their images
    if moving is not None:
        keep = torch.ones(n, dtype=torch.bool, device=dev)
        keep[list(moving)] = False
        shape = (1, n) + (1,) * ndim
        moved = torch.where(keep.reshape(shape), images, moved)
        covered = torch.where(keep.reshape(shape), coverage, covered)
    return {**batch, "images": moved, "coverage": covered, **out}


def random_flow(b: int, grid: Grid, rotation_deg: float, shift_mm: float, scale: float,
                generator: torch.Generator, device) -> torch.Tensor:
    """A random rigid-plus-scale motion per case (see :func:`augment`) as grid_sample's sampling
    grid ``[B, *S, ndim]`` on ``grid``'s array layout."""
    ndim = grid.ndim

    def uniform(*shape):
        return torch.rand(shape, generator=generator).to(device) * 2 - 1

    angle = uniform(b) * math.radians(rotation_deg)
    zoom = 1 + scale * uniform(b)
    matrix = torch.eye(ndim, device=device).repeat(b, 1, 1)
    c, s = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1] = c, -s, s, c
    shift = uniform(b, ndim) * shift_mm
    if ndim == 3:
        shift[:, 2] /= 3
    half = torch.as_tensor([(sz - 1) * sp / 2 for sz, sp in zip(grid.size, grid.spacing)], device=device)
    # a map of mm about the centre, in grid_sample's normalised coordinates: H⁻¹ A H, shift / H
    theta = torch.cat([matrix * half.reshape(1, 1, ndim) / half.reshape(1, ndim, 1),
                       (shift / half).unsqueeze(-1)], dim=-1)
    return F.affine_grid(theta, (b, 1) + tuple(reversed(grid.size)), align_corners=True)


def moved_labels(labels: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Class indices ``[B, *S]`` (−1 unknown) moved by ``flow`` (nearest; outside becomes unknown)."""
    shifted = (labels + 1).unsqueeze(1).float()
    return F.grid_sample(shifted, flow, mode="nearest", padding_mode="zeros", align_corners=True)[:, 0].round().long() - 1


# ---------------------------------------------------------------------------- subject tables
@dataclass
class SubjectRow:
    """One training subject: its name, one image path per sequence and, optionally, its label map
    (on the first sequence's grid or anywhere the headers place it)."""

    name: str
    images: Dict[str, Path]
    labels: Optional[Path] = None


def subjects_from_csv(path, sequences: Sequence[str]) -> List[SubjectRow]:
    """Rows of a CSV with a ``subject`` column and one column per sequence (image paths, relative to
    the CSV's folder or absolute); a subject with an empty cell for one of ``sequences`` is an error.
    An optional ``labels`` column gives label maps (read only for the subjects a training command is
    told are labelled)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise InputError(f"data: cannot read {path} as a CSV ({err})") from None
    if not rows:
        raise InputError(f"data: {path} has no rows")
    header = {name.strip().lower(): name for name in rows[0]}
    missing = [s for s in ["subject"] + list(sequences) if s.lower() not in header]
    if missing:
        raise InputError(f"data: {path} has no column {', '.join(missing)} (columns: {', '.join(rows[0])})")
    out = []
    for line, row in enumerate(rows, start=2):
        images = {}
        for sequence in sequences:
            cell = (row[header[sequence.lower()]] or "").strip()
            if not cell:
                raise InputError(f"data: {path} line {line}: no {sequence} image for subject {row[header['subject']]!r}")
            image = Path(cell)
            images[sequence] = image if image.is_absolute() else path.parent / image
        labels = (row[header["labels"]] or "").strip() if "labels" in header else ""
        label_path = None if not labels else (Path(labels) if Path(labels).is_absolute() else path.parent / labels)
        out.append(SubjectRow(row[header["subject"]].strip(), images, label_path))
    return out


def subjects_from_manifest(manifest_name: str, data, patients: Optional[Sequence[int]],
                           sequences: Sequence[str], labelled: Sequence[int] = ()) -> List[SubjectRow]:
    """Subjects of a described data set (e.g. ``mscmr19``) in folder ``data`` that have every sequence;
    the patients in ``labelled`` also with the manual labels of the first sequence (which must be there)."""
    manifest = Manifest.load(manifest_name)
    canonical = [manifest.canonical_sequence(s) for s in sequences]
    found = scan(manifest, data, patients, canonical, [])
    if labelled:
        checked = scan(manifest, data, list(labelled), canonical[:1], canonical[:1])
        if checked.problems:
            raise InputError("labelled_patients: " + "; ".join(checked.problems[:5]))
    if found.problems:
        raise InputError("data: " + "; ".join(found.problems[:5])
                         + (f" (and {len(found.problems) - 5} more)" if len(found.problems) > 5 else ""))
    wanted = set(patients) if patients is not None else set(found.patients)
    outside = sorted(set(labelled) - wanted)
    if outside:
        raise InputError(f"labelled_patients: {outside} are not among the training patients "
                         f"({sorted(wanted)}): a labelled case is a training case whose labels are also read")
    return [SubjectRow(f"patient{n}", {s: f.images[c] for s, c in zip(sequences, canonical)},
                       checked.patients[n].labels[canonical[0]] if n in set(labelled) else None)
            for n, f in sorted(found.patients.items()) if n in wanted]
