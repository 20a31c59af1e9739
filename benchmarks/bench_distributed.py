"""CPU benchmark of ``gatattn.distributed.ring_attention``: per-rank peak memory and time for one
complete graph spread over P = 1, 2, 3, 4 gloo processes (docs/design.md, performance
targets: "one complete graph over P ranks: peak memory per rank ~ 1/P").

One case per P: N nodes (N=8192, H=4, C=32, float32), cut into P contiguous shards as even as
possible, forward+backward of ``ring_attention`` with the gradients of q, k and v. Each rank runs
with one torch thread.

How it measures: each P is a fresh set of spawned processes. Memory: on every rank the inputs
are built, the kernel's peak-RSS mark is reset (``harness.py``'s helpers), one forward+backward
runs, and the increase of the peak over the RSS just before it is that rank's; the table gives
the largest over the ranks (the first step also allocates gloo's buffers). Time: after a
barrier, median over reps of each rank's forward+backward wall time, the slowest rank's
(a step ends when the ring does). On a machine with fewer cores than P ranks, the ranks share
cores and the time says little; the memory does not depend on it. Agreement: the concatenated
outputs are compared with the P=1 output.

Usage::

    python benchmarks/bench_distributed.py          # writes results/distributed-cpu.md
    python benchmarks/bench_distributed.py --quick  # N=1024, P=1, 2; prints only
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import socket
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import MB, _max_rss, _reset_peak_rss, _statm, cpu_model, git_commit, table

from gatattn.distributed import ring_attention

HEADS, CHANNELS = 4, 32
RESULTS = Path(__file__).resolve().parent / "results" / "distributed-cpu.md"
# glibc's malloc raises its mmap threshold (up to 32 MiB) after each freed large block, so
# tiles just under 32 MiB go to the heap and stay in the RSS after they are freed: the peak then
# counts dead tiles. A fixed threshold (read by each spawned rank at start-up) keeps the
# measurement to live memory; without it P=3 read 205 MB instead of 111 MB.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def shard_sizes(n: int, world: int) -> list[int]:
    base, extra = divmod(n, world)
    return [base + (rank < extra) for rank in range(world)]


def rank_main(rank: int, world: int, port: int, n: int, reps: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    try:
        result, out = measure(rank, world, n, reps)
        torch.save({"result": result, "out": out}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def measure(rank: int, world: int, n: int, reps: int) -> tuple[dict, torch.Tensor]:
    rows = shard_sizes(n, world)[rank]
    offset = sum(shard_sizes(n, world)[:rank])
    gen = torch.Generator().manual_seed(0)  # the same full inputs on every rank, then its rows
    full = [torch.randn(n, HEADS, CHANNELS, generator=gen) for _ in range(4)]
    q, k, v, grad = (t[offset:offset + rows].clone() for t in full)
    del full
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step() -> torch.Tensor:
        for t in (q, k, v):
            t.grad = None
        out = ring_attention(q, k, v)
        out.backward(grad)
        return out.detach()

    gc.collect()
    dist.barrier()
    before = _statm(1)
    reset = _reset_peak_rss()
    out = step()
    peak = _max_rss()
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return {"rank": rank, "rows": rows, "delta_mb": (peak - before) / MB, "peak_mb": peak / MB,
            "peak_reset": reset, "median_ms": statistics.median(times)}, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, n: int, reps: int) -> tuple[list[dict], torch.Tensor]:
    """Every rank's measurements, and the output over all nodes."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(rank_main, args=(world, free_port(), n, reps, out_dir), nprocs=world,
                           start_method="spawn")
        saved = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    return [s["result"] for s in saved], torch.cat([s["out"] for s in saved])


def report(n: int, reps: int, worlds: list[int], results: dict, diffs: dict,
           load: tuple[float, float], elapsed: float) -> str:
    base = max(r["delta_mb"] for r in results[1])
    rows = []
    for world in worlds:
        ranks = results[world]
        delta = max(r["delta_mb"] for r in ranks)
        rows.append([str(world), ", ".join(str(r["rows"]) for r in ranks),
                     f"{delta:.0f}", f"{delta / base:.3f}", f"{1 / world:.3f}",
                     f"{max(r['peak_mb'] for r in ranks):.0f}",
                     f"{max(r['median_ms'] for r in ranks):.0f}",
                     "-" if world == 1 else f"{diffs[world]:.1e}"])
    lines = [
        "# ring_attention over P processes on CPU (docs/design.md, performance targets)", "",
        f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- python {platform.python_version()}, torch {torch.__version__}, gloo, gatattn "
        f"{git_commit()}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores); 1 torch thread per rank; "
        f"ranks run with {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())} (glibc: a "
        "fixed mmap threshold, so that freed tiles leave the RSS)",
        f"- one complete graph, N={n}, H={HEADS}, C={CHANNELS}, float32, forward+backward "
        "(gradients of q, k, v), not causal",
        f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}",
        f"- total run time: {elapsed:.0f} s", "",
        *table(["P", "rows per rank", "peak increase per rank MB (max over ranks)",
                "ratio to P=1", "1/P (target: ratio ~ 1/P)",
                "peak RSS per rank MB", f"fwd+bwd ms (median of {reps}, slowest rank)",
                "max abs diff vs P=1"], rows),
        "Memory: increase of the kernel's peak RSS over the RSS just before one "
        "forward+backward, on each rank (inputs built first; the first step also allocates "
        "gloo's buffers). Each rank holds its shard's q, k, v, output and gradients, one "
        "travelling K/V block with its gradient accumulators and its receive buffers, and one "
        "or two (H, 1024, N/P) tiles of logits: all O(N/P), plus fixed costs. Time: the "
        "slowest rank's; ranks share the machine's cores when P exceeds them, so times beyond "
        "that P measure the sharing, not the ring, and a loaded machine moves them.", "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=1024, P=1, 2; print only")
    args = parser.parse_args()
    n, reps, worlds = (1024, 2, [1, 2]) if args.quick else (8192, 3, [1, 2, 3, 4])
    os.environ.update(MALLOC_ENV)  # inherited by the spawned ranks
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    results, outputs = {}, {}
    for world in worlds:
        results[world], outputs[world] = run_world(world, n, reps)
        print(f"P={world}: " + "; ".join(f"rank {r['rank']}: +{r['delta_mb']:.0f} MB, "
                                         f"{r['median_ms']:.0f} ms" for r in results[world]),
              flush=True)
    diffs = {w: float((outputs[w] - outputs[1]).abs().max()) for w in worlds if w > 1}
    text = report(n, reps, worlds, results, diffs, (load_start, os.getloadavg()[0]),
                  time.perf_counter() - start)
    print(text)
    if not args.quick:
        RESULTS.write_text(text)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
