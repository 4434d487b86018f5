"""Where the heart's axes lie in a short-axis image, from its header alone: in patient space, whatever
the order and signs of the image's storage axes.

An image stored with its x axis reversed, or its axes permuted, has the same voxels at the same
world (patient) positions; anything placed "along the image's axes" would turn with the storage order
(an atlas whose right ventricle lands on the wrong side gives RV Dice 0). :func:`short_axis_frame`
instead picks axes from the set of image axis *lines*, which storage order does not change:

- the stack (long) axis: the axis with the largest spacing (short-axis stacks have thick slices);
  among equal spacings, the axis most perpendicular to the RV direction below;
- the first in-plane axis: the other image axis, of either sign, closest to the direction pointing
  away from the right ventricle (−:data:`RV_DIRECTION_LPS`);
- the stack axis points towards the apex (its sign closest to :data:`APEX_DIRECTION_LPS`);
- the second in-plane axis completes a right-handed frame.

Both directions are anatomy, not fitted values: the right ventricle lies to the patient's right of the
left ventricle (−x in DICOM/ITK LPS coordinates) and somewhat anterior (−y); the apex points left,
anterior and down. Snapping to an image axis, rather than projecting these directions, keeps the
plane's own orientation, which the scanner's short-axis planning relates to the heart.
"""

from __future__ import annotations

import numpy as np

from mvmm.core.grid import Grid

# Unit vector from the LV towards the RV in LPS world coordinates (3D) — right and somewhat anterior.
RV_DIRECTION_LPS = np.array([-2.0, -1.0, 0.0]) / np.sqrt(5.0)
# Unit vector from the base of the heart towards its apex, LPS — left, anterior, inferior.
APEX_DIRECTION_LPS = np.array([1.0, -1.0, -1.0]) / np.sqrt(3.0)


def rv_direction(ndim: int) -> np.ndarray:
    """:data:`RV_DIRECTION_LPS` in a ``ndim``-D world (2D: the x–y plane)."""
    u = RV_DIRECTION_LPS[:ndim]
    return u / np.linalg.norm(u)


def stack_axis(grid: Grid) -> int:
    """Index (ITK order) of the stack axis of a 3D grid: largest spacing, ties broken by the axis most
    perpendicular to the RV direction, then by index."""
    spacing = np.asarray(grid.spacing)
    across = np.abs(grid.direction_matrix.T @ rv_direction(3))
    candidates = [a for a in range(3) if np.isclose(spacing[a], spacing.max(), rtol=1e-3)]
    return min(candidates, key=lambda a: (round(float(across[a]), 6), a))


def short_axis_frame(grid: Grid) -> np.ndarray:
    """The heart's frame for an image on ``grid``: a rotation ``[ndim, ndim]`` whose columns are the
    in-plane axis pointing away from the RV, the other in-plane axis, and (3D) the stack axis —
    each a signed axis of ``grid``, chosen as the module notes say, the same for any storage order."""
    axes = grid.direction_matrix
    away = -rv_direction(grid.ndim)
    if grid.ndim == 2:
        first = max(((s * axes[:, a], a, s) for a in range(2) for s in (1.0, -1.0)),
                    key=lambda c: (round(float(c[0] @ away), 9), -c[1], c[2]))[0]
        second = np.array([-first[1], first[0]])
        return np.stack([first, second], axis=1)
    stack = stack_axis(grid)
    in_plane = [a for a in range(3) if a != stack]
    first = max(((s * axes[:, a], a, s) for a in in_plane for s in (1.0, -1.0)),
                key=lambda c: (round(float(c[0] @ away), 9), -c[1], c[2]))[0]
    third = axes[:, stack]
    towards_apex = float(third @ APEX_DIRECTION_LPS)
    if abs(towards_apex) < 1e-6:  # a stack axis across the long axis: any fixed sign
        towards_apex = float(third[int(np.argmax(np.abs(third)))])
    third = third if towards_apex > 0 else -third
    second = np.cross(third, first)
    return np.stack([first, second, third], axis=1)


def spacing_along(frame: np.ndarray, grid: Grid) -> np.ndarray:
    """The voxel spacing of ``grid`` along each column of ``frame`` (each column is ± an axis of ``grid``)."""
    alignment = np.abs(grid.direction_matrix.T @ frame)  # [grid axis, frame axis]
    return np.asarray(grid.spacing)[np.argmax(alignment, axis=0)]


def extent_along(frame: np.ndarray, grid: Grid) -> np.ndarray:
    """The field-of-view extent (mm) of ``grid`` along each column of ``frame``."""
    alignment = np.abs(grid.direction_matrix.T @ frame)
    return grid.extent_mm()[np.argmax(alignment, axis=0)]


def in_plane_radius(grid: Grid) -> float:
    """Half the diagonal of the short-axis plane's field of view (mm): the unit of rotations in the
    registrations, the same for any storage order."""
    extent = grid.extent_mm()
    if grid.ndim == 3:
        extent = np.delete(extent, stack_axis(grid))
    return float(np.linalg.norm(extent)) / 2


def frame_placement(source: Grid, target: Grid) -> np.ndarray:
    """The rigid map ``[ndim + 1, ndim + 1]`` (homogeneous, mm) that takes ``source``'s heart frame and
    field-of-view centre onto ``target``'s: how an image of another subject is first laid on a case.

    Headers of different patients place their images anywhere in different scanners; their short-axis
    frames (:func:`short_axis_frame`) are the anatomically shared axes, and a field of view is
    usually centred near the heart, so this is the start that later registrations refine (the same
    placement :meth:`mvmm.data.atlas.Atlas.placed_on` gives an atlas built in image axes).
    """
    rotation = short_axis_frame(target) @ short_axis_frame(source).T
    matrix = np.eye(source.ndim + 1)
    matrix[:-1, :-1] = rotation
    matrix[:-1, -1] = target.center_world() - rotation @ source.center_world()
    return matrix
