"""sotcore.torch.DeviceNeurons: bits, device maps, surrogate gradients, modes, state,
bad input and backend faults (skipped when torch is absent)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import expit

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import sotcore  # noqa: E402
from sotcore.exceptions import BackendError, InvalidInputError  # noqa: E402
from sotcore.network import CurrentMapping, DeviceMap  # noqa: E402
from sotcore.torch import (DeviceNeurons, compare_modes, fit, predict_proba,  # noqa: E402
                           set_mode)



@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny ops: torch's thread team only adds synchronisation (and stalls badly on a
    # loaded machine); restored after each test.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


Z = 6.0   # binomial z-bound per check: with <= 100 checks a test fails with p < 1e-7


def _pop(n, i50=200e-6, scale=5e-6, spread=8.0, seed=0):
    """Devices whose I50s differ by many scales (a neuron on the wrong device is obvious)."""
    rng = np.random.default_rng(seed)
    i50s = i50 + spread * scale * (rng.permutation(n) - (n - 1) / 2) / max(n - 1, 1)
    return sotcore.DevicePopulation(i50s, np.full(n, scale) * rng.uniform(0.7, 1.3, n),
                                    0.0, 1.0, 20.0)


def _expected_p(pop, index, cur):
    """What the sampler draws for neuron k (device index[k]) at currents cur (n, K)."""
    return pop[index].table_probability(cur.astype(np.float64))


def _check_rates(bits, p):
    """Column means of bits (n, K) agree with the mean probability of each column."""
    n = bits.shape[0]
    mean, pm = bits.mean(axis=0), p.mean(axis=0)
    sd = np.sqrt(np.maximum(p * (1 - p), 0).sum(axis=0)) / n
    assert np.all(np.abs(mean - pm) <= Z * sd + 1e-3), (mean, pm)


def test_importing_sotcore_does_not_import_torch(tmp_path):
    code = ("import sys, sotcore, sotcore.estimator, sotcore.experiments, sotcore.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    # outside the source tree, so the installed package is the one imported
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


# -- forward: bits from the right devices ------------------------------------------------------
def test_forward_bits_follow_each_neurons_device(global_random_seed):
    """Round-robin map with fewer devices than neurons: neuron k switches with the
    probability of device k mod m at its current (catches a swapped/shifted index,
    a wrong mapping sign or offset)."""
    pop = _pop(5, seed=global_random_seed)
    layer = DeviceNeurons(pop, random_state=global_random_seed, nominal_device=(200e-6, 5e-6))
    rng = np.random.default_rng(global_random_seed)
    z0 = rng.uniform(-3, 3, 12).astype(np.float32)
    z = torch.from_numpy(np.tile(z0, (3000, 1)))
    bits = layer(z)
    assert bits.shape == z.shape and bits.dtype == torch.float32
    assert set(np.unique(bits.numpy())) <= {0.0, 1.0}
    np.testing.assert_array_equal(layer.device_map.index, np.arange(12) % 5)
    cur = layer.mapping.offset + layer.mapping.unit * z.numpy()
    assert layer.mapping.offset == 200e-6 and layer.mapping.unit == 5e-6
    _check_rates(bits.numpy(), _expected_p(pop, layer.device_map.index, cur))


@pytest.mark.parametrize("spec", ["channel", "position", "round-robin", None])
def test_feature_map_device_maps(spec, global_random_seed):
    """(N, C, H, W) inputs: the documented maps, and the bits of each neuron come
    from the device its map names (default for feature maps: one device per channel)."""
    C, H, W, m = 3, 2, 2, 4
    pop = _pop(m, seed=global_random_seed)
    layer = DeviceNeurons(pop, device_map=spec, random_state=global_random_seed,
                          nominal_device=(200e-6, 5e-6))
    z = torch.zeros(2000, C, H, W)
    bits = layer(z).numpy().reshape(2000, -1)
    c, p = np.divmod(np.arange(C * H * W), H * W)
    want = {"channel": c % m, None: c % m, "position": p % m,
            "round-robin": np.arange(C * H * W) % m}[spec]
    np.testing.assert_array_equal(layer.device_map.index, want)
    cur = np.full((2000, C * H * W), layer.mapping.offset, np.float32)
    _check_rates(bits, _expected_p(pop, want, cur))


def test_explicit_device_map_and_devicemap_object():
    pop = _pop(3)
    idx = np.array([2, 2, 0, 1])
    a = DeviceNeurons(pop, device_map=idx, nominal_device=(200e-6, 5e-6))
    a(torch.zeros(2, 4))
    np.testing.assert_array_equal(a.device_map.index, idx)
    b = DeviceNeurons(pop, device_map=DeviceMap(idx, 3), nominal_device=(200e-6, 5e-6))
    b(torch.zeros(2, 4))
    np.testing.assert_array_equal(b.device_map.index, idx)


def test_same_seed_same_bits_for_any_thread_count():
    pop = sotcore.DevicePopulation.from_width(20.0, 64, variability=0.1, random_state=0)
    z = torch.randn(300, 64)
    outs = []
    for nt in (1, 2):
        layer = DeviceNeurons(pop, random_state=7, n_threads=nt)
        outs.append((layer(z), layer(z)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # Each call draws a new stream: two calls differ, as does another seed.
    assert not torch.equal(outs[0][0], outs[0][1])
    assert not torch.equal(DeviceNeurons(pop, random_state=8)(z), outs[0][0])


def test_float64_input_gives_float64_bits_and_gradient():
    layer = DeviceNeurons(_pop(4), nominal_device=(200e-6, 5e-6))
    z = torch.zeros(5, 4, dtype=torch.float64, requires_grad=True)
    out = layer(z)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert z.grad.dtype == torch.float64
    np.testing.assert_allclose(z.grad.numpy(), 0.25, rtol=1e-5)   # nominal sigmoid'(0)


# -- backward: the surrogate formulas ------------------------------------------------------------
def _numpy_surrogate(kind, cur, i50n, sn, unit, curves=None, index=None):
    if kind == "nominal":
        s = expit((cur - i50n) / sn)
        return unit / sn * s * (1 - s)
    if kind == "straight-through":
        return np.where(np.abs(cur - i50n) <= 2 * np.log(9) * sn, unit / (4 * sn), 0.0)
    i50, sc = curves.i50[index], curves.scale[index]
    amp = curves.p_hi[index] - curves.p_lo[index]
    s = expit((cur - i50) / sc)
    return unit * amp / sc * s * (1 - s)


@pytest.mark.parametrize("kind", ["nominal", "calibrated", "straight-through"])
def test_gradient_is_the_surrogate_on_fixed_bits(kind, global_random_seed):
    """z.grad = grad_out * dP/dz(I) per neuron; calibrated: the curve of each
    neuron's own device (shared devices, so a neuron-vs-device index mix-up fails)."""
    rng = np.random.default_rng(global_random_seed)
    pop = _pop(3, seed=global_random_seed)
    calib = sotcore.DevicePopulation(pop.i50 * rng.uniform(0.95, 1.05, 3),
                                     pop.scale * rng.uniform(0.8, 1.2, 3), 0.02, 0.97)
    mapping = CurrentMapping(unit=4e-6, offset=190e-6)
    layer = DeviceNeurons(pop, mapping=mapping, surrogate=kind, calibration=calib,
                          device_map=np.array([2, 0, 1, 1, 2, 0, 0]),
                          nominal_device=(200e-6, 5e-6), random_state=global_random_seed)
    z = torch.from_numpy(rng.uniform(-6, 6, (40, 7)).astype(np.float32)).requires_grad_()
    bits = layer(z)
    g = torch.from_numpy(rng.standard_normal((40, 7)).astype(np.float32))
    (bits * g).sum().backward()
    cur = 190e-6 + 4e-6 * z.detach().numpy().astype(np.float64)
    want = g.numpy() * _numpy_surrogate(kind, cur, 200e-6, 5e-6, 4e-6, calib,
                                        layer.device_map.index)
    np.testing.assert_allclose(z.grad.numpy(), want, rtol=2e-3, atol=1e-6)
    assert np.abs(want).max() > 0.05


def test_hardware_aware_uses_each_devices_exact_derivative():
    pop = _pop(4)
    layer = DeviceNeurons(pop, mode="hardware-aware", nominal_device=(200e-6, 5e-6))
    z = torch.linspace(-4, 4, 8).reshape(2, 4).requires_grad_()
    layer(z).sum().backward()
    cur = layer.mapping.offset + layer.mapping.unit * z.detach().numpy().astype(np.float64)
    want = _numpy_surrogate("calibrated", cur, 0, 0, layer.mapping.unit, pop, np.arange(4))
    np.testing.assert_allclose(z.grad.numpy(), want, rtol=2e-3, atol=1e-7)


# -- modes ----------------------------------------------------------------------------------------
def test_modes_pulse_the_right_neurons(global_random_seed):
    """Devices far from the nominal device: at z = 0 a nominal neuron switches half
    the time, these devices (I50 = 1.3 x nominal) almost never."""
    pop = sotcore.DevicePopulation(np.full(8, 260e-6), np.full(8, 5e-6), 0.0, 1.0, 20.0)
    z = torch.zeros(2000, 8)

    def rate(mode, train):
        layer = DeviceNeurons(pop, mode=mode, nominal_device=(200e-6, 5e-6),
                              random_state=global_random_seed)
        layer.train(train)
        return float(layer(z).mean())
    half = Z * 0.5 / np.sqrt(z.numel())
    for mode, train, want in [("software", True, 0.5), ("software", False, 0.5),
                              ("ex-situ", True, 0.5), ("ex-situ", False, 0.0),
                              ("hardware-aware", True, 0.0), ("hil", True, 0.0),
                              ("hil", False, 0.0)]:
        assert abs(rate(mode, train) - want) <= half + 1e-6, (mode, train)


def test_hil_pulses_the_users_backend():
    pop = _pop(4)
    be = sotcore.EmulatedBackend(pop, random_state=0)
    layer = DeviceNeurons(be)
    assert layer.population is pop
    layer(torch.zeros(10, 4))
    np.testing.assert_array_equal(be.pulse_counts, 10)
    set_mode(nn.Sequential(layer), "software")
    layer(torch.zeros(10, 4))
    np.testing.assert_array_equal(be.pulse_counts, 10)   # nominal neurons, not the backend


def test_instrument_backend_gets_each_device_once_per_request(global_random_seed):
    """10 neurons on 4 instrument devices: every request names distinct devices, and
    the bits still follow each neuron's device."""
    pop = _pop(4, seed=global_random_seed)
    rng = np.random.default_rng(global_random_seed)

    def fn(cur, idx):
        assert np.unique(idx).size == idx.size
        return (rng.random(cur.shape) < pop[idx].probability(cur)).astype(np.uint8)
    be = sotcore.InstrumentBackend(fn, n_devices=4)
    layer = DeviceNeurons(be, nominal_device=(200e-6, 5e-6))
    z = torch.from_numpy(np.tile(rng.uniform(-2, 2, 10).astype(np.float32), (2000, 1)))
    bits = layer(z).numpy()
    cur = layer.mapping.offset + layer.mapping.unit * z.numpy().astype(np.float64)
    p = pop[np.arange(10) % 4].probability(cur)
    _check_rates(bits, p)


# -- helpers --------------------------------------------------------------------------------------
def _mlp(seed, n_devices=16, mode="hil", **kw):
    torch.manual_seed(seed)
    pop = sotcore.DevicePopulation.from_width(20.0, n_devices, variability=0.1,
                                              random_state=seed)
    return nn.Sequential(nn.Linear(64, n_devices),
                         DeviceNeurons(pop, mode=mode, random_state=seed, **kw),
                         nn.Linear(n_devices, 10))


def test_predict_proba_averages_softmax_over_T_passes_in_eval_mode():
    X = torch.randn(30, 64)
    a, b = _mlp(0, n_samples=5), _mlp(0, n_samples=5)
    a.train()
    p = predict_proba(a, X)
    assert a.training                                 # restored
    b.eval()
    with torch.no_grad():
        manual = sum(torch.softmax(b(X).double(), 1) for _ in range(5)) / 5
    torch.testing.assert_close(p, manual)
    c = _mlp(0)
    nested = predict_proba(c, X, at=(1, 5))
    assert set(nested) == {1, 5}
    torch.testing.assert_close(nested[5], manual)
    np.testing.assert_allclose(p.sum(1).numpy(), 1.0)


def _glorot_like_sotclassifier(model, z50, seed):
    rng = np.random.default_rng(seed)
    for k, lin in enumerate([m for m in model if isinstance(m, nn.Linear)]):
        a, b = lin.in_features, lin.out_features
        bound = np.sqrt(6.0 / (a + b))
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(rng.uniform(-bound, bound, (b, a)).astype(
                np.float32)))
            lin.bias.fill_(z50 if k == 0 else 0.0)


def test_one_hidden_layer_matches_sotclassifier_on_digits():
    """Same devices, mapping, optimiser (Adam 3e-3, batch 100, L2 1e-4), epochs and
    initialisation: the torch network reaches SOTClassifier's accuracy within noise."""
    from sklearn.model_selection import train_test_split
    from sotcore.datasets import load_digits
    from sotcore.training import nominal_curve
    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    pop = sotcore.DevicePopulation.from_width(20.0, 100, variability=0.1, random_state=0)
    i50n, sn = nominal_curve(pop)
    clf = sotcore.SOTClassifier(hidden_layer_sizes=(100,), devices=pop, training="hil",
                                max_iter=15, n_samples=16, random_state=0).fit(Xtr, ytr)
    acc_ref = clf.score(Xte, yte)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 100),
                          DeviceNeurons(pop, mapping=clf.mapping_, random_state=0),
                          nn.Linear(100, 10))
    assert clf.mapping_.offset == 0.0
    _glorot_like_sotclassifier(model, i50n / clf.mapping_.unit, 0)
    fit(model, Xtr, ytr, epochs=15, batch_size=100, lr=3e-3, alpha=1e-4, random_state=0)
    acc = float((predict_proba(model, Xte, 16).argmax(1).numpy() == yte).mean())
    # ~540 test images: two independent runs differ by a few points at most.
    assert acc_ref > 0.85
    assert abs(acc - acc_ref) <= 0.04, (acc, acc_ref)


def test_compare_modes_runs_every_mode_side_by_side():
    from sotcore.datasets import load_digits
    X, y = load_digits()

    def build(neurons):
        return nn.Sequential(nn.Linear(64, 16), neurons(16), nn.Linear(16, 10))

    def devices(k, n, seed):
        return sotcore.DevicePopulation.from_width(20.0, n, variability=0.1,
                                                   random_state=seed + k)
    recs = compare_modes(build, X[:400], y[:400], X[400:700], y[400:700], devices=devices,
                         surrogates=("nominal", "calibrated"), n_samples=(1, 4),
                         calibration=lambda pop, seed: pop,
                         fit_params={"epochs": 5, "lr": 2e-2, "batch_size": 50})
    runs = {(r["run"], r["T"]) for r in recs}
    assert runs == {(m, T) for m in ("software", "ex-situ", "hardware-aware", "hil (nominal)",
                                     "hil (calibrated)") for T in (1, 4)}
    soft = [r["accuracy"] for r in recs if r["run"] == "software" and r["T"] == 4]
    assert soft[0] > 0.5
    with pytest.raises(ValueError, match="mode"):
        compare_modes(build, X, y, X, y, devices=devices, modes=("bogus",))


# -- state ------------------------------------------------------------------------------------------
def test_state_dict_rebuilds_the_layer_without_pickle(tmp_path):
    pop = _pop(6)
    calib = sotcore.DevicePopulation(pop.i50 * 1.01, pop.scale, 0.01, 0.99)
    layer = DeviceNeurons(pop, surrogate="calibrated", calibration=calib,
                          device_map=[5, 4, 3, 2, 1, 0, 0, 1], n_samples=7,
                          nominal_device=(200e-6, 5e-6), random_state=3)
    z = torch.randn(50, 8)
    layer(z)
    sd = layer.state_dict()
    path = tmp_path / "layer.pt"
    torch.save(sd, path)
    sd2 = torch.load(path, weights_only=True)
    new = DeviceNeurons.from_state_dict(sd2)
    np.testing.assert_array_equal(new.device_map.index, [5, 4, 3, 2, 1, 0, 0, 1])
    np.testing.assert_array_equal(new.population.i50, pop.i50)
    np.testing.assert_array_equal(new.calibration.p_lo, calib.p_lo)
    assert (new.surrogate, new.n_samples, new.mode, new.shape) == ("calibrated", 7, "hil", (8,))
    assert new.mapping == layer.mapping and new.nominal == layer.nominal
    # The emulator's stream continues where it was: the next bits are identical.
    assert torch.equal(new(z), layer(z))
    # load_state_dict into a fresh layer inside a model
    model = nn.Sequential(DeviceNeurons(_pop(6, seed=9), nominal_device=(1e-4, 1e-6)))
    model.load_state_dict({"0." + k: v for k, v in sd.items()})
    np.testing.assert_array_equal(model[0].population.scale, pop.scale)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(mode="magic"), "mode"),
    (lambda d: d.update(device_map=[0, 1]), "device_map"),
    (lambda d: d.update(device_map=[7] * 8), "device_map"),
    (lambda d: d.update(device_map=[True] * 8), "device_map"),
    (lambda d: d.update(n_samples=0), "n_samples"),
    (lambda d: d.update(shape=[-8]), "shape"),
    (lambda d: d.update(mapping={"unit": -1.0, "offset": 0.0}), "unit"),
    (lambda d: d["population"].update(i50=[1e-4]), "population"),
    (lambda d: d.update(seed="x"), "seed|invalid"),
    (lambda d: d.update(emulators={"devices": {"calls": -1}}), "emulators"),
])
def test_hostile_state_is_a_clear_error(edit, match):
    layer = DeviceNeurons(_pop(6), nominal_device=(200e-6, 5e-6))
    layer(torch.zeros(1, 8))
    d = json.loads(layer.get_extra_state())
    edit(d)
    with pytest.raises(InvalidInputError, match=match):
        DeviceNeurons.from_state_dict({"_extra_state": json.dumps(d)})


def test_hostile_state_containers():
    with pytest.raises(InvalidInputError, match="_extra_state"):
        DeviceNeurons.from_state_dict({})
    with pytest.raises(InvalidInputError, match="JSON"):
        DeviceNeurons.from_state_dict({"_extra_state": "{not json"})
    with pytest.raises(InvalidInputError, match="string"):
        DeviceNeurons.from_state_dict({"_extra_state": {"format": 1}})


# -- bad input and faults --------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors():
    layer = DeviceNeurons(_pop(4), nominal_device=(200e-6, 5e-6))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="CPU"):
        layer(torch.zeros(3, 4, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.zeros(4))
    for bad in (float("nan"), float("inf"), -float("inf")):
        z = torch.zeros(3, 4)
        z[1, 2] = bad
        with pytest.raises(ValueError, match="finite.*sample 1, neuron 2"):
            layer(z.requires_grad_())
    layer(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="neurons"):
        layer(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="device_map"):
        DeviceNeurons(_pop(4), device_map="diagonal", shape=(4,))
    with pytest.raises(ValueError, match="device_map"):
        DeviceNeurons(_pop(4), device_map=[0, 1, 2], shape=(4,))
    with pytest.raises(ValueError, match="device_map"):
        DeviceNeurons(_pop(4), device_map=[0, 1, 2, 9], shape=(4,))
    with pytest.raises(ValueError, match="channels"):
        DeviceNeurons(_pop(4), device_map="channel", shape=(4,))
    with pytest.raises(ValueError, match="calibration"):
        DeviceNeurons(_pop(4), surrogate="calibrated")
    with pytest.raises(ValueError, match="calibration has 3"):
        DeviceNeurons(_pop(4), surrogate="calibrated", calibration=_pop(3))
    with pytest.raises(ValueError, match="surrogate"):
        DeviceNeurons(_pop(4), surrogate="exact")
    with pytest.raises(ValueError, match="n_samples"):
        DeviceNeurons(_pop(4), n_samples=0)
    with pytest.raises(TypeError, match="devices"):
        DeviceNeurons("20um")
    with pytest.raises(ValueError, match="nominal_device"):
        DeviceNeurons(sotcore.InstrumentBackend(lambda c, i: c > 0, n_devices=2))
    with pytest.raises(ValueError, match="hardware-aware"):
        DeviceNeurons(sotcore.InstrumentBackend(lambda c, i: c > 0, n_devices=2),
                      nominal_device=(1e-4, 1e-6), mode="hardware-aware")
    with pytest.raises(ValueError, match="n_samples"):
        predict_proba(nn.Sequential(layer), torch.zeros(2, 4), n_samples=0)


class _Garbage:
    n_devices = 4

    def __init__(self, result=None, exc=None):
        self.result, self.exc = result, exc

    def pulse(self, currents, devices):
        if self.exc is not None:
            raise self.exc
        return self.result(currents)


@pytest.mark.parametrize("backend", [
    sotcore.InstrumentBackend(lambda c, i: 1 / 0, n_devices=4),
    _Garbage(exc=RuntimeError("GPIB timeout")),
    _Garbage(result=lambda c: np.full(c.shape, 2)),
    _Garbage(result=lambda c: np.zeros((1, 1))),
])
def test_backend_faults_surface_as_backend_error(backend):
    layer = DeviceNeurons(backend, nominal_device=(200e-6, 5e-6))
    z = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(BackendError):
        layer(z).sum().backward()
