"""Time of one FFD evaluation (forward + backward) on a full image grid: point by point against separable.

The joint solver and the pairwise/group-wise registrations evaluate the atlas's (or moving image's)
FFD at every voxel of a grid that shares the control grid's direction. ``displacement(points)``
handles any points (2^ndim ``grid_sample`` lookups each); ``grid_displacement(grid)`` uses that the
spline is separable on such a grid (one B-spline weight matrix per axis). Both are timed on an
MS-CMRSeg-sized LGE grid (192 x 192 x 15 voxels, 0.73 x 0.73 x 5 mm, oblique) with 20 mm control
spacing, and their largest difference is printed.

    python benchmarks/ffd_speed.py [--devices cpu,cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mvmm.core.grid import Grid
from mvmm.spatial.nonlinear import FreeFormDeformation


def timed(fn, ffd: FreeFormDeformation, device: torch.device, repeats: int) -> float:
    """Mean seconds of ``fn()`` (a displacement field) forward and backward."""
    def once():
        ffd.params_tensor.grad = None
        (fn() ** 2).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    grid = Grid((192, 192, 15), (0.73, 0.73, 5.0), (10.0, -20.0, 5.0), tuple(rotation.ravel()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; grid {grid.size}, control spacing 20 mm")
    for name in args.devices.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        device = torch.device(name)
        ffd = FreeFormDeformation(grid, 20.0).to(device)
        coefficients = 3.0 * torch.randn(ffd.params_tensor.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ffd.params_tensor.copy_(coefficients)
        points = grid.world_points(device=device)
        pointwise = timed(lambda: ffd.displacement(points), ffd, device, args.repeats)
        separable = timed(lambda: ffd.grid_displacement(grid), ffd, device, args.repeats)
        with torch.no_grad():
            difference = (ffd.grid_displacement(grid) - ffd.displacement(points).movedim(-1, 0)).abs().max()
        print(f"{name}: point by point {1000 * pointwise:.1f} ms, separable {1000 * separable:.1f} ms "
              f"({pointwise / separable:.0f}x); largest difference {float(difference):.1e} mm")


if __name__ == "__main__":
    main()
