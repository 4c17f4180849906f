"""The optimisers of :class:`sotcore.training.Trainer`: Adam and SGD on lists of arrays,
float32 updates by one compiled pass per array."""
import numpy as np

from . import _kernels

__all__ = ["Adam", "SGD"]


def _kernel_ok(*arrays):
    """True if the compiled update applies: float32, C-contiguous, one shape."""
    a0 = arrays[0]
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous
               and a.shape == a0.shape for a in arrays) and a0.flags.writeable


class Adam:
    """Adam (Kingma & Ba 2015) on a list of arrays, updated in place.

    float32 parameters are updated by one compiled pass per array
    (``_kernels.adam_update``: moments, bias-corrected step and the optional
    L2 term together), on the calling thread: training alternates the
    update with BLAS calls, and an OpenMP team next to BLAS's busy-waiting
    threads made an epoch ~10x slower on 2 cores.  Other dtypes by NumPy.
    """

    def __init__(self, params, lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads, l2=None):
        """One step; ``l2`` (one coefficient per array, or None) adds ``l2 * p`` to the gradient."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        lr = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for k, (p, g, m, v) in enumerate(zip(params, grads, self.m, self.v)):
            c = 0.0 if l2 is None else float(l2[k])
            if _kernel_ok(p, g, m, v):
                _kernels.adam_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                                     lr, b1, b2, self.eps, c, 1)
                continue
            if c:
                g = g + c * p
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            p -= (lr * m / (np.sqrt(v) + self.eps)).astype(p.dtype, copy=False)

    def state(self):
        return {"t": self.t, "m": self.m, "v": self.v}


class SGD:
    """SGD with (Nesterov) momentum on a list of arrays, updated in place
    (float32 by one compiled pass per array, ``_kernels.sgd_update``)."""

    def __init__(self, params, lr=1e-2, momentum=0.9, nesterov=True):
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.vel = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads, l2=None):
        """One step; ``l2`` (one coefficient per array, or None) adds ``l2 * p`` to the gradient."""
        self.t += 1
        for k, (p, g, v) in enumerate(zip(params, grads, self.vel)):
            c = 0.0 if l2 is None else float(l2[k])
            if _kernel_ok(p, g, v):
                _kernels.sgd_update(p.reshape(-1), g.reshape(-1), v.reshape(-1), self.lr,
                                    self.momentum, bool(self.nesterov), c, 1)
                continue
            if c:
                g = g + c * p
            v *= self.momentum
            v -= self.lr * g
            if self.nesterov:
                p += self.momentum * v - self.lr * g
            else:
                p += v

    def state(self):
        return {"t": self.t, "vel": self.vel}
