import numpy as np
import pytest

from mvmm.data.phantom import CONTRAST, make_phantom


def test_clean_phantom_is_the_noisy_one_without_noise_and_bias():
    noisy = make_phantom(seed=4, ndim=2)
    clean = make_phantom(seed=4, ndim=2, noise_sd=0.0, bias_amplitude=0.0)
    for name in noisy.truth:
        assert np.array_equal(noisy.truth[name].data.numpy(), clean.truth[name].data.numpy())
        assert noisy.images[name].grid.same_geometry(clean.images[name].grid)
    image, labels = clean.images["C0"].data[0].numpy(), clean.truth["C0"].data[0].numpy()
    # without noise and bias, the blood pool has exactly its contrast; the noisy twin does not
    assert np.allclose(image[labels == 500], CONTRAST["C0"]["blood"])
    residual = noisy.images["C0"].data[0].numpy()[labels == 500] - CONTRAST["C0"]["blood"]
    assert residual.std() > 0.02
    assert clean.parameters["noise_sd"] == 0.0 and clean.parameters["bias_amplitude"] == 0.0


def test_phantom_rejects_negative_noise():
    with pytest.raises(ValueError, match="noise_sd"):
        make_phantom(seed=0, ndim=2, noise_sd=-0.1)
