"""Time per EM iteration and peak memory against voxel count: mvmm (CPU, CUDA) and scikit-learn.

Each case (3 images x 4 tissues x 2 subtypes, atlas prior) runs in its own process, so that its peak
memory is its own: peak RSS on CPU (it includes the ~0.3 GB of Python + torch, reported as the
baseline row), ``torch.cuda.max_memory_allocated`` on CUDA. Time per iteration is
``(t(max_iter=1 + n) - t(max_iter=1)) / n`` (medians of three), which removes loading and initialisation.
scikit-learn's ``GaussianMixture`` (8 diagonal components on the same 3 features, no prior, no
coverage) is the reference point for a plain mixture of the same size.

    python benchmarks/em_speed.py [--sizes 2d,3d-small,3d-large] [--devices cpu,cuda] [--json out.json]
    python benchmarks/em_speed.py --profile 3d-large
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
import warnings

SIZES = {"2d": (256, 256), "3d-small": (16, 192, 192), "3d-large": (160, 192, 224)}
N_IMAGES, N_TISSUES, N_SUBTYPES = 3, 4, 2


def make_data(shape, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_TISSUES, shape, generator=g)
    means = torch.rand(N_IMAGES, N_TISSUES, generator=g) * 10
    images = torch.stack([means[i][labels] + torch.randn(shape, generator=g) for i in range(N_IMAGES)])
    prior = torch.nn.functional.one_hot(labels, N_TISSUES).movedim(-1, 0).float() * 0.6 + 0.1
    return images, prior


def time_mvmm(shape, device, n_iter):
    import torch
    from mvmm.mixture import ConvergenceWarning, MultivariateMixture
    images, prior = make_data(shape)
    images, prior = images.to(device), prior.to(device)
    coverage = torch.ones(images.shape, dtype=torch.bool, device=device)

    def fit(iters):
        model = MultivariateMixture(n_subtypes=N_SUBTYPES, max_iter=iters, tol=1e-30)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(images, coverage, prior)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, model.n_iter_

    fit(1)  # warm-up (CUDA context, kernels)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # the median of three of each (single runs of a few ms are noisy), divided by the iterations
    # that ran: EM stops early when log L repeats exactly (a fixed point)
    long, n_long = sorted(fit(1 + n_iter) for _ in range(3))[1]
    short, n_short = sorted(fit(1) for _ in range(3))[1]
    if n_long <= n_short:
        raise RuntimeError(f"EM stopped after {n_long} iterations: nothing to time")
    per_iter = (long - short) / (n_long - n_short)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return per_iter, peak


def time_sklearn(shape, n_iter):
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    images, _ = make_data(shape)
    x = images.reshape(N_IMAGES, -1).T.numpy().astype(np.float64)

    def fit(iters):
        gm = GaussianMixture(N_TISSUES * N_SUBTYPES, covariance_type="diag", max_iter=iters, tol=0.0,
                             init_params="random_from_data", random_state=0)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(x)
        return time.perf_counter() - start

    return (fit(1 + n_iter) - fit(1)) / n_iter, None


def profile_iteration(size: str) -> None:
    """Print the operators one ``fit(max_iter=1)`` from given parameters spends its CPU time in: the data
    gathered, the E-step at the parameters, one M-step and the E-step after it (two passes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mvmm.mixture import ConvergenceWarning, MultivariateMixture
    images, prior = make_data(SIZES[size])
    coverage = torch.ones(images.shape, dtype=torch.bool)
    model = MultivariateMixture(n_subtypes=N_SUBTYPES, max_iter=1, tol=1e-30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(images, coverage, prior)  # initialised: the profile covers one iteration
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.fit(images, coverage, prior, max_iter=1, init_params=model.params_)
    print(f"fit(max_iter=1) from given parameters (set-up, two E-steps, one M-step), {size}, "
          f"{torch.get_num_threads()} threads:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def run_case(args):
    shape = SIZES[args.size]
    if args.backend == "baseline":
        import torch  # noqa: F401  (what every case pays before it starts)
        per_iter, gpu_peak = 0.0, None
    elif args.backend == "sklearn":
        per_iter, gpu_peak = time_sklearn(shape, args.iters)
    else:
        per_iter, gpu_peak = time_mvmm(shape, args.device, args.iters)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    print(json.dumps({"seconds_per_iter": per_iter, "peak_rss_bytes": rss, "peak_gpu_bytes": gpu_peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    parser.add_argument("--profile", metavar="SIZE", choices=list(SIZES),
                        help="Instead: profile one EM iteration at this size on CPU (torch.profiler, top operators).")
    parser.add_argument("--case", nargs=4, metavar=("BACKEND", "SIZE", "DEVICE", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        profile_iteration(args.profile)
        return
    if args.case:
        backend, size, device, iters = args.case
        run_case(argparse.Namespace(backend=backend, size=size, device=device, iters=int(iters)))
        return
    import torch
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    cases = [("baseline", "2d", "cpu")]
    for size in args.sizes.split(","):
        cases += [("mvmm", size, d) for d in devices]
        if not args.no_sklearn:
            cases.append(("sklearn", size, "cpu"))
    rows = []
    for backend, size, device in cases:
        out = subprocess.run([sys.executable, __file__, "--case", backend, size, device, str(args.iters)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{backend} {size} {device} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        voxels = 1
        for s in SIZES[size]:
            voxels *= s
        rows.append({"backend": backend, "size": size, "shape": SIZES[size], "voxels": voxels, "device": device, **result})
        print(f"{backend:>8} {size:>9} {device:>5}: {result['seconds_per_iter']:.4f} s/iter", file=sys.stderr)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
               + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"\nmachine: {machine}; torch {torch.__version__}; {N_IMAGES} images x {N_TISSUES} tissues x "
          f"{N_SUBTYPES} subtypes\n")
    print("| method | volume | voxels | device | s / EM iteration | peak RSS (GB) | peak GPU memory (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gpu = f"{r['peak_gpu_bytes'] / 1e9:.2f}" if r["peak_gpu_bytes"] else "–"
        name = {"mvmm": "mvmm", "sklearn": "sklearn GaussianMixture (8 diag)", "baseline": "Python + torch imported"}[r["backend"]]
        shape = "×".join(map(str, r["shape"])) if r["backend"] != "baseline" else "–"
        print(f"| {name} | {shape} | {r['voxels'] if r['backend'] != 'baseline' else '–'} | {r['device']} | "
              f"{r['seconds_per_iter']:.4f} | {r['peak_rss_bytes'] / 1e9:.2f} | {gpu} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                       "command": "python benchmarks/em_speed.py " + " ".join(sys.argv[1:]), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
