"""Train the Bayesian segmentation CNN on unlabelled synthetic cases, then segment a new one with it,
alone and refined — the amortized path end to end, on the CPU in about a minute, no data to fetch.

    python examples/train_bayes_phantom.py [--out bayes-example]
"""

import argparse
from pathlib import Path

from mvmm.atlas_build import GroupwiseSettings, build_atlas
from mvmm.core.settings import BayesNetSettings, RegistrationSettings, TrainingSettings
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.data.phantom import write_phantom
from mvmm.metrics import evaluate_labels
from mvmm.nets.data import SubjectRow
from mvmm.amortized import segment_with_model
from mvmm.training import train_bayes

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, default=Path("bayes-example"))
out = parser.parse_args().out

# 2D cases (one short-axis slice per sequence); the atlas comes from the labels of four *other* cases
cases = {seed: write_phantom(out / "data" / f"case{seed}", seed=seed, ndim=2, force=True) for seed in range(12)}
atlas, _ = build_atlas([cases[s]["LGE_truth"] for s in range(8, 12)], GroupwiseSettings(register="affine", frame="axes"))
atlas.save(out / "atlas.nii.gz")

# train on the images of cases 0-6 (their labels are never read)
rows = [SubjectRow(f"case{s}", {"LGE": cases[s]["LGE"], "C0": cases[s]["C0"]}) for s in range(7)]
network = BayesNetSettings(subtypes=["LGE:Myo=2"], channels=(8, 16, 32), features=8)
report = train_bayes(rows, ["LGE", "C0"], [out / "atlas.nii.gz"], out / "model", network,
                     TrainingSettings(epochs=40, lr=3e-3), device="auto", force=True)
print(f"trained {report['epochs']} epochs in {report['seconds']:.0f} s; loss curve: {out / 'model' / 'loss.png'}")

# segment the held-out case 7: the network alone, then registration + EM from its warp
images = [Image.read(cases[7][name], name) for name in ("LGE", "C0")]
truth = Image.read(cases[7]["LGE_truth"], "truth").data[0].numpy().astype(int)
spacing = tuple(reversed(images[0].grid.spacing))
for how, registration in (("network alone", None), ("network, then registration + EM", RegistrationSettings())):
    result = segment_with_model(images, out / "model", registration=registration)
    dice = evaluate_labels(result.label_map(), truth, spacing, CARDIAC_LABELS)
    print(f"{how}: network {result.timings['network_s']:.2f} s; Dice "
          + ", ".join(f"{name} {m['dice']:.3f}" for name, m in dice.items()))
result.write(out / "segmentation", force=True)
