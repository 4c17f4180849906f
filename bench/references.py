"""Peer implementations for the benchmarks: plain NumPy and PyTorch CPU.

Each does the same job as sotcore's path with the same model: 784-500-10,
hidden neurons are devices with per-device sigmoid curves (I50_j, scale_j),
currents ``I = unit * z``; HIL training with the nominal-curve surrogate and
Adam; inference averages the softmax over T Bernoulli samples.
"""
import numpy as np
from scipy.special import expit

try:
    import torch
except ImportError:  # PyTorch is optional
    torch = None


# -- NumPy ------------------------------------------------------------------------------------
def numpy_predict_proba(X, W1, b1, W2, b2, i50_u, scale_u, T, rng):
    """Best-effort NumPy inference: one sgemm, probabilities once, T sample rounds."""
    P = expit((X @ W1 + b1 - i50_u) / scale_u).astype(np.float32)
    acc = np.zeros((X.shape[0], W2.shape[1]), np.float32)
    for _ in range(T):
        bits = (rng.random(P.shape, dtype=np.float32) < P).astype(np.float32)
        z = bits @ W2 + b2
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        acc += z
    return acc / T


def numpy_hil_epoch(X, y, params, i50_u, scale_u, i50_nom_u, scale_nom_u, rng, state,
                    batch=100, lr=3e-3):
    """One HIL epoch in plain NumPy (float32, Adam); returns training accuracy."""
    W1, b1, W2, b2 = params
    n = X.shape[0]
    order = rng.permutation(n)
    correct = 0
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    for s in range(0, n, batch):
        idx = order[s:s + batch]
        Xb, yb = X[idx], y[idx]
        z1 = Xb @ W1 + b1
        P = expit((z1 - i50_u) / scale_u)
        h = (rng.random(P.shape, dtype=np.float32) < P).astype(np.float32)
        z2 = h @ W2 + b2
        z2 -= z2.max(axis=1, keepdims=True)
        p = np.exp(z2)
        p /= p.sum(axis=1, keepdims=True)
        correct += int((p.argmax(1) == yb).sum())
        g2 = p
        g2[np.arange(len(yb)), yb] -= 1
        g2 /= len(yb)
        sn = expit((z1 - i50_nom_u) / scale_nom_u)
        g1 = (g2 @ W2.T) * (sn * (1 - sn) / scale_nom_u)
        grads = [Xb.T @ g1, g1.sum(0), h.T @ g2, g2.sum(0)]
        state["t"] += 1
        t = state["t"]
        a = lr * np.sqrt(1 - b2_ ** t) / (1 - b1_ ** t)
        for p_, g, m, v in zip(params, grads, state["m"], state["v"]):
            m *= b1_
            m += (1 - b1_) * g
            v *= b2_
            v += (1 - b2_) * g * g
            p_ -= a * m / (np.sqrt(v) + eps)
    return correct / n


# -- PyTorch ----------------------------------------------------------------------------------
if torch is not None:
    class _Stochastic(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, i50_u, scale_u, i50_nom, scale_nom):
            P = torch.sigmoid((z - i50_u) / scale_u)
            ctx.save_for_backward(z)
            ctx.nom = (i50_nom, scale_nom)
            return torch.bernoulli(P)

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            i50_nom, scale_nom = ctx.nom
            s = torch.sigmoid((z - i50_nom) / scale_nom)
            return g * s * (1 - s) / scale_nom, None, None, None, None


def torch_hil_epoch(X, y, params, i50_u, scale_u, i50_nom_u, scale_nom_u, opt, gen,
                    batch=100):
    """The same HIL epoch with PyTorch CPU autograd and torch.optim.Adam."""
    W1, b1, W2, b2 = params
    n = X.shape[0]
    order = torch.randperm(n, generator=gen)
    correct = 0
    for s in range(0, n, batch):
        idx = order[s:s + batch]
        Xb, yb = X[idx], y[idx]
        h = _Stochastic.apply(Xb @ W1 + b1, i50_u, scale_u, i50_nom_u, scale_nom_u)
        logits = h @ W2 + b2
        loss = torch.nn.functional.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct += int((logits.argmax(1) == yb).sum())
    return correct / n


def torch_predict_proba(X, W1, b1, W2, b2, i50_u, scale_u, T):
    with torch.no_grad():
        P = torch.sigmoid((X @ W1 + b1 - i50_u) / scale_u)
        acc = torch.zeros(X.shape[0], W2.shape[1])
        for _ in range(T):
            acc += torch.softmax(torch.bernoulli(P) @ W2 + b2, dim=1)
        return acc / T
