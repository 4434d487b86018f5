"""All file input and output of images. This is the only module that calls SimpleITK."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Tuple

import numpy as np
import SimpleITK as sitk

from mvmm.core.grid import Grid
from mvmm.core.errors import InputError
from mvmm.core.outputs import OutputError, atomic_path, verify_output


_NIFTI_FLOAT_TYPES = {16: np.float32, 64: np.float64}  # NIfTI datatype codes of real floats
# Voxel spacing (mm) and size outside which a file is taken to have a broken header, not anatomy.
SPACING_RANGE_MM = (0.01, 50.0)
MAX_VOXELS = 2 ** 30
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def _nifti_check(path: Path, argname: str) -> int:
    """For a NIfTI file: raise InputError if it is truncated or its compression is corrupt (SimpleITK
    would fill the missing voxels with zeros, or stop without naming the file); return the number of
    NaN/Inf values it stores (0 for other formats and for integer types).

    SimpleITK 2.x (ITK 5) reads NaN and ±Inf in NIfTI files as 0 without a word (fixed only in
    ITK 6, InsightSoftwareConsortium/ITK#6683), so they are looked for in the file's own bytes.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return 0
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(f"{argname}: {path} is truncated or corrupt ({err})") from None
    for endian in "<>":
        if len(raw) < 4:
            break
        sizeof_hdr = struct.unpack(endian + "i", raw[:4])[0]
        if sizeof_hdr == 348 and len(raw) >= 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", raw[70:74])
            offset = int(struct.unpack(endian + "f", raw[108:112])[0])
            break
        if sizeof_hdr == 540 and len(raw) >= 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(endian + "hh", raw[12:16])
            dims = struct.unpack(endian + "8q", raw[16:80])
            offset = int(struct.unpack(endian + "q", raw[168:176])[0])
            break
    else:
        return 0
    if len(raw) < 4 or sizeof_hdr not in (348, 540):
        return 0
    sizes = [int(d) for d in dims[1:1 + max(1, min(int(dims[0]), 7))]]
    if min(sizes) < 1:  # ITK would read such an axis as size 1, and part of the voxels as the image
        raise InputError(f"{argname}: {path} has an axis of size {min(sizes)} in its header (size {sizes})")
    expected = offset + int(np.prod(sizes)) * bitpix // 8
    if len(raw) < expected:
        raise InputError(f"{argname}: {path} is truncated: {len(raw)} bytes of voxel data where its header "
                         f"says {expected}")
    if datatype not in _NIFTI_FLOAT_TYPES:
        return 0
    data = np.frombuffer(raw, dtype=np.dtype(_NIFTI_FLOAT_TYPES[datatype]).newbyteorder(endian), offset=offset,
                         count=(expected - offset) // np.dtype(_NIFTI_FLOAT_TYPES[datatype]).itemsize)
    return int((~np.isfinite(data)).sum())


def _check_geometry(image, path: Path, argname: str) -> None:
    """Raise InputError for a header whose size or spacing cannot be anatomy (zero-size axis, spacing
    outside :data:`SPACING_RANGE_MM`, more than :data:`MAX_VOXELS` voxels)."""
    ndim = min(image.GetDimension(), 3)
    size, spacing = image.GetSize()[:ndim], image.GetSpacing()[:ndim]
    if min(size) < 1:
        raise InputError(f"{argname}: {path} has an axis of size 0 (size {list(size)})")
    low, high = SPACING_RANGE_MM
    if not all(low <= s <= high for s in spacing):
        raise InputError(f"{argname}: {path} has voxel spacing {[round(s, 6) for s in spacing]} mm, outside "
                         f"{low}–{high} mm: its header is probably wrong (fix the spacing, e.g. with SimpleITK)")
    if int(np.prod(size)) > MAX_VOXELS:
        raise InputError(f"{argname}: {path} has {int(np.prod(size))} voxels (size {list(size)}), more than "
                         f"{MAX_VOXELS}: not an image mvmm can hold")


def _grid_from_sitk(image: sitk.Image, ndim: int) -> Grid:
    full = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(full, full)[:ndim, :ndim]
    return Grid(image.GetSize()[:ndim], image.GetSpacing()[:ndim], image.GetOrigin()[:ndim],
                tuple(direction.ravel()))


def _read_checked(path: Path, argname: str, header_only: bool = False):
    """The image of ``path`` (or, header only, its reader after ``ReadImageInformation``); errors name ``argname``."""
    if not path.exists():
        raise InputError(f"{argname}: file not found: {path}")
    if path.is_dir():
        raise InputError(f"{argname}: {path} is a folder, expected an image file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise InputError(f"{argname}: cannot read {path} as an image ({first})") from None
    ndim = reader.GetDimension()
    if ndim not in (2, 3, 4):
        raise InputError(f"{argname}: {path} has {ndim} dimensions; mvmm reads 2D, 3D and 4D images")
    _check_geometry(reader, path, argname)
    if header_only:
        return reader
    try:
        return reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise InputError(f"{argname}: cannot read {path} as an image ({first})") from None


def read_grid(path, argname: str) -> Grid:
    """The geometry of an image file from its header alone (the voxels are not read)."""
    path = Path(path)
    reader = _read_checked(path, argname, header_only=True)
    return _grid_from_sitk(reader, min(reader.GetDimension(), 3))


def read_array(path, argname: str) -> Tuple[np.ndarray, Grid, int]:
    """Read an image file with SimpleITK.

    Parameters
    ----------
    path : str or Path
        Any format SimpleITK reads.
    argname : str
        The argument the file came from, used in error messages (e.g. ``"images"``).

    Returns
    -------
    array : np.ndarray
        Voxel values in tensor order: ``[*S]`` for a scalar image of dimension ``ndim``, or
        ``[C, *S]`` for a multi-component image (C components) with spatial shape ``S``.
    grid : Grid
        Geometry of the spatial axes (all axes of a scalar image; a vector image's spatial axes).
    ndim : int
        The file's dimension: ``array.ndim`` for scalar images, ``array.ndim - 1`` for vector images.
    """
    path = Path(path)
    nifti_nonfinite = _nifti_check(path, argname) if path.exists() and path.is_file() else 0
    image = _read_checked(path, argname)
    ndim = image.GetDimension()
    array = sitk.GetArrayFromImage(image)
    nonfinite = nifti_nonfinite or int((~np.isfinite(array)).sum())
    if nonfinite:
        raise InputError(f"{argname}: {path} has {nonfinite} NaN/Inf voxels")
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        array = np.moveaxis(array, -1, 0)
    grid = _grid_from_sitk(image, min(ndim, 3))
    return array, grid, ndim


def _to_sitk(array: np.ndarray, grid: Grid) -> sitk.Image:
    if array.ndim == grid.ndim:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(grid.spacing)
        image.SetOrigin(grid.origin)
        image.SetDirection(grid.direction)
        return image
    if array.ndim == grid.ndim + 1:
        # A stack of maps (classes): one more axis, as a 4D NIfTI for a 3D grid.
        return sitk.JoinSeries([_to_sitk(np.ascontiguousarray(a), grid) for a in array])
    raise ValueError(f"array: expected {grid.ndim} or {grid.ndim + 1} dimensions, got shape {array.shape}")


def write_array(path, array: np.ndarray, grid: Grid) -> Path:
    """Write ``array`` on ``grid`` atomically; the format follows the extension (NIfTI first).

    Parameters
    ----------
    path : str or Path
        Destination file.
    array : np.ndarray, shape [*grid.shape] or [K, *grid.shape]
        Voxel values; a leading K axis is written as an extra (last) image axis.
    grid : Grid
        Geometry of the spatial axes.
    """
    array = np.asarray(array)
    if tuple(array.shape[-grid.ndim:]) != grid.shape:
        raise ValueError(f"array: shape {array.shape} does not end with the grid's shape {grid.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(_to_sitk(array, grid), os.fspath(tmp), True)
    return path


def write_vector_field(path, field: np.ndarray, grid: Grid) -> Path:
    """Write a vector image ``[ndim, *grid.shape]`` (e.g. a displacement field in mm) atomically.

    The vectors are stored as pixel components, which is what ITK's (and SimpleITK's)
    ``DisplacementFieldTransform`` reads.
    """
    field = np.asarray(field, dtype=np.float64)
    if field.shape != (grid.ndim,) + grid.shape:
        raise ValueError(f"field: expected shape {(grid.ndim,) + grid.shape}, got {field.shape}")
    image = sitk.GetImageFromArray(np.moveaxis(field, 0, -1), isVector=True)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, os.fspath(tmp), True)
    return path


def write_linear_transform(path, matrix: np.ndarray) -> Path:
    """Write a homogeneous ``[ndim+1, ndim+1]`` world → world matrix as an ITK transform file (.tfm).

    ITK's convention is ours: the transform maps points of the fixed (common) space into the
    moving image's space.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    ndim = matrix.shape[0] - 1
    transform = sitk.AffineTransform(ndim)
    transform.SetMatrix(matrix[:ndim, :ndim].ravel().tolist())
    transform.SetTranslation(matrix[:ndim, ndim].tolist())
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, os.fspath(tmp))
    return path


def read_linear_transform(path, argname: str = "path") -> np.ndarray:
    """Read any linear ITK transform file (Euler, similarity, versor, affine…) as a homogeneous matrix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{argname}: {path} does not exist")
    try:
        transform = sitk.ReadTransform(os.fspath(path))
    except RuntimeError as err:
        raise InputError(f"{argname}: cannot read {path} as an ITK transform ({str(err).strip().splitlines()[-1]})") from None
    if not transform.IsLinear():
        raise InputError(f"{argname}: {path} holds a non-linear ITK transform; give displacement fields as images")
    ndim = transform.GetDimension()
    origin = np.asarray(transform.TransformPoint((0.0,) * ndim))
    matrix = np.eye(ndim + 1)
    for axis in range(ndim):
        unit = [0.0] * ndim
        unit[axis] = 1.0
        matrix[:ndim, axis] = np.asarray(transform.TransformPoint(unit)) - origin
    matrix[:ndim, ndim] = origin
    return matrix


def verify_written(path: Path) -> None:
    """Read a written output back whole (an image with SimpleITK, a transform file as ITK transform,
    JSON and PNG by :func:`mvmm.core.outputs.verify_output`); raises OutputError."""
    path = Path(path)
    verify_output(path)
    try:
        if path.name.lower().endswith(IMAGE_SUFFIXES):
            sitk.ReadImage(os.fspath(path))
        elif path.suffix == ".tfm":
            sitk.ReadTransform(os.fspath(path))
    except RuntimeError as err:
        raise OutputError(f"{path} does not read back ({str(err).strip().splitlines()[-1]})") from None


def reoriented(array: np.ndarray, grid: Grid, order, flips) -> Tuple[np.ndarray, Grid]:
    """The same voxels at the same world positions, stored in another axis order and direction:
    SimpleITK's ``PermuteAxes(order)`` then ``Flip(flips)`` (about the field of view, not the origin).

    Scanners and converters produce any of the 8 (2D) or 48 (3D) storage orders of one image; results
    in world space must not depend on which (``tests/test_orientation.py``).

    Parameters
    ----------
    array : np.ndarray, shape [*grid.shape]
    grid : Grid
    order : sequence of int
        ITK axes in their new order.
    flips : sequence of bool
        Per new axis, whether its storage direction is reversed.
    """
    image = sitk.Flip(sitk.PermuteAxes(_to_sitk(array, grid), [int(a) for a in order]), [bool(f) for f in flips],
                      flipAboutOrigin=False)
    return sitk.GetArrayFromImage(image), _grid_from_sitk(image, grid.ndim)
