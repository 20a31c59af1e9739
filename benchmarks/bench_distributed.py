"""CPU benchmark of ``gatattn.distributed.ring_attention`` with ``causal=True``: how evenly the
ranks share the work, load-balanced (zig-zag) against the plain ring, per-rank memory, and time
against one process (docs/design.md, performance targets).

One case: one causal sequence of N nodes (default N=8192, H=4, C=32, float32), cut into P
contiguous shards, forward+backward of ``ring_attention`` with the gradients of q, k and v, on
P = 1 process and on P = 2 and 4 gloo processes, each with ``load_balance=True`` (zig-zag) and
``False`` (plain ring). Every rank runs with one torch thread.

How it measures, each P and mode in a fresh set of spawned processes:

* Compute per rank: the CPU time of the rank's main thread inside the ring's local attention
  calls, merges and block backwards (the module's ``_attend``, ``merge_attention`` and
  ``_block_backward``, wrapped here), summed over one forward+backward; median over reps. Thread
  CPU time counts only what the rank computes, not its waits for neighbours, and not the time
  it is descheduled when P ranks share fewer cores. Balance: the largest over the ranks divided
  by their mean (1.0: perfectly even; the slowest rank sets the pace of every step).
* Wall time: after a barrier, each rank's forward+backward wall time, the slowest rank's,
  median over reps. On a machine with fewer cores than P ranks they share cores, so this
  measures the sharing as well.
* Memory: the increase of each rank's peak RSS over its RSS before one forward+backward (inputs
  built first), the largest over the ranks.
* Agreement: the concatenated outputs against the P=1 output.

Usage::

    python benchmarks/bench_distributed.py             # N=8192; writes results/distributed-cpu.md
    python benchmarks/bench_distributed.py --n 2048    # another N (written too)
    python benchmarks/bench_distributed.py --quick     # N=1024, P=1, 2; prints only
"""

from __future__ import annotations

import argparse
import functools
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

from gatattn import distributed as ring_module
from gatattn.distributed import ring_attention

HEADS, CHANNELS = 4, 32
RESULTS = Path(__file__).resolve().parent / "results" / "distributed-cpu.md"
# glibc's malloc raises its mmap threshold (up to 32 MiB) after each freed large block, so
# blocks just under 32 MiB go to the heap and stay in the RSS after they are freed: the peak
# then counts dead memory. A fixed threshold (read by each spawned rank at start-up) keeps the
# measurement to live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
BALANCE_TARGET = 1.15


def shard_sizes(n: int, world: int) -> list[int]:
    base, extra = divmod(n, world)
    return [base + (rank < extra) for rank in range(world)]


class ComputeClock:
    """Thread CPU time spent inside the wrapped functions (outermost calls only)."""

    def __init__(self) -> None:
        self.seconds, self.depth = 0.0, 0

    def wrap(self, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            self.depth += 1
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.thread_time() - start
        return timed


def rank_main(rank: int, world: int, port: int, n: int, reps: int, balance: bool,
              out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=20))
    try:
        result, out = measure(rank, world, n, reps, balance)
        torch.save({"result": result, "out": out}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def measure(rank: int, world: int, n: int, reps: int,
            balance: bool) -> tuple[dict, torch.Tensor]:
    clock = ComputeClock()
    for name in ("_attend", "merge_attention", "_block_backward"):
        setattr(ring_module, name, clock.wrap(getattr(ring_module, name)))
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
        out = ring_attention(q, k, v, causal=True, load_balance=balance)
        out.backward(grad)
        return out.detach()

    gc.collect()
    dist.barrier()
    before = _statm(1)
    reset = _reset_peak_rss()
    out = step()
    peak = _max_rss()
    walls, computes = [], []
    for _ in range(reps):
        dist.barrier()
        clock.seconds = 0.0
        start = time.perf_counter()
        step()
        walls.append((time.perf_counter() - start) * 1e3)
        computes.append(clock.seconds * 1e3)
    return {"rank": rank, "rows": rows, "delta_mb": (peak - before) / MB, "peak_mb": peak / MB,
            "peak_reset": reset, "wall_ms": statistics.median(walls),
            "compute_ms": statistics.median(computes)}, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, n: int, reps: int, balance: bool) -> tuple[list[dict], torch.Tensor]:
    """Every rank's measurements, and the output over all nodes."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(rank_main, args=(world, free_port(), n, reps, balance, out_dir),
                           nprocs=world, start_method="spawn")
        saved = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    return [s["result"] for s in saved], torch.cat([s["out"] for s in saved])


def imbalance(ranks: list[dict]) -> float:
    computes = [r["compute_ms"] for r in ranks]
    return max(computes) / statistics.mean(computes)


def report(n: int, reps: int, runs: dict, diffs: dict, load: tuple[float, float],
           elapsed: float, note: str) -> str:
    single = runs[(1, True)][0]
    rows = []
    for (world, balance), ranks in runs.items():
        mode = "one process" if world == 1 else ("zig-zag" if balance else "plain ring")
        wall = max(r["wall_ms"] for r in ranks)
        slowest = max(r["compute_ms"] for r in ranks)
        rows.append([str(world), mode, ", ".join(f"{r['compute_ms']:.0f}" for r in ranks),
                     f"{imbalance(ranks):.3f}", f"{single['compute_ms'] / slowest:.2f}",
                     f"{wall:.0f}",
                     f"{single['wall_ms'] / wall:.2f}",
                     f"{max(r['delta_mb'] for r in ranks):.0f}",
                     "-" if world == 1 else f"{diffs[(world, balance)]:.1e}"])
    lines = [
        "# ring_attention, causal, over P processes on CPU: balance, memory, time", "",
        f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- python {platform.python_version()}, torch {torch.__version__}, gloo, gatattn "
        f"{git_commit()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical cores; 1 torch thread per rank "
        "(torch.set_num_threads(1)), so P = 4 ranks share 2 cores; ranks run with "
        f"{' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}",
        f"- one causal sequence, N={n}, H={HEADS}, C={CHANNELS}, float32, forward+backward "
        "(gradients of q, k, v), shards of the caller as even as possible" + note,
        f"- medians of {reps} reps after one warm-up; load average (1 min) at start / end: "
        f"{load[0]:.2f} / {load[1]:.2f}; total run time {elapsed:.0f} s", "",
        *table(["P", "layout", "compute per rank ms (thread CPU time, rank 0 first)",
                f"max / mean compute (target <= {BALANCE_TARGET})",
                "one process's compute / slowest rank's", "fwd+bwd wall ms (slowest rank)",
                "wall speed-up vs one process",
                "peak increase per rank MB (max)", "max abs diff vs P=1"], rows),
        "Compute: CPU time of each rank's main thread inside the local attention calls, merges "
        "and block backwards, one forward+backward (no waiting, no re-layout transfers). The "
        "plain ring gives rank r the key blocks of ranks <= r, so compute grows with r; the "
        "zig-zag layout gives each rank two chunks of 2P, one early and one late, and every "
        "rank the same calls. One process computes the whole causal sequence in one call, "
        "whose route (SDPA on CPU) spends about as much on the masked half as on the kept "
        "one; the ring skips key blocks wholly in the future, so P ranks together compute "
        "less than one process. Wall time: the slowest rank's; with more ranks than cores the "
        "ranks share them, so the wall time of P = 4 measures the sharing too, and so does "
        "every wall time on a loaded machine (load average above). Memory: peak RSS increase "
        "over the RSS before one forward+backward, largest over the ranks.", "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=1024, P=1, 2; print only")
    parser.add_argument("--n", type=int, default=8192, help="sequence length")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    n, worlds = (1024, [2]) if args.quick else (args.n, [2, 4])
    os.environ.update(MALLOC_ENV)  # inherited by the spawned ranks
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    runs, outputs = {}, {}
    for world, balance in [(1, True)] + [(w, b) for w in worlds for b in (True, False)]:
        runs[(world, balance)], outputs[(world, balance)] = run_world(world, n, args.reps,
                                                                      balance)
        ranks = runs[(world, balance)]
        mode = "one process" if world == 1 else ("zig-zag" if balance else "plain ring")
        print(f"P={world} {mode}: max/mean {imbalance(ranks):.3f}; "
              + "; ".join(f"rank {r['rank']}: {r['compute_ms']:.0f} ms compute, "
                          f"{r['wall_ms']:.0f} ms wall, +{r['delta_mb']:.0f} MB" for r in ranks),
              flush=True)
    diffs = {key: float((out - outputs[(1, True)]).abs().max())
             for key, out in outputs.items() if key[0] > 1}
    note = "" if n == 8192 else f" (N={n} instead of 8192: {args.n}-node runs chosen by --n)"
    text = report(n, args.reps, runs, diffs, (load_start, os.getloadavg()[0]),
                  time.perf_counter() - start, note)
    print(text)
    if not args.quick:
        RESULTS.write_text(text)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
