"""Probabilistic atlases: K tissue-probability maps on a grid, with the user's label values.

An atlas is read from a probability image (K maps, one more axis than the images), built from one
or more integer label maps (one-hot, Gaussian smoothing in mm, averaged over maps), or made by
``Atlas.builtin_cardiac`` — a smooth short-axis heart placed at the centre of a reference grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from mvmm.data import io
from mvmm.data.anatomy import extent_along, short_axis_frame, spacing_along
from mvmm.core.grid import Grid
from mvmm.data.labels import CARDIAC_LABELS, LabelSet, label_values
from mvmm.core.errors import InputError
from mvmm.core.settings import BUILTIN_CARDIAC, DEFAULT_SIGMA_MM, FRAMES  # noqa: F401 (re-exported)
from mvmm.core.outputs import write_json
from mvmm.spatial.warp import sample_image



@dataclass
class Atlas:
    """A probabilistic atlas.

    Attributes
    ----------
    probabilities : torch.Tensor, shape [K, *grid.shape]
        Tissue probabilities; they sum to one over K at every voxel.
    grid : Grid
        Geometry of the maps.
    labels : LabelSet
        Name and label value of each of the K classes, in the order of the maps.
    source : str
        Where it came from, for messages and reports.
    frame : {"world", "axes"}
        ``"world"``: the grid's header places the atlas in scanner space. ``"axes"``: the atlas
        lives in a subject-independent frame (identity direction, origin at the centre of its
        anatomy), as group-wise building in image axes makes it; :meth:`placed_on` puts it on a
        target's axes and field-of-view centre.
    templates : dict of str to torch.Tensor, each of shape [*grid.shape]
        Mean intensity template per sequence (e.g. ``"LGE"``, ``"C0"``), robustly normalised, on the
        atlas grid (:func:`mvmm.atlas_build.mean_templates`); empty for a label-only atlas.
    coarse : torch.Tensor, shape [K, *grid.shape], optional
        The same atlas before its non-linear group-wise levels (the mean of the linearly aligned
        maps, :func:`mvmm.atlas_build.build_atlas`): blurrier, so its likelihood has a wider basin.
        The joint solver's start search and coarse levels place this one, its full-resolution level
        the sharp ``probabilities`` (:meth:`coarse_stage`). None: one atlas throughout.
    """

    probabilities: torch.Tensor
    grid: Grid
    labels: LabelSet
    source: str = "<memory>"
    frame: str = "world"
    templates: Dict[str, torch.Tensor] = field(default_factory=dict)
    coarse: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.frame not in FRAMES:
            raise InputError(f"atlas {self.source}: frame must be one of {FRAMES}, got {self.frame!r}")
        for sequence, template in self.templates.items():
            if tuple(template.shape) != self.grid.shape:
                raise InputError(f"atlas {self.source}: the {sequence} template has shape {list(template.shape)}, "
                                 f"not the atlas grid's {list(self.grid.shape)}")
        if self.probabilities.shape[0] != len(self.labels):
            raise InputError(f"atlas {self.source}: {self.probabilities.shape[0]} probability maps "
                             f"for {len(self.labels)} labels {self.labels.as_dict()}")
        if self.coarse is not None and tuple(self.coarse.shape) != tuple(self.probabilities.shape):
            raise InputError(f"atlas {self.source}: its coarse stage has shape {list(self.coarse.shape)}, not the "
                             f"probabilities' {list(self.probabilities.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_label_maps(cls, maps: Sequence[np.ndarray], grid: Grid, labels: Optional[LabelSet] = None,
                        sigma_mm: float = DEFAULT_SIGMA_MM, source: str = "<memory>",
                        argname: str = "atlas") -> "Atlas":
        """Average of one-hot label maps, each smoothed by a Gaussian of ``sigma_mm``.

        Parameters
        ----------
        maps : sequence of np.ndarray, each of shape [*grid.shape]
            Integer label maps, already in one space (on ``grid``).
        labels : LabelSet, optional
            Expected classes; the values found in ``maps`` must be exactly these. Default: the values
            found (named as the built-in cardiac set when they are 0/200/500/600).
        sigma_mm : float
            Standard deviation of the smoothing, in mm (0 for none); anisotropic spacing is honoured.
        """
        if sigma_mm < 0 or not np.isfinite(sigma_mm):
            raise InputError(f"sigma_mm: must be a finite number >= 0, got {sigma_mm}")
        found = set()
        for m in maps:
            found |= label_values(m, source, argname)
        if labels is None:
            labels = LabelSet.from_values(found)
        else:
            labels.check_values(sorted(found), source, argname)
        sigma_vox = [sigma_mm / s for s in reversed(grid.spacing)]
        total = np.zeros((len(labels),) + grid.shape, dtype=np.float32)
        for m in maps:
            for k, value in enumerate(labels.values):
                onehot = (m == value).astype(np.float32)
                total[k] += ndimage.gaussian_filter(onehot, sigma_vox, mode="nearest") if sigma_mm > 0 else onehot
        total /= np.clip(total.sum(axis=0, keepdims=True), 1e-12, None)
        return cls(torch.from_numpy(total), grid, labels, source)

    @classmethod
    def read(cls, paths: Sequence[str], image_ndim: Optional[int] = None, labels: Optional[LabelSet] = None,
             sigma_mm: float = DEFAULT_SIGMA_MM, argname: str = "atlas") -> "Atlas":
        """Read a probability atlas (one file) or label maps (one or more files on one grid).

        A file with one more axis than the images (or several components) is a probability atlas;
        its label values come from the JSON sidecar written by :meth:`save`, else from ``labels``.
        """
        paths = [Path(p) for p in paths]
        arrays = [_as_saved(p, *io.read_array(p, argname)) for p in paths]
        is_prob = [a.ndim == g.ndim + 1 for a, g, _ in arrays]
        for p, (_, g, _) in zip(paths, arrays):
            if image_ndim is not None and g.ndim != image_ndim:
                raise InputError(f"{argname}: {p} is {g.ndim}D but the images are {image_ndim}D")
        if any(is_prob):
            if len(paths) != 1:
                raise InputError(f"{argname}: give one probability atlas or several label maps, not both")
            return cls._from_probability_array(arrays[0][0], arrays[0][1], paths[0], labels, argname)
        grid = arrays[0][1]
        for p, (_, g, _) in zip(paths[1:], arrays[1:]):
            if not g.same_geometry(grid):
                raise InputError(f"{argname}: label map {p} is not on the grid of {paths[0]}; label maps "
                                 f"averaged into one atlas must share one grid")
        source = ", ".join(str(p) for p in paths)
        return cls.from_label_maps([a for a, _, _ in arrays], grid, labels, sigma_mm, source, argname)

    @classmethod
    def _from_probability_array(cls, array: np.ndarray, grid: Grid, path: Path,
                                labels: Optional[LabelSet], argname: str) -> "Atlas":
        sidecar = _sidecar_path(path)
        frame, templates, coarse = "world", {}, None
        if sidecar.exists():
            meta = json.loads(sidecar.read_text())
            stored = LabelSet.from_dict(meta["labels"])
            frame = meta.get("frame", "world")
            templates = {sequence: _read_template(path.with_name(name), grid, argname)
                         for sequence, name in meta.get("templates", {}).items()}
            if "coarse" in meta:
                coarse = _read_coarse(path.with_name(meta["coarse"]), path, array.shape, grid, argname)
            if labels is not None and labels != stored:
                raise InputError(f"labels: {labels.as_dict()} differ from the labels of atlas {path} "
                                 f"({stored.as_dict()}, from {sidecar.name})")
            labels = stored
        if labels is None:
            raise InputError(f"{argname}: {path} holds {array.shape[0]} probability maps but no label values "
                             f"(no {sidecar.name} beside it): give `labels` with {array.shape[0]} entries")
        if array.shape[0] != len(labels):
            raise InputError(f"{argname}: {path} holds {array.shape[0]} probability maps but the label set "
                             f"{labels.as_dict()} has {len(labels)} classes")
        return cls(_normalised(array, str(path), argname), grid, labels, str(path), frame, templates, coarse)

    @classmethod
    def builtin_cardiac(cls, reference: Grid, labels: LabelSet = CARDIAC_LABELS,
                        sigma_mm: float = 3.0) -> "Atlas":
        """A smooth short-axis cardiac atlas centred in ``reference``'s field of view.

        Geometry (in mm, along the heart's frame of the reference, :func:`mvmm.data.anatomy.short_axis_frame`:
        the stack axis and the in-plane image axis closest to the patient's left, whatever the
        storage order, so a short-axis stack is assumed): an LV blood pool of radius 24 mm, a 9 mm
        myocardial ring, and an RV crescent on the patient's right wrapping the septum; along the
        stack the heart narrows towards both ends.
        """
        if len(labels) != 4:
            raise InputError(f"labels: the built-in cardiac atlas has 4 classes (background, Myo, LV, RV); "
                             f"got {labels.as_dict()}")
        frame = short_axis_frame(reference)
        stack_spacing, stack_extent = (spacing_along(frame, reference)[-1], extent_along(frame, reference)[-1])
        spacing = [1.5, 1.5] + ([min(stack_spacing, 5.0)] if reference.ndim == 3 else [])
        extent = [160.0, 160.0] + ([stack_extent] if reference.ndim == 3 else [])
        size = [max(1, int(round(e / s))) for e, s in zip(extent, spacing)]
        oriented = Grid(tuple(size), tuple(spacing), (0.0,) * reference.ndim, tuple(frame.ravel()))
        grid = oriented.with_size(size, spacing, reference.center_world())
        label_map = _cardiac_label_map(grid, labels.values)
        return cls.from_label_maps([label_map], grid, labels, sigma_mm, source=BUILTIN_CARDIAC)

    # ------------------------------------------------------------------ use
    def placed_on(self, reference: Grid) -> "Atlas":
        """The atlas with its frame's axes along the heart's frame of ``reference`` and its origin at
        the reference's FoV centre.

        For an ``"axes"`` atlas (built in the heart's frame of each label map), this is the placement
        that short-axis stacks share, the same for any storage order of the reference
        (:func:`mvmm.data.anatomy.short_axis_frame`); the result is a ``"world"`` atlas.
        """
        if reference.ndim != self.grid.ndim:
            raise InputError(f"atlas {self.source} is {self.grid.ndim}D but the images are {reference.ndim}D")
        placement = np.eye(reference.ndim + 1)
        placement[:-1, :-1], placement[:-1, -1] = short_axis_frame(reference), reference.center_world()
        return replace(self, grid=self.grid.moved(placement), frame="world")

    def placed_for(self, reference: Grid) -> "Atlas":
        """The atlas as a case on ``reference`` uses it: an ``"axes"`` atlas :meth:`placed_on` it, a
        ``"world"`` atlas as it is (its header places it)."""
        return self.placed_on(reference) if self.frame == "axes" else self

    def coarse_stage(self) -> "Atlas":
        """The atlas the coarse registration levels place: its :attr:`coarse` stage where it has one
        (same grid, labels and templates), else itself."""
        if self.coarse is None:
            return self
        return replace(self, probabilities=self.coarse, coarse=None, source=f"{self.source} (coarse stage)")

    def template_for(self, names: Sequence[str], preferred: Optional[str] = None) -> Optional[str]:
        """The first of ``preferred`` then ``names`` (image names, matched case-insensitively) that this
        atlas has a template for, as the atlas spells it; None if none."""
        for name in ([preferred] if preferred else []) + list(names):
            for sequence in self.templates:
                if sequence.lower() == name.lower():
                    return sequence
        return None

    def sample(self, points: torch.Tensor, transform: Optional[nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prior probabilities at world points ``[*S, ndim]``.

        Returns ``prior [K, *S]`` (background one-hot outside the atlas's field of view) and
        ``inside [*S]`` (bool).
        """
        values, inside = sample_image(self.probabilities.to(points.device), self.grid, points, transform)
        background = torch.zeros_like(values)
        background[self.labels.background_index] = 1.0
        return torch.where(inside.unsqueeze(0), values, background), inside

    def save(self, path, extra: Optional[dict] = None) -> None:
        """Write the maps (K as the last image axis) and a JSON sidecar with the label values and frame.

        ``extra`` entries (e.g. how the atlas was built) are added to the sidecar.
        """
        path = Path(path)
        io.write_array(path, self.probabilities.cpu().numpy(), self.grid)
        names = {}
        for sequence, template in self.templates.items():
            names[sequence] = _template_path(path, sequence).name
            io.write_array(path.with_name(names[sequence]), template.cpu().numpy().astype(np.float32), self.grid)
        coarse = {}
        if self.coarse is not None:
            coarse["coarse"] = _companion_path(path, "coarse").name
            io.write_array(path.with_name(coarse["coarse"]), self.coarse.cpu().numpy(), self.grid)
        write_json(_sidecar_path(path), {"labels": self.labels.as_dict(), "source": self.source, "frame": self.frame,
                                         "ndim": self.grid.ndim, **({"templates": names} if names else {}),
                                         **coarse, **(extra or {})})


def _as_saved(path: Path, array: np.ndarray, grid: Grid, ndim: int) -> Tuple[np.ndarray, Grid, int]:
    """A 2D atlas is stored as a 3D image (maps along the last axis); its sidecar says so."""
    sidecar = _sidecar_path(path)
    if grid.ndim == 3 and sidecar.exists() and json.loads(sidecar.read_text()).get("ndim") == 2:
        direction = grid.direction_matrix[:2, :2].ravel()
        grid = Grid(grid.size[:2], grid.spacing[:2], grid.origin[:2], tuple(direction))
        return array, grid, 2
    return array, grid, ndim


def _template_path(path: Path, sequence: str) -> Path:
    """``atlas.nii.gz`` → ``atlas_template_LGE.nii.gz``."""
    return _companion_path(path, f"template_{sequence}")


def _companion_path(path: Path, part: str) -> Path:
    """``atlas.nii.gz`` → ``atlas_<part>.nii.gz``: a file saved beside the atlas and listed in its sidecar."""
    sidecar = _sidecar_path(path)
    return path.with_name(sidecar.name[: -len(".json")] + f"_{part}" + path.name[len(sidecar.stem):])


def _read_template(path: Path, grid: Grid, argname: str) -> torch.Tensor:
    """A template the sidecar lists, checked to lie on the atlas grid."""
    if not path.is_file():
        raise InputError(f"{argname}: the atlas's sidecar lists the template {path}, which is missing")
    array, template_grid, _ = io.read_array(path, argname)
    if array.ndim != grid.ndim or not template_grid.same_geometry(grid):
        raise InputError(f"{argname}: template {path} is not on the grid of its atlas")
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def _read_coarse(path: Path, atlas_path: Path, shape: tuple, grid: Grid, argname: str) -> torch.Tensor:
    """The coarse stage the sidecar lists: on the atlas grid, as many maps, a partition of unity."""
    if not path.is_file():
        raise InputError(f"{argname}: the atlas's sidecar lists its coarse stage {path}, which is missing")
    array, coarse_grid, _ = _as_saved(atlas_path, *io.read_array(path, argname))  # stored as the atlas is
    if tuple(array.shape) != tuple(shape) or not coarse_grid.same_geometry(grid):
        raise InputError(f"{argname}: coarse stage {path} is not on the grid of its atlas (shape "
                         f"{list(array.shape)}, expected {list(shape)})")
    return _normalised(array, f"coarse stage {path}", argname)


def _normalised(array: np.ndarray, what: str, argname: str) -> torch.Tensor:
    """Probability maps ``[K, *S]`` as read, each voxel's scaled to sum to 1; an InputError naming
    ``what`` for negative, NaN or Inf values or a voxel where all K are 0."""
    array = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)) or array.min() < 0:
        raise InputError(f"{argname}: {what} has negative, NaN or Inf probabilities")
    total = array.sum(axis=0, keepdims=True)
    if np.any(total <= 0):
        raise InputError(f"{argname}: {what} has voxels where all {array.shape[0]} probabilities are 0")
    return torch.from_numpy(array / total)


def _sidecar_path(path: Path) -> Path:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_name(name + ".json")


def _cardiac_label_map(grid: Grid, values: Sequence[int]) -> np.ndarray:
    """Label map of the built-in heart, shape ``grid.shape``; values in order bg, Myo, LV, RV."""
    bg, myo, lv, rv = values
    centre = torch.as_tensor(grid.center_world(), dtype=torch.float64)
    local = (grid.world_points(dtype=torch.float64) - centre) @ torch.as_tensor(grid.direction_matrix)
    x, y = local[..., 0].numpy(), local[..., 1].numpy()
    if grid.ndim == 3:
        half = max(grid.extent_mm()[2] / 2.0, 1e-6)
        t = np.abs(local[..., 2].numpy()) / half
        taper = np.clip(1.0 - 0.5 * np.clip((t - 0.5) / 0.5, 0, 1) ** 2, 0.5, 1.0)
        rv_present = t < 0.85
    else:
        taper, rv_present = np.ones_like(x), np.ones_like(x, dtype=bool)
    r_lv, wall = 24.0 * taper, 9.0
    r = np.hypot(x, y)
    out = np.full(x.shape, bg, dtype=np.int32)
    rv_pool = (((x + 30.0 * taper) / (26.0 * taper)) ** 2 + (y / (40.0 * taper)) ** 2 < 1.0) & (r > r_lv + wall + 2.0)
    out[rv_pool & rv_present] = rv
    out[r <= r_lv + wall] = myo
    out[r <= r_lv] = lv
    return out
