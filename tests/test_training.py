import numpy as np
import pytest
from sklearn.model_selection import train_test_split

import sotcore
from sotcore.backends import EmulatedBackend
from sotcore.datasets import load_digits
from sotcore.estimator import SOTClassifier
from sotcore.network import CurrentMapping, StochasticMLP, nominal_derivative, softmax
from sotcore.training import (SGD, Adam, TrainConfig, Trainer, TrainingInterrupted,
                              _mixture_grad, load_checkpoint, make_surrogate, nominal_curve,
                              nominal_population, save_checkpoint)


def test_mixture_grad_matches_finite_differences():
    rng = np.random.default_rng(0)
    n, T, C = 3, 4, 5
    logits = rng.standard_normal((n * T, C))
    y = np.array([0, 3, 4])

    def loss_of(lg):
        p = softmax(lg.copy()).reshape(n, T, C)
        return _mixture_grad(p, y)[0]

    _, g = _mixture_grad(softmax(logits.copy()).reshape(n, T, C), y)
    num = np.zeros_like(logits)
    h = 1e-6
    for idx in np.ndindex(*logits.shape):
        lp, lm = logits.copy(), logits.copy()
        lp[idx] += h
        lm[idx] -= h
        num[idx] = (loss_of(lp) - loss_of(lm)) / (2 * h)
    np.testing.assert_allclose(g, num, atol=1e-6)


def test_surrogates():
    pop = sotcore.DevicePopulation.from_width(20.0, 8, random_state=0)
    i50, s = nominal_curve(pop)
    assert i50 == pytest.approx(2e-3) and s == pytest.approx(0.3e-3 / (2 * np.log(9)))
    m = CurrentMapping.for_nominal(s)
    cur = (i50 + s * np.linspace(-3, 3, 8))[None, :].astype(np.float32)
    nom = make_surrogate("nominal", m, i50, s)(cur, slice(0, 8))
    np.testing.assert_allclose(nom, nominal_derivative(cur.astype(float), i50, s, m.unit),
                               rtol=1e-4)
    assert nom.max() == pytest.approx(0.25, rel=0.05)     # peak slope 1/4 per unit
    cal = make_surrogate("calibrated", m, i50, s, pop)(cur, slice(0, 8))
    np.testing.assert_allclose(cal, m.unit * pop.derivative(cur.astype(float)), rtol=1e-5)
    st = make_surrogate("straight-through", m, i50, s)(cur, slice(0, 8))
    assert set(np.unique(st)) <= {0.0, np.float32(0.25)}
    with pytest.raises(ValueError, match="calibration"):
        make_surrogate("calibrated", m, i50, s)
    with pytest.raises(ValueError, match="surrogate"):
        make_surrogate("magic", m, i50, s)


@pytest.mark.parametrize("opt", [Adam, SGD])
def test_optimizers_minimise_a_quadratic(opt):
    p = [np.array([3.0, -2.0], np.float32)]
    o = opt(p, lr=0.05)
    for _ in range(500):
        o.step(p, [2 * p[0]])
    assert np.abs(p[0]).max() < 0.05


def test_mapping_validation():
    with pytest.raises(ValueError, match="unit"):
        CurrentMapping(unit=0.0)
    with pytest.raises(ValueError, match="offset"):
        CurrentMapping(unit=1.0, offset=np.nan)
    m = CurrentMapping(unit=2.0, offset=1.0)
    assert m.to_current(3.0) == 7.0 and m.to_units(7.0) == 3.0


def test_network_forward_and_predict_shapes():
    pop = sotcore.DevicePopulation.from_width(20.0, 12, random_state=0)
    net = StochasticMLP([5, 7, 5, 3], CurrentMapping.for_nominal(nominal_curve(pop)[1]))
    net.initialize(np.random.default_rng(0), nominal_curve(pop)[0] / net.mapping.unit)
    assert [s.stop - s.start for s in net.device_slices()] == [7, 5]
    X = np.random.default_rng(1).random((9, 5)).astype(np.float32)
    probs, cache = net.forward(X, EmulatedBackend(pop, 0), 4)
    assert probs.shape == (9, 4, 3)
    np.testing.assert_allclose(probs.sum(axis=2), 1, rtol=1e-5)
    assert cache["bits"][0].shape == (36, 7) and cache["bits"][1].shape == (36, 5)
    P = net.predict_proba(X, EmulatedBackend(pop, 0), 6, batch_size=4)
    assert P.shape == (9, 3)
    np.testing.assert_allclose(P.sum(axis=1), 1)
    with pytest.raises(ValueError, match="layer_sizes"):
        StochasticMLP([5, 3], net.mapping)


def test_predict_proba_matches_forward_statistics():
    """The compiled binary mat-vec inference path agrees with the BLAS training path."""
    pop = sotcore.DevicePopulation.from_width(20.0, 30, random_state=0)
    net = StochasticMLP([6, 30, 4], CurrentMapping.for_nominal(nominal_curve(pop)[1]))
    net.initialize(np.random.default_rng(0), nominal_curve(pop)[0] / net.mapping.unit)
    net.coefs[1] *= 10
    X = np.random.default_rng(2).random((1, 6)).astype(np.float32)
    T = 4000
    a = net.predict_proba(X, EmulatedBackend(pop, 1), T)[0]
    b = net.forward(X, EmulatedBackend(pop, 2), T)[0][0].mean(axis=0)
    # Each is a mean of T bounded samples; their difference is within a few SE.
    assert np.abs(a - b).max() < 0.05


def _digits():
    X, y = load_digits()
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def test_two_hidden_layers_learn():
    Xtr, Xte, ytr, yte = _digits()
    clf = SOTClassifier(hidden_layer_sizes=(64, 32), devices=20.0, training="hil",
                        max_iter=12, batch_size=32, n_samples=8, random_state=0)
    assert clf.fit(Xtr, ytr).score(Xte, yte) > 0.6


@pytest.mark.parametrize("seed", [0, 1])
def test_mode_ordering_on_digits(seed):
    """HIL ~ software > ex-situ at 10% variability (small settings)."""
    Xtr, Xte, ytr, yte = _digits()
    pop = sotcore.DevicePopulation.from_width(20.0, 100, variability=0.10, random_state=seed)
    acc = {}
    for mode in ("software", "ex-situ", "hil"):
        clf = SOTClassifier(hidden_layer_sizes=(100,), devices=pop, training=mode, max_iter=20,
                            batch_size=32, n_samples=16, random_state=seed)
        acc[mode] = clf.fit(Xtr, ytr).score(Xte, yte)
    # Measured over seeds 0-2: software 0.954-0.961, hil 0.946-0.956, ex-situ 0.79-0.87.
    assert acc["software"] > 0.93
    assert acc["hil"] > acc["software"] - 0.03
    assert acc["ex-situ"] < acc["software"] - 0.03


def test_training_is_reproducible_and_thread_independent():
    Xtr, Xte, ytr, yte = _digits()
    kw = dict(hidden_layer_sizes=(32,), devices=20.0, max_iter=2, n_samples=4, random_state=3)
    a = SOTClassifier(n_threads=1, **kw).fit(Xtr, ytr)
    b = SOTClassifier(n_threads=2, **kw).fit(Xtr, ytr)
    for ca, cb in zip(a.coefs_, b.coefs_):
        np.testing.assert_array_equal(ca, cb)
    np.testing.assert_array_equal(a.predict_proba(Xte), b.predict_proba(Xte))
    c = SOTClassifier(**{**kw, "random_state": 4}).fit(Xtr, ytr)
    assert not np.array_equal(a.coefs_[0], c.coefs_[0])


def test_callbacks_and_early_stopping():
    Xtr, Xte, ytr, yte = _digits()
    seen = []
    pop = sotcore.DevicePopulation.from_width(20.0, 16, random_state=0)
    i50, s = nominal_curve(pop)
    m = CurrentMapping.for_nominal(s)
    res = Trainer([64, 16, 10], backend=EmulatedBackend(pop, 0),
                  surrogate=make_surrogate("nominal", m, i50, s), mapping=m,
                  hidden_bias=i50 / s, random_state=0,
                  callbacks=[lambda e, info, net: seen.append(info) or e >= 3]).fit(Xtr, ytr, 50)
    assert res.n_iter == 3 and len(seen) == 3 and res.stopped_early
    assert seen[-1]["loss"] < seen[0]["loss"]
    clf = SOTClassifier(hidden_layer_sizes=(16,), devices=20.0, early_stopping=True,
                        n_iter_no_change=2, tol=0.5, max_iter=50, random_state=0).fit(Xtr, ytr)
    # as MLPClassifier: stops after MORE than n_iter_no_change epochs without improvement
    assert clf.n_iter_ == 4 and len(clf.validation_scores_) == 4


def test_nominal_population_is_ideal():
    pop = sotcore.DevicePopulation.from_width(10.0, 20, variability=0.3, stuck_fraction=0.2,
                                              random_state=0)
    nom = nominal_population(pop)
    assert np.all(nom.i50 == 1e-3) and not nom.stuck.any() and np.all(nom.p_hi == 1)


def test_alpha_shrinks_the_weights():
    from sklearn.model_selection import train_test_split
    from sotcore.datasets import load_digits
    X, y = load_digits()
    Xtr, _, ytr, _ = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    norms = []
    for alpha in (0.0, 30.0):
        clf = SOTClassifier(hidden_layer_sizes=(16,), devices=20.0, alpha=alpha, max_iter=5,
                            batch_size=64, random_state=0).fit(Xtr, ytr)
        norms.append(sum(float(np.square(c).sum()) for c in clf.coefs_))
    assert norms[1] < 0.8 * norms[0], norms


@pytest.mark.parametrize("mode, surrogate", [("hardware-aware", "nominal"),
                                              ("hil", "calibrated")])
def test_two_hidden_layers_learn_with_device_surrogates(mode, surrogate):
    from sklearn.model_selection import train_test_split
    from sotcore.datasets import load_digits
    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    pop = sotcore.DevicePopulation.from_width(20.0, 48, variability=0.1, random_state=0)
    clf = SOTClassifier(hidden_layer_sizes=(32, 16), devices=pop, training=mode,
                        surrogate=surrogate, calibration=pop, max_iter=15, batch_size=32,
                        n_samples=8, random_state=0).fit(Xtr, ytr)
    assert clf.loss_curve_[-1] < 0.7 * clf.loss_curve_[0]
    assert clf.score(Xte, yte) > 0.75


def test_each_hidden_layer_draws_from_its_own_stream():
    pop = sotcore.DevicePopulation.from_width(20.0, 12, random_state=0)
    net = StochasticMLP([5, 6, 6, 3], CurrentMapping(pop.scale.mean()))
    net.initialize(np.random.default_rng(0), pop.i50.mean() / pop.scale.mean())
    backend = EmulatedBackend(pop, 0)
    streams = []
    orig = backend.pulse_keyed

    def spy(c, d, keys, stream):
        streams.append(stream)
        return orig(c, d, keys, stream)
    backend.pulse_keyed = spy
    X = np.random.default_rng(1).random((4, 5)).astype(np.float32)
    net.predict_proba(X, backend, 3, row_keys=np.arange(4, dtype=np.uint64))
    assert streams == [0, 1]
    # the same currents and keys in two streams give different bits
    cur = np.tile(pop.i50[:6], (400, 1))
    keys = np.arange(400, dtype=np.uint64)
    a = orig(cur, slice(0, 6), keys, 0)
    b = orig(cur, slice(0, 6), keys, 1)
    assert (a != b).mean() > 0.3


def test_calibration_must_cover_the_devices_used():
    from sotcore.datasets import load_digits
    X, y = load_digits()
    pop = sotcore.DevicePopulation.from_width(20.0, 8, random_state=0)
    with pytest.raises(ValueError, match="calibration has 4 devices but the device map uses 8"):
        SOTClassifier(hidden_layer_sizes=(8,), devices=pop, calibration=pop[:4],
                      surrogate="calibrated", max_iter=1).fit(X[:50], y[:50])


def test_blas_limits_are_restored_after_concurrent_predictions():
    from concurrent.futures import ThreadPoolExecutor
    from threadpoolctl import threadpool_info
    from sotcore.datasets import load_digits

    def blas():
        return sorted((d["internal_api"], d["num_threads"]) for d in threadpool_info()
                      if d["user_api"] == "blas")
    X, y = load_digits()
    clf = SOTClassifier(hidden_layer_sizes=(16, 8), devices=20.0, max_iter=2,
                        random_state=0).fit(X, y)
    before = blas()
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda _: clf.predict_proba(X[:300]), range(6)))
    assert blas() == before
    clf.fit(X, y)
    assert blas() == before


# ---- Trainer: one object for fit, continuation, state_dict and resume ----------------------
def _trainer(backend, hidden=(16,), random_state=0, network=None, **kw):
    """A Trainer on digits through ``backend`` (20 devices' curves, nominal surrogate)."""
    i50, s = nominal_curve(_POP)
    m = CurrentMapping.for_nominal(s)
    return Trainer(network or [64, *hidden, 10], backend=backend, mapping=m, hidden_bias=i50 / s,
                   surrogate=make_surrogate("nominal", m, i50, s), random_state=random_state,
                   config=TrainConfig(batch_size=64, train_samples=2, learning_rate=1e-2), **kw)


_POP = sotcore.DevicePopulation.from_width(20.0, 20, random_state=1)


def _weights(trainer):
    return trainer.network.coefs + trainer.network.intercepts


def _assert_same_run(a, b):
    for wa, wb in zip(_weights(a), _weights(b)):
        np.testing.assert_array_equal(wa, wb)
    np.testing.assert_array_equal(a.optimizer.m[0], b.optimizer.m[0])
    assert a.history["loss"] == b.history["loss"] and a.epoch == b.epoch


@pytest.mark.parametrize("hidden", [(16,), (12, 8)])
def test_trainer_fit_continues_where_it_stopped(hidden):
    Xtr, Xte, ytr, yte = _digits()
    whole = _trainer(EmulatedBackend(_POP, 9), hidden)
    whole.fit(Xtr, ytr, 4)
    steps = _trainer(EmulatedBackend(_POP, 9), hidden)
    first = [w.copy() for w in _weights(steps)]
    res = steps.fit(Xtr, ytr, 2)
    assert res.n_iter == 2 and len(res.history["loss"]) == 2
    assert not np.array_equal(_weights(steps)[0], _weights(whole)[0])
    res = steps.fit(Xtr, ytr, 2)
    assert res.n_iter == 4 and not np.array_equal(first[0], _weights(steps)[0])
    _assert_same_run(steps, whole)
    # what continuing means: a new trainer with the same weights and optimiser but a fresh
    # generator and device stream is another run
    other = _trainer(EmulatedBackend(_POP, 9), hidden)
    other.fit(Xtr, ytr, 2)
    again = _trainer(EmulatedBackend(_POP, 9), hidden, network=other.network,
                     optimizer=other.optimizer, epoch=other.epoch, history=other.history)
    again.fit(Xtr, ytr, 2)
    assert not np.array_equal(_weights(again)[0], _weights(whole)[0])


@pytest.mark.parametrize("hidden", [(16,), (12, 8)])
def test_trainer_state_dict_mid_epoch_resumes_bit_exactly(tmp_path, hidden):
    from test_faults import FlakyBackend
    Xtr, Xte, ytr, yte = _digits()
    clean = _trainer(FlakyBackend(EmulatedBackend(_POP, 9)), hidden)
    clean.fit(Xtr, ytr, 3)
    # the instrument fails in the middle of epoch 2 (20 batches per epoch)
    ck = tmp_path / "t.ckpt.npz"
    broken = _trainer(FlakyBackend(EmulatedBackend(_POP, 9), fail_on={(len(hidden) * 27)}),
                      hidden, checkpoint=ck)
    with pytest.raises(TrainingInterrupted):
        broken.fit(Xtr, ytr, 3)
    state = broken.state_dict()
    assert state["meta"]["epoch"] == 1 and 0 < state["meta"]["batch_start"] < len(Xtr)
    assert len(state["order"]) == len(Xtr)
    # a new trainer (other seed: other initial weights and orders) on a new backend object
    for restored in (state, load_checkpoint(ck)):
        resumed = _trainer(FlakyBackend(EmulatedBackend(_POP, 9)), hidden, random_state=7)
        resumed.load_state_dict(restored)
        res = resumed.fit(Xtr, ytr)                   # finishes the interrupted run
        assert res.n_iter == 3
        _assert_same_run(resumed, clean)
    # without the state the new trainer is another run
    fresh = _trainer(FlakyBackend(EmulatedBackend(_POP, 9)), hidden, random_state=7)
    fresh.fit(Xtr, ytr, 3)
    assert not np.array_equal(_weights(fresh)[0], _weights(clean)[0])


def test_trainer_state_dict_is_a_copy_and_goes_through_a_checkpoint_file(tmp_path):
    Xtr, Xte, ytr, yte = _digits()
    whole = _trainer(EmulatedBackend(_POP, 9))
    whole.fit(Xtr, ytr, 4)
    a = _trainer(EmulatedBackend(_POP, 9))
    a.fit(Xtr, ytr, 2)
    state = a.state_dict()
    a.fit(Xtr, ytr, 1)                                # does not change the state taken
    save_checkpoint(tmp_path / "c.npz", state)
    b = _trainer(EmulatedBackend(_POP, 9), random_state=3)
    b.load_state_dict(load_checkpoint(tmp_path / "c.npz"))
    b.fit(Xtr, ytr, 2)
    _assert_same_run(b, whole)


def test_trainer_load_state_dict_rejects_another_run():
    Xtr, Xte, ytr, yte = _digits()
    small = _trainer(EmulatedBackend(_POP, 9), (8,))
    small.fit(Xtr[:200], ytr[:200], 1)
    with pytest.raises(ValueError, match=r"layer sizes \[64, 8, 10\], this run has "
                                         r"\[64, 16, 10\]"):
        _trainer(EmulatedBackend(_POP, 9)).load_state_dict(small.state_dict())
    with pytest.raises(ValueError, match="taken on 200 training samples, this run has 100"):
        fitted = _trainer(EmulatedBackend(_POP, 9), (8,))
        fitted.fit(Xtr[:100], ytr[:100], 1)
        fitted.load_state_dict(small.state_dict())
    loaded = _trainer(EmulatedBackend(_POP, 9), (8,))
    loaded.load_state_dict(small.state_dict())
    with pytest.raises(ValueError, match="taken on 200 training samples, this run has 300"):
        loaded.fit(Xtr[:300], ytr[:300], 1)
