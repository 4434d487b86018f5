"""Atlases with intensity templates: built group-wise with the label maps, saved and read back, and
placing the atlas on a case by image registration."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mvmm.atlas_build import GroupwiseSettings, build_atlas
from mvmm.cli import main
from mvmm.core.errors import InputError
from mvmm.core.grid import Grid
from mvmm.core.settings import RegistrationSettings
from mvmm.data import io
from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.data.subject import Subject
from mvmm.segment import segment_subject
from test_multi_atlas import SHAPES, heart, mean_dice, scan


@pytest.fixture(scope="module")
def template_atlas(tmp_path_factory):
    """A world-frame atlas with an LGE template from four subjects whose hearts sit near the origin."""
    folder = tmp_path_factory.mktemp("template")
    rng = np.random.default_rng(5)
    maps, images = [], []
    for i, shape in enumerate(SHAPES[:4]):
        spacing = tuple(rng.uniform(1.1, 1.4, 2))
        grid = Grid((int(110 / spacing[0]), int(100 / spacing[1])), spacing, tuple(rng.uniform(-58, -48, 2)),
                    (1, 0, 0, 1))
        labels = heart(grid, rng.uniform(-3, 3, 2), **shape)
        maps.append(folder / f"s{i}_manual.nii.gz")
        images.append(folder / f"s{i}_LGE.nii.gz")
        io.write_array(maps[-1], labels, grid)
        io.write_array(images[-1], 50.0 + 400.0 * scan(labels, rng), grid)  # scanner units: normalised away
    atlas, report = build_atlas(maps, GroupwiseSettings(register="affine", rounds=1), images={"LGE": images})
    return folder, maps, images, atlas, report


def test_templates_are_built_saved_and_read_back(tmp_path, template_atlas):
    _, maps, images, atlas, report = template_atlas
    assert set(atlas.templates) == {"LGE"} and report["templates"]["LGE"]["images"] == 4
    template = atlas.templates["LGE"].numpy()
    assert template.shape == atlas.grid.shape
    # the tissues' contrasts in their order (LV > RV > background > Myo), in normalised units whatever
    # the scanner's (the images were 50 + 400 × the contrast)
    values = np.asarray(CARDIAC_LABELS.values)[atlas.probabilities.argmax(0).numpy()]
    means = [float(template[values == v].mean()) for v in (500, 600, 0, 200)]
    assert means == sorted(means, reverse=True) and max(map(abs, means)) < 2, means
    atlas.save(tmp_path / "atlas.nii.gz")
    meta = json.loads((tmp_path / "atlas.json").read_text())
    assert meta["templates"] == {"LGE": "atlas_template_LGE.nii.gz"}
    back = Atlas.read([tmp_path / "atlas.nii.gz"], image_ndim=2)
    assert set(back.templates) == {"LGE"} and np.allclose(back.templates["LGE"].numpy(), template, atol=1e-6)
    placed = back.placed_on(Grid((50, 50), (2.0, 2.0), (0.0, 0.0), (1, 0, 0, 1)))
    assert set(placed.templates) == {"LGE"}
    # a listed template that is gone is named
    (tmp_path / "atlas_template_LGE.nii.gz").unlink()
    with pytest.raises(InputError, match="lists the template .*atlas_template_LGE.nii.gz, which is missing"):
        Atlas.read([tmp_path / "atlas.nii.gz"], image_ndim=2)


def test_template_images_must_match_the_label_maps_before_any_work(template_atlas, tmp_path):
    _, maps, images, _, _ = template_atlas
    with pytest.raises(InputError, match="images: 3 LGE images for 4 label maps"):
        build_atlas(maps, GroupwiseSettings(register="affine"), images={"LGE": images[:3]})
    args = ["atlas", "build", "--label-maps", *map(str, maps), "--register", "affine", "--out", str(tmp_path / "a.nii.gz")]
    result = CliRunner().invoke(main, args + [arg for p in images[:3] for arg in ("--images", f"LGE={p}")])
    assert result.exit_code == 1 and "--images: 3 LGE images for 4 label maps" in result.output
    result = CliRunner().invoke(main, args + ["--images", "LGE"])
    assert result.exit_code == 1 and "--images: expected SEQ=PATH" in result.output


def test_a_template_recovers_a_misplaced_atlas(template_atlas):
    *_, atlas, _ = template_atlas
    rng = np.random.default_rng(11)
    grid = Grid((90, 84), (1.3, 1.3), (-48.0, -62.0), (1, 0, 0, 1))
    truth = heart(grid, np.array([9.0, -7.0]))  # the atlas's heart sits near the origin: 11 mm off
    case = Image.from_array(scan(truth, rng), grid, "LGE", "case")

    def prior_dice(registration):
        result = segment_subject(Subject([case], atlas=atlas), registration=registration, max_iter=5)
        prior = np.asarray(CARDIAC_LABELS.values)[result.common.prior.argmax(0).numpy()]
        return mean_dice(prior, truth, grid), result

    placed_by_header, _ = prior_dice(RegistrationSettings(atlas="none", template_metric="none"))
    by_template, result = prior_dice(RegistrationSettings(atlas="none", template_metric="ncc"))
    assert placed_by_header < 0.6 and by_template > 0.85, (placed_by_header, by_template)
    record = result.registration.template
    assert record["sequence"] == "LGE" and record["loss_after"] < record["loss_before"]
    # the likelihood levels continue from the template's affine placement
    refined, _ = prior_dice(RegistrationSettings(atlas="affine", template_metric="ncc", max_outer=3))
    assert refined > 0.85, refined


def test_template_settings_are_checked(template_atlas):
    *_, atlas, _ = template_atlas
    case = Image.from_array(np.zeros((20, 20), dtype=np.float32) + np.arange(20), Grid((20, 20), (2.0, 2.0),
                                                                                        (0.0, 0.0), (1, 0, 0, 1)), "C0")
    with pytest.raises(InputError, match="template_sequence: the atlas has no 'T2' template"):
        segment_subject(Subject([case], atlas=atlas), registration=RegistrationSettings(template_sequence="T2"))
    with pytest.raises(InputError, match="template_transform: a svf from the template cannot be continued"):
        RegistrationSettings(atlas="ffd", template_transform="svf")
