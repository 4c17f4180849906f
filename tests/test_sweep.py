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
