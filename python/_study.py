"""Shared set-up of the MNIST studies (public API only)."""
from pathlib import Path

from sotcore.datasets import load_mnist


def mnist_study(args):
    """(out_dir, X_train, y_train, X_test, y_test, hidden, seeds, epochs) for a study.

    MNIST from ``args.data`` (default ../shared/data/mnist): train on the
    5,000-image subset, test on the official 10,000.  ``args.quick`` shrinks
    everything to a smoke run.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Xtr, ytr = load_mnist(args.data, "train")
    Xte, yte = load_mnist(args.data, "test")
    hidden, seeds, epochs = (500,), list(range(args.seeds)), args.epochs
    if args.quick:
        Xtr, ytr, Xte, yte = Xtr[:1000], ytr[:1000], Xte[:1000], yte[:1000]
        hidden, seeds, epochs = (100,), [0], 3
    return out, Xtr, ytr, Xte, yte, hidden, seeds, epochs
