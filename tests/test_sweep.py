import json

import pytest

from sotcore.sweep import load_results, run_sweep, sweep_tasks

FAST = {"max_iter": 2, "batch_size": 64}


def _tasks(**kw):
    return sweep_tasks([10.0, 20.0], [0.1], ["software", "hil:nominal"], [0], hidden=(16,),
                       n_samples=(1, 4), estimator_params=FAST, **kw)


def test_tasks_have_stable_unique_keys():
    a, b = _tasks(), _tasks()
    assert [t["key"] for t in a] == [t["key"] for t in b]
    assert len({t["key"] for t in a}) == len(a) == 4
    with pytest.raises(ValueError, match="unknown run"):
        sweep_tasks([20], [0.1], ["insitu"], [0])


def test_joblib_sweep_appends_and_resumes(tmp_path):
    path = tmp_path / "sweep.jsonl"
    tasks = _tasks()
    run_sweep(tasks[:2], path, n_jobs=2, progress=False)
    first = load_results(path)
    # software tasks give software + ex-situ records, at 2 T values each
    assert len(first) == sum(4 if t["run"] == "software" else 2 for t in tasks[:2])
    # simulate a kill mid-write: a torn last line
    with open(path, "a") as fh:
        fh.write('{"key": "torn')
    recs = run_sweep(tasks, path, n_jobs=1, progress=False)
    keys = [r["key"] for r in recs]
    assert set(keys) == {t["key"] for t in tasks}
    # finished tasks were not run again
    assert sum(k == tasks[0]["key"] for k in keys) == 4
    for line in path.read_text().splitlines():
        json.loads(line)


def test_dask_local_cluster(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        recs = run_sweep(_tasks(), tmp_path / "d.jsonl", backend="dask",
                         scheduler=cluster.scheduler_address, progress=False)
    assert {r["run"] for r in recs} == {"software", "ex-situ", "hil (nominal)"}
    assert all(0 <= r["accuracy"] <= 1 for r in recs)
    assert {r["width"] for r in recs} == {10.0, 20.0}


def test_bad_backend(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        run_sweep(_tasks(), tmp_path / "x.jsonl", backend="spark")
    with pytest.raises(ValueError, match="scheduler"):
        run_sweep(_tasks(), tmp_path / "x.jsonl", backend="dask")


# -- durability, locking, dedupe, worker exit (issue #14) ------------------------------------
import errno  # noqa: E402
import os  # noqa: E402

from sotcore import sweep as sweep_mod  # noqa: E402
from sotcore.exceptions import InvalidInputError  # noqa: E402

N_REC = 120


def _fake_run_task(task):
    return [{"key": task["key"], "i": i, "task_records": N_REC, "width": task["width"]}
            for i in range(N_REC)]


def _counts(path):
    import collections
    return collections.Counter(json.loads(line)["key"] for line in path.read_text().splitlines())


def test_duplicate_values_give_one_task():
    t = sweep_tasks([10, 10.0, 20], [0.1, 0.1], ["software"], [0, 0])
    assert len(t) == 2 and len({x["key"] for x in t}) == 2


def test_disk_full_while_appending_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "run_task", _fake_run_task)
    tasks = sweep_tasks([10.0, 20.0, 30.0], [0.1], ["software"], [0])
    path = tmp_path / "s.jsonl"
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:               # the second task's append hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="space"):
        run_sweep(tasks, path, progress=False)
    monkeypatch.setattr(os, "fsync", real)
    assert list(_counts(path).values()) == [N_REC]       # task 1 whole, task 2 not at all
    recs = run_sweep(tasks, path, progress=False)
    assert _counts(path) == {t["key"]: N_REC for t in tasks}
    assert len(recs) == 3 * N_REC


def test_partly_written_task_is_redone_not_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "run_task", _fake_run_task)
    tasks = sweep_tasks([10.0, 20.0], [0.1], ["software"], [0])
    path = tmp_path / "s.jsonl"
    lines = [json.dumps(r) for r in _fake_run_task(tasks[0])]
    part = [json.dumps(r) for r in _fake_run_task(tasks[1])][:62]
    path.write_text("\n".join(lines + part) + "\n" + part[0][:17])       # + a torn line
    assert len(load_results(path)) == N_REC            # the partial task is not reported
    run_sweep(tasks, path, progress=False)
    assert _counts(path) == {tasks[0]["key"]: N_REC, tasks[1]["key"]: N_REC}


def test_failed_repair_never_shortens_completed_work(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "run_task", _fake_run_task)
    tasks = sweep_tasks([10.0, 20.0], [0.1], ["software"], [0])
    path = tmp_path / "s.jsonl"
    full = [json.dumps(r) for r in _fake_run_task(tasks[0])]
    part = [json.dumps(r) for r in _fake_run_task(tasks[1])][:5]
    path.write_text("\n".join(full + part) + "\n" + '{"key": "to')
    from sotcore import _io

    def broken(p, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(_io, "atomic_write", broken)
    with pytest.raises(OSError):
        run_sweep(tasks, path, progress=False)
    # the torn line is gone, every complete line is still there
    assert path.read_text().splitlines() == full + part
    monkeypatch.undo()
    monkeypatch.setattr(sweep_mod, "run_task", _fake_run_task)
    run_sweep(tasks, path, progress=False)
    assert _counts(path) == {tasks[0]["key"]: N_REC, tasks[1]["key"]: N_REC}


def test_second_driver_on_the_same_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "run_task", _fake_run_task)
    path = tmp_path / "s.jsonl"
    tasks = sweep_tasks([10.0], [0.1], ["software"], [0])
    with sweep_mod._locked(path):
        with pytest.raises(InvalidInputError, match="another sweep"):
            run_sweep(tasks, path, progress=False)
    assert not path.exists() or path.read_text() == ""
    run_sweep(tasks, path, progress=False)            # the lock is released again
    assert len(load_results(path)) == N_REC


def test_invalid_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(InvalidInputError, match="line 2"):
        load_results(path)


def test_workers_exit_when_the_driver_is_killed(tmp_path):
    """SIGKILL the driver of a 2-worker joblib sweep: its workers exit within seconds."""
    import signal
    import subprocess
    import sys
    import time
    psutil = pytest.importorskip("psutil")
    script = (
        "from sotcore.sweep import run_sweep, sweep_tasks\n"
        "t = sweep_tasks([10.0, 20.0, 30.0, 40.0], [0.1], ['software'], [0], hidden=(32,),\n"
        "                estimator_params={'max_iter': 400})\n"
        f"run_sweep(t, {str(tmp_path / 'k.jsonl')!r}, n_jobs=2, progress=False)\n")
    drv = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)   # installed package
    try:
        proc = psutil.Process(drv.pid)
        workers = []
        for _ in range(100):                     # wait for the workers to start a task
            time.sleep(0.2)
            workers = [c for c in proc.children(recursive=True)
                       if c.cpu_times().user > 0.5]
            if len(workers) >= 2:
                break
        assert workers, "no worker started"
        drv.send_signal(signal.SIGKILL)
        drv.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline and any(w.is_running() and w.status() != "zombie"
                                             for w in workers):
            time.sleep(0.2)
        alive = [w.pid for w in workers if w.is_running() and w.status() != "zombie"]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, f"workers {alive} outlived their driver"
    finally:
        if drv.poll() is None:
            drv.kill()
