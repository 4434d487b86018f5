"""Seconds per MS-CMRSeg case of a trained Bayesian segmentation CNN (``mvmm segment --model``), files to labels.

For each patient, the model (of those given) that was not trained on it reads the case's files,
predicts the atlas warp and θ, and writes the label map: ``files_to_labels_s`` runs from reading the
images to the written ``labels.nii.gz`` (what issue 18's "≤ 1 s per case" counts), split into the
library's own timings (``load_s``, ``network_s``, ``sample_s``, ``refine_s``) and the writing.
``cli_s`` is the whole ``mvmm segment --model`` command in this process with every output (posteriors,
entropy, figures, report); a fresh interpreter's imports are not counted (``cardiac_case.py`` measures
them). Each case runs ``--repeats`` times, after one untimed warm-up case; the median is reported.

    python benchmarks/bayes_speed.py --models MODEL_DIR... [--data ../shared/data/mscmr] [--patients 1-25] \\
        [--repeats 3] [--devices cpu,cuda] [--json bayes_speed.json]

The models are those of a 5-fold experiment (``mvmm experiment mscmr --folds 5 --methods bayes``:
``OUT/models/fold*``); each model's ``config.json`` names the patients it was trained on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path


def parse_patients(text: str) -> list:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def model_for(loaded: dict, patient: int) -> Path:
    """The model directory (of ``{path: LoadedModel}``) whose training subjects leave ``patient`` out."""
    for path, model in loaded.items():
        if f"patient{patient}" not in model.config.subjects:
            return path
    raise SystemExit(f"--models: every model was trained on patient {patient}")


def files_to_labels(data: Path, patient: int, model, device: str, out: Path) -> dict:
    """Read the case, segment it with ``model`` (loaded), write its label map; seconds and split."""
    import numpy as np

    from mvmm.amortized import segment_with_model
    from mvmm.data import io
    from mvmm.data.image import Image

    start = time.perf_counter()
    images = [Image.read(data / f"patient{patient}_{s}.nii.gz", s) for s in model.config.images]
    result = segment_with_model(images, model, device=device, prior_votes=False)
    segmented = time.perf_counter()
    io.write_array(out / "labels.nii.gz", result.label_map().astype(np.int16), result.common.grid)
    end = time.perf_counter()
    return {"files_to_labels_s": end - start, "labels_write_s": end - segmented,
            **result.timings}


def whole_command(data: Path, patient: int, model_dir: Path, device: str, out: Path, sequences) -> float:
    from mvmm.cli import main as cli

    images = [str(data / f"patient{patient}_{s}.nii.gz") for s in sequences]
    start = time.perf_counter()
    cli(["segment", "--images", *images, "--names", *sequences, "--model", str(model_dir), "--device", device,
         "--out", str(out), "--force", "--quiet"], standalone_mode=False)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mscmr"))
    parser.add_argument("--patients", default="1-25")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import warnings

    import torch

    from mvmm.amortized import loaded_model
    from mvmm import __version__

    warnings.simplefilter("ignore")  # a model's own warnings (e.g. a crop's placement) are not timed here
    patients = parse_patients(args.patients)
    rows, summary = [], {}
    for device in args.devices.split(","):
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{device}: not available, skipped")
            continue
        loaded = {path: loaded_model(path, device)[0] for path in args.models}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            first = patients[0]
            files_to_labels(args.data, first, loaded[model_for(loaded, first)], device, out)  # warm-up
            for patient in patients:
                path = model_for(loaded, patient)
                runs = [files_to_labels(args.data, patient, loaded[path], device, out) for _ in range(args.repeats)]
                cli = [whole_command(args.data, patient, path, device, out / "cli", loaded[path].config.images)
                       for _ in range(args.repeats)]
                row = {"patient": patient, "device": device, "model": str(path),
                       **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                       "cli_s": statistics.median(cli)}
                rows.append(row)
                print(f"{device} patient {patient}: files to labels {row['files_to_labels_s']:.2f} s "
                      f"(network {row['network_s']:.2f}, sample {row['sample_s']:.2f}, θ {row['refine_s']:.2f}, "
                      f"write {row['labels_write_s']:.2f}); whole command {row['cli_s']:.2f} s", flush=True)
        seconds = [r["files_to_labels_s"] for r in rows if r["device"] == device]
        summary[device] = {"median_s": statistics.median(seconds), "max_s": max(seconds),
                           "cases_within_1s": sum(s <= 1.0 for s in seconds), "cases": len(seconds),
                           "cli_median_s": statistics.median(r["cli_s"] for r in rows if r["device"] == device)}
        print(device, summary[device])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    if any(d.startswith("cuda") for d in summary) and torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    record = {"benchmark": "bayes_speed", "date": datetime.date.today().isoformat(), "machine": machine,
              "mvmm_version": __version__, "torch_version": torch.__version__,
              "command": "python benchmarks/bayes_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if v is not None and k != "json"),
              "summary": summary, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
