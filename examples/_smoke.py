"""The ``--smoke`` mode every example shares: tiny sizes that prove the script runs end to end.

Two epochs of training or sizes too small to time give figures that mean nothing, so a smoke run
says so before its first figure, across each plot and in the name of each file it writes, and
never overwrites the files of a full run.
"""

from __future__ import annotations

from pathlib import Path

NOTE = ("SMOKE RUN: sizes chosen only to check that this script runs end to end; the figures "
        "below are not measurements. Run without --smoke to measure.")


def announce(smoke: bool) -> None:
    if smoke:
        print(NOTE, flush=True)


def output_path(name: str, smoke: bool) -> Path:
    """``name`` for a full run, ``stem.smoke.suffix`` for a smoke run."""
    path = Path(name)
    return path.with_name(f"{path.stem}.smoke{path.suffix}") if smoke else path


def savefig(fig, path: Path) -> None:
    """Save ``fig``; one bound for a smoke run's path is stamped so that it cannot pass for a
    result."""
    if path.stem.endswith(".smoke"):
        fig.text(0.5, 0.5, "SMOKE RUN\nnot a measurement", ha="center", va="center",
                 fontsize=30, color="red", alpha=0.35, rotation=20)
    fig.savefig(path, dpi=90)
