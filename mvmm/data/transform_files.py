"""Saving and loading the transforms of a case: ITK .tfm files for linear maps, displacement-field
NIfTI files for non-linear ones, and a ``transforms.json`` index that says how they chain.

Every transform maps points of the common space (the reference image's world, mm) into the named
image's (or the atlas's) world — ITK's fixed → moving convention, so SimpleITK can read the files
and ``sitk.Resample(moving, reference, transform)`` reproduces what mvmm saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from mvmm.data import io
from mvmm.core.grid import Grid
from mvmm.data.labels import label_values
from mvmm.core.errors import InputError
from mvmm.core.outputs import write_json
from mvmm.spatial.nonlinear import DenseDisplacementField, DisplacementTransform
from mvmm.spatial.regularizers import displacement_on
from mvmm.spatial.transforms import (AffineTransform, IdentityTransform, LinearTransform, SequentialTransform,
                                     map_grid)
from mvmm.spatial.warp import sample_image

TRANSFORMS_FORMAT = "mvmm-transforms/1"
INDEX_NAME = "transforms.json"


def _steps(transform: nn.Module) -> List[nn.Module]:
    if isinstance(transform, SequentialTransform):
        return [s for step in transform.steps for s in _steps(step)]
    return [] if isinstance(transform, IdentityTransform) else [transform]


def save_transforms(out_dir, transforms: Dict[str, nn.Module], common_grid: Grid) -> Path:
    """Write each transform's steps into ``out_dir`` and an index ``transforms.json``; returns its path.

    Linear steps become ``<name>_<i>.tfm``; displacement steps (FFD, SVF, fields) are sampled on
    ``common_grid`` — where they act — into ``<name>_<i>_displacement.nii.gz``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": TRANSFORMS_FORMAT, "convention": "maps common-space points (mm) into each image's world",
             "common_grid": common_grid.to_dict(), "transforms": {}}
    for name, transform in transforms.items():
        entries = []
        for i, step in enumerate(_steps(transform)):
            if isinstance(step, LinearTransform):
                file = out / f"{name}_{i}.tfm"
                io.write_linear_transform(file, step.affine().detach().cpu().numpy())
                entries.append({"type": "linear", "kind": type(step).__name__, "file": file.name})
            elif isinstance(step, DisplacementTransform):
                file = out / f"{name}_{i}_displacement.nii.gz"
                with torch.no_grad():
                    field = displacement_on(step, common_grid).cpu().numpy()
                io.write_vector_field(file, field, common_grid)
                entries.append({"type": "displacement", "kind": type(step).__name__, "file": file.name})
            else:
                raise TypeError(f"cannot save a {type(step).__name__}")
        index["transforms"][name] = entries
    write_json(out / INDEX_NAME, index)
    return out / INDEX_NAME


def load_transforms(path, argname: str = "path") -> Dict[str, nn.Module]:
    """Read a ``transforms.json`` (or the folder holding one) back into fixed transforms by name."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{argname}: cannot read {path} ({err})") from None
    if index.get("format") != TRANSFORMS_FORMAT:
        raise InputError(f"{argname}: {path} is not an mvmm transforms index (format {index.get('format')!r})")
    out = {}
    for name, entries in index["transforms"].items():
        steps = []
        for entry in entries:
            file = path.parent / entry["file"]
            if entry["type"] == "linear":
                steps.append(AffineTransform.from_matrix(torch.as_tensor(io.read_linear_transform(file, argname))))
            else:
                field, grid, _ = io.read_array(file, argname)
                if field.shape != (grid.ndim,) + grid.shape:
                    raise InputError(f"{argname}: {file} is not a {grid.ndim}-component displacement field")
                steps.append(DenseDisplacementField(grid, torch.as_tensor(field, dtype=torch.float32)))
        out[name] = steps[0] if len(steps) == 1 else SequentialTransform(*steps) if steps else IdentityTransform()
    return out


def common_grid_of(path) -> Grid:
    """The common grid recorded in a ``transforms.json`` (or the folder holding one)."""
    path = Path(path)
    index = json.loads((path / INDEX_NAME if path.is_dir() else path).read_text())
    return Grid.from_dict(index["common_grid"])


def warp_file(image_path, transforms_path, name: str, out_path, reference_path=None, labels: bool = False,
              force: bool = False) -> Path:
    """Resample an image (or a label map) of ``name`` into the common space through its saved transform.

    Parameters
    ----------
    image_path : path
        An image on ``name``'s side of the transform (its own grid, or any grid in its world).
    transforms_path : path
        ``transforms.json`` or its folder, as ``mvmm segment`` writes it.
    name : str
        Which transform to use (an image name or ``"atlas"``).
    out_path : path
        Output file, written atomically; an existing one only with ``force``.
    reference_path : path, optional
        Image whose grid to sample on (default: the common grid of the transforms).
    labels : bool
        Nearest-neighbour sampling that keeps label values (default: linear).
    """
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise InputError(f"out_path: {out_path} exists; nothing was written (use `force` to overwrite)")
    transforms = load_transforms(transforms_path, "transforms_path")
    if name not in transforms:
        raise InputError(f"name: {name!r} has no transform in {transforms_path} (there: {sorted(transforms)})")
    array, grid, _ = io.read_array(image_path, "image_path")
    if array.ndim != grid.ndim:
        raise InputError(f"image_path: {image_path} is not a scalar image (array shape {array.shape})")
    if labels:  # nearest sampling of intensities would pass silently for a label map
        label_values(array, image_path, "image_path")
    target = io.read_array(reference_path, "reference_path")[1] if reference_path else common_grid_of(transforms_path)
    data = torch.as_tensor(array, dtype=torch.float32).unsqueeze(0)
    with torch.no_grad():
        values, _ = sample_image(data, grid, map_grid(transforms[name], target),
                                 mode="nearest" if labels else "linear")
    result = values[0].numpy()
    io.write_array(out_path, result.astype(array.dtype) if labels else result, target)
    return out_path
