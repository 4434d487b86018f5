"""Time and accuracy of C0 → LGE registration (rigid; FFD on request): mvmm (CPU, CUDA), SimpleITK, ANTsPy.

Cases: the 3D phantom (seed 0) with C0's header moved by a known rigid map (8°, 6 mm), and, when the
MS-CMRSeg copy is there, the C0 → LGE pairs of the chosen patients as they come (headers placed by the
scanner; residual breath-hold misalignment). Every method starts from the headers and maps LGE-space
points into C0's world. Accuracy is the Dice (Myo, LV, RV, mean) of C0's labels resampled through the
found transform (nearest) against LGE's labels — the labels are used for nothing else.

Methods:
- ``header``: no registration (the baseline every method must beat);
- ``mvmm``: ``PairwiseRegistration`` rigid, Mattes-style MI (32 bins) on the LGE grid coarsened to 2 mm;
- ``mvmm+em``: that, then refined inside a plain 4-class mixture by the joint solver (what
  ``mvmm segment --register-images rigid --atlas none`` does);
- ``sitk``: ``ImageRegistrationMethod``, Euler3DTransform about the LGE centre, Mattes MI (32 bins,
  all voxels), gradient descent (learning rate estimated each iteration, at most 2 mm per step) with
  physical-shift scales, shrink 4/2/1, smoothing 2/1/0 mm — the recipe of the SimpleITK notebooks;
- ``ants``: ``ants.registration(type_of_transform="Rigid", initial_transform="identity")`` (Mattes MI),
  run with ``--ants-python`` (an interpreter that has antspyx), so antspyx's own NumPy/SciPy pins
  need not enter mvmm's environment.
- ``mvmm-ffd`` (only with ``--methods …,mvmm-ffd``): not rigid — ``PairwiseRegistration`` rigid,
  affine, then B-spline FFD levels (40, 20 mm, bending weight 1000), MI; its labels go through the
  same SimpleITK resampler, via the displacement field it gives on the LGE grid;
- ``mvmm-ffd-rigid`` (only with ``--methods …,mvmm-ffd-rigid``): rigid again — the rotation and
  translation closest (least squares over the LGE grid) to the ``mvmm-ffd`` map;
- ``ceiling`` (only with ``--methods …,ceiling``): not a method but a bound: the translation of C0 that
  the labels themselves score best (2 mm steps, ±6 mm in-plane, ±8 mm through-plane).

    python benchmarks/registration_speed.py [--data ../shared/data/mscmr] [--patients 1-5]
        [--devices cpu,cuda] [--ants-python /path/to/python] [--methods header,mvmm,ceiling] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STRUCTURES = {"Myo": 200, "LV": 500, "RV": 600}


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    out = {}
    for name, value in STRUCTURES.items():
        p, t = pred == value, truth == value
        out[name] = float(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
    out["mean"] = float(np.mean([out[n] for n in STRUCTURES]))
    return out


def phantom_case(folder: Path) -> dict:
    """Write the 3D phantom with C0's header moved by a known rigid map; returns the case's files."""
    import torch

    from mvmm.data.image import Image
    from mvmm.data.phantom import make_phantom
    from mvmm.spatial import RigidTransform

    phantom = make_phantom(0, ndim=3)
    lge = phantom.images["LGE"]
    truth = RigidTransform(3, torch.tensor([math.radians(8.0), math.radians(-4.0), 0.0, 6.0, -4.0, 3.0],
                                           dtype=torch.float64), center=lge.grid.center_world())
    m = truth.affine().numpy()
    files = {}
    for role, image in (("fixed", lge), ("fixed_labels", phantom.truth["LGE"]), ("moving", phantom.images["C0"]),
                        ("moving_labels", phantom.truth["C0"])):
        g = image.grid.moved(m) if role.startswith("moving") else image.grid
        files[role] = folder / f"phantom_{role}.nii.gz"
        Image(image.data, g, role).write(files[role])
    return {"name": "phantom (C0 moved 8°/6 mm)", **files}


def mscmr_cases(data: Path, patients) -> list:
    cases = []
    for p in patients:
        files = {"fixed": data / f"patient{p}_LGE.nii.gz", "fixed_labels": data / f"patient{p}_LGE_manual.nii.gz",
                 "moving": data / f"patient{p}_C0.nii.gz", "moving_labels": data / f"patient{p}_C0_manual.nii.gz"}
        if all(f.exists() for f in files.values()):
            cases.append({"name": f"MS-CMRSeg patient {p}", **files})
    return cases


def labels_through(case: dict, transform) -> np.ndarray:
    """C0 labels resampled on the LGE grid through a SimpleITK transform (nearest)."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(case["fixed_labels"]))
    moving = sitk.ReadImage(str(case["moving_labels"]))
    return resampled_labels(fixed, moving, transform)


def resampled_labels(fixed, moving, transform) -> np.ndarray:
    """``moving`` (a SimpleITK label image) on ``fixed``'s grid through ``transform`` (nearest)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkNearestNeighbor, 0))


def run_header(case: dict, device: str) -> tuple:
    import SimpleITK as sitk

    return 0.0, labels_through(case, sitk.Transform(3, sitk.sitkIdentity))


def _timed_mvmm(case: dict, device: str, register) -> tuple:
    """Time ``register(fixed, moving)`` (→ a transform) and resample the labels through it."""
    import torch

    from mvmm.data.image import Image

    fixed, moving = Image.read(case["fixed"], "LGE"), Image.read(case["moving"], "C0")

    def run():
        transform = register(fixed, moving)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return transform

    if device.startswith("cuda"):
        run()  # warm-up: CUDA context and kernels
    start = time.perf_counter()
    transform = run()
    seconds = time.perf_counter() - start
    return seconds, labels_through(case, _as_sitk(transform, fixed.grid))


def _as_sitk(transform, grid):
    """A SimpleITK transform doing what ``transform`` does on ``grid``: affine, or a displacement field
    sampled at ``grid``'s voxels (FFD), so that every method's labels go through one resampler."""
    import SimpleITK as sitk
    import torch

    from mvmm.spatial.transforms import map_grid

    if hasattr(transform, "affine"):
        matrix = transform.affine().detach().cpu().double().numpy()
        return sitk.AffineTransform(matrix[:3, :3].ravel().tolist(), matrix[:3, 3].tolist())
    with torch.no_grad():
        field = (map_grid(transform, grid) - grid.world_points()).cpu().double().numpy()
    image = sitk.GetImageFromArray(field, isVector=True)
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    image.SetDirection(grid.direction)
    return sitk.DisplacementFieldTransform(image)


def run_label_ceiling(case: dict, device: str) -> tuple:
    """Not a method: the translation (2 mm steps along the LGE axes, ±6 mm in-plane, ±8 mm through-plane)
    that the labels themselves score best (mean Dice). It bounds what a rigid shift of C0 can gain."""
    import itertools

    import SimpleITK as sitk

    fixed, moving = sitk.ReadImage(str(case["fixed_labels"])), sitk.ReadImage(str(case["moving_labels"]))
    truth = sitk.GetArrayFromImage(fixed).astype(np.int64)
    axes = np.asarray(fixed.GetDirection()).reshape(3, 3)
    start = time.perf_counter()
    best = None
    for steps in itertools.product(range(-6, 7, 2), range(-6, 7, 2), range(-8, 9, 2)):
        shift = sitk.TranslationTransform(3, tuple(axes @ np.asarray(steps, dtype=float)))
        labels = resampled_labels(fixed, moving, shift)
        score = dice_scores(labels, truth)["mean"]
        if best is None or score > best[0]:
            best = (score, labels)
    return time.perf_counter() - start, best[1]


def run_mvmm(case: dict, device: str) -> tuple:
    from mvmm.register import PairwiseRegistration, PairwiseSettings

    settings = PairwiseSettings(transform="rigid", metric="mi", init="header")
    return _timed_mvmm(case, device, lambda f, m: PairwiseRegistration(f, m, settings, device=device).run().transform)


def mvmm_ffd(fixed, moving, device: str):
    """Not rigid: rigid, affine, then FFD levels (40, 20 mm; bending weight 1000), Mattes MI."""
    from mvmm.register import PairwiseRegistration, PairwiseSettings

    settings = PairwiseSettings(transform="ffd", metric="mi", init="header", bending_weight=1000.0)
    return PairwiseRegistration(fixed, moving, settings, device=device).run().transform


def run_mvmm_ffd(case: dict, device: str) -> tuple:
    return _timed_mvmm(case, device, lambda f, m: mvmm_ffd(f, m, device))


def run_mvmm_ffd_rigid(case: dict, device: str) -> tuple:
    """Rigid again: the rotation and translation closest (least squares over the LGE grid's voxels,
    Kabsch) to what ``mvmm-ffd`` found — whether the non-rigid gain has a rigid part."""
    import torch

    from mvmm.spatial import AffineTransform
    from mvmm.spatial.transforms import map_grid

    def register(fixed, moving):
        ffd = mvmm_ffd(fixed, moving, device)
        with torch.no_grad():
            source = fixed.grid.world_points(dtype=torch.float64).reshape(-1, fixed.grid.ndim)
            target = map_grid(ffd, fixed.grid).reshape(-1, fixed.grid.ndim).double().cpu()
        return AffineTransform.from_matrix(torch.as_tensor(rigid_fit(source.numpy(), target.numpy())))

    return _timed_mvmm(case, device, register)


def rigid_fit(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Homogeneous ``[n+1, n+1]`` rigid map minimising Σ ‖R·source + t − target‖² (Kabsch; no reflection)."""
    n = source.shape[1]
    source_mean, target_mean = source.mean(0), target.mean(0)
    u, _, vt = np.linalg.svd((source - source_mean).T @ (target - target_mean))
    flip = np.eye(n)
    flip[-1, -1] = np.sign(np.linalg.det(vt.T @ u.T))
    rotation = vt.T @ flip @ u.T
    matrix = np.eye(n + 1)
    matrix[:n, :n], matrix[:n, n] = rotation, target_mean - rotation @ source_mean
    return matrix


def run_mvmm_joint(case: dict, device: str) -> tuple:
    """MI placement, then refined inside a plain 4-class mixture (what ``--register-images rigid`` does)."""
    import warnings

    from mvmm.data.subject import Subject
    from mvmm.joint import JointSolver, RegistrationSettings
    from mvmm.mixture.model import MultivariateMixture

    def register(fixed, moving):
        model = MultivariateMixture(n_subtypes=1, n_classes=4, random_state=0)
        settings = RegistrationSettings(atlas="none", images="rigid", images_init="mi")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return JointSolver(model, settings, device).run(Subject([fixed, moving])).transforms["C0"]

    return _timed_mvmm(case, device, register)


def run_sitk(case: dict, device: str) -> tuple:
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(case["fixed"]), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(case["moving"]), sitk.sitkFloat32)
    start = time.perf_counter()
    initial = sitk.Euler3DTransform()
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()])
    initial.SetCenter(centre)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=200, convergenceMinimumValue=1e-6,
                                         convergenceWindowSize=10, estimateLearningRate=method.EachIteration,
                                         maximumStepSizeInPhysicalUnits=2.0)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(fixed, moving)
    seconds = time.perf_counter() - start
    return seconds, labels_through(case, transform)


ANTS_WORKER = """
import json, sys, time
import ants
fixed, moving, fixed_labels, moving_labels, out = sys.argv[1:6]
f, m = ants.image_read(fixed), ants.image_read(moving)
start = time.perf_counter()
reg = ants.registration(f, m, type_of_transform="Rigid", initial_transform="identity", aff_metric="mattes")
seconds = time.perf_counter() - start
warped = ants.apply_transforms(ants.image_read(fixed_labels), ants.image_read(moving_labels), reg["fwdtransforms"],
                               interpolator="nearestNeighbor")
warped.to_file(out)
print(json.dumps({"seconds": seconds}))
"""


def run_ants(case: dict, python: str) -> tuple:
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "warped.nii.gz"
        done = subprocess.run([python, "-c", ANTS_WORKER, str(case["fixed"]), str(case["moving"]),
                               str(case["fixed_labels"]), str(case["moving_labels"]), str(out)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "ANTs failed")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        return seconds, sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(np.int64)


def ants_python(requested):
    """An interpreter with antspyx: the one asked for, else this one if it has it, else None."""
    candidates = [requested] if requested else [sys.executable]
    for python in candidates:
        if subprocess.run([python, "-c", "import ants"], capture_output=True).returncode == 0:
            return python
    return None


def parse_patients(text: str) -> list:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "mscmr")
    parser.add_argument("--patients", default="1-5")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--ants-python", help="Python interpreter with antspyx (default: this one, if it has it)")
    parser.add_argument("--methods", default="header,sitk,mvmm,mvmm+em,ants",
                        help="Comma-separated subset; 'mvmm-ffd' adds a non-rigid mvmm registration, 'mvmm-ffd-rigid' "
                             "its closest rigid map, 'ceiling' the best translation chosen by the labels.")
    parser.add_argument("--json", type=Path, help="Also write every row as JSON here.")
    args = parser.parse_args()

    import torch

    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    ants = ants_python(args.ants_python)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [phantom_case(Path(tmp))] + mscmr_cases(args.data, parse_patients(args.patients))
        runs = [("header", "-", run_header), ("sitk", "cpu", run_sitk)]
        runs += [("mvmm", d, run_mvmm) for d in devices] + [("mvmm+em", d, run_mvmm_joint) for d in devices]
        runs += [("mvmm-ffd", d, run_mvmm_ffd) for d in devices]
        runs += [("mvmm-ffd-rigid", d, run_mvmm_ffd_rigid) for d in devices]
        runs += [("ceiling", "-", run_label_ceiling)] + ([("ants", "cpu", None)] if ants else [])
        runs = [run for run in runs if run[0] in args.methods.split(",")]
        rows = []
        for case in cases:
            truth = labels_through_identity_truth(case)
            for method, device, fn in runs:
                seconds, labels = run_ants(case, ants) if method == "ants" else fn(case, device)
                rows.append({"case": case["name"], "method": method, "device": device, "seconds": seconds,
                             "dice": dice_scores(labels, truth)})
                print(f"{case['name']:<28} {method:<7} {device:<5} {seconds:7.2f} s  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in rows[-1]["dice"].items()), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(0)}" if "cuda" in devices else "")
          + ("" if ants else "; ANTsPy not available (give --ants-python)"))
    print("\n| method | device | cases | mean s / case | Myo | LV | RV | mean Dice |")
    print("|---|---|---|---|---|---|---|---|")
    for method, device in dict.fromkeys((r["method"], r["device"]) for r in rows):
        for subset, label in ((lambda r: "phantom" in r["case"], "phantom"), (lambda r: "phantom" not in r["case"],
                                                                              "MS-CMRSeg")):
            chosen = [r for r in rows if r["method"] == method and r["device"] == device and subset(r)]
            if chosen:
                d = {k: np.mean([r["dice"][k] for r in chosen]) for k in ("Myo", "LV", "RV", "mean")}
                print(f"| {method} | {device} | {label} × {len(chosen)} | {np.mean([r['seconds'] for r in chosen]):.2f} "
                      f"| {d['Myo']:.3f} | {d['LV']:.3f} | {d['RV']:.3f} | {d['mean']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def labels_through_identity_truth(case: dict) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(case["fixed_labels"]))).astype(np.int64)


if __name__ == "__main__":
    main()
