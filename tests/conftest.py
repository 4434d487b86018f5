import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mvmm.data.phantom import make_phantom, write_phantom

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs ``-n auto``), give each worker its own CPU core.

    The tests' tensors are small, so one thread per process does as much as two (measured on 2 cores),
    and two workers with torch's default of every core each would oversubscribe the machine. Pinning the
    worker, rather than only ``torch.set_num_threads(1)``, keeps everything consistent with a 1-core
    machine: ``available_cores()`` (the CLI's ``--threads`` default) and the worker processes that the
    multi-atlas registration spawns all see the one core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker is None:
        return
    if hasattr(os, "sched_setaffinity"):  # Linux
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def phantom3d():
    return make_phantom(seed=3)


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory):
    """A phantom written to disk once per session: {role: path}."""
    return write_phantom(tmp_path_factory.mktemp("phantom") / "case", seed=1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_mixture(n_images=2, shape=(30, 30), means=((0.0, 5.0, 10.0), (3.0, 0.0, 6.0)), seed=0):
    """Images drawn from a known mixture; returns (images [N, *S], labels [*S], prior [K, *S])."""
    g = torch.Generator().manual_seed(seed)
    means = torch.as_tensor(means, dtype=torch.float32)
    k = means.shape[1]
    labels = torch.randint(0, k, shape, generator=g)
    images = torch.stack([means[i][labels] + torch.randn(shape, generator=g) for i in range(n_images)])
    prior = torch.nn.functional.one_hot(labels, k).movedim(-1, 0).float() * 0.5 + 0.5 / k
    return images, labels, prior
