"""Atlas sets, multi-atlas priors (registration + locally weighted fusion), and `mvmm segment --atlas-set`;
the fit-guided prior (label maps registered to a first fit, `--atlas-set-guide fit`)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage

from mvmm.cli import main
from mvmm.core.errors import InputError
from mvmm.core.grid import Grid
from mvmm.core.settings import FitGuidedSettings, MultiAtlasSettings
from mvmm.data.atlas import Atlas
from mvmm.data import io
from mvmm.data.atlas_set import entries_of, label_maps_of, read_atlas_set
from mvmm.data.image import Image
from mvmm.data.labels import LabelSet, one_hot
from mvmm.metrics import structure_metrics
from mvmm.data.subject import Subject
from mvmm.multi_atlas import fit_guided_prior, local_ncc, multi_atlas_prior, read_atlas, read_labels
from mvmm.segment import segment_subject

NAMED = LabelSet(("outside", "wall", "pool", "right"), (0, 200, 500, 600))
INTENSITY = {0: 0.35, 200: 0.12, 500: 0.8, 600: 0.7}


def heart(grid: Grid, centre, lv=14.0, wall=8.0, rv=(14.0, 26.0)) -> np.ndarray:
    """A 2D heart (values 0/200/500/600) with an LV of radius ``lv``, a ``wall`` mm myocardium and an RV
    ellipse of half-axes ``rv``, about ``centre`` (mm)."""
    points = grid.world_points(dtype=torch.float64).numpy() - np.asarray(centre)
    x, y = points[..., 0], points[..., 1]
    r = np.hypot(x, y)
    out = np.zeros(grid.shape, dtype=np.int16)
    out[((x + lv + wall + rv[0] - 6) / rv[0]) ** 2 + (y / rv[1]) ** 2 < 1] = 600
    out[r < lv + wall] = 200
    out[r < lv] = 500
    return out


def scan(labels: np.ndarray, rng, noise=0.03) -> np.ndarray:
    """An image of a label map: a tissue contrast, a body ellipse around the heart, noise."""
    image = np.vectorize(INTENSITY.get)(labels).astype(np.float32)
    return image + rng.normal(0, noise, labels.shape).astype(np.float32)


def write_case(folder, name, grid, labels, rng):
    io.write_array(folder / f"{name}_LGE.nii.gz", scan(labels, rng), grid)
    io.write_array(folder / f"{name}_LGE_manual.nii.gz", labels, grid)


# each atlas errs in its own way (LV too small or large, wall too thin or thick, RV shorter or longer):
# no affine map makes one of them the target, and their errors cancel in a vote
SHAPES = [dict(lv=11.0, wall=10.0, rv=(12.0, 30.0)), dict(lv=17.0, wall=6.0, rv=(16.0, 22.0)),
          dict(lv=12.0, wall=7.0, rv=(17.0, 28.0)), dict(lv=16.0, wall=9.5, rv=(11.0, 24.0)),
          dict(lv=14.5, wall=6.5, rv=(15.0, 31.0))]


@pytest.fixture(scope="module")
def atlas_set(tmp_path_factory):
    """Five labelled subjects on their own grids (headers anywhere, heart off-centre), and a target."""
    folder = tmp_path_factory.mktemp("set")
    rng = np.random.default_rng(3)
    for i, shape in enumerate(SHAPES):
        spacing = tuple(rng.uniform(1.1, 1.5, 2))
        grid = Grid((int(120 / spacing[0]), int(110 / spacing[1])), spacing, (200.0 * i, -50.0 * i), (1, 0, 0, 1))
        write_case(folder, f"subject{i + 1}", grid, heart(grid, grid.center_world() + rng.uniform(-6, 6, 2), **shape),
                   rng)
    target_grid = Grid((96, 88), (1.25, 1.25), (-40.0, 10.0), (1, 0, 0, 1))
    truth = heart(target_grid, target_grid.center_world() + np.array([4.0, -3.0]))
    target = Image.from_array(scan(truth, rng), target_grid, "LGE", "target")
    return folder, target, truth


def mean_dice(labels: np.ndarray, truth: np.ndarray, grid: Grid) -> float:
    return float(np.mean([structure_metrics(labels == v, truth == v, grid.spacing)["dice"] for v in (200, 500, 600)]))


def test_fused_prior_beats_every_single_atlas_and_is_a_probability_map(atlas_set):
    folder, target, truth = atlas_set
    entries = entries_of(read_atlas_set(folder), "LGE")
    assert [e.subject for e in entries] == [f"subject{i}" for i in range(1, 6)]
    settings = MultiAtlasSettings(transform="affine", workers=1)
    singles = []
    for entry in entries:
        atlas, _ = multi_atlas_prior(target, [entry], settings, NAMED)
        singles.append(mean_dice(np.asarray(NAMED.values)[atlas.probabilities.argmax(0).numpy()], truth, target.grid))
    fused, report = multi_atlas_prior(target, entries, settings, NAMED)
    fused_dice = mean_dice(np.asarray(NAMED.values)[fused.probabilities.argmax(0).numpy()], truth, target.grid)
    assert min(singles) > 0.6, singles  # every registration found the heart
    assert fused_dice > max(singles) + 0.01, (fused_dice, singles)
    # a prior: on the case's grid, non-negative, one at every voxel, the user's label names and values
    assert fused.grid.same_geometry(target.grid) and fused.labels == NAMED and fused.frame == "world"
    p = fused.probabilities
    assert float(p.min()) >= 0 and torch.allclose(p.sum(0), torch.ones(()), atol=1e-5)
    assert len(report["similarity_after_affine"]) == 5 and report["kept"] == [e.name for e in entries]


def test_the_most_similar_atlases_are_kept_and_worker_processes_agree(atlas_set):
    folder, target, truth = atlas_set
    entries = entries_of(read_atlas_set(folder), "LGE")
    one, report = multi_atlas_prior(target, entries, MultiAtlasSettings(size=2, workers=1), NAMED)
    ranked = np.argsort(report["similarity_after_affine"])[::-1][:2]
    assert sorted(report["kept"]) == sorted(entries[i].name for i in ranked)
    two, _ = multi_atlas_prior(target, entries, MultiAtlasSettings(size=2, workers=2), NAMED)
    agree = (one.probabilities.argmax(0) == two.probabilities.argmax(0)).float().mean()
    assert float(agree) > 0.99


def test_worker_processes_serve_later_calls_until_a_call_fails_or_they_are_stopped():
    """Starting the spawned workers (each imports torch) cost seconds per call; one pool serves them all."""
    import os

    from mvmm import multi_atlas

    multi_atlas.stop_workers()
    pool = multi_atlas.worker_pool(2, 3, "cpu")
    first = multi_atlas.run_jobs(os.getpid, [()] * 3, pool, "pids", False)
    assert os.getpid() not in first  # the jobs ran in the workers
    started = {process.pid for process in pool._processes.values()}
    assert multi_atlas.worker_pool(2, 20, "cpu") is pool and multi_atlas.worker_pool(2, 1, "cpu") is None
    assert multi_atlas.worker_pool(2, 5, "cuda:0") is None  # one process drives a GPU
    again = multi_atlas.run_jobs(os.getpid, [()] * 3, pool, "pids", False)
    assert set(again) <= started and {process.pid for process in pool._processes.values()} == started
    # a job's error ends the call's pool (nothing of it stays queued); the next call starts a new one
    with pytest.raises(ValueError):
        multi_atlas.run_jobs(int, [("not a number",), ("1",)], pool, "fail", False)
    fresh = multi_atlas.worker_pool(2, 3, "cpu")
    assert fresh is not pool and multi_atlas.run_jobs(int, [("1",), ("2",)], fresh, "ints", False) == [1, 2]
    multi_atlas.stop_workers()
    assert multi_atlas.worker_pool(2, 3, "cpu") is not fresh
    multi_atlas.stop_workers()


def test_local_ncc_weights_the_atlas_that_matches_there():
    rng = np.random.default_rng(0)
    fixed = rng.normal(size=(30, 40))
    good = fixed + 0.1 * rng.normal(size=fixed.shape)
    bad = rng.normal(size=fixed.shape)
    mask = np.ones(fixed.shape, dtype=bool)
    mask[:, :5] = False
    assert local_ncc(fixed, good, mask, (2.0, 2.0))[mask].mean() > 0.9
    assert abs(local_ncc(fixed, bad, mask, (2.0, 2.0))[mask].mean()) < 0.3
    assert np.all(local_ncc(fixed, good, mask, (2.0, 2.0))[~mask] == -1.0)


def test_atlas_sets_from_a_csv_and_clear_errors(tmp_path, atlas_set):
    folder, _, _ = atlas_set
    csv = tmp_path / "set.csv"
    csv.write_text("subject,sequence,image,labels\n"
                   f"a,LGE,{folder / 'subject1_LGE.nii.gz'},{folder / 'subject1_LGE_manual.nii.gz'}\n")
    (entry,) = read_atlas_set(csv)
    assert (entry.subject, entry.sequence) == ("a", "LGE")
    with pytest.raises(InputError, match="atlas_set: no labelled 'C0' image .*LGE"):
        entries_of([entry], "C0")
    bad = tmp_path / "bad.csv"
    bad.write_text("subject,image\na,x.nii.gz\n")
    with pytest.raises(InputError, match="atlas_set: .*missing: sequence, labels"):
        read_atlas_set(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("subject,sequence,image,labels\na,LGE,nowhere.nii.gz,nowhere_manual.nii.gz\n")
    with pytest.raises(InputError, match="line 2: image 'nowhere.nii.gz' is not a file"):
        read_atlas_set(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no labelled image"):
        read_atlas_set(empty)
    with pytest.raises(InputError, match="neither a folder nor a CSV"):
        read_atlas_set(tmp_path / "nothing")
    # a label map off its image's grid is named
    grid = Grid((10, 10), (1.0, 1.0), (0.0, 0.0), (1, 0, 0, 1))
    io.write_array(tmp_path / "odd_LGE.nii.gz", np.random.default_rng(0).normal(size=(10, 10)), grid)
    io.write_array(tmp_path / "odd_LGE_manual.nii.gz", np.zeros((9, 10), dtype=np.int16), Grid((10, 9), (1.0, 1.0),
                                                                                                 (0.0, 0.0), (1, 0, 0, 1)))
    (odd,) = [e for e in read_atlas_set(tmp_path) if e.subject == "odd"]
    with pytest.raises(InputError, match="odd_LGE_manual.nii.gz is not on the grid of its image"):
        read_atlas(odd, grid, NAMED)


def test_segment_with_an_atlas_set_from_the_command_line(tmp_path, atlas_set):
    folder, target, truth = atlas_set
    target.write(tmp_path / "LGE.nii.gz")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["segment", "--images", str(tmp_path / "LGE.nii.gz"), "--atlas-set", str(folder),
                                       "--atlas-set-size", "3", "--atlas-set-workers", "1", "--register-atlas", "none",
                                       "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    labels = io.read_array(out / "labels.nii.gz", "labels")[0]
    assert mean_dice(labels, truth, target.grid) > 0.8
    # both priors at once is refused, in flags
    result = CliRunner().invoke(main, ["segment", "--images", str(tmp_path / "LGE.nii.gz"), "--atlas-set", str(folder),
                                       "--atlas", "builtin:cardiac", "--out", str(tmp_path / "o2"), "-q"])
    assert result.exit_code == 1 and "--atlas-set: give --atlas or --atlas-set, not both" in result.output


def soft_onehot(labels: np.ndarray, values, sigma: float = 1.0) -> torch.Tensor:
    """A fit's posterior stand-in: the one-hot of ``labels`` blurred and renormalised, ``[K, *S]``."""
    onehot = np.stack([ndimage.gaussian_filter((labels == v).astype(np.float32), sigma) for v in values])
    return torch.from_numpy(onehot / onehot.sum(0, keepdims=True))


def test_label_maps_registered_to_a_fit_take_its_shape(atlas_set):
    folder, target, truth = atlas_set
    entries = entries_of(read_atlas_set(folder), "LGE")
    fit = Image(soft_onehot(truth, NAMED.values), target.grid, "posterior")

    def dice_of(transform):
        prior, report = fit_guided_prior(fit, entries, FitGuidedSettings(transform=transform, workers=1), NAMED,
                                         target.grid)
        return mean_dice(np.asarray(NAMED.values)[prior.probabilities.argmax(0).numpy()], truth, target.grid), prior, report

    laid, _, _ = dice_of("rigid")
    bent, prior, report = dice_of("ffd")
    # the subjects' shapes differ from the fit's (SHAPES): a non-linear map takes them there, a rigid one cannot
    assert bent > 0.95 and 1 - bent < 0.6 * (1 - laid), (laid, bent)
    assert prior.grid.same_geometry(target.grid) and prior.labels == NAMED and prior.frame == "world"
    p = prior.probabilities
    assert float(p.min()) >= 0 and torch.allclose(p.sum(0), torch.ones(()), atol=1e-5)
    assert report["guide"] == "fit" and report["atlases"] == [e.name for e in entries]
    names = {e.name for e in entries}
    assert set(report["similarity"]) == set(report["jacobians"]) == names and report["dropped"] == {}
    assert min(report["agreement"].values()) > 0.9


def test_a_label_map_s_image_is_warped_by_its_own_map(atlas_set):
    """The local NCC weights of a fit-guided vote compare the case with each atlas's image where its labels went:
    the image must follow the label map's transform (here the scan's contrast of the warped labels)."""
    from mvmm.multi_atlas import foreground_centre, register_labels_to_fit

    folder, target, truth = atlas_set
    entry = entries_of(read_atlas_set(folder), "LGE")[1]
    fit = Image(soft_onehot(truth, NAMED.values), target.grid, "posterior")
    warped = register_labels_to_fit(fit, foreground_centre(fit, 0), entry, FitGuidedSettings(workers=1), NAMED,
                                    target.grid, with_image=True)
    expected = np.tensordot([INTENSITY[v] for v in NAMED.values], warped["labels"], axes=1)
    inside = warped["inside"]
    assert np.corrcoef(warped["image"][inside], expected[inside])[0, 1] > 0.95
    assert "image" not in register_labels_to_fit(fit, foreground_centre(fit, 0), entry, FitGuidedSettings(workers=1),
                                                 NAMED, target.grid)


@pytest.mark.parametrize("fusion", ["local-ncc", "joint"])
def test_fit_guided_votes_weigh_each_map_by_how_its_image_matches_the_case_there(atlas_set, monkeypatch, fusion):
    """Two registered label maps that disagree on the left half: with local NCC (or joint fusion) the one whose
    image matches the case there wins there (and the other where its image matches); the plain vote, or a set of
    another sequence (whose images cannot be compared with the case), averages them, and the report says which
    and why."""
    from mvmm import multi_atlas

    _, target, _ = atlas_set
    case = target.data[0].numpy()
    rng = np.random.default_rng(1)
    noise = rng.normal(0, case.std(), case.shape).astype(np.float32)
    left = np.zeros(case.shape, dtype=bool)
    left[:, : case.shape[1] // 2] = True

    def fake_registration(fit, centre, entry, settings, labels, grid, device, with_image):
        first = entry.subject == "subject1"
        chosen = np.zeros((len(labels),) + case.shape, dtype=np.float32)
        chosen[1 if first else 2] = 1.0  # subject1 calls everything wall, subject2 pool
        image = np.where(left == first, case, noise)  # subject1's image is the case's on the left, subject2's right
        out = {"labels": chosen, "inside": np.ones(case.shape, dtype=bool), "jacobian": None, "similarity": 0.0,
               "agreement": 1.0}
        return {**out, "image": image} if with_image else out

    monkeypatch.setattr(multi_atlas, "register_labels_to_fit", fake_registration)
    entries = entries_of(read_atlas_set(atlas_set[0]), "LGE")[:2]
    fit = Image(torch.full((4,) + case.shape, 0.25), target.grid, "posterior")
    # the weights alone (the local search before them: tests/test_joint_fusion.py)
    settings = FitGuidedSettings(workers=1, sigma_mm=0.0, fusion=fusion, search_voxels=0)
    weighted, report = fit_guided_prior(fit, entries, settings, NAMED, target.grid, reference=target)
    p = weighted.probabilities.numpy()
    assert report["fusion"] == fusion and np.allclose(p.sum(0), 1.0, atol=1e-5)
    inner = ndimage.binary_erosion(left, iterations=8), ndimage.binary_erosion(~left, iterations=8)
    assert p[1][inner[0]].mean() > 0.95 and p[2][inner[1]].mean() > 0.95
    for kwargs in ({"settings": dataclasses.replace(settings, fusion="vote"), "reference": target},
                   {"settings": settings, "reference": None},
                   {"settings": settings, "reference": Image(target.data, target.grid, "cine", "another sequence")}):
        plain, report = fit_guided_prior(fit, entries, kwargs["settings"], NAMED, target.grid,
                                         reference=kwargs["reference"])
        assert report["fusion"] == "vote", report["fusion_reason"]
        assert np.allclose(plain.probabilities[1:3].numpy(), 0.5, atol=1e-6)
    assert "not of the reference's sequence 'cine'" in report["fusion_reason"]
    with pytest.raises(InputError, match="FitGuidedSettings.fusion"):
        FitGuidedSettings(fusion="majority")


def test_segment_refits_on_the_atlas_set_registered_to_its_first_fit(tmp_path, atlas_set):
    folder, target, truth = atlas_set
    target.write(tmp_path / "LGE.nii.gz")
    out = tmp_path / "out"
    args = ["segment", "--images", str(tmp_path / "LGE.nii.gz"), "--atlas-set", str(folder), "--atlas-set-guide", "fit",
            "--atlas-set-workers", "1", "--labels", "outside=0,wall=200,pool=500,right=600", "-q"]
    result = CliRunner().invoke(main, args + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["atlas_set"]["guide"] == "fit"
    assert report["settings"]["atlas_set"]["atlases"] == [f"subject{i} LGE" for i in range(1, 6)]
    assert {"guide_fit_s", "atlas_set_s"} <= set(report["timings_s"])
    assert report["settings"]["atlas_set"]["fusion"] == "joint"  # the set's images are the case's sequence
    labels = io.read_array(out / "labels.nii.gz", "labels")[0]
    assert mean_dice(labels, truth, target.grid) > 0.85
    result = CliRunner().invoke(main, args + ["--atlas-set-fusion", "vote", "--prior-votes", "--atlas-set-prior-weight",
                                              "5", "--out", str(tmp_path / "vote")])
    assert result.exit_code == 0, result.output
    voted = json.loads((tmp_path / "vote" / "report.json").read_text())["settings"]
    assert voted["atlas_set"]["fusion"] == "vote" and voted["atlas_set"]["settings"]["fusion"] == "vote"
    # the weight reaches the settings, but a prior fused by an equal vote has not seen the image: it votes as 1
    assert voted["atlas_set"]["settings"]["prior_weight"] == 5 and voted["prior_weight"] == 1.0
    # only the atlases' similarity chooses some of them: not with the fit as the guide (named in flags)
    result = CliRunner().invoke(main, args + ["--atlas-set-size", "3", "--out", str(tmp_path / "o2")])
    assert result.exit_code == 1 and "--atlas-set-size" in result.output and "--atlas-set-guide" in result.output
    assert report["settings"]["prior_votes"] is False and "prior_weight" not in report["settings"]  # no vote here


def test_a_refit_reports_its_first_fit_s_quality(atlas_set):
    folder, target, truth = atlas_set
    entries = entries_of(read_atlas_set(folder), "LGE")
    subject = Subject([target], Atlas.builtin_cardiac(target.grid, NAMED), roi_margin_mm=10.0)
    first = segment_subject(subject, learn_proportions=False)
    # the label maps as registered to the fit (the local search would move them by the images)
    refit = segment_subject(subject, learn_proportions=False, atlas_set=entries,
                            fit_guided=FitGuidedSettings(workers=1, search_voxels=0))
    assert refit.guide is not None and refit.subject.atlas.source.startswith("multi-atlas")
    # the refit's prior was made from the first fit's posterior, so the images barely move it: whether they
    # found the heart is the first fit's measure
    assert refit.posterior_shift() == pytest.approx(first.posterior_shift())
    assert dataclasses.replace(refit, guide=None).posterior_shift() < first.posterior_shift()
    assert "atlas" not in refit.subject.transforms and refit.settings["registration"] is None
    assert refit.settings["guide_fit"]["registration"] == first.settings["registration"]


def test_the_fused_prior_votes_with_its_weight_and_the_quality_undoes_it(atlas_set):
    folder, target, truth = atlas_set
    entries = entries_of(read_atlas_set(folder), "LGE")
    subject = Subject([target], Atlas.builtin_cardiac(target.grid, NAMED), roi_margin_mm=10.0)
    first = segment_subject(subject, learn_proportions=False, prior_votes=True)
    refits = {w: segment_subject(subject, learn_proportions=False, prior_votes=True, atlas_set=entries, guide=first,
                                 fit_guided=FitGuidedSettings(workers=1, search_voxels=0, prior_weight=w))
              for w in (1.0, 3.0)}
    assert FitGuidedSettings().prior_weight == 3.0 and refits[3.0].settings["prior_weight"] == 3.0
    prior = refits[1.0].common.prior.double()
    model = 2 * refits[1.0].posterior.double() - prior  # equal votes: the model's own posterior recovered
    assert (model - prior).abs().max() > 0.5  # the model and the prior disagree somewhere
    # the weight changes what is written, not the fit (nor the prior)
    assert torch.equal(refits[3.0].common.prior, refits[1.0].common.prior)
    assert torch.allclose(refits[3.0].model.params_.means, refits[1.0].model.params_.means)
    assert torch.allclose(refits[3.0].posterior.double(), (model + 3 * prior) / 4, atol=1e-5)
    # the model's departure from its prior is the model's, whatever the vote's weight
    shifts = [dataclasses.replace(r, guide=None).posterior_shift() for r in refits.values()]
    assert shifts[0] == pytest.approx(shifts[1], abs=1e-5)
    assert first.prior_weight == 1.0  # the first fit's atlas, not image-weighted, votes equally


def test_a_label_map_far_from_its_field_of_view_centre_is_started_on_the_fit_s_anatomy(tmp_path, atlas_set):
    folder, target, truth = atlas_set
    rng = np.random.default_rng(5)
    grid = Grid((128, 128), (1.25, 1.25), (300.0, -80.0), (1, 0, 0, 1))
    write_case(tmp_path, "far", grid, heart(grid, grid.center_world() + np.array([35.0, 30.0]), **SHAPES[0]), rng)
    (entry,) = entries_of(read_atlas_set(tmp_path), "LGE")
    # the fit on a grid cut to the target's heart (as a fit's region of interest is)
    to_index = target.grid.world_to_index_matrix
    centre = to_index[:2, :2] @ (target.grid.center_world() + [4.0, -3.0]) + to_index[:2, 2]  # ITK order (x, y)
    start = np.round(centre - 36).astype(int)
    origin = target.grid.index_to_world_matrix[:2, :2] @ start + target.grid.origin
    cut = Grid((72, 72), target.grid.spacing, tuple(origin), (1, 0, 0, 1))
    posterior = soft_onehot(truth, NAMED.values)[:, start[1]:start[1] + 72, start[0]:start[0] + 72]
    prior, _ = fit_guided_prior(Image(posterior, cut, "posterior"), [entry], FitGuidedSettings(workers=1), NAMED,
                                target.grid)
    assert mean_dice(np.asarray(NAMED.values)[prior.probabilities.argmax(0).numpy()], truth, target.grid) > 0.85


def test_a_label_map_that_does_not_reach_the_fit_s_anatomy_is_left_out(tmp_path, atlas_set, caplog):
    folder, target, truth = atlas_set
    rng = np.random.default_rng(6)
    for name in ("subject1", "subject2"):
        for suffix in ("LGE", "LGE_manual"):
            (tmp_path / f"{name}_{suffix}.nii.gz").symlink_to(folder / f"{name}_{suffix}.nii.gz")
    grid = Grid((100, 100), (1.25, 1.25), (0.0, 0.0), (1, 0, 0, 1))  # a heart of a fifth of the size
    write_case(tmp_path, "tiny", grid, heart(grid, grid.center_world(), lv=3.0, wall=2.0, rv=(3.0, 5.0)), rng)
    entries = entries_of(read_atlas_set(tmp_path), "LGE")
    fit = Image(soft_onehot(truth, NAMED.values), target.grid, "posterior")
    prior, report = fit_guided_prior(fit, entries, FitGuidedSettings(workers=1), NAMED, target.grid)
    assert list(report["dropped"]) == ["tiny LGE"] and report["kept"] == ["subject1 LGE", "subject2 LGE"]
    assert "atlas tiny LGE left out of the prior" in caplog.text
    assert mean_dice(np.asarray(NAMED.values)[prior.probabilities.argmax(0).numpy()], truth, target.grid) > 0.9
    with pytest.raises(InputError, match="atlas_set: no atlas's label map could be registered to the first fit"):
        fit_guided_prior(fit, [e for e in entries if e.subject == "tiny"], FitGuidedSettings(workers=1), NAMED,
                         target.grid)


def test_an_atlas_set_with_another_data_set_s_label_values_gives_the_same_prior(tmp_path, atlas_set):
    """Label maps valued as ACDC's (1 right, 2 wall, 3 pool), named like ACDC's files (``_gt``, a frame for a
    sequence), make the fit-guided prior that the same maps with the case's values make, once named by tissue."""
    folder, target, truth = atlas_set
    other = {600: 1, 200: 2, 500: 3}
    for i in range(1, 4):
        array, grid, _ = io.read_array(folder / f"subject{i}_LGE_manual.nii.gz", "labels")
        io.write_array(tmp_path / f"subject{i}_frame01_gt.nii.gz",
                       np.vectorize(lambda v: other.get(int(v), 0))(array).astype(np.int16), grid)
        (tmp_path / f"subject{i}_frame01.nii.gz").symlink_to(folder / f"subject{i}_LGE.nii.gz")
    named = "right=1,wall=2,pool=3"
    entries = read_atlas_set(tmp_path, label_names=named)
    assert [(e.subject, e.sequence, e.label_names) for e in entries] == [(f"subject{i}", "frame01", named)
                                                                        for i in range(1, 4)]
    # the fit-guided prior reads only label maps: a set without the case's sequence gives all of them
    assert label_maps_of(entries, "LGE") == entries
    with pytest.raises(InputError, match="no labelled 'LGE' image"):
        entries_of(entries, "LGE")
    ours = entries_of(read_atlas_set(folder), "LGE")[:3]
    fit = Image(soft_onehot(truth, NAMED.values), target.grid, "posterior")
    settings = FitGuidedSettings(transform="affine", workers=1)
    prior, _ = fit_guided_prior(fit, entries, settings, NAMED, target.grid)
    same, _ = fit_guided_prior(fit, ours, settings, NAMED, target.grid)
    assert torch.equal(prior.probabilities, same.probabilities)
    # a CSV row names its own values; unnamed, foreign or unparsable names are errors naming the option
    csv = tmp_path / "set.csv"
    csv.write_text("subject,sequence,image,labels,label_names\n"
                   f"a,cine,{tmp_path / 'subject1_frame01.nii.gz'},{tmp_path / 'subject1_frame01_gt.nii.gz'},"
                   f"\"{named}\"\n")
    (row,) = read_atlas_set(csv, label_names="ignored=9")
    assert row.label_names == named
    with pytest.raises(InputError, match=r"^atlas_set: .*subject1_frame01_gt.nii.gz has label values \[1, 2, 3\] "
                                         r"that are not in the label set"):
        read_labels(dataclasses.replace(entries[0], label_names=None), target.grid, NAMED)
    with pytest.raises(InputError, match=r"^atlas_set_labels: .* has label values \[3\] that 'right=1,wall=2' "
                                         r"does not name"):
        read_labels(dataclasses.replace(entries[0], label_names="right=1,wall=2"), target.grid, NAMED)
    with pytest.raises(InputError, match="^atlas_set_labels: RV not among the classes outside, wall, pool, right"):
        read_labels(dataclasses.replace(entries[0], label_names="RV=1,wall=2,pool=3"), target.grid, NAMED)
    with pytest.raises(InputError, match="^atlas_set_labels: expected NAME=VALUE"):
        read_atlas_set(tmp_path, label_names="right:1")


def test_one_hot_matches_named_values_by_tissue():
    labels = LabelSet(("bg", "Myo", "LV", "RV"), (0, 200, 500, 600))
    array = np.array([[0, 1, 2], [3, 4, 0]])
    # two values may name one tissue (4: another data set's RV); the background follows the background
    onehot = one_hot(array, labels, "map", "maps", "RV=1,Myo=2,LV=3,RV=4")
    assert onehot.shape == (4, 2, 3) and onehot.dtype == np.float32
    assert np.array_equal(np.asarray(labels.values)[onehot.argmax(0)], [[0, 600, 200], [500, 600, 0]])
    assert np.array_equal(onehot.sum(0), np.ones((2, 3)))
    # the case's own values need no names, and must be exactly the label set's
    own = np.array([[0, 200], [500, 600]])
    assert np.array_equal(one_hot(own, labels, "map", "maps").argmax(0), [[0, 1], [2, 3]])
    with pytest.raises(InputError, match=r"^maps: map has label values \[1, 2, 3, 4\]"):
        one_hot(array, labels, "map", "maps")


def test_the_atlas_set_search_option_reaches_the_fit_guided_settings():
    from mvmm.cli import _fit_guided_settings

    params = {"atlas_set": "set", "atlas_set_guide": "fit", "atlas_set_size": None, "atlas_set_transform": None,
              "atlas_set_fusion": None, "atlas_set_search": None, "atlas_set_workers": 1,
              "atlas_set_prior_weight": 3.0, "atlas_set_slice_shift": 4.5}
    assert _fit_guided_settings(params).search_voxels == FitGuidedSettings().search_voxels == 3
    assert _fit_guided_settings({**params, "atlas_set_search": 0}).search_voxels == 0
    assert _fit_guided_settings({**params, "atlas_set_prior_weight": 1.5}).prior_weight == 1.5
    assert _fit_guided_settings({**params, "atlas_set_slice_shift": 0.0}).slice_shift_mm == 0.0
    with pytest.raises(InputError, match="FitGuidedSettings.slice_shift_mm"):
        FitGuidedSettings(slice_shift_mm=-1.0)
    with pytest.raises(InputError, match="FitGuidedSettings.search_voxels"):
        FitGuidedSettings(search_voxels=-1)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(InputError, match="^FitGuidedSettings.prior_weight: expected"):
            FitGuidedSettings(prior_weight=bad)
