"""What ``torch.compile`` costs and gives a small graph transformer on CPU.

A model of two ``SelfAttentionConv`` layers (F=64, H=4) trains on 8 batches of 48-79 graphs of
10-40 nodes (forward+backward, ``batch=``). Under ``torch.compile`` the batched route runs as
the opaque operator ``gatattn::segment_attention``, whose backward recomputes the forward. The
script times, each in a fresh model: eager mode, compiled with inductor and with
``aot_eager`` (``dynamic=True``): the first pass over the 8 batches (compilation included) and
the median of later passes.

    python benchmarks/bench_compile.py      # writes results/compile-cpu.md

Measures, never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gatattn  # noqa: E402
from benchmarks.harness import environment, table  # noqa: E402

FEATURES, HEADS, BATCHES = 64, 4, 8
RESULTS = Path(__file__).resolve().parent / "results" / "compile-cpu.md"


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            gatattn.SelfAttentionConv(FEATURES, FEATURES // HEADS, heads=HEADS, root_weight=True)
            for _ in range(2))

    def forward(self, x, batch):
        for conv in self.convs:
            x = torch.relu(conv(x, batch=batch))
        return x


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(BATCHES):
        count = int(torch.randint(48, 80, (1,), generator=gen))
        sizes = torch.randint(10, 41, (count,), generator=gen)
        batch = torch.arange(count).repeat_interleave(sizes)
        data.append((torch.randn(batch.numel(), FEATURES, generator=gen), batch))
    return data


def one_pass(model, data) -> float:
    start = time.perf_counter()
    for x, batch in data:
        model.zero_grad(set_to_none=True)
        model(x, batch).square().mean().backward()
    return time.perf_counter() - start


def measure(name: str, make, data, passes: int) -> list[str]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = make(Model())
    first = one_pass(model, data)
    later = statistics.median(one_pass(model, data) for _ in range(passes))
    print(f"{name}: first pass {first:.2f} s, later passes {later:.3f} s", flush=True)
    return [name, f"{first:.2f}", f"{later:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=5, help="later passes timed (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = batches()
    load = os.getloadavg()[0]
    rows = [
        measure("eager", lambda m: m, data, args.passes),
        measure("torch.compile (inductor, dynamic=True)",
                lambda m: torch.compile(m, dynamic=True), data, args.passes),
        measure("torch.compile (aot_eager, dynamic=True)",
                lambda m: torch.compile(m, backend="aot_eager", dynamic=True), data,
                args.passes),
    ]
    lines = ["# torch.compile on a small graph transformer (cpu)", "",
             *environment(torch.get_num_threads()),
             f"- load average (1 min) at start / end: {load:.2f} / {os.getloadavg()[0]:.2f}",
             f"- model: 2 SelfAttentionConv layers, F={FEATURES}, H={HEADS}; {BATCHES} batches "
             "of 48-79 graphs of 10-40 nodes, batch=, forward+backward", "",
             *table(["mode", "first pass s (compilation included)",
                     f"later passes s (median of {args.passes})"], rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
