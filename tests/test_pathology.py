"""Myocardial pathology from named subtypes: scar in LGE, oedema in T2 (mvmm.pathology), MyoPS metrics."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mvmm.cli import main
from mvmm.core.errors import InputError
from mvmm.core.settings import ExperimentSettings, PathologySettings
from mvmm.data import io
from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS, PATHOLOGY_LABELS
from mvmm.data.phantom import make_phantom, write_phantom
from mvmm.data.subject import Subject
from mvmm.evaluate import evaluate_label_files
from mvmm.mixture import MultivariateMixture
from mvmm.pathology import cardiac_pathology_subtypes, named_pathologies, pathology_maps
from mvmm.segment import preset_values, segment_subject


def dice(a, b):
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def fitted_phantom(seed, **kwargs):
    phantom = make_phantom(seed=seed, ndim=2)
    images = [phantom.images[s] for s in ("LGE", "C0", "T2")]
    atlas = Atlas.builtin_cardiac(images[0].grid, CARDIAC_LABELS)
    result = segment_subject(Subject(images, atlas=atlas), learn_proportions=False, registration=None,
                             device="cpu", **kwargs)
    return phantom, result


@pytest.mark.parametrize("seed", [0, 1])
def test_scar_and_oedema_are_found_from_the_subtypes(seed):
    """The subtype rule: the phantom's pathology is a step of intensity, which the named subtypes find."""
    phantom, result = fitted_phantom(seed, pathology=True, pathology_rule=PathologySettings(rule="subtype"))
    assert result.pathology_rule.rule == "subtype" and result.settings["pathology_rule"]["rule"] == "subtype"
    assert result.settings["subtypes"] == ["LGE:Myo=normal,scar", "T2:Myo=normal,oedema"]
    on_lge, on_t2 = pathology_maps(result, "LGE"), pathology_maps(result, "T2")
    assert on_lge.names == ["scar", "oedema"]
    assert dice(on_lge.mask["scar"], phantom.scar.data[0].numpy() > 0.5) > 0.75
    assert dice(on_t2.mask["oedema"], phantom.oedema.data[0].numpy() > 0.5) > 0.85
    # scar over oedema, both inside the myocardium, probabilities within [0, 1]
    assert not (on_t2.mask["scar"] & on_t2.mask["oedema"]).any()
    assert (on_t2.mask["oedema"] <= on_t2.tissue_mask["oedema"]).all()
    for p in on_t2.names:
        assert on_t2.probability[p].min() >= 0.0 and on_t2.probability[p].max() <= 1.0
    # the mask is the most probable of normal / scar / oedema where the label map says myocardium
    assert on_lge.probability["scar"][on_lge.mask["scar"]].mean() > 0.5


def test_the_n_sd_rule_thresholds_the_normal_myocardium_gaussian():
    """The default rule: scar where the LGE is more than scar_sd standard deviations of the myocardium above its
    normal subtype's fitted mean, oedema where the T2 is more than oedema_sd above its normal level and it is not
    scar — within the label map's myocardium; a higher threshold marks a subset; the subtype rule differs."""
    phantom, result = fitted_phantom(0, pathology=True)
    assert result.pathology_rule == PathologySettings() and result.pathology_rule.rule == "sd"
    params, k = result.model.params_, result.labels.names.index("Myo")
    for name in (None, "T2"):
        sample = result.sample_on(name)
        maps = pathology_maps(result, name)
        myo = maps.tissue_mask["scar"]
        above = {}
        for pathology, image in (("scar", "LGE"), ("oedema", "T2")):
            i = sample.names.index(image)
            normal = int(torch.argmin(params.means[0, i, k, :2]))
            threshold = float(params.means[0, i, k, normal]
                              + result.pathology_rule.threshold_sd(pathology) * params.variances[0, i, k, normal].sqrt())
            above[pathology] = (sample.images[i].numpy() > threshold) & sample.coverage[i].numpy() & myo
        assert above["scar"].any() and above["oedema"].any()
        assert (maps.mask["scar"] == above["scar"]).all()
        assert (maps.mask["oedema"] == (above["oedema"] & ~above["scar"])).all()
    strict = replace(result, pathology_rule=PathologySettings(scar_sd=3.0, oedema_sd=3.0))
    loose, tight = pathology_maps(result, "T2"), pathology_maps(strict, "T2")
    for p in ("scar", "oedema"):
        assert tight.mask[p].sum() < loose.mask[p].sum()
    assert (tight.mask["scar"] <= loose.mask["scar"]).all()
    subtype = pathology_maps(replace(result, pathology_rule=PathologySettings(rule="subtype")), "T2")
    assert (subtype.mask["oedema"] != loose.mask["oedema"]).any()
    # the probability maps are the subtypes' posteriors under either rule
    assert np.array_equal(subtype.probability["scar"], loose.probability["scar"])


def test_pathology_rule_settings_are_checked():
    for bad, match in (({"rule": "otsu"}, "PathologySettings.rule"), ({"scar_sd": -1.0}, "PathologySettings.scar_sd"),
                       ({"oedema_sd": float("inf")}, "PathologySettings.oedema_sd"),
                       ({"scar_sd": float("nan")}, "PathologySettings.scar_sd")):
        with pytest.raises(InputError, match=match):
            PathologySettings(**bad)
    with pytest.raises(InputError, match="PathologySettings.oedema_sd"):
        ExperimentSettings(pathology=True, oedema_sd=-0.5)
    assert ExperimentSettings(scar_sd=2.0).pathology_settings() == PathologySettings(scar_sd=2.0)
    _, result = fitted_phantom(0, subtypes=["LGE:Myo=scar,normal"], pathology=True)
    with pytest.raises(InputError, match="scar is named as the darkest subtype of LGE:Myo"):
        pathology_maps(result)


def test_the_cardiac_clean_up_keeps_pathological_wall(monkeypatch):
    """With named pathology subtypes, every label map (common grid, each image's grid, the pathology's
    own) hands the cardiac clean-up the wall where scar or oedema is the most probable level, to keep
    as myocardium (tests/test_postprocess.py checks what the clean-up does with it)."""
    from mvmm import segment
    from mvmm.pathology import pathological_wall

    _, result = fitted_phantom(0, pathology=True, postprocess="cardiac")
    seen = []
    clean_up = segment.postprocess_labels

    def spy(labels, label_set, method, slice_axis=0, keep_wall=None):
        seen.append(keep_wall)
        return clean_up(labels, label_set, method, slice_axis, keep_wall)

    monkeypatch.setattr(segment, "postprocess_labels", spy)
    for name in (None, "T2"):
        sample = result.sample_on(name)
        wall = pathological_wall(result, sample)
        seen.clear()
        kept = result.label_map_on(name)
        assert len(seen) == 1 and seen[0] is not None and (seen[0] == wall).all() and wall.any()
        maps = pathology_maps(result, name)
        assert (seen[-1] == wall).all() and (maps.tissue_mask["scar"] == (kept == 200)).all()
        for p in maps.names:  # the masks are the wall's pathology inside the myocardium
            assert (maps.mask[p] <= wall).all()
    seen.clear()
    result.label_map()  # the common grid by default
    assert seen and seen[0] is not None
    _, plain_fit = fitted_phantom(0, subtypes=["LGE:Myo=2"], postprocess="cardiac")
    assert pathological_wall(plain_fit, plain_fit.common) is None


def test_without_named_subtypes_there_is_no_pathology_to_read():
    _, result = fitted_phantom(0, subtypes=["LGE:Myo=2"])
    with pytest.raises(InputError, match="no subtype is named scar or oedema"):
        pathology_maps(result)
    with pytest.raises(InputError, match="scar is named twice"):
        named_pathologies(["LGE:Myo=normal,scar", "T2:Myo=normal,scar"], ["LGE", "T2"], ["bg", "Myo"])
    assert cardiac_pathology_subtypes(["de", "C0", "t2"]) == ["de:Myo=normal,scar", "t2:Myo=normal,oedema"]


def test_pathology_needs_an_image_that_shows_it():
    phantom = make_phantom(seed=0, ndim=2)
    images = [phantom.images["C0"]]
    with pytest.raises(InputError, match="no image shows scar or oedema"):
        segment_subject(Subject(images, atlas=Atlas.builtin_cardiac(images[0].grid, CARDIAC_LABELS)),
                        pathology=True, registration=None, device="cpu")


def test_tied_subtypes_split_a_bright_minority_from_the_bulk():
    """Untied, EM fits a tissue's tails with a narrow and a wide Gaussian at one mean; tied levels
    (named subtypes) find the bright minority: the reason named subtypes share their variance."""
    rng = np.random.default_rng(0)
    n = 6000
    tissue = np.where(rng.random(n) < 0.08, rng.normal(0.60, 0.04, n), rng.normal(0.33, 0.04, n))
    tissue[: n // 5] = rng.uniform(0.15, 0.45, n // 5)  # partial volume with the neighbours
    images = torch.as_tensor(np.concatenate([rng.normal(0.0, 0.05, n), tissue]))[None].float()
    prior = torch.zeros((2, 2 * n))
    prior[0, :n], prior[1, n:] = 1.0, 1.0
    tied = MultivariateMixture(n_subtypes=[[1, 2]], tied_variances=[[False, True]], learn_proportions=False,
                               random_state=0).fit(images, prior=prior)
    means, sd = tied.means_[0, 1], np.sqrt(tied.variances_[0, 1])
    assert abs(means.max() - 0.60) < 0.03 and abs(means.min() - 0.33) < 0.03
    assert sd[0] == pytest.approx(sd[1])
    untied = MultivariateMixture(n_subtypes=[[1, 2]], learn_proportions=False, random_state=0).fit(images, prior=prior)
    assert abs(untied.means_[0, 1].max() - 0.60) > 0.1  # the failure the tie is there for


def test_subtype_responsibilities_sum_to_one_and_fall_back_to_the_weights_where_uncovered():
    phantom, result = fitted_phantom(0, pathology=True)
    sample = result.common
    coverage = sample.coverage.clone()
    coverage[1, :10] = False
    within = result.model.predict_subtype_proba(sample.images, coverage, sample.prior, sample.grid.spacing)
    assert torch.allclose(within[0][1].sum(0), torch.ones(()), atol=1e-5)
    weights = result.model.params_.log_weights[0, 1].exp()
    assert torch.allclose(within[1][:, :, :10], weights[..., None, None].to(within[1].dtype).expand(-1, -1, 10, within[1].shape[-1]))


def test_pathology_outputs_volumes_and_myops_evaluation(tmp_path):
    # the subtype rule, which finds the phantom's step of scar (the n-SD rule's threshold also takes the normal
    # wall's bright tail: the volume check below is of the outputs, not of the rule)
    phantom, result = fitted_phantom(1, pathology=True, pathology_rule=PathologySettings(rule="subtype"))
    files = result.write(tmp_path / "out")
    report = json.loads(files["report"].read_text())["pathology"]
    assert report["labels"] == PATHOLOGY_LABELS
    scar = report["common_grid"]["scar"]
    voxel = result.common.grid.voxel_volume_ml
    assert scar["ml"] == pytest.approx(float((phantom.scar.data[0] > 0.5).sum()) * voxel, rel=0.35)
    assert 0 < scar["percent_of_tissue"] < 100 and scar["tissue_fraction_defined"] == 1.0
    for name in ("pathology", "pathology_LGE", "pathology_T2", "scar_probability", "oedema_probability_T2",
                 "pathology_figure"):
        assert files[name].exists(), name
    values = set(np.unique(io.read_array(files["pathology_T2"], "x")[0]).tolist())
    assert values <= {0, 1220, 2221} and {1220, 2221} <= values
    # MyoPS-valued truth on the T2 grid: evaluate reads the values and reports scar and scar ∪ oedema
    truth = np.where(phantom.oedema.data[0].numpy() > 0.5, PATHOLOGY_LABELS["oedema"], 0).astype(np.int16)
    io.write_array(tmp_path / "truth.nii.gz", truth, phantom.oedema.grid)
    metrics = evaluate_label_files(files["pathology_T2"], tmp_path / "truth.nii.gz")
    assert set(metrics) == {"scar", "scar+oedema"}
    assert np.isnan(metrics["scar"]["dice"]) or metrics["scar"]["dice"] == 0.0  # no scar in this truth
    assert metrics["scar+oedema"]["dice"] > 0.3


def test_evaluate_counts_pathology_as_myocardium_for_the_structures(tmp_path):
    grid = make_phantom(seed=0, ndim=2).images["LGE"].grid
    truth = np.zeros(grid.shape, dtype=np.int16)
    truth[10:20, 10:20], truth[12:15, 12:15], truth[30:40, 30:40], truth[45:50, 45:50] = 200, 2221, 500, 600
    pred = truth.copy()
    pred[12:15, 12:15] = 1220  # oedema where the truth has scar: scar missed, scar ∪ oedema right
    for name, array in (("pred", pred), ("truth", truth)):
        io.write_array(tmp_path / f"{name}.nii.gz", array, grid)
    metrics = evaluate_label_files(tmp_path / "pred.nii.gz", tmp_path / "truth.nii.gz")
    assert metrics["Myo"]["dice"] == 1.0 and metrics["LV"]["dice"] == 1.0
    assert metrics["scar"]["dice"] == 0.0 and metrics["scar+oedema"]["dice"] == 1.0


def test_preset_is_cardiac_for_a_cardiac_atlas_and_names_the_images_as_given():
    phantom = make_phantom(seed=0, ndim=2)
    images = [Image(phantom.images["LGE"].data, phantom.images["LGE"].grid, "lge"), phantom.images["C0"]]
    cardiac = Subject(images, atlas=Atlas.builtin_cardiac(images[0].grid, CARDIAC_LABELS))
    values = preset_values("auto", cardiac)
    assert values["subtypes"] == ["lge:Myo=2"] and values["proportions"] == "atlas" and values["roi_margin_mm"] == 5.0
    assert preset_values("auto", cardiac, pathology=True)["subtypes"] == ["lge:Myo=normal,scar"]
    assert preset_values("none", cardiac) == {} and preset_values("auto", Subject(images)) == {}
    with pytest.raises(InputError, match="preset: expected one of auto, cardiac, none"):
        preset_values("heart", cardiac)
    with pytest.raises(InputError, match="preset: cardiac .* needs an atlas"):
        preset_values("cardiac", Subject(images))


def test_segment_cli_preset_pathology_and_scanner_int16_images(tmp_path):
    """`mvmm segment --pathology` with the auto (cardiac) preset; an explicit option beats the preset;
    a T2 stored as int16 in scanner units is an image, not a label map."""
    case = write_phantom(tmp_path / "case", seed=1, ndim=2)
    t2, grid, _ = io.read_array(case["T2"], "x")
    scanner = tmp_path / "T2.nii.gz"
    io.write_array(scanner, np.round(t2 * 3000 + 17).astype(np.int16), grid)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["segment", "--images", str(case["LGE"]), str(case["C0"]), str(scanner),
                                       "--pathology", "--proportions", "learned", "--out", str(out),
                                       "--device", "cpu", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "scar" in result.output and "oedema" in result.output and "label map" not in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["preset"] == {"name": "auto", "applied": ["affine_weight", "atlas_search_fov", "atlas_search_mm",
                                                                        "postprocess", "prior_votes", "roi_margin_mm",
                                                                        "subtypes", "template_metric"]}
    assert report["settings"]["prior_votes"] is True
    assert report["settings"]["learn_proportions"] is True  # given explicitly
    assert report["settings"]["subtypes"] == ["LGE:Myo=normal,scar", "T2:Myo=normal,oedema"]
    assert report["pathology"]["images"]["T2"]["oedema"]["ml"] > 0
    assert (out / "pathology" / "pathology.png").exists()
    assert report["settings"]["pathology_rule"] == {"rule": "sd", "scar_sd": 1.5, "oedema_sd": 1.0}
    refused = CliRunner().invoke(main, ["segment", "--images", str(case["LGE"]), "--scar-sd", "2",
                                        "--out", str(tmp_path / "no"), "--device", "cpu"])
    assert refused.exit_code != 0 and "--scar-sd" in refused.output and "--pathology" in refused.output
    assert not (tmp_path / "no").exists()
