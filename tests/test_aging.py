import numpy as np
import pytest

import sotcore
from sotcore.devices import DeviceAging


@pytest.fixture
def pop():
    return sotcore.DevicePopulation.from_width(20.0, 50, random_state=0)


def test_population_at_follows_the_model(pop):
    aging = DeviceAging(i50_drift=0.1, window_drift=-0.2, drift_spread=0.0, read_error=0.05)
    draws = aging.draw(len(pop), np.random.default_rng(0))
    aged = aging.population_at(pop, np.full(len(pop), 2_000_000), draws)
    np.testing.assert_allclose(aged.i50, pop.i50 * 1.2)
    np.testing.assert_allclose(aged.window, pop.window * 0.6)
    np.testing.assert_allclose(aged.p_lo, 0.05)
    np.testing.assert_allclose(aged.p_hi, 0.95)
    same = aging.population_at(pop, np.zeros(len(pop)), draws)
    np.testing.assert_allclose(same.i50, pop.i50)


def test_devices_stick_after_their_failure_time(pop):
    aging = DeviceAging(stuck_rate=1.0)            # one failure per million pulses on average
    draws = aging.draw(len(pop), np.random.default_rng(1))
    counts = np.full(len(pop), 700_000)
    aged = aging.population_at(pop, counts, draws)
    np.testing.assert_array_equal(aged.stuck, draws["fail_at"] <= 700_000)
    assert 0 < aged.stuck.sum() < len(pop)


def test_emulator_ages_with_pulses_and_resumes_exactly(pop):
    aging = DeviceAging(i50_drift=0.5, stuck_rate=0.3, read_error=0.01)
    be = sotcore.EmulatedBackend(pop, 3, aging=aging, update_pulses=500)
    I = np.tile(pop.i50, (2000, 1))
    first = be.pulse(I).mean()
    for _ in range(20):
        be.pulse(I)
    state = be.get_state()
    later = be.pulse(I)
    assert be.population.i50.mean() > pop.i50.mean() * 1.01
    assert later.mean() < first - 0.01         # I50 drifted up: fewer switches at fixed I
    be2 = sotcore.EmulatedBackend(pop, 3, aging=aging, update_pulses=500)
    be2.set_state(state)
    np.testing.assert_array_equal(be2.pulse(I), later)


def test_aging_validation():
    with pytest.raises(ValueError, match="read_error"):
        DeviceAging(read_error=0.7)
    with pytest.raises(ValueError, match="stuck_rate"):
        DeviceAging(stuck_rate=-1)
