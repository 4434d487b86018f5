import numpy as np
import pytest
import torch

from mvmm.data.atlas import Atlas
from mvmm.core.grid import Grid
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS, LabelSet
from mvmm.data.subject import Subject
from mvmm.core.errors import InputError

GRID = Grid((20, 16, 6), (1.5, 1.5, 5.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def label_map(values=(0, 200, 500, 600)):
    m = np.full(GRID.shape, values[0], dtype=np.int16)
    m[:, 4:12, 5:10] = values[1]
    m[:, 6:10, 6:9] = values[2]
    m[:, 4:12, 12:16] = values[3]
    return m


def test_atlas_from_label_maps_is_a_smooth_partition_of_unity():
    atlas = Atlas.from_label_maps([label_map(), label_map()], GRID, sigma_mm=2.0)
    assert atlas.labels == CARDIAC_LABELS
    p = atlas.probabilities
    assert torch.allclose(p.sum(0), torch.ones(GRID.shape), atol=1e-5)
    assert 0 < float(p[1].max()) < 1 and float(p.min()) >= 0  # smoothed, not one-hot
    # argmax of a lightly smoothed map gives back the map
    assert (np.asarray(CARDIAC_LABELS.values)[p.argmax(0).numpy()] == label_map()).mean() > 0.9


def test_atlas_label_set_must_match_labels_option():
    with pytest.raises(InputError, match=r"label values \[600\] .* do not occur"):
        Atlas.from_label_maps([label_map((0, 200, 500, 500))], GRID, labels=CARDIAC_LABELS)
    with pytest.raises(InputError, match=r"label values \[700\] that are not in"):
        Atlas.from_label_maps([label_map((0, 200, 500, 700))], GRID, labels=CARDIAC_LABELS)


def test_probability_atlas_round_trip_keeps_labels(tmp_path):
    atlas = Atlas.from_label_maps([label_map()], GRID, labels=LabelSet.parse("bg=0,wall=200,pool=500,rv=600"))
    atlas.save(tmp_path / "atlas.nii.gz")
    back = Atlas.read([tmp_path / "atlas.nii.gz"], image_ndim=3)
    assert back.labels.as_dict() == {"bg": 0, "wall": 200, "pool": 500, "rv": 600}
    assert torch.allclose(back.probabilities, atlas.probabilities, atol=1e-6)
    (tmp_path / "atlas.json").unlink()
    with pytest.raises(InputError, match="no label values"):
        Atlas.read([tmp_path / "atlas.nii.gz"], image_ndim=3)
    with pytest.raises(InputError, match="4 probability maps but the label set"):
        Atlas.read([tmp_path / "atlas.nii.gz"], image_ndim=3, labels=LabelSet.parse("a=0,b=1"))


def test_coarse_stage_round_trips_and_a_bad_one_is_named(tmp_path):
    sharp = Atlas.from_label_maps([label_map()], GRID, sigma_mm=0.5)
    blurred = Atlas.from_label_maps([label_map()], GRID, sigma_mm=4.0)
    atlas = Atlas(sharp.probabilities, GRID, sharp.labels, coarse=blurred.probabilities)
    assert atlas.placed_on(GRID).coarse is atlas.coarse  # placing moves both stages
    assert torch.equal(atlas.coarse_stage().probabilities, blurred.probabilities)
    assert sharp.coarse_stage() is sharp
    atlas.save(tmp_path / "a.nii.gz")
    assert (tmp_path / "a_coarse.nii.gz").is_file()
    back = Atlas.read([tmp_path / "a.nii.gz"], image_ndim=3)
    assert torch.allclose(back.coarse, blurred.probabilities, atol=1e-6)
    with pytest.raises(InputError, match="coarse stage has shape"):
        Atlas(sharp.probabilities, GRID, sharp.labels, coarse=blurred.probabilities[:3])
    other = Grid((10, 16, 6), (1.5, 1.5, 5.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    Atlas.from_label_maps([label_map()[:, :, :10]], other).save(tmp_path / "small.nii.gz")
    (tmp_path / "small.nii.gz").replace(tmp_path / "a_coarse.nii.gz")
    with pytest.raises(InputError, match=r"^atlas: coarse stage .*a_coarse.nii.gz is not on the grid of its atlas"):
        Atlas.read([tmp_path / "a.nii.gz"], image_ndim=3)
    (tmp_path / "a_coarse.nii.gz").unlink()
    with pytest.raises(InputError, match=r"lists its coarse stage .*a_coarse.nii.gz, which is missing"):
        Atlas.read([tmp_path / "a.nii.gz"], image_ndim=3)


def test_builtin_atlas_is_centred_and_sized_in_mm():
    reference = Grid((96, 96, 12), (1.25, 1.25, 8.0), (-40.0, 30.0, -50.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))
    atlas = Atlas.builtin_cardiac(reference)
    pts = reference.world_points()
    prior, inside = atlas.sample(pts)
    assert bool(inside.all())
    lv = prior[2]
    centroid = np.array(np.nonzero((lv[6] > 0.5).numpy())).mean(axis=1)
    assert np.allclose(centroid, [47.5, 47.5], atol=1.0)  # LV pool at the centre of the field of view
    lv_area_mm2 = float((lv[6] > 0.5).sum()) * 1.25 ** 2
    assert 0.7 < lv_area_mm2 / (np.pi * 24.0 ** 2) < 1.3  # radius ~24 mm whatever the spacing
    # the RV lies to the patient's right of the LV (−x in LPS world; this image's +y storage axis points
    # left, so the RV sits at low row indices, whatever the storage order)
    points = pts[6].double()
    rv_minus_lv = points[prior[3][6] > 0.5].mean(0) - points[lv[6] > 0.5].mean(0)
    assert float(rv_minus_lv[0]) < -20.0 and abs(float(rv_minus_lv[1])) < 5.0, rv_minus_lv


def make_image(name, grid=GRID, value_fn=None, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=grid.shape).astype(np.float32) if value_fn is None else value_fn(grid)
    return Image.from_array(data, grid, name)


def test_subject_coverage_follows_each_field_of_view_and_mask():
    small = Grid((20, 16, 2), (1.5, 1.5, 5.0), (0.0, 0.0, 10.0), GRID.direction)  # slices 2-3 only
    mask = np.zeros(GRID.shape, dtype=np.float32)
    mask[:, :8] = 1
    subject = Subject([make_image("A"), make_image("B", small)], masks={"A": Image.from_array(mask, GRID, "m")})
    sample = subject.sample()
    assert sample.images.shape == (2,) + GRID.shape
    assert torch.equal(sample.coverage[0], torch.as_tensor(mask > 0))
    covered_slices = sample.coverage[1].any(dim=(1, 2)).nonzero().squeeze(1).tolist()
    assert covered_slices == [2, 3]
    # a sample of B at its own voxel centres returns its own values
    b_on_common = sample.images[1, 2:4]
    assert torch.allclose(b_on_common, subject.images[1].data[0], atol=1e-5)


@pytest.mark.parametrize("problem, match", [
    ("nan", "NaN/Inf"), ("constant", "one constant value"), ("dims", "2D and 3D"),
    ("empty_mask", "is empty"), ("no_overlap", "does not overlap"), ("mask_name", "not one of the image names"),
])
def test_subject_rejects_bad_input(problem, match):
    images = [make_image("A"), make_image("B", seed=1)]
    masks = {}
    if problem == "nan":
        images[1].data[0, 1, 2, 3] = float("nan")
    elif problem == "constant":
        images[1] = make_image("B", value_fn=lambda g: np.full(g.shape, 3.0, np.float32))
    elif problem == "dims":
        images[1] = make_image("B", Grid((20, 16), (1.5, 1.5), (0.0, 0.0), (1, 0, 0, 1)))
    elif problem == "empty_mask":
        masks = {"B": Image.from_array(np.zeros(GRID.shape), GRID, "m")}
    elif problem == "no_overlap":
        images[1] = make_image("B", Grid(GRID.size, GRID.spacing, (500.0, 0.0, 0.0), GRID.direction))
    elif problem == "mask_name":
        masks = {"C": Image.from_array(np.ones(GRID.shape), GRID, "m")}
    with pytest.raises(InputError, match=match):
        Subject(images, masks=masks).sample()


def test_atlas_that_misses_the_images_is_rejected():
    far = Grid(GRID.size, GRID.spacing, (0.0, 0.0, 900.0), GRID.direction)
    atlas = Atlas.from_label_maps([label_map()], far)
    with pytest.raises(InputError, match="^atlas: the atlas .* does not overlap"):
        Subject([make_image("A")], atlas=atlas).sample()


def test_sample_atlas_at_points_equals_the_full_sample_there_with_its_gradient():
    from mvmm.spatial.transforms import RigidTransform
    atlas = Atlas.from_label_maps([label_map()], GRID, sigma_mm=2.0)
    subject = Subject([make_image("A")], atlas=atlas)
    params = torch.tensor([0.02, -0.01, 0.03, 1.0, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    subject.transforms["atlas"] = RigidTransform(3, params=params, center=GRID.center_world())
    full = subject.sample().prior  # [K, *S]
    where = torch.zeros(GRID.shape, dtype=torch.bool)
    where[1:5, 3:13, 2:18] = True
    points = GRID.world_points()[where]
    at_points = subject.sample_atlas(GRID, points=points)
    assert at_points.shape == (4, int(where.sum()))
    torch.testing.assert_close(at_points, full[:, where])
    weights = torch.rand(at_points.shape, generator=torch.Generator().manual_seed(0))
    (g_points,) = torch.autograd.grad((at_points * weights).sum(), params)
    (g_full,) = torch.autograd.grad((full[:, where] * weights).sum(), params)
    torch.testing.assert_close(g_points, g_full, rtol=1e-4, atol=1e-6)  # float32 sums in another order
    torch.testing.assert_close(subject.sample_atlas(GRID), full.detach())
