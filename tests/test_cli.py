import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage

from mvmm.cli import main
from mvmm.data import io
from mvmm.data.atlas import Atlas
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.postprocess import postprocess_labels
from mvmm.segment import load_params, load_subject
from mvmm.data.transform_files import load_transforms


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def images_of(files, names=("LGE", "C0", "T2")):
    return ["--images", *[files[n] for n in names]]


def test_help_on_every_command():
    commands = ([], ["segment"], ["evaluate"], ["phantom"], ["demo"], ["warp"], ["register"], ["atlas"],
                ["atlas", "build"], ["check-manifest"], ["experiment"], ["experiment", "mscmr"])
    for cmd in commands:
        result = run(*cmd, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_segment_end_to_end_on_the_phantom(phantom_files, tmp_path):
    out = tmp_path / "seg"
    result = run("segment", *images_of(phantom_files), "--names", "LGE", "C0", "T2", "--out", out,
                 "--subtypes", "LGE:Myo=2", "--preset", "none", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    expected = {"labels.nii.gz", "labels_LGE.nii.gz", "labels_C0.nii.gz", "labels_T2.nii.gz", "posteriors.nii.gz",
                "entropy.nii.gz", "params.json", "report.json", "overview.png", "convergence.png", "transforms",
                ".mvmm-outputs.json"}
    assert {p.name for p in out.iterdir()} == expected
    # by default the atlas is registered (rigid, then affine) and the images stay where their headers put them
    index = json.loads((out / "transforms" / "transforms.json").read_text())
    assert list(index["transforms"]) == ["atlas"] and index["transforms"]["atlas"][0]["kind"] == "AffineTransform"
    # labels on each image's own grid, with the user's label values
    for name in ("LGE", "C0", "T2"):
        labels, grid, _ = io.read_array(out / f"labels_{name}.nii.gz", "t")
        _, image_grid, _ = io.read_array(phantom_files[name], "t")
        assert grid.same_geometry(image_grid) and set(np.unique(labels)) <= {0, 200, 500, 600}
    posteriors, _, ndim = io.read_array(out / "posteriors.nii.gz", "t")
    assert ndim == 4 and np.allclose(posteriors.sum(0), 1, atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["em"]["iterations"] == len(report["em"]["log_likelihood"]) - 1
    assert set(report["volumes_ml"]) == {"bg", "Myo", "LV", "RV"}
    assert report["n_subtypes"]["LGE"]["Myo"] == 2 and report["n_subtypes"]["C0"]["Myo"] == 1
    # where the time went: each registration level, then the final fit and the outputs
    split = report["timings_s"]["registration_split_s"]
    assert set(split) == {"level rigid", "level affine", "level affine, full resolution"}
    assert sum(split.values()) <= report["timings_s"]["registration_s"] and report["timings_s"]["write_s"] > 0
    # the result is good against the truth, and evaluate agrees with it
    ev = run("evaluate", "--pred", out / "labels_LGE.nii.gz", "--truth", phantom_files["LGE_truth"], "--json")
    assert ev.exit_code == 0, ev.output
    metrics = json.loads(ev.output)["metrics"]
    assert metrics["LV"]["dice"] > 0.8 and metrics["Myo"]["dice"] > 0.6
    # fitted parameters reload and reproduce the posteriors
    params = load_params(out / "params.json")
    subject = load_subject([phantom_files[n] for n in ("LGE", "C0", "T2")], names=["LGE", "C0", "T2"])
    subject.transforms = load_transforms(out / "transforms")
    sample = subject.sample()
    again = params["model"].predict_proba(sample.images, sample.coverage, sample.prior, sample.grid.spacing)
    assert np.allclose(again.numpy(), posteriors, atol=1e-4)


def test_segment_registration_grid_and_full_resolution_options(phantom_files, tmp_path):
    out = tmp_path / "seg"
    result = run("segment", *images_of(phantom_files), "--out", out, "--preset", "none", "--quiet", "--device", "cpu",
                 "--grid-spacing", "5", "--no-full-resolution", "--max-iter", "20")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    registration = report["settings"]["registration"]
    assert registration["grid_spacing"] == 5.0 and registration["refine_full_resolution"] is False
    assert set(report["timings_s"]["registration_split_s"]) == {"level rigid", "level affine"}


def test_demo_writes_report_with_dice(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert set(report["dice"]) == {"Myo", "LV", "RV"}
    assert all(0.5 < d <= 1 for d in report["dice"].values())
    assert report["registration_outer_iterations"] > 0  # the atlas was registered, as segment does by default
    assert "Myo" in result.output and "dice" in result.output


def test_phantom_command_2d(tmp_path):
    result = run("phantom", "--out", tmp_path / "p", "--dims", "2", "--seed", "4")
    assert result.exit_code == 0, result.output
    _, grid, ndim = io.read_array(tmp_path / "p" / "C0.nii.gz", "t")
    assert ndim == 2
    seg = run("segment", "--images", tmp_path / "p" / "LGE.nii.gz", tmp_path / "p" / "C0.nii.gz",
              "--out", tmp_path / "s", "-q")
    assert seg.exit_code == 0, seg.output


def test_atlas_build_and_use_with_custom_labels(phantom_files, tmp_path):
    truth = phantom_files["LGE_truth"]
    result = run("atlas", "build", "--label-maps", truth, truth, "--out", tmp_path / "atlas.nii.gz", "--sigma", "3")
    assert result.exit_code == 0, result.output
    atlas = Atlas.read([tmp_path / "atlas.nii.gz"], 3)
    assert atlas.labels == CARDIAC_LABELS and torch.allclose(atlas.probabilities.sum(0), torch.tensor(1.0))
    again = run("atlas", "build", "--labels", truth, "--out", tmp_path / "atlas.nii.gz")
    assert again.exit_code != 0 and "exists" in again.output
    seg = run("segment", *images_of(phantom_files, ("LGE", "C0")), "--atlas", tmp_path / "atlas.nii.gz",
              "--out", tmp_path / "s", "-q")
    assert seg.exit_code == 0, seg.output
    # a label-map atlas with the user's names
    seg2 = run("segment", *images_of(phantom_files, ("LGE",)), "--atlas", truth,
               "--labels", "back=0,wall=200,pool=500,right=600", "--out", tmp_path / "s2", "-q")
    assert seg2.exit_code == 0, seg2.output
    assert set(json.loads((tmp_path / "s2" / "report.json").read_text())["volumes_ml"]) == {"back", "wall", "pool", "right"}


def test_segment_postprocesses_every_label_map(phantom_files, tmp_path):
    out = tmp_path / "s"
    result = run("segment", *images_of(phantom_files, ("LGE", "C0")), "--postprocess", "cardiac", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["settings"]["postprocess"] == "cardiac"
    posteriors, _, _ = io.read_array(out / "posteriors.nii.gz", "t")
    labels, _, _ = io.read_array(out / "labels.nii.gz", "t")
    raw = np.asarray(CARDIAC_LABELS.values)[posteriors.argmax(0)]
    assert (labels == postprocess_labels(raw, CARDIAC_LABELS, "cardiac")).all()
    for name in ("LGE", "C0"):  # on its own grid too: one component per structure
        native, _, _ = io.read_array(out / f"labels_{name}.nii.gz", "t")
        for value in (200, 500, 600):
            assert ndimage.label(native == value)[1] == 1, (name, value)


def test_plain_mixture_without_atlas(phantom_files, tmp_path):
    result = run("segment", *images_of(phantom_files, ("LGE", "C0")), "--atlas", "none", "--out", tmp_path / "s", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["atlas"] is None


@pytest.fixture
def bad_inputs(phantom_files, tmp_path):
    nan_image = tmp_path / "nan.nii.gz"
    arr, grid, _ = io.read_array(phantom_files["LGE"], "t")
    with_nan = arr.copy()
    with_nan[2, 10, 10] = np.nan
    io.write_array(nan_image, with_nan, grid)
    flat = tmp_path / "flat.nii.gz"
    io.write_array(flat, np.full_like(arr, 7.0), grid)
    two_d = tmp_path / "slice.nii.gz"
    from mvmm.core.grid import Grid
    io.write_array(two_d, arr[5], Grid(grid.size[:2], grid.spacing[:2], grid.origin[:2], (1, 0, 0, 1)))
    far = tmp_path / "far.nii.gz"
    io.write_array(far, arr, Grid(grid.size, grid.spacing, (1e4, 0, 0), grid.direction))
    truth, truth_grid, _ = io.read_array(phantom_files["LGE_truth"], "t")
    far_atlas = tmp_path / "far_atlas.nii.gz"
    io.write_array(far_atlas, truth, Grid(truth_grid.size, truth_grid.spacing, (1e4, 0, 0), truth_grid.direction))
    empty_mask = tmp_path / "empty_mask.nii.gz"
    io.write_array(empty_mask, np.zeros(arr.shape, np.uint8), grid)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    return {"nan": nan_image, "flat": flat, "2d": two_d, "far": far, "far_atlas": far_atlas, "empty_mask": empty_mask, "taken": taken}


@pytest.mark.parametrize("case, match", [
    ("missing", "--images: file not found"),
    ("unreadable", "--images: cannot read"),
    ("nan", "--images: .*NaN/Inf"),
    ("flat", "--images: .*one constant value"),
    ("2d", "--images: 2D and 3D images cannot share"),
    ("far", "--images: image 'far' .*does not overlap"),
    ("atlas_far", "--atlas: the atlas .* does not overlap"),
    ("labels_mismatch", "do not occur"),
    ("unknown_labels", r"values \[500, 600\] that are not in"),
    ("empty_mask", "--mask: mask of 'LGE' .*is empty"),
    ("subtypes_image", "--subtypes: unknown image 'T2'"),
    ("subtypes_tissue", "--subtypes: unknown tissue 'scar'"),
    ("out_exists", "--out: .* exists and is not empty.*use --force"),
    ("cuda", "--device: 'cuda' asks for CUDA, which is not available.*use --device=cpu"),
    ("names_count", "--names: 2 names for 1 images"),
    ("roi_without_atlas", "--roi-margin: a region of interest around the atlas needs an atlas"),
    ("proportions_without_atlas", "--proportions: held proportions .* need an atlas"),
    ("postprocess_labels", "--postprocess: unknown tissue 'LV'"),
    ("register_without_atlas", r"--register-atlas: 'affine' moves the atlas, but the subject has none \(--atlas "
                               r"none\); give an atlas or set --register-atlas=none"),
    ("register_one_image", "--register-images: 'rigid' moves the non-reference images, but there is only the "
                           "reference .*; set --register-images=none"),
])
def test_segment_rejects_bad_input_with_a_clear_message(case, match, phantom_files, bad_inputs, tmp_path):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    lge = phantom_files["LGE"]
    args = {"missing": ["--images", tmp_path / "nope.nii.gz"],
            "unreadable": ["--images", phantom_files["description"]],
            "nan": ["--images", lge, bad_inputs["nan"], "--names", "LGE", "bad"],
            "flat": ["--images", lge, bad_inputs["flat"], "--names", "LGE", "bad"],
            "2d": ["--images", lge, bad_inputs["2d"]],
            "far": ["--images", lge, bad_inputs["far"], "--names", "LGE", "far"],
            "atlas_far": ["--images", lge, "--atlas", bad_inputs["far_atlas"]],
            "labels_mismatch": ["--images", lge, "--atlas", phantom_files["LGE_truth"], "--labels", "bg=0,Myo=200,LV=500,RV=600,scar=700"],
            "unknown_labels": ["--images", lge, "--atlas", phantom_files["LGE_truth"], "--labels", "bg=0,Myo=200"],
            "empty_mask": ["--images", lge, "--mask", f"LGE={bad_inputs['empty_mask']}"],
            "subtypes_image": ["--images", lge, "--subtypes", "T2:Myo=2"],
            "subtypes_tissue": ["--images", lge, "--subtypes", "LGE:scar=2"],
            "out_exists": ["--images", lge],
            "cuda": ["--images", lge, "--device", "cuda"],
            "names_count": ["--images", lge, "--names", "a", "b"],
            "roi_without_atlas": ["--images", lge, "--atlas", "none", "--roi-margin", "5"],
            "proportions_without_atlas": ["--images", lge, "--atlas", "none", "--proportions", "atlas"],
            "postprocess_labels": ["--images", lge, "--atlas", phantom_files["LGE_truth"], "--postprocess", "cardiac",
                                   "--labels", "back=0,wall=200,pool=500,right=600"],
            "register_without_atlas": ["--images", lge, "--atlas", "none", "--register-atlas", "affine"],
            "register_one_image": ["--images", lge, "--register-images", "rigid"]}[case]
    out = bad_inputs["taken"] if case == "out_exists" else tmp_path / "out"
    result = run("segment", *args, "--out", out, "-q")
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and isinstance(result.exception, SystemExit), result.exception
    assert __import__("re").search(match, result.output), result.output
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists() or not any(out.iterdir())  # nothing written


def test_force_overwrites_an_existing_output(phantom_files, bad_inputs):
    out = bad_inputs["taken"]
    result = run("segment", "--images", phantom_files["LGE"], "--out", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert (out / "labels.nii.gz").exists() and (out / "keep.txt").read_text() == "mine"


def test_evaluate_errors(phantom_files, tmp_path):
    r = run("evaluate", "--pred", phantom_files["LGE_truth"], "--truth", phantom_files["C0_truth"])
    assert r.exit_code == 1 and "--truth: " in r.output and "is not on the grid of --pred" in r.output
    r = run("evaluate", "--pred", phantom_files["LGE_truth"], "--truth", phantom_files["LGE_truth"],
            "--labels", "bg=0,Myo=200")
    assert r.exit_code == 1 and "values [500, 600]" in r.output
    r = run("evaluate", "--pred", phantom_files["LGE_truth"], "--truth", phantom_files["LGE_truth"])
    assert r.exit_code == 0 and "1.000" in r.output


def test_segment_with_registration_writes_reloadable_itk_transforms(tmp_path):
    import SimpleITK as sitk

    from mvmm.data.phantom import write_phantom

    files = write_phantom(tmp_path / "case2d", seed=0, ndim=2)
    out = tmp_path / "seg"
    result = run("segment", *images_of(files, ("LGE", "C0")), "--register-images", "rigid", "--register-atlas", "ffd",
                 "--out", out, "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "transforms" / "transforms.json").read_text())
    assert [e["type"] for e in index["transforms"]["atlas"]] == ["displacement", "linear"]
    assert [e["kind"] for e in index["transforms"]["C0"]] == ["RigidTransform"]
    transforms = load_transforms(out / "transforms")
    # SimpleITK reads the same map as mvmm
    itk = sitk.ReadTransform(str(out / "transforms" / "C0_0.tfm"))
    point = (3.0, -7.0)
    expected = transforms["C0"](torch.tensor([point], dtype=torch.float64))[0].numpy()
    assert np.allclose(itk.TransformPoint(point), expected, atol=1e-6)
    # per-image labels on C0's own grid, and the registration in the report
    _, c0_grid, _ = io.read_array(files["C0"], "C0")
    _, grid, _ = io.read_array(out / "labels_C0.nii.gz", "labels_C0")
    assert grid.same_geometry(c0_grid)
    report = json.loads((out / "report.json").read_text())
    assert report["registration"]["history"] and report["registration"]["atlas_jacobian"]["folding_share"] == 0.0
    # mvmm warp brings C0's truth into the common space with the same transform SimpleITK applies
    warped = tmp_path / "c0_truth_common.nii.gz"
    result = run("warp", "--image", files["C0_truth"], "--transforms", out / "transforms", "--name", "C0",
                 "--reference", files["LGE"], "--label-map", "--out", warped)
    assert result.exit_code == 0, result.output
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(warped)))
    fixed = sitk.ReadImage(str(files["LGE"]))
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(files["C0_truth"])), fixed, itk,
                                                  sitk.sitkNearestNeighbor, 0))
    assert set(np.unique(ours)) <= {0, 200, 500, 600} and np.mean(ours == theirs) > 0.99
    assert run("warp", "--image", files["C0"], "--transforms", out / "transforms", "--name", "T9",
               "--out", tmp_path / "x.nii.gz").exit_code == 1
    intensities_as_labels = run("warp", "--image", files["C0"], "--transforms", out / "transforms", "--name", "C0",
                                "--labels", "--out", tmp_path / "y.nii.gz")
    assert intensities_as_labels.exit_code == 1 and "not an integer label map" in intensities_as_labels.output
    assert not (tmp_path / "y.nii.gz").exists()

