"""What limits the two-phase Chan–Vese blood pool on MS-CMRSeg: the network, or the energy itself?

The Chan–Vese CNN (``mvmm train acwe --classes 2``) minimises the two-phase region energy
Σ_x P(x) (I(x) − c₁)² + (1 − P(x)) (I(x) − c₂)² (plus a length term). Without the length term its
global minimiser over hard partitions of a region is a single intensity threshold — the one that
minimises the within-class sum of squares (exact 2-means in one dimension, found here by scanning
every split of the sorted intensities). This scores that minimiser's bright phase against the blood
pool (LV ∪ RV) of each sequence's manual labels, on the sequence's own grid, in three regions:

- ``file``: the whole image file;
- ``heart10``: within 10 mm of the manual heart (an oracle region: the labels choose it);
- ``heart10_seeded``: the same, keeping only the bright phase's in-slice connected components that
  touch the manual blood pool eroded by 3 voxels (oracle seeds: which bright region is blood).

The last two read the test patient's labels: they bound what the energy can give, they are not
methods. No training; a few seconds per patient.

Usage::

    python benchmarks/acwe_bounds.py --data ../shared/data/mscmr [--patients 1-25] [--json bounds.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import numpy as np
from scipy import ndimage

BLOOD_POOL = (500, 600)  # MS-CMRSeg's LV and RV values
MARGIN_MM = 10.0
SEED_EROSION = 3  # voxels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else float("nan")


def two_means_threshold(values: np.ndarray) -> float:
    """The threshold t minimising Σ_{v ≤ t} (v − c₁)² + Σ_{v > t} (v − c₂)² (class means c): the
    two-phase Chan–Vese energy's global minimiser without the length term."""
    v = np.sort(values.astype(np.float64).ravel())
    n = v.size
    sums, squares = np.cumsum(v), np.cumsum(v * v)
    k = np.arange(1, n)  # the first k values are the dark class
    dark = squares[k - 1] - sums[k - 1] ** 2 / k
    bright = (squares[-1] - squares[k - 1]) - (sums[-1] - sums[k - 1]) ** 2 / (n - k)
    best = int(np.argmin(dark + bright))
    return float((v[best] + v[best + 1]) / 2)


def seeded(bright: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The in-slice connected components of ``bright`` ``[Z, Y, X]`` that touch ``seeds``."""
    kept = np.zeros_like(bright)
    for z in range(bright.shape[0]):
        components, _ = ndimage.label(bright[z])
        touched = np.unique(components[seeds[z] & (components > 0)])
        kept[z] = np.isin(components, touched) & (components > 0)
    return kept


def patient_bounds(image_path: Path, labels_path: Path) -> dict:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_path))
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    truth = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))).astype(np.int64)
    spacing = tuple(reversed(image.GetSpacing()))  # array order
    pool = np.isin(truth, BLOOD_POOL)
    heart = ndimage.distance_transform_edt(truth == 0, sampling=spacing) <= MARGIN_MM
    whole = values > two_means_threshold(values)
    near = heart & (values > two_means_threshold(values[heart]))
    seeds = np.stack([ndimage.binary_erosion(s, iterations=SEED_EROSION) for s in pool])
    return {"file": dice(whole, pool), "heart10": dice(near, pool), "heart10_seeded": dice(seeded(near, seeds), pool)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--patients", default="1-25")
    parser.add_argument("--sequences", nargs="+", default=["C0", "LGE"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from mvmm.data.manifest import Manifest, parse_patients, scan

    found = scan(Manifest.load("mscmr19"), args.data, parse_patients(args.patients), args.sequences,
                 args.sequences).patients
    rows = []
    for patient, files in sorted(found.items()):
        for sequence in args.sequences:
            row = {"patient": patient, "sequence": sequence,
                   **patient_bounds(files.images[sequence], files.labels[sequence])}
            rows.append(row)
            print(patient, sequence, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, flush=True)
    summary = {s: {k: float(np.nanmean([r[k] for r in rows if r["sequence"] == s]))
                   for k in ("file", "heart10", "heart10_seeded")} for s in args.sequences}
    for sequence, values in summary.items():
        print(f"{sequence:<4} blood-pool Dice of the energy's minimiser:", {k: round(v, 3) for k, v in values.items()},
              f"({sum(r['sequence'] == sequence for r in rows)} patients)")
    if args.json:
        report = {"benchmark": "acwe_bounds", "date": datetime.date.today().isoformat(),
                  "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
                  "margin_mm": MARGIN_MM, "seed_erosion_voxels": SEED_EROSION, "summary": summary, "patients": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
