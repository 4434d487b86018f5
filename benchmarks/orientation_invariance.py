"""Does a case segment the same whatever the storage order of its images? All 48 (3D) axis orders and
directions of a case, the same voxels at the same world positions (:meth:`mvmm.data.image.Image.reoriented`),
each segmented with the built-in atlas where its header puts it (``registration=None``: the placement is
what depends on the orientation; registration cannot undo an atlas on the wrong side); the labels are
brought back to the stored order's grid by world position and compared with the stored order's, and LGE
Dice against the truth is reported. The test suite checks every placement and 8 2D orders end to end;
this runs every 3D order end to end (about 2–5 s each on 2 cores).

    python benchmarks/orientation_invariance.py [--case phantom|mscmr] [--data DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["phantom", "mscmr"], default="phantom")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "mscmr",
                        help="MS-CMRSeg folder (patient 1 is used with --case mscmr)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from mvmm.data.atlas import Atlas
    from mvmm.data.image import Image
    from mvmm.data.labels import CARDIAC_LABELS
    from mvmm.data.phantom import make_phantom
    from mvmm.data.subject import Subject
    from mvmm.metrics import evaluate_labels
    from mvmm.segment import segment_subject
    from mvmm.spatial import sample_image

    warnings.simplefilter("ignore")
    if args.case == "phantom":
        phantom = make_phantom(0, ndim=3)
        lge, c0, truth = phantom.images["LGE"], phantom.images["C0"], phantom.truth["LGE"]
    else:
        lge, c0 = Image.read(args.data / "patient1_LGE.nii.gz", "LGE"), Image.read(args.data / "patient1_C0.nii.gz", "C0")
        truth = Image.read(args.data / "patient1_LGE_manual.nii.gz", "truth")
    points = lge.grid.world_points(dtype=torch.float64).float()
    spacing = tuple(reversed(lge.grid.spacing))
    reference, rows, start = None, [], time.perf_counter()
    for order in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            images = [lge.reoriented(order, flips), c0.reoriented(order, flips)]
            result = segment_subject(Subject(images, Atlas.builtin_cardiac(images[0].grid)), registration=None,
                                     device="cpu", seed=0)
            labels = torch.from_numpy(result.label_map().astype(np.float32))[None]
            world = sample_image(labels, images[0].grid, points, mode="nearest")[0][0].numpy().astype(np.int64)
            dice = {k: v["dice"] for k, v in evaluate_labels(world, truth.data[0].numpy().astype(np.int64), spacing,
                                                             CARDIAC_LABELS).items()}
            reference = world if reference is None else reference
            rows.append({"order": list(order), "flips": list(flips), "agreement": float((world == reference).mean()),
                         "dice": dice})
            print(order, flips, f"agreement {rows[-1]['agreement']:.4f}",
                  " ".join(f"{k} {v:.3f}" for k, v in dice.items()), flush=True)
    summary = {"case": args.case, "orders": len(rows), "seconds": time.perf_counter() - start,
               "min_agreement": min(r["agreement"] for r in rows),
               "dice_min": {k: min(r["dice"][k] for r in rows) for k in rows[0]["dice"]},
               "dice_max": {k: max(r["dice"][k] for r in rows) for k in rows[0]["dice"]},
               "machine": platform.platform(), "cpu_threads": torch.get_num_threads(),
               "date": datetime.date.today().isoformat(), "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
