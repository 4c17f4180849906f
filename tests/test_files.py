"""Files are untrusted input; writes never destroy the last good state (issue #14).

Every loader either returns something usable or raises one ValueError
(InvalidInputError) naming the file -- never another exception, never an
allocation beyond the documented limits (checked with tracemalloc).
"""
import errno
import hashlib
import io
import json
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sotcore import _io
from sotcore.estimator import SOTClassifier
from sotcore.exceptions import InvalidInputError
from sotcore.training import load_checkpoint

FAST = dict(hidden_layer_sizes=(6,), max_iter=2, n_samples=2, batch_size=16, random_state=0)
MiB = 1 << 20


def _data():
    rng = np.random.default_rng(0)
    X = rng.random((48, 5)).astype(np.float32)
    return X, np.arange(48) % 3


def _peak(fn):
    """(result or exception, peak traced bytes) of fn()."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 -- returned for the caller to check
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _npy(shape, dtype="<f4", data=b""):
    """Raw .npy bytes with a chosen header and (possibly too short) data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + data


def _zip(members, compress=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# -- _io: atomic writes ----------------------------------------------------------------------
def test_atomic_write_failure_keeps_old_content_and_leaves_no_tmp(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    _io.atomic_write(p, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="space"):
        _io.atomic_write(p, b"new" * 1000)
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]
    _io.atomic_write(p, b"new")
    assert p.read_bytes() == b"new"


# -- _io: JSON -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    (b"[" * 100000 + b"]" * 100000, "deep"),      # RecursionError in the C decoder
    (b"[" * 70 + b"]" * 70, "deep"),              # under the recursion limit, over ours
    (b'{"a": 1, "a": 2}', "duplicate"),
    (b"[NaN]", "NaN"),
    (b"[1e400]", "overflow"),
    (b"[" + b"9" * 5000 + b"]", "digits"),
    (b"\xff\xfe", "UTF-8"),
    (b'{"a": [1, 2', "truncated"),
])
def test_read_json_rejects(tmp_path, text, match):
    p = tmp_path / "x.json"
    p.write_bytes(text)
    with pytest.raises(InvalidInputError, match=match) as ei:
        _io.read_json(p)
    assert str(p) in str(ei.value)


def test_read_json_size_limit_and_format(tmp_path):
    p = tmp_path / "x.json"
    p.write_bytes(b'{"format": "f", "version": 3}' + b" " * 100)
    with pytest.raises(InvalidInputError, match="limit"):
        _io.read_json(p, max_bytes=64)
    with pytest.raises(InvalidInputError, match="newer"):
        _io.read_json(p, fmt="f", version=2)
    with pytest.raises(InvalidInputError, match="format"):
        _io.read_json(p, fmt="g", version=3)
    assert _io.read_json(p, fmt="f", version=3)["version"] == 3
    with pytest.raises(FileNotFoundError):
        _io.read_json(tmp_path / "absent.json")


# -- _io: bounded .npz -----------------------------------------------------------------------
def test_npz_header_declaring_2gib_is_rejected_before_allocating(tmp_path):
    p = tmp_path / "bomb.npz"
    p.write_bytes(_zip({"a.npy": _npy((1 << 29,), data=b"\0" * 1000)}))   # claims 2 GiB
    out, peak = _peak(lambda: _io.read_npz(p))
    assert isinstance(out, InvalidInputError) and "bomb.npz" in str(out)
    assert peak < 4 * MiB


def test_npz_zip_header_lying_about_size_is_rejected(tmp_path):
    data = bytearray(_zip({"a.npy": _npy((4,), data=b"\0" * 16)}))
    real = len(_npy((4,), data=b"\0" * 16))
    # Patch the uncompressed size in the local and central headers to 512 MiB.
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = data.find(sig)
        assert struct.unpack_from("<I", data, i + off)[0] == real
        struct.pack_into("<I", data, i + off, 2**29)
    p = tmp_path / "lie.npz"
    p.write_bytes(bytes(data))
    out, peak = _peak(lambda: _io.read_npz(p))
    assert isinstance(out, InvalidInputError) and "compressed bytes" in str(out)
    assert peak < 4 * MiB


def test_npz_deflate_bomb_is_rejected_by_the_limit(tmp_path):
    p = tmp_path / "z.npz"
    p.write_bytes(_zip({"a.npy": _npy((8 * MiB,), "|u1", b"\0" * (8 * MiB))},
                       zipfile.ZIP_DEFLATED))
    assert p.stat().st_size < 64 * 1024
    out, peak = _peak(lambda: _io.read_npz(p, max_bytes=MiB))
    assert isinstance(out, InvalidInputError) and "limit" in str(out)
    assert peak < 2 * MiB
    # the expected-shape hook refuses a member before its data are read
    def refuse(name, shape, dtype):
        raise InvalidInputError(f"refused {name} {shape}")
    out, peak = _peak(lambda: _io.read_npz(p, expected=refuse))
    assert isinstance(out, InvalidInputError) and "refused a (8388608,)" in str(out)
    assert peak < 2 * MiB
    assert _io.read_npz(p)["a"].shape == (8 * MiB,)        # within the default limit


@pytest.mark.parametrize("members, match", [
    ({"a.npy": _npy((2,), "|O", b"\0" * 16)}, "dtype"),
    ({"a.npy": _npy((2,), "<f8", b"\0" * 8)}, "needs 16 bytes"),
    ({"a.txt": b"x"}, "unexpected member"),
    ({"a.npy": b"\x93NUMPY\x09\x00junk"}, "not a valid .npy"),
])
def test_npz_bad_members(tmp_path, members, match):
    p = tmp_path / "m.npz"
    p.write_bytes(_zip(members))
    with pytest.raises(InvalidInputError, match=match):
        _io.read_npz(p)


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, 600), flip=st.integers(0, 600), xor=st.integers(1, 255))
def test_npz_reader_on_mutated_archives(cut, flip, xor):
    good = _io.npz_bytes({"a": np.arange(20, dtype=np.float32), "s": np.array("meta")})
    b = bytearray(good[:cut] if cut < len(good) else good)
    if flip < len(b):
        b[flip] ^= xor
    try:
        out = _io.read_npz(bytes(b), what="probe")
    except InvalidInputError as exc:
        assert "probe" in str(exc)
        return
    assert set(out) <= {"a", "s"}


# -- models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    X, y = _data()
    clf = SOTClassifier(devices=20.0, **FAST).fit(X, y)
    d = tmp_path_factory.mktemp("model")
    clf.save(d / "m.json")
    return clf, d / "m.json", X


def _copy_model(src, dst_dir):
    meta = json.loads(src.read_text())
    (dst_dir / "m.json").write_text(src.read_text())
    slot = {"a": ".npz", "b": ".npz.1"}[meta["weights"]["slot"]]
    (dst_dir / ("m" + slot)).write_bytes(src.with_name("m" + slot).read_bytes())
    return dst_dir / "m.json", dst_dir / ("m" + slot)


def _rewrite(path, meta, rechecksum=True):
    if rechecksum:
        body = {k: v for k, v in meta.items() if k != "checksum"}
        meta["checksum"] = hashlib.sha256(_io.json_bytes(body)).hexdigest()
    path.write_text(json.dumps(meta))


def test_numpy_typed_parameters_save_and_load(tmp_path):
    X, y = _data()
    clf = SOTClassifier(**FAST).fit(X, y)
    # NumPy-typed values as a user (or a grid search) sets them; fit's own
    # checkpoint bookkeeping is not under test here, so set them after fit.
    clf.set_params(hidden_layer_sizes=(np.int64(6),), n_samples=np.int64(2),
                   max_iter=np.int32(2), learning_rate_init=np.float32(3e-3),
                   nominal_device=np.array([2e-3, 7e-5]), random_state=np.int64(0))
    back = SOTClassifier.load(clf.save(tmp_path / "m.json"))
    p = back.get_params()
    assert p["nominal_device"] == [2e-3, 7e-5] and p["n_samples"] == 2
    assert p["hidden_layer_sizes"] == (6,) and p["max_iter"] == 2
    assert p["random_state"] == 0 and p["checkpoint"] is None
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))


@pytest.mark.parametrize("hidden", [(6,), [6], 6, (5, 4)])
def test_save_load_keeps_parameter_types_and_fitted_counters(hidden, tmp_path):
    """Tuples stay tuples, lists lists, ints ints; t_ and best_loss_ survive."""
    X, y = _data()
    clf = SOTClassifier(**dict(FAST, hidden_layer_sizes=hidden,
                               nominal_device=(2e-3, 7e-5))).fit(X, y)
    back = SOTClassifier.load(clf.save(tmp_path / "m.json"))
    assert back.hidden_layer_sizes == hidden and type(back.hidden_layer_sizes) is type(hidden)
    assert back.nominal_device == (2e-3, 7e-5)
    assert back.t_ == clf.t_ > 0 and back.best_loss_ == clf.best_loss_
    assert back.n_iter_ == clf.n_iter_ and back.loss_curve_ == clf.loss_curve_


def test_unjsonable_parameter_fails_before_writing(tmp_path):
    X, y = _data()
    clf = SOTClassifier(**FAST).fit(X, y)
    clf.n_samples = object()        # the hostile case: a parameter that is not JSON
    with pytest.raises(ValueError, match="n_samples"):
        clf.save(tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_edited_model_json_fails_the_checksum(model, tmp_path):
    path, _ = _copy_model(model[1], tmp_path)
    meta = json.loads(path.read_text())
    meta["params"]["n_samples"] = 3             # a valid value: only the checksum can tell
    _rewrite(path, meta, rechecksum=False)
    with pytest.raises(InvalidInputError, match="checksum"):
        SOTClassifier.load(path)


FIELD_EDITS = [
    (("params", "n_samples"), 1.5, "n_samples"),
    (("params", "n_samples"), "32", "n_samples"),
    (("params", "n_samples"), True, "n_samples"),
    (("params", "n_samples"), 10**9, "n_samples"),
    (("params", "n_threads"), 2**31, "n_threads|cannot predict"),
    (("params", "hidden_layer_sizes"), [6.5], "hidden_layer_sizes"),
    (("params", "hidden_layer_sizes"), [2**40], "hidden_layer_sizes"),
    (("params", "checkpoint"), "/tmp/elsewhere.npz", "checkpoint"),
    (("params", "solver"), "lbfgs", "solver"),
    (("params", "evil"), 1, "evil"),
    (("params", "nominal_device"), [1e-3, -1.0], "nominal_device"),
    (("classes",), [0, 0, 1], "classes"),
    (("classes",), [2, 1, 0], "classes"),
    (("classes",), [0, 1, 2.5], "classes"),
    (("classes_dtype",), "|O", "classes_dtype"),
    (("classes_dtype",), "<U1000000000", "classes_dtype"),
    (("n_features_in",), 6, "cannot predict|shape"),
    (("n_features_in",), 10**10, "n_features_in"),
    (("weights", "n_layers"), 3, "n_layers"),
    (("weights", "slot"), "../../etc/passwd", "slot"),
    (("weights", "file"), "/etc/passwd", "weights"),
    (("seeds",), [1, 2, 3], "seeds"),
    (("seeds",), [2**70, 1, 2, 3], "seeds"),
    (("seeds",), [-1, 1, 2, 3], "seeds"),
    (("nominal",), [0.0, 1e-4], "nominal"),
    (("mapping", "unit"), 0, "mapping.unit"),
    (("mapping", "offset"), "0", "mapping.offset"),
    (("loss_curve",), ["x"], "loss_curve"),
    (("n_iter",), -1, "n_iter"),
    (("devices", "i50"), [1.0], "devices"),
    (("devices", "table_span"), 1e-300, "devices"),
    (("devices", "width"), [None] * 5 + [-1.0], "devices"),
    (("extra_field",), 1, "unknown field"),
]


@pytest.mark.parametrize("keys, value, match", FIELD_EDITS)
def test_every_model_field_is_validated(model, tmp_path, keys, value, match):
    """Each edit is re-checksummed, so only field validation can refuse it."""
    path, _ = _copy_model(model[1], tmp_path)
    meta = json.loads(path.read_text())
    d = meta
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value
    _rewrite(path, meta)
    with pytest.raises(InvalidInputError, match=match) as ei:
        SOTClassifier.load(path)
    assert str(path) in str(ei.value) or "m.npz" in str(ei.value)


def _rewrite_weights(path, npz, fn):
    z = dict(np.load(npz))
    fn(z)
    blob = _io.npz_bytes(z)
    npz.write_bytes(blob)
    meta = json.loads(path.read_text())
    meta["weights"]["sha256"] = hashlib.sha256(blob).hexdigest()
    _rewrite(path, meta)


@pytest.mark.parametrize("edit, match", [
    (lambda z: z["coef_0"].__setitem__((0, 0), np.nan), "finite"),
    (lambda z: z["coef_1"].__setitem__((0, 0), 3e38), "magnitude"),
    (lambda z: z.__setitem__("coef_0", z["coef_0"][:, :-1]), "shape"),
    (lambda z: z.__setitem__("coef_0", z["coef_0"].astype(np.float64)), "float32"),
    (lambda z: z.pop("intercept_1"), "missing"),
    (lambda z: z.__setitem__("coef_9", z["coef_0"]), "no such array"),
])
def test_bad_weights_are_refused(model, tmp_path, edit, match):
    path, npz = _copy_model(model[1], tmp_path)
    _rewrite_weights(path, npz, edit)
    with pytest.raises(InvalidInputError, match=match):
        SOTClassifier.load(path)


def test_weights_bomb_is_rejected_with_bounded_memory(model, tmp_path):
    path, npz = _copy_model(model[1], tmp_path)
    blob = _zip({"coef_0.npy": _npy((1 << 28, 2), data=b"\0" * 100),
                 "coef_1.npy": b"", "intercept_0.npy": b"", "intercept_1.npy": b""})
    npz.write_bytes(blob)
    meta = json.loads(path.read_text())
    meta["weights"]["sha256"] = hashlib.sha256(blob).hexdigest()
    _rewrite(path, meta)
    out, peak = _peak(lambda: SOTClassifier.load(path))
    assert isinstance(out, InvalidInputError), out
    assert peak < 8 * MiB


def test_saves_alternate_slots_and_failed_save_keeps_old_model(tmp_path, monkeypatch):
    X, y = _data()
    clf = SOTClassifier(devices=20.0, **FAST).fit(X, y)
    path = clf.save(tmp_path / "m.json")
    assert (tmp_path / "m.npz").exists()
    P = SOTClassifier.load(path).predict_proba(X)
    clf.save(path)                                  # the second save uses the other slot
    assert (tmp_path / "m.npz.1").exists() and not (tmp_path / "m.npz").exists()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = SOTClassifier(devices=20.0, **{**FAST, "random_state": 1}).fit(X, y)
    real = _io.atomic_write
    for fail_on in (1, 2):                          # disk full on the weights, then the JSON
        calls = []

        def failing(p, data):
            calls.append(p)
            if len(calls) == fail_on:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(p, data)
        monkeypatch.setattr(_io, "atomic_write", failing)
        with pytest.raises(OSError):
            other.save(path)
        monkeypatch.setattr(_io, "atomic_write", real)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
        np.testing.assert_array_equal(SOTClassifier.load(path).predict_proba(X), P)


def test_save_refuses_npz_model_path(model, tmp_path):
    with pytest.raises(ValueError, match="npz"):
        model[0].save(tmp_path / "m.npz")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(["json", "npz"]), cut=st.integers(0, 5000),
       flip=st.integers(0, 5000), xor=st.integers(1, 255))
def test_bytewise_mutated_model_files(model, tmp_path_factory, which, cut, flip, xor):
    d = tmp_path_factory.mktemp("mut")
    path, npz = _copy_model(model[1], d)
    target = path if which == "json" else npz
    b = bytearray(target.read_bytes())
    b = b[:cut] if cut < len(b) else b
    if flip < len(b):
        b[flip] ^= xor
    target.write_bytes(bytes(b))
    try:
        clf = SOTClassifier.load(path)
    except InvalidInputError as exc:
        assert str(d) in str(exc)
        return
    P = clf.predict_proba(model[2])
    assert np.isfinite(P).all()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                                                                       allow_infinity=False)
    | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.text(max_size=3), c, max_size=3), max_leaves=6)


def _paths(d, prefix=()):
    """Every key path of a decoded JSON object (lists of numbers as one leaf)."""
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fieldwise_mutated_model_files(model, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fld")
    path, _ = _copy_model(model[1], d)
    meta = json.loads(path.read_text())
    keys = data.draw(st.sampled_from(sorted(p for p in _paths(meta) if p != ("checksum",))))
    value = data.draw(JSON_VALUES)
    node = meta
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    _rewrite(path, meta)
    try:
        clf = SOTClassifier.load(path)
    except InvalidInputError as exc:
        assert str(d) in str(exc)
        return
    assert np.isfinite(clf.predict_proba(model[2])).all()


# -- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    X, y = _data()
    ck = tmp_path_factory.mktemp("ck") / "c.npz"
    SOTClassifier(devices=20.0, checkpoint=ck, **FAST).fit(X, y)
    return ck, X, y


def _edit_ckpt(src, dst, meta_fn=None, arr_fn=None, rechecksum=True):
    z = dict(np.load(src))
    meta = json.loads(str(z["meta"]))
    if meta_fn:
        meta_fn(meta)
    z["meta"] = np.array(json.dumps(meta))
    if arr_fn:
        arr_fn(z)
    if rechecksum:
        z.pop("checksum")
        z["checksum"] = np.array(_io.array_digest(z))
    dst.write_bytes(_io.npz_bytes(z))
    return dst


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize("meta_fn, arr_fn, match", [
    (_set("end_epoch", 10**12), None, "end_epoch"),
    (_set("end_epoch", 50), None, "max_iter"),
    (_set("epoch", -1), None, "epoch"),
    (_set("layer_sizes", [5, 7, 3]), None, "shape"),
    (_set("layer_sizes", [5, 2**30, 3]), None, "layer_sizes"),
    (_set("n_samples", 0), None, "n_samples"),
    (_set("batch_start", 10**6), None, "batch_start"),
    (_set("rng_state", {"bit_generator": "PCG64", "state": {"state": 2**200, "inc": 1},
                        "has_uint32": 0, "uinteger": 0}), None, "rng_state"),
    (_set("rng_state", "x"), None, "rng_state"),
    (_set("optimizer", "LBFGS"), None, "optimizer"),
    (_set("opt_hyper", {"lr": -1, "beta1": 0.9, "beta2": 0.9, "eps": 1e-8}), None, "lr"),
    (_set("mapping", {"unit": 0, "offset": 0}), None, "mapping.unit"),
    (_set("n_best", 1), None, "n_best"),
    (_set("best_score", float("nan")), None, "best_score"),
    (lambda m: m["extra"].__setitem__("seeds", [2**70, 0, 0, 0]), None, "seeds"),
    (lambda m: m["extra"].__setitem__("stage", 2), None, "extra.stage"),
    (lambda m: m["extra"].__setitem__("stage", "1"), None, "extra.stage"),
    (lambda m: m["extra"]["params"].__setitem__("hil_epochs", 0), None, "hil_epochs"),
    (lambda m: m.pop("history"), None, "history"),
    (None, lambda z: z["coef_0"].__setitem__((0, 0), np.nan), "NaN"),
    (None, lambda z: z.__setitem__("coef_0", z["coef_0"][:-1]), "shape"),
    (None, lambda z: z.__setitem__("opt_m_0", z["opt_m_0"].astype(np.float64)), "float32"),
    (None, lambda z: z["opt_v_0"].__setitem__((0, 0), -1.0), "opt_v"),
    (None, lambda z: z.__setitem__("order", np.zeros(48, np.int64)), "permutation"),
    (None, lambda z: z.__setitem__("order", np.arange(47)), "order"),
    (None, lambda z: z.__setitem__("extra", z["order"]), "unexpected"),
    (None, lambda z: z.pop("intercept_0"), "missing"),
])
def test_checkpoint_fields_are_validated(ckpt, tmp_path, meta_fn, arr_fn, match):
    bad = _edit_ckpt(ckpt[0], tmp_path / "bad.npz", meta_fn, arr_fn)
    with pytest.raises(InvalidInputError, match=match) as ei:
        load_checkpoint(bad)
    assert "bad.npz" in str(ei.value)


def test_checkpoint_of_a_stage_the_fit_does_not_have_is_refused(ckpt, tmp_path):
    bad = _edit_ckpt(ckpt[0], tmp_path / "bad.npz", lambda m: m["extra"].__setitem__("stage", 1))
    with pytest.raises(InvalidInputError, match=r"bad.npz: field 'extra.stage' is 1"):
        SOTClassifier(devices=20.0, **FAST).fit(ckpt[1], ckpt[2], resume_from=bad)


def test_checkpoint_checksum_and_resume_after_validation(ckpt, tmp_path):
    def poke(z):
        z["coef_1"] = z["coef_1"] + np.float32(0.5)
    bad = _edit_ckpt(ckpt[0], tmp_path / "edited.npz", arr_fn=poke, rechecksum=False)
    with pytest.raises(InvalidInputError, match="checksum"):
        load_checkpoint(bad)
    ck, X, y = ckpt
    state = load_checkpoint(ck)
    assert state["order"].dtype == np.int64
    SOTClassifier(devices=20.0, **FAST).fit(X, y, resume_from=ck)


def test_checkpoint_bomb_is_rejected_with_bounded_memory(ckpt, tmp_path):
    # A member declaring 256 MiB of zeros (deflated to ~250 KiB) with the wrong shape.
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        with np.load(ckpt[0]) as z:
            for name in z.files:
                if name != "coef_0":
                    zf.writestr(name + ".npy", _npy_of(z[name]))
        with zf.open("coef_0.npy", "w") as fh:
            fh.write(_npy((64 * MiB,), "<f4"))
            chunk = b"\0" * (16 * MiB)
            for _ in range(16):
                fh.write(chunk)
    assert bomb.stat().st_size < 2 * MiB
    out, peak = _peak(lambda: load_checkpoint(bomb))
    assert isinstance(out, InvalidInputError) and "coef_0" in str(out)
    assert peak < 8 * MiB


def _npy_of(a):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 20000), flip=st.integers(0, 20000), xor=st.integers(1, 255))
def test_bytewise_mutated_checkpoints(ckpt, tmp_path_factory, cut, flip, xor):
    b = bytearray(ckpt[0].read_bytes())
    b = b[:cut] if cut < len(b) else b
    if flip < len(b):
        b[flip] ^= xor
    p = tmp_path_factory.mktemp("ckm") / "c.npz"
    p.write_bytes(bytes(b))
    try:
        state = load_checkpoint(p)
    except InvalidInputError as exc:
        assert str(p) in str(exc)
        return
    assert all(np.isfinite(c).all() for c in state["network"].coefs)
