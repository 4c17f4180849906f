"""Tests of the sotcore-eval command line (in-process through main(), and once as a process)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sotcore
from sotcore import DevicePopulation
from sotcore.cli import main

_ROOT = str(Path(sotcore.__file__).resolve().parent.parent)


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sotcore-eval: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def measurements(tmp_path):
    path = tmp_path / "m.csv"
    assert main(["simulate", "-o", str(path), "--width", "10", "20", "--n-devices", "25",
                 "--seed", "0", "--truth", str(tmp_path / "truth.json")]) == 0
    return path


def test_simulate_then_calibrate_end_to_end(tmp_path, measurements, capsys):
    capsys.readouterr()
    out = tmp_path / "devices.json"
    rc = main(["calibrate", str(measurements), "-o", str(out), "--summary",
               str(tmp_path / "s.csv"), "--stats", str(tmp_path / "st.json")])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "sotcore calibration of 50 device(s)" in stdout and "width scaling" in stdout
    assert f"wrote {out} (population of 50 devices)" in stdout
    pop = DevicePopulation.load(out)
    truth = DevicePopulation.load(tmp_path / "truth.json")
    assert len(pop) == 50
    assert np.median(np.abs(pop.i50 / truth.i50 - 1)) < 0.01
    np.testing.assert_array_equal(pop.width, truth.width)
    st = json.loads((tmp_path / "st.json").read_text())
    assert st["width_fits"]["i50"]["n_widths"] == 2
    assert (tmp_path / "s.csv").read_text().count("\n") == 51


def test_calibrate_isotonic_fit_levels_and_no_output(measurements, capsys):
    assert main(["calibrate", str(measurements), "--method", "isotonic", "--no-progress"]) == 0
    assert "isotonic fit" in capsys.readouterr().out
    assert main(["calibrate", str(measurements), "--fit-levels"]) == 0
    assert "levels fitted per device" in capsys.readouterr().out


def test_calibrate_writes_plots(tmp_path, measurements, capsys):
    pytest.importorskip("matplotlib")
    rc = main(["calibrate", str(measurements), "-o", str(tmp_path / "d.json"), "--plots",
               str(tmp_path / "figs")])
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["calibration.png", "curves.png", "histograms.png", "width_scaling.png"]
    assert "wrote 4 figure(s)" in capsys.readouterr().out


def test_simulate_options(tmp_path, capsys):
    raw = tmp_path / "raw.csv"
    assert main(["simulate", "-o", str(raw), "--n-devices", "3", "--pulses", "10",
                 "--n-points", "5", "--raw", "--seed", "1"]) == 0
    lines = raw.read_text().splitlines()
    assert lines[0] == "device,current,switched,width" and len(lines) == 1 + 3 * 5 * 10
    truth = tmp_path / "t.json"
    DevicePopulation.from_width(5.0, 4, random_state=0).save(truth)
    assert main(["simulate", "-o", str(tmp_path / "p.csv"), "--population", str(truth),
                 "--sweep", "width", "--seed", "2"]) == 0
    assert "the population in" in capsys.readouterr().out
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    main(["simulate", "-o", str(a), "--seed", "5", "--n-devices", "4"])
    main(["simulate", "-o", str(b), "--seed", "5", "--n-devices", "4"])
    assert a.read_text() == b.read_text()


@pytest.mark.parametrize("argv, status, pattern", [
    (["calibrate", "missing.csv"], 1, "measurements file not found: missing.csv"),
    (["calibrate", "{m}", "--method", "spline"], 2, "argument --method: invalid choice"),
    (["calibrate"], 2, "the following arguments are required"),
    (["calibrate", "{m}", "-o", "{tmp}/no/such/dir/d.json"], 1, "directory .* does not exist"),
    (["calibrate", "{m}", "--confidence", "2"], 2, "argument --confidence: must be <="),
    (["simulate", "-o", "{tmp}/x.csv", "--pulses", "0"], 2, "argument --pulses: must be >= 1"),
    (["simulate", "-o", "{tmp}/x.csv", "--width", "-3"], 2, "argument --width: must be > 0"),
    (["simulate", "-o", "{tmp}/x.csv", "--n-devices", "many"], 2, "expected an integer"),
    (["simulate", "-o", "{tmp}/x.csv", "--population", "{tmp}/none.json"], 1,
     "population file not found"),
    (["simulate", "--width", "5", "--population", "p.json", "-o", "x.csv"], 2,
     "not allowed with argument"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["calibrate", "{bad}"], 1, r"bad\.csv, line 3, column 'switched': 'abc' is not a number"),
])
def test_user_errors_are_one_line(tmp_path, measurements, capsys, argv, status, pattern):
    bad = tmp_path / "bad.csv"
    bad.write_text("device,current,pulses,switched\nA,1e-3,10,1\nA,2e-3,10,abc\n")
    argv = [a.format(m=measurements, tmp=tmp_path, bad=bad) for a in argv]
    capsys.readouterr()
    assert main(argv) == status
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert re.search(pattern, line), line


def test_plots_without_matplotlib_fail_before_the_fit(tmp_path, measurements, capsys,
                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    capsys.readouterr()
    assert main(["calibrate", str(measurements), "-o", str(tmp_path / "d.json"), "--plots",
                 str(tmp_path / "figs")]) == 1
    captured = capsys.readouterr()
    assert "pip install sotcore[plot]" in _one_error_line(captured.err)
    assert captured.out == "" and not (tmp_path / "d.json").exists()


def test_warnings_are_reported_in_one_line(tmp_path, capsys):
    p = tmp_path / "m.csv"
    p.write_text("device,current,pulses,switched,operator\n"
                 "A,1e-3,100,5,x\nA,2e-3,100,50,x\nA,3e-3,100,95,x\nB,1e-3,100,3,x\n")
    assert main(["calibrate", str(p), "--skip-invalid"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("sotcore-eval: warning: ") and "'operator'" in line
               for line in err)
    assert any("skipped 1 device(s)" in line for line in err)


def test_no_subcommand_runs_main_job(capsys):
    import sotcore.cli as cli
    calls = []
    orig = cli.run_main_job
    try:
        cli.run_main_job = lambda args: calls.append(args) or 0
        assert main([]) == 0 and len(calls) == 1
    finally:
        cli.run_main_job = orig


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "calibrate" in out and "simulate" in out
    assert main(["calibrate", "--help"]) == 0
    assert "--plots DIR" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert sotcore.__version__ in capsys.readouterr().out


def test_module_entry_point_subprocess(tmp_path, measurements):
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "d.json"
    proc = subprocess.run([sys.executable, "-m", "sotcore.cli", "calibrate", str(measurements),
                           "-o", str(out)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sotcore calibration of 50 device(s)" in proc.stdout
    assert len(DevicePopulation.load(out)) == 50
    proc = subprocess.run([sys.executable, "-m", "sotcore.cli", "calibrate",
                           str(tmp_path / "missing.csv")], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    _one_error_line(proc.stderr)


def test_main_job_small(tmp_path, capsys):
    from sotcore.cli import main
    code = main(["--hidden", "32", "--epochs", "3", "--seeds", "1", "--quiet",
                 "--surrogates", "nominal,calibrated", "--samples", "1,4",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    for run in ("software", "ex-situ", "hardware-aware", "hil (nominal)", "hil (calibrated)"):
        assert run in out
    assert "T=4" in out
    assert (tmp_path / "out" / "results.json").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "accuracy_vs_T.png").stat().st_size > 1000


def test_main_job_is_computed_by_experiments_without_printing(capsys):
    from sotcore.datasets import load_digits
    from sotcore.experiments import estimate_main_job, run_main_job
    X, y = load_digits()
    seen = []
    records = run_main_job(X[:200], y[:200], X[200:300], y[200:300], hidden_layer_sizes=(8,),
                           widths=(10.0, 20.0), surrogates=("nominal", "calibrated"),
                           n_samples=(2,), seeds=range(1), progress=False,
                           estimator_params={"max_iter": 1},
                           on_width=lambda w, recs: seen.append((w, len(recs))))
    assert capsys.readouterr().out == ""
    assert seen == [(10.0, 5), (20.0, 5)] and len(records) == 10
    assert [r["width"] for r in records] == [10.0] * 5 + [20.0] * 5
    assert [r["run"] for r in records[:5]] == ["software", "ex-situ", "hardware-aware",
                                               "hil (nominal)", "hil (calibrated)"]
    costs = estimate_main_job(X[:200], 100, hidden_layer_sizes=(8,), devices=20.0,
                              surrogates=("nominal",), estimator_params={"max_iter": 1})
    assert [(m, s) for m, s, _ in costs] == [("software", "nominal"), ("ex-situ", "nominal"),
                                             ("hardware-aware", "nominal"), ("hil", "nominal")]


@pytest.mark.parametrize("argv, code, text", [
    (["--surrogates", "magic"], 2, "unknown surrogate"),
    (["--samples", "a,b"], 2, "comma-separated"),
    (["--data", "/nonexistent/dir"], 1, "not found"),
    (["--devices", "/nonexistent.json"], 1, "not found"),
    (["--seeds", "0"], 2, ">= 1"),
    (["sweep", "--out", "x", "--backend", "dask"], 2, "--scheduler"),
    (["sweep", "--out", "x.jsonl"], 2, "--out is a directory"),
    (["train"], 2, "required"),
])
def test_main_job_user_errors(argv, code, text, capsys):
    from sotcore.cli import main
    assert main(argv) == code
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_subcommand_and_devices_file(tmp_path, capsys):
    import sotcore
    from sotcore.cli import main
    pop = sotcore.DevicePopulation.from_width(10.0, 24, random_state=0)
    pop.save(tmp_path / "dev.json")
    assert main(["train", "-o", str(tmp_path / "m.json"), "--devices",
                 str(tmp_path / "dev.json"), "--hidden", "24", "--epochs", "2"]) == 0
    clf = sotcore.SOTClassifier.load(tmp_path / "m.json")
    assert clf.hidden_layer_sizes == (24,)
    capsys.readouterr()
    # more neurons than devices: they share the devices round-robin, and the CLI says so
    assert main(["train", "-o", str(tmp_path / "m.json"), "--devices",
                 str(tmp_path / "dev.json"), "--hidden", "48", "--epochs", "1"]) == 0
    assert "48 neurons share them round-robin" in capsys.readouterr().out


def test_sweep_subcommand(tmp_path, capsys):
    from sotcore.cli import main
    out = tmp_path / "new" / "sweep" / "results.jsonl"
    assert main(["sweep", "--out", str(out.parent), "--widths", "10", "20", "--variabilities",
                 "0.1", "--runs", "software", "--seeds", "1", "--hidden", "16", "--epochs",
                 "2", "--quiet"]) == 0
    assert "width 10.0 um" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2 * 2 * 3


def _options(parser):
    """(subcommand, action) for every option of the CLI."""
    import argparse
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from ((name, b) for _, b in _options(sub))
        elif a.option_strings:
            yield "main", a


def test_every_option_has_help_and_names_its_default():
    """--help documents every option, and an option with a default says which."""
    import argparse
    from sotcore.cli import build_parser
    missing, no_default = [], []
    for cmd, a in _options(build_parser()):
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = f"{cmd} {a.option_strings[-1]}"
        if not a.help:
            missing.append(name)
        elif a.default not in (None, False) and "default" not in a.help:
            no_default.append(name)
    assert not missing, f"options without --help text: {missing}"
    assert not no_default, f"options whose help does not give the default: {no_default}"


def test_quiet_everywhere_and_out_is_a_directory():
    from sotcore.cli import build_parser
    by_cmd = {}
    for cmd, a in _options(build_parser()):
        by_cmd.setdefault(cmd, set()).update(a.option_strings)
    for cmd, opts in by_cmd.items():
        assert "--quiet" in opts, f"{cmd} has no --quiet"
    for cmd, a in _options(build_parser()):
        if "--out" in a.option_strings:
            assert a.metavar == "DIR", f"{cmd} --out is not a directory"


def test_simulate_quiet_prints_nothing(tmp_path, capsys):
    from sotcore.cli import main
    assert main(["simulate", "-o", str(tmp_path / "m.csv"), "--n-devices", "3", "--seed", "1",
                 "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "m.csv").stat().st_size > 0
