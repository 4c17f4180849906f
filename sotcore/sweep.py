"""Parameter sweeps: widths x variabilities x modes x seeds, on joblib or Dask.

Each task trains one (width, variability, run, seed) configuration and scores
it at every T; the driver appends each finished task's records to a JSON-lines
file as soon as it arrives, so an interrupted sweep resumes where it stopped
(tasks whose key is already in the file are skipped).  With
``backend="dask"`` the tasks go to a ``dask.distributed`` scheduler, which is
how a sweep goes past one machine.
"""
import functools
import hashlib
import itertools
import json
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["sweep_tasks", "run_task", "run_sweep", "load_results"]

RUNS = ("software", "hardware-aware", "hil:nominal", "hil:straight-through")


def sweep_tasks(widths, variabilities, runs, seeds, *, dataset="digits", hidden=(100,),
                n_samples=(1, 8, 32), estimator_params=None):
    """The list of task dicts of a sweep (one per width, variability, run, seed)."""
    tasks = []
    for w, v, run, seed in itertools.product(widths, variabilities, runs, seeds):
        if run not in RUNS:
            raise ValueError(f"unknown run {run!r}; choose from {', '.join(RUNS)}")
        task = {"width": float(w), "variability": float(v), "run": run, "seed": int(seed),
                "dataset": str(dataset), "hidden": [int(h) for h in hidden],
                "n_samples": [int(t) for t in n_samples],
                "estimator_params": dict(estimator_params or {})}
        task["key"] = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()[:16]
        tasks.append(task)
    return tasks


@functools.lru_cache(maxsize=4)
def _dataset(spec):
    """(X_train, y_train, X_test, y_test) for 'digits' or an MNIST IDX directory."""
    from .datasets import load_digits, load_mnist
    if spec == "digits":
        from sklearn.model_selection import train_test_split
        X, y = load_digits()
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
        return Xtr, ytr, Xte, yte
    Xtr, ytr = load_mnist(spec, "train")
    Xte, yte = load_mnist(spec, "test")
    return Xtr, ytr, Xte, yte


def run_task(task):
    """Train and score one sweep task; returns its list of records (runs anywhere)."""
    from .experiments import compare_modes
    Xtr, ytr, Xte, yte = _dataset(task["dataset"])
    mode, _, surrogate = task["run"].partition(":")
    modes = ("software", "ex-situ") if mode == "software" else (mode,)
    recs = compare_modes(Xtr, ytr, Xte, yte, width=task["width"],
                         variability=task["variability"], hidden_layer_sizes=task["hidden"],
                         modes=modes, surrogates=(surrogate or "nominal",),
                         n_samples=task["n_samples"], seeds=(task["seed"],),
                         estimator_params=task["estimator_params"], progress=False)
    for r in recs:
        r["key"] = task["key"]
    return recs


def load_results(path):
    """Records of a results file; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


def _append(path, records):
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        fh.flush()


def run_sweep(tasks, results_path, *, backend="joblib", n_jobs=1, scheduler=None,
              progress=True):
    """Run the tasks not yet in ``results_path``; append their records as they finish.

    Parameters
    ----------
    backend : {"joblib", "dask"}
    n_jobs : int
        joblib workers (ignored for Dask, whose cluster decides).
    scheduler : str or dask.distributed.Client
        The Dask scheduler address (``tcp://host:8786``) or a connected client.

    Returns
    -------
    list of dict: all records in the file after the sweep.
    """
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    if results_path.exists():
        text = results_path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            # A sweep killed mid-write leaves a torn line: drop it, redo that task.
            results_path.write_text(text[:text.rfind("\n") + 1], encoding="utf-8")
    done = {r.get("key") for r in load_results(results_path)}
    todo = [t for t in tasks if t["key"] not in done]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="sweep", unit="task",
               disable=not progress)
    if backend == "joblib":
        from joblib import Parallel, delayed
        for recs in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
                delayed(run_task)(t) for t in todo):
            _append(results_path, recs)
            bar.update(1)
    elif backend == "dask":
        try:
            from dask.distributed import Client, as_completed
        except ImportError:
            raise ImportError("the dask backend needs dask.distributed: "
                              "pip install 'sotcore[dask]'") from None
        if scheduler is None:
            raise ValueError("backend='dask' needs scheduler= (an address or a Client)")
        own = not isinstance(scheduler, Client)
        client = Client(scheduler) if own else scheduler
        try:
            futures = [client.submit(run_task, t, key=f"sotcore-{t['key']}", pure=False)
                       for t in todo]
            for fut in as_completed(futures):
                _append(results_path, fut.result())
                bar.update(1)
        finally:
            if own:
                client.close()
    else:
        raise ValueError(f"backend must be 'joblib' or 'dask', got {backend!r}")
    bar.close()
    return load_results(results_path)
