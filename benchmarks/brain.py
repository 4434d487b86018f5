"""A 1 mm brain side by side: ``mvmm segment`` against ANTs Atropos and SAMSEG, same inputs.

The case: nilearn's MNI152 2009 T1 template (1 mm) and a synthetic T2-like second channel made from
its tissue maps (CSF bright, grey matter mid, white matter dark, with noise and a smooth bias field),
both moved by a known rigid motion (rotation and shift, below). The atlas is the template's own
grey- and white-matter probability maps with CSF as what the intracranial volume leaves, in MNI
space, *not* moved: a method has to find the motion. The reference segmentation is the argmax of the
maps moved by the known motion; agreement is Dice per tissue against it.

Both mvmm and Atropos get the same brain mask (the moved T1's nonzero voxels, holes filled: the
template is skull-stripped, and its exact zeros would otherwise be a tissue of their own).

- ``mvmm``: ``mvmm segment --images T1 T2 --atlas <the maps> --mask … --register-atlas ffd
  --no-full-resolution`` (rigid, affine, then two FFD levels on the 2.5 mm registration grid, EM on
  the full grid; one Gaussian per tissue and image, two for the background).
- ``atropos``: ANTsPy's ``ants.atropos`` on both channels within the mask, prior-initialised from the
  same maps (weight 0.25) with its MRF (``[0.1,1x1x1]``); Atropos does no registration, so its priors
  stay where the atlas is.
- ``samseg``: ``run_samseg`` on both channels with its own atlas (shipped in the pip package);
  its labels are grouped into CSF (ventricles, extracerebral CSF), grey matter (cortex, deep grey
  nuclei, cerebellar cortex, hippocampus, amygdala) and white matter (cerebral and cerebellar white
  matter, brainstem).

Each tool runs as its own process; the table gives its whole-process wall time (start-up, reading
and writing included) and peak memory (``ru_maxrss`` of that process and what it waited for).
Machine and date go into the JSON.

The tools live in their own virtual environments (SAMSEG pins ``numpy<2``; antspyx and nilearn
are not mvmm's dependencies), made once by ``--setup`` from PyPI::

    python benchmarks/brain.py --setup                 # benchmarks/.envs/{ants,samseg}
    python benchmarks/brain.py --json brain.json       # all three tools
    python benchmarks/brain.py --tools mvmm --threads 2

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENVS = HERE / ".envs"
ENV_PACKAGES = {"ants": ["antspyx", "nilearn"], "samseg": ["samseg"]}
# the known motion of the images relative to the atlas: rotation (degrees about x, y, z) and shift (mm)
MOTION = {"rotation_deg": (6.0, -4.0, 8.0), "shift_mm": (7.0, -5.0, 4.0)}
TISSUES = ("CSF", "GM", "WM")  # label values 1, 2, 3; background 0
# FreeSurfer labels (SAMSEG's output) grouped into the three tissues
SAMSEG_GROUPS = {
    "CSF": (4, 5, 14, 15, 24, 43, 44),
    "GM": (3, 8, 10, 11, 12, 13, 17, 18, 26, 28, 42, 47, 49, 50, 51, 52, 53, 54, 58, 60),
    "WM": (2, 7, 16, 41, 46),
}


def env_python(envs: Path, name: str) -> Path:
    return envs / name / "bin" / "python"


def setup(envs: Path) -> None:
    """One virtual environment per third-party tool, from PyPI (prints what it runs)."""
    for name, packages in ENV_PACKAGES.items():
        target = envs / name
        for command in ([sys.executable, "-m", "venv", str(target)],
                        [str(env_python(envs, name)), "-m", "pip", "install", "-q", *packages]):
            print("$", " ".join(command), flush=True)
            subprocess.run(command, check=True)


# ---------------------------------------------------------------------------- the case
def nilearn_data(envs: Path) -> Path:
    """The folder of the MNI152 files nilearn ships (read with SimpleITK here, not imported)."""
    code = "import nilearn.datasets, os; print(os.path.join(os.path.dirname(nilearn.datasets.__file__), 'data'))"
    out = subprocess.run([str(env_python(envs, "ants")), "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def prepare(case: Path, envs: Path, seed: int = 0) -> dict:
    """Write the moved T1 and T2, the atlas (MNI space) and the moved reference labels into ``case``."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    import torch

    from mvmm.data.atlas import Atlas
    from mvmm.data.io import read_grid
    from mvmm.data.labels import LabelSet

    case.mkdir(parents=True, exist_ok=True)
    data = nilearn_data(envs)
    t1 = sitk.ReadImage(str(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
                                               sitk.sitkFloat32))
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"),
                                               sitk.sitkFloat32))
    gm, wm = np.clip(gm / 255.0, 0, 1), np.clip(wm / 255.0, 0, 1)  # stored as uint8 0–255
    spacing = t1.GetSpacing()[::-1]  # array order
    # intracranial volume: the brain, closed and grown by 3 mm, smoothed; CSF is what GM and WM leave of it
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.5, iterations=4))
    icv = ndimage.gaussian_filter(ndimage.binary_dilation(brain, iterations=3).astype(np.float32),
                                  sigma=[1.0 / s for s in spacing])
    csf = np.clip(icv - gm - wm, 0, 1)
    background = np.clip(1.0 - gm - wm - csf, 0, 1)
    maps = np.stack([background, csf, gm, wm])
    maps /= maps.sum(0, keepdims=True)
    # a T2-like channel from the tissue maps: CSF bright, GM mid, WM dark; a smooth bias and noise
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in gm.shape], indexing="ij")
    bias = 1.0 + 0.15 * x - 0.1 * y + 0.08 * z * z
    t2 = (0.05 * maps[0] + 1.0 * maps[1] + 0.55 * maps[2] + 0.3 * maps[3]) * bias
    t2 = (t2 + rng.normal(scale=0.03, size=t2.shape)).astype(np.float32) * 1000

    def image(array, like):
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(like)
        return out

    # the motion: images are resampled through its inverse, so that anatomy at x in the atlas is at T(x)
    motion = sitk.Euler3DTransform()
    motion.SetCenter(t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()]))
    motion.SetRotation(*[np.deg2rad(a) for a in MOTION["rotation_deg"]])
    motion.SetTranslation(MOTION["shift_mm"])
    inverse = motion.GetInverse()

    def moved(img, interpolator=sitk.sitkLinear, default=0.0):
        return sitk.Resample(img, t1, inverse, interpolator, default, img.GetPixelID())

    sitk.WriteImage(moved(t1), str(case / "T1.nii.gz"))
    sitk.WriteImage(moved(image(t2, t1)), str(case / "T2.nii.gz"))
    moved_maps = np.stack([sitk.GetArrayFromImage(moved(image(m.astype(np.float32), t1), default=float(k == 0)))
                           for k, m in enumerate(maps)])
    truth = moved_maps.argmax(0).astype(np.uint8)
    # the brain mask every tool gets: where the (skull-stripped) T1 has signal, holes filled
    mask = ndimage.binary_fill_holes(sitk.GetArrayFromImage(moved(t1)) > 1.0).astype(np.uint8)
    sitk.WriteImage(image(mask, t1), str(case / "mask.nii.gz"))
    sitk.WriteImage(image(truth, t1), str(case / "truth.nii.gz"))
    for k, name in enumerate(("background",) + TISSUES):
        sitk.WriteImage(image(maps[k].astype(np.float32), t1), str(case / f"prior_{name}.nii.gz"))
    # mvmm's probability atlas: the four maps on the template's grid, labels in a sidecar
    labels = LabelSet(("background",) + TISSUES, (0, 1, 2, 3))
    grid = read_grid(case / "prior_CSF.nii.gz", "prior")
    Atlas(torch.as_tensor(maps), grid, labels, "MNI152 2009 (nilearn): GM, WM; CSF from the ICV", "world").save(
        case / "atlas.nii.gz")
    info = {"shape": list(gm.shape), "spacing_mm": list(spacing), "motion": MOTION, "voxels": int(np.prod(gm.shape)),
            "tissue_voxels": {t: int((truth == k + 1).sum()) for k, t in enumerate(TISSUES)}}
    (case / "case.json").write_text(json.dumps(info, indent=2))
    return info


# ---------------------------------------------------------------------------- the tools
ATROPOS = r"""
import sys, ants
case, out, threads = sys.argv[1], sys.argv[2], sys.argv[3]
import os; os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = threads
t1 = ants.image_read(f"{case}/T1.nii.gz"); t2 = ants.image_read(f"{case}/T2.nii.gz")
mask = ants.image_read(f"{case}/mask.nii.gz")
priors = [ants.image_read(f"{case}/prior_{t}.nii.gz") for t in ("CSF", "GM", "WM")]
seg = ants.atropos(a=[t1, t2], x=mask, i=priors, m="[0.1,1x1x1]", c="[5,0]", priorweight=0.25)
ants.image_write(seg["segmentation"], f"{out}/labels.nii.gz")
"""

SAMSEG_TO_NIFTI = r"""
import sys, surfa as sf
seg = sf.load_volume(sys.argv[1]); seg.save(sys.argv[2])
"""


def run_measured(command, env=None) -> dict:
    """Run ``command``; its wall seconds, peak RSS (bytes) and return code."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({process.returncode}):\n{output[-3000:]}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}


def run_tool(tool: str, case: Path, out: Path, envs: Path, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
    if tool == "mvmm":
        result = run_measured([sys.executable, "-m", "mvmm", "segment", "--images", str(case / "T1.nii.gz"),
                               str(case / "T2.nii.gz"), "--names", "T1", "T2", "--atlas", str(case / "atlas.nii.gz"),
                               "--mask", f"T1={case / 'mask.nii.gz'}", "--mask", f"T2={case / 'mask.nii.gz'}",
                               "--preset", "none", "--register-atlas", "ffd", "--no-full-resolution",
                               "--out", str(out / "mvmm"), "--force", "--threads", str(threads), "--quiet"], env)
        labels = out / "mvmm" / "labels.nii.gz"
    elif tool == "atropos":
        (out / "atropos").mkdir(exist_ok=True)
        result = run_measured([str(env_python(envs, "ants")), "-c", ATROPOS, str(case), str(out / "atropos"),
                               str(threads)], env)
        labels = out / "atropos" / "labels.nii.gz"
    elif tool == "samseg":
        run_samseg = envs / "samseg" / "bin" / "run_samseg"
        result = run_measured([str(run_samseg), "--input", str(case / "T1.nii.gz"), str(case / "T2.nii.gz"),
                               "--output", str(out / "samseg"), "--threads", str(threads)], env)
        labels = out / "samseg" / "labels.nii.gz"
        subprocess.run([str(env_python(envs, "samseg")), "-c", SAMSEG_TO_NIFTI, str(out / "samseg" / "seg.mgz"),
                        str(labels)], check=True)
    else:
        raise ValueError(f"tool: unknown {tool!r}")
    return {**result, "agreement": agreement(labels, case, tool)}


def agreement(labels_path: Path, case: Path, tool: str) -> dict:
    """Dice of CSF, GM and WM against the moved template's argmax (on the template grid)."""
    import numpy as np
    import SimpleITK as sitk

    truth_img = sitk.ReadImage(str(case / "truth.nii.gz"))
    labels_img = sitk.ReadImage(str(labels_path))
    labels_img = sitk.Resample(labels_img, truth_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    truth = sitk.GetArrayFromImage(truth_img)
    labels = sitk.GetArrayFromImage(labels_img).astype(np.int64)
    if tool == "samseg":
        grouped = np.zeros_like(labels)
        for k, tissue in enumerate(TISSUES, start=1):
            grouped[np.isin(labels, SAMSEG_GROUPS[tissue])] = k
        labels = grouped
    dice = {}
    for k, tissue in enumerate(TISSUES, start=1):
        a, b = labels == k, truth == k
        dice[tissue] = float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    return dice


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="Make the tools' environments and stop.")
    parser.add_argument("--envs", type=Path, default=ENVS, help="Where the tools' environments are.")
    parser.add_argument("--out", type=Path, default=Path("brain-benchmark"), help="Working folder.")
    parser.add_argument("--tools", default="mvmm,atropos,samseg")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    args = parser.parse_args()
    if args.setup:
        setup(args.envs)
        return
    case = args.out / "case"
    info = prepare(case, args.envs)
    rows = []
    for tool in args.tools.split(","):
        row = {"tool": tool, **run_tool(tool, case, args.out, args.envs, args.threads)}
        rows.append(row)
        print(f"{tool}: {row['seconds']:.1f} s, {row['peak_rss_bytes'] / 1e9:.2f} GB, Dice "
              + ", ".join(f"{t} {d:.3f}" for t, d in row["agreement"].items()), file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    date = datetime.date.today().isoformat()
    print(f"\n{info['shape']} voxels at 1 mm, 2 channels; motion {MOTION}; {machine}; {date}\n")
    print("| tool | wall s | peak RSS GB | CSF Dice | GM Dice | WM Dice |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = r["agreement"]
        print(f"| {r['tool']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | {d['CSF']:.3f} | "
              f"{d['GM']:.3f} | {d['WM']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "date": date, "case": info, "rows": rows,
                                               "command": "python " + " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main()
