"""Device multiplexing: more neurons than devices (DeviceMap), on instruments and the emulator."""
import numpy as np
import pytest
from scipy.stats import norm

import sotcore
from sotcore.backends import EmulatedBackend, InstrumentBackend
from sotcore.network import CurrentMapping, DeviceMap, StochasticMLP


class _Log:
    """A deterministic instrument that logs every request: bit = current > threshold[d]."""

    def __init__(self, n_devices, threshold=0.0):
        self.requests = []
        self.threshold = np.broadcast_to(threshold, (n_devices,)).astype(float)

    def __call__(self, currents, devices):
        self.requests.append((currents.copy(), devices.copy()))
        return (currents > self.threshold[devices]).astype(np.uint8)


def test_round_robin_is_identity_with_enough_devices():
    dm = DeviceMap.resolve("round-robin", 10, 16)
    assert dm.tolist() == list(range(10)) and not dm.shared
    assert DeviceMap.resolve(None, 10, 3).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_multiplexed_requests_name_each_device_once_in_order(rng):
    n_dev, H, n = 3, 8, 5
    lab = _Log(n_dev)
    backend = InstrumentBackend(lab, n_devices=n_dev)
    dm = DeviceMap.resolve("round-robin", H, n_dev)
    cur = rng.standard_normal((n, H))
    bits = dm.plan(slice(0, H)).pulse(backend, cur)
    # Every bit lands on its own neuron.
    np.testing.assert_array_equal(bits, (cur > 0).astype(np.uint8))
    for _, devs in lab.requests:
        assert np.unique(devs).size == devs.size
    # Each device gets its neurons' currents in input order, then neuron order.
    seen = {d: [] for d in range(n_dev)}
    for c, devs in lab.requests:
        for row in c:
            for j, d in enumerate(devs):
                seen[int(d)].append(row[j])
    for d in range(n_dev):
        neurons = np.flatnonzero(dm.index == d)
        assert len(seen[d]) == n * len(neurons)
        # within one request the rows run input-major; requests go by neuron rank
        assert sorted(seen[d]) == sorted(cur[:, neurons].ravel().tolist())
    np.testing.assert_array_equal(backend.pulse_counts, dm.pulses_per_device(n))


def test_per_device_order_inside_a_request(rng):
    lab = _Log(2)
    backend = InstrumentBackend(lab, n_devices=2)
    dm = DeviceMap(np.array([0, 1, 0, 1]), 2)
    cur = np.arange(12, dtype=float).reshape(3, 4)
    dm.plan(slice(0, 4)).pulse(backend, cur)
    assert len(lab.requests) == 1
    c, devs = lab.requests[0]
    assert devs.tolist() == [0, 1]
    # device 0: input 0 neuron 0, input 0 neuron 2, input 1 neuron 0, ...
    assert c[:, 0].tolist() == [0, 2, 4, 6, 8, 10]
    assert c[:, 1].tolist() == [1, 3, 5, 7, 9, 11]


def test_uneven_map_uses_one_request_per_rank(rng):
    lab = _Log(3)
    backend = InstrumentBackend(lab, n_devices=3)
    dm = DeviceMap(np.array([2, 0, 2, 1, 2]), 3)
    cur = rng.standard_normal((4, 5))
    bits = dm.plan(slice(0, 5)).pulse(backend, cur)
    np.testing.assert_array_equal(bits, (cur > 0).astype(np.uint8))
    # rank 0 on devices (2, 0, 1); ranks 1 and 2 both on device 2: one request of 2 x 4 rows
    assert [d.tolist() for _, d in lab.requests] == [[2, 0, 1], [2]]
    assert lab.requests[1][0][:, 0].tolist() == cur[:, [2, 4]].ravel().tolist()
    assert backend.pulse_counts.tolist() == [4, 4, 12]


def test_emulated_neurons_sharing_a_device_follow_its_curve(global_random_seed):
    pop = sotcore.DevicePopulation.from_width(20.0, 4, variability=0.2, random_state=3)
    dm = DeviceMap.resolve("round-robin", 12, 4)
    backend = EmulatedBackend(pop, global_random_seed)
    n = 4000
    # each neuron at a current where its device switches with P ~ 0.3 .. 0.7
    off = np.linspace(-1, 1, 12)
    cur = np.tile(pop.i50[dm.index] + off * pop.scale[dm.index], (n, 1))
    bits = dm.plan(slice(0, 12)).pulse(backend, cur)
    p = pop[dm.index].probability(cur[:1])[0]
    z = norm.isf(0.5 * 1e-6 / 12)
    se = np.sqrt(p * (1 - p) / n)
    assert (np.abs(bits.mean(axis=0) - p) <= z * se + 1e-3).all()
    # neurons sharing a device are not copies of each other
    assert (bits[:, 0] != bits[:, 4]).any()
    np.testing.assert_array_equal(backend.pulse_counts, dm.pulses_per_device(n))


def test_duplicate_devices_are_counted_each_time(pop20):
    b = EmulatedBackend(pop20, 0)
    b.pulse(np.tile(pop20.i50[[0, 0, 1]], (5, 1)), np.array([0, 0, 1]))
    assert b.pulse_counts[:3].tolist() == [10, 5, 0]


@pytest.mark.parametrize("spec, match", [
    (np.array([0, 1, 8]), r"device_map\[2\] = 8"),
    (np.array([0, -1, 2]), r"device_map\[1\] = -1"),
    (np.array([0, 1]), "3 neurons"),
    (np.array([0.5, 1, 2]), "whole numbers"),
    ("cyclic", "round-robin"),
    (np.array([[0, 1, 2]]), "1-D"),
    (np.array(["a", "b", "c"]), "1-D array of device indices"),
])
def test_bad_device_maps_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        DeviceMap.resolve(spec, 3, 8)


def test_network_forward_pulses_through_the_map():
    lab = _Log(2)
    backend = InstrumentBackend(lab, n_devices=2)
    net = StochasticMLP([3, 4, 2], CurrentMapping(1.0), device_map=DeviceMap.resolve(None, 4, 2))
    net.initialize(np.random.default_rng(0), 0.0)
    X = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    probs, cache = net.forward(X, backend, 2)
    z = X @ net.coefs[0] + net.intercepts[0]
    np.testing.assert_array_equal(cache["bits"][0], np.repeat(z > 0, 2, axis=0))
    assert backend.pulse_counts.tolist() == [24, 24]
    P = net.predict_proba(X, backend, 3)
    assert P.shape == (6, 2) and np.allclose(P.sum(1), 1)
    with pytest.raises(TypeError, match="DeviceMap"):
        StochasticMLP([3, 4, 2], CurrentMapping(1.0), device_map=[0, 1, 0, 1])
