import numpy as np
import pytest

from mvmm.data.labels import CARDIAC_LABELS, LabelSet
from mvmm.core.errors import InputError
from mvmm.postprocess import close_blood_pool, keep_largest_components, postprocess_labels

MYO, LV, RV = 200, 500, 600


def short_axis_slice(size=41):
    """A ring of myocardium (radii 9–13 voxels) around an LV cavity, with an RV crescent beside it."""
    y, x = np.mgrid[:size, :size] - size // 2
    r = np.hypot(y, x)
    plane = np.zeros((size, size), dtype=np.int64)
    plane[r < 9] = LV
    plane[(r >= 9) & (r < 13)] = MYO
    plane[(r >= 14) & (r < 18) & (x < -4)] = RV
    return plane


def test_papillary_muscle_and_enclosed_voxels_become_blood_pool():
    plane = short_axis_slice()
    truth = plane.copy()
    c = plane.shape[0] // 2
    plane[c - 2:c + 2, c + 5:c + 9] = MYO  # a papillary muscle on the inner wall: not a hole
    plane[c, c] = 0  # an enclosed background voxel: a hole
    plane[c - 1, c - 1] = RV  # an RV voxel inside the cavity is not wall: only filled as a hole
    out = close_blood_pool(plane[None], LV, MYO)[0]
    assert (out == truth).all()
    assert (plane[c - 2:c + 2, c + 5:c + 9] == MYO).all()  # the input is left as it was


def test_kept_wall_is_not_taken_for_a_papillary_muscle():
    """Wall the caller keeps (where the model finds scar or oedema) stays wall inside the cavity's hull;
    the rest of the closing is unchanged."""
    plane = short_axis_slice()
    c = plane.shape[0] // 2
    plane[c - 2:c + 2, c + 5:c + 9] = MYO  # inside the hull: blood pool unless kept
    plane[c + 5:c + 7, c - 3:c - 1] = MYO
    keep = np.zeros(plane.shape, dtype=bool)
    keep[c - 2:c + 2, c + 5:c + 9] = True  # enhanced wall at the endocardium
    out = close_blood_pool(plane, LV, MYO, keep=keep)
    assert (out[c - 2:c + 2, c + 5:c + 9] == MYO).all()
    assert (out[c + 5:c + 7, c - 3:c - 1] == LV).all()  # the papillary muscle, not kept, joins the pool
    assert (close_blood_pool(plane, LV, MYO, keep=np.zeros_like(keep)) == close_blood_pool(plane, LV, MYO)).all()
    stack = np.stack([plane, plane])  # slices along another axis: the mask moves with them
    out3 = close_blood_pool(np.moveaxis(stack, 0, 2), LV, MYO, slice_axis=2, keep=np.moveaxis(np.stack([keep, keep]), 0, 2))
    assert (np.moveaxis(out3, 2, 0)[1] == out).all()


def test_wall_outside_the_cavitys_hull_is_kept():
    plane = short_axis_slice()
    plane[plane == LV] = 0
    plane[18:23, 18:23] = LV  # a small cavity: the ring of wall lies outside its hull
    out = close_blood_pool(plane, LV, MYO)
    assert (out == plane).all()
    flat = np.zeros((5, 5), dtype=np.int64)
    flat[2, :] = LV  # a cavity on one line has no interior
    flat[1, 2] = MYO
    assert (close_blood_pool(flat, LV, MYO) == flat).all()


def test_each_structure_keeps_its_largest_component():
    volume = np.stack([short_axis_slice()] * 3)
    islands = volume.copy()
    islands[0, 0:2, 0:2] = LV  # a stray LV island in a corner
    islands[2, 38:40, 38:40] = RV
    out = keep_largest_components(islands, [MYO, LV, RV])
    assert (out == volume).all()


def test_postprocess_labels_checks_method_and_labels():
    plane = short_axis_slice()
    assert postprocess_labels(plane, CARDIAC_LABELS, "none") is plane
    with pytest.raises(InputError, match="^postprocess: expected one of none, cardiac, got 'smooth'"):
        postprocess_labels(plane, CARDIAC_LABELS, "smooth")
    with pytest.raises(InputError, match="^postprocess: unknown tissue 'LV'"):
        postprocess_labels(plane, LabelSet(("bg", "WM", "GM"), (0, 1, 2)), "cardiac")
