"""C6: a convolutional network with SOT device neurons (PyTorch layer) on MNIST.

conv 5x5 x 16 -> batch norm -> device neurons -> avg-pool 2 -> conv 5x5 x 32 ->
batch norm -> device neurons
-> avg-pool 2 -> linear 10, built with :class:`sotcore.torch.DeviceNeurons`
(one device per channel, the layer's default for feature maps: 16 + 32
devices, 20 um, 10 % variability, drawn from the default model whose
constants are ASSUMPTIONS, see sotcore.devices).  Trained on the 5,000-image
MNIST subset, tested on the official 10,000, for several seeds: software,
ex-situ, hil (nominal), hil (calibrated: curves measured through the devices
by ``calibrate_backend``), accuracy at T = 1, 8, 32.  Adam at lr 1e-2 (not
SOTClassifier's 3e-3): in 6 epochs (300 steps) a channel's batch-norm shift
must travel the device's I50 offset, ~2.9 network units (sd) at 10 %
variability, and Adam moves a parameter at most ~lr per step.  Writes ``results.json``
and ``table.txt`` into ``--out``.

    python python/c6_cnn.py --out results/c6              # 3 seeds, 6 epochs, one process
    for s in 0 1 2; do python python/c6_cnn.py --seed $s --threads 1 --out results/c6 & done
    wait; python python/c6_cnn.py --merge --out results/c6  # the same, seeds in parallel
    python python/c6_cnn.py --quick --out results/c6q     # a smoke run
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import sotcore
from sotcore.characterize import calibrate_backend
from sotcore.datasets import load_mnist
from sotcore.experiments import format_table, summarize
from sotcore.torch import compare_modes
from sotcore.training import nominal_curve


def build(neurons):
    """The model definition: ``neurons(n_devices)`` gives each device-neuron layer."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.BatchNorm2d(16), neurons(16), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 5), nn.BatchNorm2d(32), neurons(32), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def merge(out):
    """One results.json and table.txt from the per-seed runs in ``out/seed*/``."""
    parts = [json.loads(p.read_text()) for p in sorted(out.glob("seed*/results.json"))]
    if not parts:
        raise SystemExit(f"no {out}/seed*/results.json to merge")
    records = [r for part in parts for r in part["records"]]
    settings = dict(parts[0]["settings"], seeds=sorted({r["seed"] for r in records}))
    (out / "results.json").write_text(json.dumps(
        {"records": records, "summary": summarize(records), "settings": settings}, indent=1))
    table = format_table(records)
    (out / "table.txt").write_text(table + "\n")
    print(table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="MNIST IDX directory (default ../shared/data/mnist)")
    ap.add_argument("--out", default="results/c6")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=None,
                    help="run only this seed (run seeds in parallel, then --merge)")
    ap.add_argument("--merge", action="store_true",
                    help="combine OUT/seed*/results.json into OUT/results.json and table.txt")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--width", type=float, default=20.0)
    ap.add_argument("--variability", type=float, default=0.10)
    ap.add_argument("--threads", type=int, default=2, help="torch and sampler threads")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.merge:
        return merge(out)
    if args.seed is not None:
        out = out / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    Xtr, ytr = load_mnist(args.data, "train")
    Xte, yte = load_mnist(args.data, "test")
    seeds = [args.seed] if args.seed is not None else list(range(args.seeds))
    epochs = args.epochs
    if args.quick:
        Xtr, ytr, Xte, yte = Xtr[:1000], ytr[:1000], Xte[:1000], yte[:1000]
        seeds, epochs = [0], 2
    Xtr, Xte = Xtr.reshape(-1, 1, 28, 28), Xte.reshape(-1, 1, 28, 28)

    def devices(k, n, seed):
        return sotcore.DevicePopulation.from_width(args.width, n, variability=args.variability,
                                                   random_state=1000 * seed + k)

    def calibration(pop, seed):
        # Measured through the devices (pulse sweeps) as a lab would, then fitted.
        be = sotcore.EmulatedBackend(pop, random_state=10_000 + seed)
        return calibrate_backend(be, nominal_curve(pop)).population

    records = []
    t0 = time.time()

    def save(rec=None):
        if rec is not None:
            records.append(rec)
            print(f"[{time.time() - t0:7.0f} s] {rec['run']:18s} seed {rec['seed']} "
                  f"T={rec['T']:2d} acc={100 * rec['accuracy']:.2f} "
                  f"({rec['seconds_per_epoch']:.1f} s/epoch)", flush=True)
        (out / "results.json").write_text(json.dumps(
            {"records": records, "summary": summarize(records) if records else [],
             "settings": {"model": "conv5x5x16-bn-dev-avgpool2-conv5x5x32-bn-dev-avgpool2-linear10",
                          "device_map": "channel", "epochs": epochs, "seeds": seeds,
                          "width": args.width, "variability": args.variability,
                          "train": len(Xtr), "test": len(Xte), "threads": args.threads,
                          "fit": f"Adam lr {args.lr:g}, batch 100, L2 1e-4/batch "
                                 "(sotcore.torch.fit)",
                          "note": "device constants are assumptions, not the paper's figures"}},
            indent=1))
    compare_modes(build, Xtr, ytr, Xte, yte, devices=devices,
                  modes=("software", "ex-situ", "hil"), surrogates=("nominal", "calibrated"),
                  n_samples=(1, 8, 32), seeds=seeds, calibration=calibration,
                  fit_params={"epochs": epochs, "lr": args.lr}, n_threads=args.threads, on_record=save)
    save()
    table = format_table(records)
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
