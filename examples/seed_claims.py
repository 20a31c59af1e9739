"""The seed text's claims about self-attention, measured: one row per claim, the figure, and
whether it holds.

The measurements live in ``gatattn.claims`` (and are asserted in tests/test_claims.py); this
script runs them, prints a markdown table, writes it to ``seed_claims.md`` and draws
``seed_claims.png`` in the current directory.

Run: python examples/seed_claims.py [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import _smoke  # noqa: E402  (examples/_smoke.py, beside this script)
import _threads  # noqa: E402  (examples/_threads.py)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from gatattn import claims  # noqa: E402


def measure(smoke: bool) -> tuple[list[tuple[str, str, bool]], dict]:
    """All claims as ``(claim, measured figure, holds)`` rows, and the series to plot."""
    sizes = [256, 512, 1024, 2048] if smoke else [256, 512, 1024, 2048, 4096]
    temperatures = [10.0 ** (e / 2) for e in range(-8, 9)]
    n, length = 16, 64
    rows = []

    eq = claims.permutation_equivariance()
    rows.append(("Self-attention is permutation equivariant: f(Px) = P f(x)",
                 f"max abs diff {eq['plain']:.1e}", eq["plain"] < 1e-5))
    rows.append(("Positional encodings break that equivariance",
                 f"max abs diff {eq['with_positions']:.2f}", eq["with_positions"] > 1e-2))

    diff = claims.complete_graph_equivalence()
    rows.append(("Self-attention = message passing (GAT-style) on the complete graph",
                 f"fused vs n^2 explicit edges: max abs diff {diff:.1e}", diff < 1e-5))

    scale = claims.scaling(sizes, reps=1 if smoke else 3)
    fit = {route: {what: claims.fit_exponent(sizes, series[what]) for what in series}
           for route, series in scale.items()}
    rows.append(("Naive attention stores the n x n score matrix: memory O(n^2)",
                 f"peak tensor memory ~ n^{fit['naive']['bytes']:.2f}",
                 abs(fit["naive"]["bytes"] - 2) < 0.2))
    rows.append(("A fused (FlashAttention-style) route never stores it: memory O(n d)",
                 f"peak tensor memory ~ n^{fit['fused']['bytes']:.2f}",
                 abs(fit["fused"]["bytes"] - 1) < 0.1))
    rows.append(("Both still do O(n^2 d) work",
                 f"time ~ n^{fit['naive']['seconds']:.2f} (naive), "
                 f"n^{fit['fused']['seconds']:.2f} (fused)",
                 all(1.5 < fit[r]["seconds"] < 2.5 for r in fit)))

    heads = [1, 2, 4, 8, 16]
    var = claims.head_average_variance(heads)
    slope = claims.fit_exponent(heads, var)
    rows.append(("Averaging h independent heads divides the variance by h",
                 f"var ~ h^{slope:.2f}; h*var(h)/var(1) = "
                 + ", ".join(f"{h * v / var[0]:.2f}" for h, v in zip(heads, var, strict=True)),
                 abs(slope + 1) < 0.1))

    grad = claims.score_gradient(n, causal=True)
    nonzero = int((grad != 0).sum())
    above = int((grad.triu(1) != 0).sum())
    rows.append(("Causal mask: dL/dS is lower-triangular, n(n+1)/2 possibly non-zero entries",
                 f"n={n}: {above} non-zero above the diagonal, {nonzero} of "
                 f"n(n+1)/2={n * (n + 1) // 2} below (row 0 has one key: its softmax is constant)",
                 above == 0 and nonzero == n * (n + 1) // 2 - 1))

    sweep = claims.temperature_sweep(temperatures, n=n)
    entropy, gnorm = sweep["entropy"], sweep["grad_norm"]
    rows.append(("Temperature: entropy -> log n as tau -> inf, -> 0 as tau -> 0",
                 f"H/log n = {entropy[-1] / math.log(n):.4f} at tau=1e4, "
                 f"{entropy[0] / math.log(n):.1e} at tau=1e-4",
                 entropy[-1] / math.log(n) > 0.999 and entropy[0] / math.log(n) < 1e-3))
    rows.append(("... and the gradient dL/dS vanishes at both ends",
                 f"norm of dL/dS over its peak: {gnorm[0] / max(gnorm):.1e} at tau=1e-4, "
                 f"{gnorm[-1] / max(gnorm):.1e} at tau=1e4",
                 gnorm[0] / max(gnorm) < 1e-3 and gnorm[-1] / max(gnorm) < 1e-3))

    paths = claims.gradient_by_distance(length)
    att, rnn = paths["attention"], paths["rnn"]
    rows.append(("Gradient path: O(1) for attention, L steps (decaying) for an RNN",
                 f"norm of dy_T/dx_(T-L), at L={length - 1} over at L=1: attention "
                 f"{att[-1] / att[1]:.2f}, RNN {rnn[-1] / rnn[1]:.0e}",
                 att[-1] / att[1] > 0.05 and rnn[-1] / rnn[1] < 1e-6))
    reach = {name: sum(g > 0 for g in series) for name, series in paths.items()}
    rows.append(("A causal CNN's receptive field is fixed; attention's is the whole past",
                 f"inputs reaching y_T: CNN (3 layers, k=3) {reach['cnn']}, "
                 f"attention {reach['attention']} of {length}",
                 reach["cnn"] == 7 and reach["attention"] == length))
    series = {"sizes": sizes, "scaling": scale, "fit": fit, "temperatures": temperatures,
              "entropy": entropy, "grad_norm": gnorm, "n": n, "paths": paths}
    return rows, series


def table(rows, smoke: bool) -> str:
    """A smoke run's sizes are too small to judge a claim by (its exponents fit four points
    timed once), so it reports the figures without a verdict."""
    def verdict(ok: bool) -> str:
        return "not judged (smoke run)" if smoke else "yes" if ok else "NO"

    lines = ["| claim | measured | holds? |", "|---|---|---|"]
    lines += [f"| {claim} | {figure} | {verdict(ok)} |" for claim, figure, ok in rows]
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes = axes.ravel()
    for route, style in (("naive", "o-"), ("fused", "s-")):
        for ax, what, unit in ((axes[0], "seconds", "s"), (axes[1], "bytes", "B")):
            ax.loglog(s["sizes"], s["scaling"][route][what], style,
                      label=f"{route} ~ n^{s['fit'][route][what]:.2f}")
            ax.set(xlabel="n (nodes)", ylabel=f"{what} ({unit})")
    for ax in axes[:2]:
        ax.xaxis.set_minor_formatter(NullFormatter())  # no clashing labels
    axes[0].set_title("time per forward")
    axes[1].set_title("peak tensor memory")

    ax = axes[2]
    ax.semilogx(s["temperatures"], [h / math.log(s["n"]) for h in s["entropy"]], "o-",
                label="entropy / log n")
    ax.semilogx(s["temperatures"], [g / max(s["grad_norm"]) for g in s["grad_norm"]], "s-",
                label="|dL/dS| / its peak")
    ax.set(xlabel="temperature tau", title=f"temperature (n={s['n']})")

    ax = axes[3]
    for name, series in s["paths"].items():
        ax.semilogy(range(len(series)), [max(g, 1e-30) for g in series], label=name)
    ax.set(xlabel="distance L", ylabel="|dy_T / dx_(T-L)|", title="gradient over distance")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _smoke.savefig(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="smaller sizes, a few seconds")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    torch.manual_seed(0)
    rows, series = measure(args.smoke)
    text = table(rows, args.smoke)
    print(text)
    table_path = _smoke.output_path("seed_claims.md", args.smoke)
    table_path.write_text((_smoke.NOTE + "\n\n" if args.smoke else "") + text + "\n")
    plot_path = _smoke.output_path("seed_claims.png", args.smoke)
    plot(series, plot_path)
    for kind, path in (("table", table_path), ("plot", plot_path)):
        print(f"{kind}: {path.resolve()}")


if __name__ == "__main__":
    main()
