"""Figures of device calibrations and training results (needs the optional matplotlib extra).

Every function draws on a :class:`matplotlib.figure.Figure` created without
pyplot (no global state, no GUI backend), so it works in scripts, servers
and notebooks alike; files are written with the Agg backend.  Calibration
figures show currents with an SI prefix chosen from the data (nA ... A),
widths in micrometres.

    from sotcore.plotting import plot_calibration, save_calibration_figures
    fig = plot_calibration(result)                     # overview figure
    save_calibration_figures(result, "figures/")       # PNG files
"""
from pathlib import Path

import numpy as np

__all__ = ["plot_device_curves", "plot_parameter_histograms", "plot_width_scaling",
           "plot_calibration", "plot_family_fits", "save_calibration_figures",
           "plot_learning_curves",
           "plot_accuracy_vs_T", "plot_accuracy_vs_width", "plot_variability_gap"]



def _current_unit(result):
    """(multiplier from amperes, unit text) for a calibration's currents."""
    from .calibration.result import si_prefix
    f = result.per_device
    vals = f["i50"][np.isfinite(f["i50"])]
    factor, prefix = si_prefix(vals if vals.size else result.measurements["current"])
    return 1.0 / factor, f"{prefix}A"


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("sotcore's figures need matplotlib: pip install sotcore[plot]") \
            from None
    return Figure, FigureCanvasAgg


def _new_figure(figsize):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _check_result(result):
    from .calibration import CalibrationResult
    if not isinstance(result, CalibrationResult):
        raise TypeError(f"result must be a CalibrationResult (from sotcore.calibrate), got "
                        f"{type(result).__name__}")


def _device_positions(result, devices, max_devices):
    """Positions of the devices to draw: given labels/positions, or a spread by I50."""
    labels = list(result.devices)
    if devices is None:
        f = result.per_device
        ok = np.flatnonzero(~f["stuck"] & np.isfinite(f["i50"]))
        if ok.size == 0:
            ok = np.arange(len(labels))
        ok = ok[np.argsort(f["i50"][ok], kind="stable")]
        take = np.unique(np.linspace(0, ok.size - 1, min(max_devices, ok.size)).round()
                         .astype(int))
        return ok[take]
    out = []
    index = {lab: i for i, lab in enumerate(labels)}
    for d in devices:
        if d in index:
            out.append(index[d])
        elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and \
                0 <= d < len(labels):
            out.append(int(d))
        else:
            raise ValueError(f"devices: {d!r} is neither a device label nor a position in "
                             f"[0, {len(labels)})")
    if not out:
        raise ValueError("devices must name at least one device")
    return np.asarray(out)


def _wilson(k, n, z=1.96):
    """Wilson score interval of a binomial proportion (stays inside [0, 1])."""
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # Rounding can put an end a hair past p at 0 or n switches; error bars must not be negative.
    return np.minimum(centre - half, p), np.maximum(centre + half, p)


def _width_groups(result):
    w = result.per_device["width"]
    if np.isfinite(w).all():
        return [(f"w = {v:g} \u00b5m", w == v) for v in np.unique(w)]
    return [("all devices", np.ones(w.shape, dtype=bool))]


def plot_device_curves(result, devices=None, *, ax=None, max_devices=6):
    """Measured switching probabilities with 95 % binomial error bars and fitted curves.

    Parameters
    ----------
    result : CalibrationResult
    devices : sequence, optional
        Device labels (or integer positions in ``result.devices``); default
        ``max_devices`` devices spread over the range of fitted I50.
    ax : matplotlib Axes, optional
        Draw here; default a new figure.
    max_devices : int, default 6

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_result(result)
    if ax is None:
        ax = _new_figure((6.0, 4.2)).add_subplot()
    pos = _device_positions(result, devices, max_devices)
    m = result.measurements
    sub = result.population[pos]
    f = result.per_device
    mul, unit = _current_unit(result)
    for j, d in enumerate(pos):
        rows = m["device"] == d
        I, n, k = m["current"][rows], m["pulses"][rows], m["switched"][rows]
        lo, hi = _wilson(k, n)
        p = k / n
        color = f"C{j % 10}"
        flags = [name for name in ("stuck", "nonmonotone", "rejected", "unusable")
                 if name in f and f[name][d]]
        wd = f["width"][d]
        label = (f"{result.devices[d]}" + (f", {wd:g} \u00b5m" if np.isfinite(wd) else "")
                 + (f", {f['family'][d]}" if "family" in f else "")
                 + (f" ({', '.join(flags)})" if flags else ""))
        ax.errorbar(I * mul, p, yerr=[p - lo, hi - p], fmt="o", ms=3, lw=0.8, capsize=1.5,
                    color=color, label=label)
        grid = np.linspace(I.min(), I.max(), 400)
        cur = np.zeros((grid.size, len(sub)))
        cur[:, j] = grid
        ax.plot(grid * mul, sub.probability(cur)[:, j], color=color, lw=1.4)
    ax.set_xlabel(f"pulse current ({unit})")
    ax.set_ylabel("switching probability")
    ax.set_ylim(-0.03, 1.03)
    fit = ("per-device family (auto)" if result.model == "auto"
           else f"{result.model} fit")
    ax.set_title(f"measured (95% Wilson bars) and {fit}", fontsize=10)
    ax.legend(fontsize=7, title="device", title_fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return ax.figure


def plot_parameter_histograms(result, *, axes=None, bins=30):
    """Histograms of fitted I50 and programming window, one colour per width.

    Parameters
    ----------
    result : CalibrationResult
    axes : pair of matplotlib Axes, optional
    bins : int, default 30
        Bins per histogram (over the common range of all widths).

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_result(result)
    if axes is None:
        fig = _new_figure((9.0, 3.6))
        axes = fig.subplots(1, 2)
    f = result.per_device
    used = ~f["stuck"] & np.isfinite(f["i50"])
    groups = _width_groups(result)
    mul, unit = _current_unit(result)
    for ax, name, label in ((axes[0], "i50", f"I50 ({unit})"),
                            (axes[1], "window", f"programming window W ({unit})")):
        v = f[name][used] * mul
        if v.size == 0:
            ax.text(0.5, 0.5, "no fitted devices", ha="center", transform=ax.transAxes)
            continue
        # Widths spanning a wide range: log-spaced bins on a log axis, where
        # equal relative spread looks equally wide at every width.
        logx = v.min() > 0 and v.max() / v.min() > 4
        nb = bins * max(1, len(groups) // 2)
        edges = (np.geomspace(v.min(), v.max(), nb + 1) if logx
                 else np.histogram_bin_edges(v, bins=nb))
        if logx:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        for glabel, g in groups:
            vals = f[name][g & used] * mul
            if vals.size:
                ax.hist(vals, bins=edges, alpha=0.6, label=f"{glabel} (n={vals.size})")
        ax.set_xlabel(label + (" (log scale)" if logx else ""))
        ax.set_ylabel("devices")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_title("device-to-device variability of I50", fontsize=10)
    axes[1].set_title("... and of the programming window", fontsize=10)
    return axes[0].figure


def plot_width_scaling(result, *, axes=None):
    """I50 and window against device width: devices, mean +- sd per width, fitted lines.

    The shaded band is the confidence band of the fitted line (level
    ``result.confidence``).  Needs at least two distinct widths.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_result(result)
    if result.width_fits is None:
        raise ValueError("plot_width_scaling needs devices of at least 2 distinct widths "
                         "(result.width_fits is None)")
    from scipy import stats
    if axes is None:
        fig = _new_figure((9.0, 3.6))
        axes = fig.subplots(1, 2)
    f = result.per_device
    used = ~f["stuck"] & np.isfinite(f["i50"])
    w = f["width"]
    rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
    wmax = float(w[used].max())
    xs = np.linspace(0.0, wmax * 1.05, 200)
    mul, unit = _current_unit(result)
    for ax, name, label in ((axes[0], "i50", f"I50 ({unit})"),
                            (axes[1], "window", f"window W ({unit})")):
        fit = result.width_fits[name]
        jitter = 1 + 0.015 * rng.standard_normal(used.sum())
        ax.plot(w[used] * jitter, f[name][used] * mul, ".", ms=2, alpha=0.25, color="0.4",
                label="devices")
        for row in result.stats:
            if row["width_um"] is not None and row["n_used"] > 1:
                ax.errorbar(row["width_um"], row[f"{name}_median"] * mul,
                            yerr=row[f"{name}_mad"] * mul, fmt="s", ms=5, color="C3",
                            capsize=3, zorder=3)
        ax.errorbar([], [], yerr=[], fmt="s", color="C3", label="median +- MAD per width")
        line = fit["intercept"] + fit["slope"] * xs
        se = np.sqrt(np.maximum(xs ** 2 * fit["slope_se"] ** 2 + fit["intercept_se"] ** 2
                                + 2 * xs * fit["slope_intercept_cov"], 0.0))
        tq = stats.t.ppf(0.5 + 0.5 * result.confidence, fit["n_devices"] - 2)
        ax.plot(xs, line * mul, color="C0",
                label=f"robust fit: {fit['slope'] * mul:.4g} {unit}/\u00b5m, "
                      f"R$^2$={fit['r2']:.3f}")
        ax.fill_between(xs, (line - tq * se) * mul, (line + tq * se) * mul, color="C0",
                        alpha=0.2, lw=0, label=f"{result.confidence:.0%} CI of the line")
        ax.set_xlabel("device width (\u00b5m)")
        ax.set_ylabel(label)
        ax.set_xlim(0, xs[-1])
        ax.set_ylim(bottom=min(0.0, float(np.min(line)) * mul))
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    axes[0].set_title("size dependence of I50", fontsize=10)
    axes[1].set_title("size dependence of the programming window", fontsize=10)
    return axes[0].figure


def plot_calibration(result, *, devices=None, max_devices=6, title=None, path=None, dpi=150):
    """Overview figure: fitted curves, histograms and (if >= 2 widths) width scaling.

    Parameters
    ----------
    result : CalibrationResult
    devices, max_devices
        As in :func:`plot_device_curves`.
    title : str, optional
        Figure title (default names the source and the device count).
    path : str or path, optional
        Also save the figure here (format from the suffix, Agg backend).
    dpi : int, default 150

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_result(result)
    scaling = result.width_fits is not None
    fig = _new_figure((14.0, 8.0) if scaling else (14.0, 4.2))
    grid = fig.subplots(2 if scaling else 1, 3, squeeze=False)
    plot_device_curves(result, devices, ax=grid[0, 0], max_devices=max_devices)
    plot_parameter_histograms(result, axes=grid[0, 1:])
    if scaling:
        plot_width_scaling(result, axes=grid[1, :2])
        _text_panel(grid[1, 2], result)
    fig.suptitle(title or f"calibration of {len(result)} devices from {result.source}",
                 fontsize=12)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _text_panel(ax, result):
    ax.axis("off")
    f = result.per_device
    mul, unit = _current_unit(result)
    fams, counts = np.unique(np.asarray(f["family"], dtype=str), return_counts=True)
    lines = [f"devices: {len(result)}   skipped: {len(result.skipped)}",
             "families: " + ", ".join(f"{a} {b}" for a, b in zip(fams, counts)),
             f"stuck {int(f['stuck'].sum())}, non-monotone {int(f['nonmonotone'].sum())}, "
             f"rejected {int(f['rejected'].sum())}, unusable {int(f['unusable'].sum())}", ""]
    pct = f"{result.confidence:.0%}"
    for name, label in (("i50", "I50"), ("window", "W")):
        ft = result.width_fits[name]
        lines += [f"{label} = a w + b  (w in \u00b5m, robust fit)",
                  f"  a = {ft['slope'] * mul:.4g} {unit}/\u00b5m",
                  f"      {pct} CI [{ft['slope_ci'][0] * mul:.4g}, {ft['slope_ci'][1] * mul:.4g}]",
                  f"  b = {ft['intercept'] * mul:.4g} {unit}",
                  f"      {pct} CI [{ft['intercept_ci'][0] * mul:.4g}, "
                  f"{ft['intercept_ci'][1] * mul:.4g}]",
                  f"  R^2 = {ft['r2']:.3f}", ""]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes)


def plot_family_fits(result, devices=None, *, max_devices=4, path=None, dpi=150):
    """Each fitted family's curve and standardised residuals, per device.

    Top row: measured probabilities (95 % Wilson bars) and the curve of every
    family fitted to the device (the chosen one thick, marked in the
    legend).  Bottom row: Pearson residuals ``(k - n P) / sqrt(n P (1 - P))``
    of each family at the measured currents (about N(0, 1) for a right model).

    Parameters
    ----------
    result : CalibrationResult
    devices : sequence, optional
        Labels or positions; default ``max_devices`` devices spread over I50.
    max_devices : int, default 4
    path : str or path, optional
        Also save the figure here.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_result(result)
    if not result.family_fits:
        raise ValueError("plot_family_fits needs fitted devices (all devices are stuck)")
    pos = _device_positions(result, devices, max_devices)
    fig = _new_figure((3.6 * len(pos) + 0.4, 6.0))
    axes = fig.subplots(2, len(pos), squeeze=False, sharex="col",
                        gridspec_kw={"height_ratios": [2, 1]})
    m, f = result.measurements, result.per_device
    mul, unit = _current_unit(result)
    colors = {"logistic": "C0", "probit": "C1", "thermal": "C3", "asymmetric": "C2",
              "isotonic": "C4", "table": "C5"}
    for j, d in enumerate(pos):
        top, bot = axes[0, j], axes[1, j]
        rows = m["device"] == d
        I, n, k = m["current"][rows], m["pulses"][rows], m["switched"][rows]
        lo, hi = _wilson(k, n)
        p = k / n
        top.errorbar(I * mul, p, yerr=[p - lo, hi - p], fmt="o", ms=3, lw=0.8, capsize=1.5,
                     color="k", label="measured")
        grid = np.linspace(I.min(), I.max(), 400)
        for name in result.family_fits:
            P = result.curve(d, grid, family=name)
            if P is None:
                continue
            chosen = f["family"][d] == name
            top.plot(grid * mul, P, color=colors.get(name, "0.5"), lw=2.4 if chosen else 1.0,
                     ls="-" if chosen else "--",
                     label=f"{name} (chosen)" if chosen else name)
            Pm = np.clip(result.curve(d, I, family=name), 1e-12, 1 - 1e-12)
            r = (k - n * Pm) / np.sqrt(n * Pm * (1 - Pm))
            bot.plot(I * mul, r, "o-" if chosen else ".--", ms=3, lw=0.8,
                     color=colors.get(name, "0.5"))
        for z in (-2, 2):
            bot.axhline(z, color="0.6", lw=0.6, ls=":")
        bot.axhline(0, color="0.3", lw=0.6)
        lo_, hi_ = bot.get_ylim()
        bot.set_ylim(max(lo_, -8.0), min(hi_, 8.0))  # a far tail would flatten the rest
        top.set_title(f"device {result.devices[d]!s}", fontsize=9)
        top.set_ylim(-0.03, 1.03)
        top.grid(alpha=0.3)
        bot.grid(alpha=0.3)
        bot.set_xlabel(f"pulse current ({unit})")
        top.legend(fontsize=6.5, loc="lower right")
    axes[0, 0].set_ylabel("switching probability")
    axes[1, 0].set_ylabel("standardised residual")
    fig.suptitle(f"switching-curve families fitted to {result.source} "
                 f"({result.model}, {result.selection.upper()})", fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def save_calibration_figures(result, directory, *, devices=None, max_devices=6, dpi=150):
    """Write the calibration figures as PNG files into ``directory`` (created if needed).

    Files: ``curves.png``, ``histograms.png``, ``calibration.png`` (overview),
    with at least two widths ``width_scaling.png``, and with more than one
    family fitted (``model="auto"``) ``families.png`` (:func:`plot_family_fits`).

    Returns
    -------
    list of pathlib.Path
    """
    _check_result(result)
    _matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    figs = [("curves.png", plot_device_curves(result, devices, max_devices=max_devices)),
            ("histograms.png", plot_parameter_histograms(result))]
    if result.width_fits is not None:
        figs.append(("width_scaling.png", plot_width_scaling(result)))
    figs.append(("calibration.png", plot_calibration(result, devices=devices,
                                                     max_devices=max_devices)))
    if len(result.family_fits) > 1:
        figs.append(("families.png", plot_family_fits(result, devices,
                                                      max_devices=min(max_devices, 4))))
    for name, fig in figs:
        path = directory / name
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


# -- training results (records from sotcore.experiments.compare_modes) ----------------------
_RUN_COLORS = {"software": "C0", "ex-situ": "C1", "hardware-aware": "C2",
               "hil (nominal)": "C3", "hil (calibrated)": "C4", "hil (straight-through)": "C5"}


def _runs(records):
    return list(dict.fromkeys(r["run"] for r in records))


def _color(run):
    return _RUN_COLORS.get(run)


def _save(fig, path, dpi=150):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def plot_learning_curves(records, path=None):
    """Training loss per epoch of each mode (mean over seeds, band = min..max)."""
    fig = _new_figure((6.4, 4.2))
    ax = fig.add_subplot()
    for run in _runs(records):
        if run == "ex-situ":
            continue  # same training run as software
        curves = {}
        for r in records:
            if r["run"] == run:
                curves[r["seed"]] = r["loss_curve"]
        L = min(len(c) for c in curves.values())
        arr = np.array([c[:L] for c in curves.values()])
        ep = np.arange(1, L + 1)
        line, = ax.plot(ep, arr.mean(axis=0), label=run, color=_color(run))
        if len(arr) > 1:
            ax.fill_between(ep, arr.min(axis=0), arr.max(axis=0), alpha=0.2,
                            color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (-log mean softmax)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Learning curves (ex-situ shares the software run)")
    return _save(fig, path)


def _accuracy_against(records, key, T, xlabel, path, *, scale=1.0, log2=True, min_points=1):
    """Test accuracy at ``T`` (mean ± std over seeds) against ``record[key]``, per run."""
    fig = _new_figure((6.4, 4.2))
    ax = fig.add_subplot()
    for run in _runs(records):
        sel = [r for r in records if r["run"] == run and (T is None or r["T"] == T)]
        xs = sorted({r[key] for r in sel})
        if len(xs) < min_points:
            continue
        acc = [[r["accuracy"] for r in sel if r[key] == x] for x in xs]
        ax.errorbar([scale * x for x in xs], [100 * np.mean(a) for a in acc],
                    yerr=[100 * np.std(a) for a in acc], marker="o", capsize=3, label=run,
                    color=_color(run))
    if log2:
        ax.set_xscale("log", base=2)
        ticks = sorted({scale * r[key] for r in records})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)" if T is None else f"test accuracy at T={T} (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy_vs_T(records, path=None):
    """Test accuracy against the number of samples T averaged at inference."""
    return _accuracy_against(records, "T", None, "samples averaged at inference, T", path)


def plot_accuracy_vs_width(records, path=None, T=32):
    """Test accuracy at ``T`` samples against device width, per mode."""
    return _accuracy_against(records, "width", T, "device width (um)", path)


def plot_variability_gap(records, path=None, T=32):
    """Accuracy of each mode against device-to-device variability (ex-situ gap)."""
    return _accuracy_against(records, "variability", T, "device-to-device variability (%)",
                             path, scale=100.0, log2=False, min_points=2)
