"""Parameter sweeps: widths x variabilities x modes x seeds, on joblib or Dask.

Each task trains one (width, variability, run, seed) configuration and scores
it at every T; the driver appends each finished task's records to a JSON-lines
file as soon as it arrives, so an interrupted sweep resumes where it stopped
(tasks whose key is already in the file are skipped).  With
``backend="dask"`` the tasks go to a ``dask.distributed`` scheduler, which is
how a sweep goes past one machine.
"""
import collections
import functools
import hashlib
import itertools
import json
import os
import socket
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import _io
from .exceptions import InvalidInputError

__all__ = ["sweep_tasks", "run_task", "run_sweep", "load_results"]

RUNS = ("software", "hardware-aware", "hil:nominal", "hil:calibrated", "hil:straight-through")


def sweep_tasks(widths, variabilities, runs, seeds, *, dataset="digits", hidden=(100,),
                n_samples=(1, 8, 32), estimator_params=None, instrument=None, nominal=None):
    """The list of task dicts of a sweep (one per distinct width, variability, run, seed).

    Repeated values (``widths=[10, 10]``) give one task, not two.  ``instrument``
    (``"module:factory"``, see :func:`sotcore.experiments.backend_from_factory`)
    runs every task on the lab's devices instead of emulated populations (widths
    and variabilities then do not apply); ``nominal`` (i50, scale) is the first
    guess of their calibration sweep.
    """
    tasks, seen = [], set()
    if instrument is not None:
        widths, variabilities = [float("nan")], [float("nan")]
    for w, v, run, seed in itertools.product(widths, variabilities, runs, seeds):
        if run not in RUNS:
            raise ValueError(f"unknown run {run!r}; choose from {', '.join(RUNS)}")
        task = {"width": None if instrument else float(w),
                "variability": None if instrument else float(v), "run": run, "seed": int(seed),
                "dataset": str(dataset), "hidden": [int(h) for h in hidden],
                "n_samples": [int(t) for t in n_samples],
                "estimator_params": dict(estimator_params or {})}
        if instrument is not None:
            task["instrument"] = str(instrument)
            task["nominal"] = None if nominal is None else [float(v) for v in nominal]
        task["key"] = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()[:16]
        if task["key"] not in seen:
            seen.add(task["key"])
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
    """Train and score one sweep task; returns its list of records (runs anywhere).

    Each record carries ``task_records``, the number of records of its task,
    so a task whose records were only partly written is seen as not done.
    """
    from .experiments import compare_modes, measured_calibration
    Xtr, ytr, Xte, yte = _dataset(task["dataset"])
    mode, _, surrogate = task["run"].partition(":")
    modes = ("software", "ex-situ") if mode == "software" else (mode,)
    backend, calibration = None, None
    if task.get("instrument"):
        nominal = task.get("nominal")
        backend, calibration = _instrument(task["instrument"],
                                           None if nominal is None else tuple(nominal))
    elif mode == "hardware-aware" or surrogate == "calibrated":
        calibration = measured_calibration
    recs = compare_modes(Xtr, ytr, Xte, yte, width=task["width"] or 20.0,
                         variability=task["variability"], hidden_layer_sizes=task["hidden"],
                         backend=backend, calibration=calibration,
                         modes=modes, surrogates=(surrogate or "nominal",),
                         n_samples=task["n_samples"], seeds=(task["seed"],),
                         estimator_params=task["estimator_params"], progress=False)
    for r in recs:
        r["key"] = task["key"]
        r["task_records"] = len(recs)
    return recs


@functools.lru_cache(maxsize=2)
def _instrument(spec, nominal):
    """(backend, measured calibration) of an instrument, once per worker process."""
    from .experiments import backend_from_factory, measured_calibration
    backend = backend_from_factory(spec)
    return backend, measured_calibration(backend, 0, nominal=nominal)


_WATCHED = None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_with_driver(driver):
    """In a worker process: exit as soon as the driver is gone.

    ``driver`` is (hostname, pid).  A killed driver cannot shut its pool
    down, and loky workers would go on training for nobody (even picking up
    tasks already queued).  A loky worker is the driver's child, so a changed
    ``getppid()`` means the driver died; a worker that is not its child (a
    remote joblib backend) is left alone unless the driver is on this host
    and gone.
    """
    global _WATCHED
    host, pid = driver
    if _WATCHED == driver or os.getpid() == pid or host != socket.gethostname():
        return          # already watching, in-process, or another machine
    if os.getppid() != pid:
        if not _alive(pid):
            os._exit(1)     # the driver died before this task reached us
        return
    _WATCHED = driver

    def watch():
        while os.getppid() == pid:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, name="sotcore-driver-watch", daemon=True).start()


def _run_task_for(task, driver):
    _exit_with_driver(driver)
    return run_task(task)


def _scan(path):
    """(records, length of the valid prefix, whether the last line was torn)."""
    data = path.read_bytes() if path.exists() else b""
    out, good = [], 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and not line:
            break
        try:
            rec = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = False
        if rec is False or (last and not data.endswith(b"\n")):
            if last:       # killed mid-write: a torn last line
                return out, good, True
            raise InvalidInputError(f"{path}: line {i + 1} is not valid JSON")
        if rec is not None:
            if not isinstance(rec, dict):
                raise InvalidInputError(f"{path}: line {i + 1} is not a JSON object")
            out.append(rec)
        good += len(line) + 1
    return out, good, False


def _complete(records):
    """Records of tasks whose every record is present (and the keys of those tasks)."""
    count = collections.Counter(r.get("key") for r in records)
    done = set()
    for r in records:
        want = r.get("task_records")
        if not isinstance(want, int) or count[r.get("key")] >= want:   # legacy: no count
            done.add(r.get("key"))
    return [r for r in records if r.get("key") in done], done


def load_results(path):
    """Records of the complete tasks in a results file.

    A torn last line (killed mid-write) and the records of a task that was
    only partly written are ignored; any other invalid line raises
    ``InvalidInputError``.
    """
    return _complete(_scan(Path(path))[0])[0]


def _append(path, records):
    """Append one task's records durably: all of them or (on failure) none."""
    block = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    with open(path, "ab") as fh:
        start = fh.tell()
        try:
            fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:
            # Disk full or killed: take the partial block back so the task reads as not
            # done (if even this fails, the record count still marks it incomplete).
            try:
                fh.truncate(start)
                os.fsync(fh.fileno())
            except OSError:
                pass
            raise


def _locked(path):
    """Hold an exclusive lock on ``path`` (via ``.<name>.lock``): one driver per file."""
    return _io.exclusive_lock(path.with_name(f".{path.name}.lock"),
                              f"{path}: another sweep is writing to this results file; "
                              "wait for it or use another --out")


def _repair(path):
    """Make ``path`` hold only complete tasks' records; return their keys.

    A torn last line is cut off by truncating to the valid prefix (never
    shorter); records of partly written tasks are dropped by an atomic
    rewrite of the complete ones (the old file survives any failure).
    """
    records, good, torn = _scan(path)
    if torn:
        with open(path, "r+b") as fh:
            fh.truncate(good)
            os.fsync(fh.fileno())
    complete, done = _complete(records)
    if len(complete) != len(records):
        _io.atomic_write(path, "".join(json.dumps(r) + "\n" for r in complete).encode())
    return done


def run_sweep(tasks, results_path, *, backend="joblib", n_jobs=1, scheduler=None,
              progress=True):
    """Run the tasks not yet in ``results_path``; append their records as they finish.

    A task counts as done only when all its records are durably in the file
    (fsync); a sweep killed or out of disk space resumes with exactly the
    unfinished tasks.  Only one driver may write a results file at a time
    (another one gets ``InvalidInputError``).  joblib workers exit when the
    driver dies.

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
    if backend not in ("joblib", "dask"):
        raise ValueError(f"backend must be 'joblib' or 'dask', got {backend!r}")
    if backend == "dask" and scheduler is None:
        raise ValueError("backend='dask' needs scheduler= (an address or a Client)")
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(results_path):
        done = _repair(results_path)
        todo, seen = [], set(done)
        for t in tasks:
            if t["key"] not in seen:
                seen.add(t["key"])
                todo.append(t)
        n_total = len({t["key"] for t in tasks})
        bar = tqdm(total=n_total, initial=n_total - len(todo), desc="sweep", unit="task",
                   disable=not progress)
        if backend == "joblib":
            from joblib import Parallel, delayed
            me = (socket.gethostname(), os.getpid())
            for recs in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
                    delayed(_run_task_for)(t, me) for t in todo):
                _append(results_path, recs)
                bar.update(1)
        else:
            try:
                from dask.distributed import Client, as_completed
            except ImportError:
                raise ImportError("the dask backend needs dask.distributed: "
                                  "pip install 'sotcore[dask]'") from None
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
        bar.close()
        return load_results(results_path)
