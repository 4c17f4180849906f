import os

import numpy as np
import pytest

# Statistical tests run under several seeds: a correct kernel passes for any seed.
_SEEDS = [int(s) for s in os.environ.get("SOTCORE_TEST_SEEDS", "0,1,42").split(",")]


@pytest.fixture(params=_SEEDS)
def global_random_seed(request):
    return request.param


@pytest.fixture
def pop20():
    import sotcore
    return sotcore.DevicePopulation.from_width(20.0, n_devices=64, variability=0.10,
                                               random_state=0)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
