"""The ``--threads`` option every example shares.

torch's default is one thread per core, and on a shared or loaded machine timings then swing
with whatever else runs (ratios by up to 10x between runs on a loaded 2-core machine). A fixed,
printed thread count makes an example's timing figures reproducible and says what they were
measured with. The default, one thread, is what the gallery's figures were measured with: on a
loaded machine, threads beyond the free cores slow a run down. On a quiet machine, pass more.
"""

from __future__ import annotations

import argparse

import torch

DEFAULT = 1


def add_option(parser: argparse.ArgumentParser, scope: str = "the run") -> None:
    parser.add_argument("--threads", type=int, default=DEFAULT,
                        help=f"torch threads for {scope} (default: {DEFAULT})")


def apply(threads: int, report: bool = True) -> None:
    """Set torch's intra-op thread count and (``report``) print it beside the figures it
    affects."""
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    if report:
        print(f"torch threads: {torch.get_num_threads()} (--threads)", flush=True)
