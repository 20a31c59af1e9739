"""Per-call overhead on small graphs: ``gatattn.attention`` against bare SDPA.

The peer is the least work possible for the same attention: the nodes already grouped by graph
size into ``(count, H, len, C)`` tensors outside the timed region, then one
``F.scaled_dot_product_attention`` call per size group. gatattn gets the packed ``(N, H, C)``
nodes and either a graph built once outside the timed region (``graph=``, as every layer of a
model gets it) or ``ptr`` (the keyword form: the first call reads and checks ``ptr`` and builds
its graph, every later call given the same tensor checks that it still holds those values and
gets that graph), the latter with validation on and off (``gatattn.validation``).
Forward only, no autograd. The table also gives the host reads per call (device-to-host reads:
``.item()``, ``.tolist()``, ``int()``, ...), counted in a separate call.

    python benchmarks/bench_overhead.py                   # CPU, writes results/overhead-cpu.md
    python benchmarks/bench_overhead.py --device cuda     # times with CUDA events

Measures, never asserts. Targets (docs/design.md): one 64-node graph <= 1.15x bare SDPA with
``graph=`` and <= 1.5x with ``ptr=``; 64 graphs of 32 nodes <= 1.1x and <= 1.2x.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gatattn  # noqa: E402
from benchmarks.harness import environment, table  # noqa: E402

HEADS, CHANNELS = 4, 16
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    name: str
    sizes: list[int] | None  # None: one complete graph, no ptr


def cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)

    def random_sizes(count: int) -> list[int]:
        return torch.randint(10, 31, (count,), generator=gen).tolist()

    return [
        Case("one graph of 64 nodes", [64]),
        Case("64 graphs of 32 nodes (one group)", [32] * 64),
        Case("16 graphs of 10-30 nodes", random_sizes(16)),
        Case("64 graphs of 10-30 nodes", random_sizes(64)),
        Case("256 graphs of 10-30 nodes", random_sizes(256)),
    ]


def grouped(q: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """``q`` as one ``(count, H, len, C)`` tensor per graph size (the peer's free lunch)."""
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    groups = []
    for length in sorted(set(sizes)):
        graphs = [q[starts[g]:starts[g + 1]] for g, s in enumerate(sizes) if s == length]
        groups.append(torch.stack(graphs).transpose(1, 2).contiguous())
    return groups


_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default)


class _HostReads(TorchDispatchMode):
    """``_local_scalar_dense`` (``item``, ``int()``, ``bool()``) and ``equal`` (``torch.equal``
    returns a Python bool), plus ``tolist`` / ``cpu`` / ``numpy``, which dispatch neither
    (tests/test_host_syncs.py counts the same way)."""

    def __init__(self):
        super().__init__()
        self.count, self.inside = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS and not self.inside:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads(step) -> int:
    reads = _HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy", "item")}

    def counted(method):
        def wrapper(self, *args, **kwargs):
            reads.count += not reads.inside
            reads.inside += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                reads.inside -= 1
        return wrapper

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counted(method))
        with reads:
            step()
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    return reads.count


def time_ms(step, device: torch.device) -> float:
    """One call's wall time, device work included (CUDA events around it on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    step()
    return (time.perf_counter() - begin) * 1e3


def measure(case: Case, device: torch.device, dtype: torch.dtype, reps: int) -> list[str]:
    n = 64 if case.sizes is None else sum(case.sizes)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, HEADS, CHANNELS, generator=gen).to(device, dtype) for _ in range(3))
    sizes = [n] if case.sizes is None else case.sizes
    ptr = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=device)
    graph = gatattn.build_graph(ptr=ptr)  # once per batch, outside the timed region
    groups = list(zip(grouped(q, sizes), grouped(k, sizes), grouped(v, sizes), strict=True))

    def bare_sdpa():
        return [F.scaled_dot_product_attention(*g) for g in groups]

    def ours_graph():
        return gatattn.attention(q, k, v, graph=graph)

    def ours():
        return gatattn.attention(q, k, v, ptr=ptr)

    steps = {"sdpa": bare_sdpa, "graph": ours_graph, "on": ours, "off": ours}
    # The switch is set around the timed call, not inside it: a model sets it once.
    switched = {"off": lambda: gatattn.graph.validation(False)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    with torch.no_grad():
        for name, step in steps.items():  # warm-up; also fills gatattn's structure cache
            with switched.get(name, contextlib.nullcontext)():
                step()
        # Interleaved, rotating who goes first; torch.utils.benchmark's blocked_autorange times
        # one step at a time, so a shared machine's drift would favour one of them.
        for rep in range(reps):
            names = list(steps)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                with switched.get(name, contextlib.nullcontext)():
                    times[name].append(time_ms(steps[name], device))
        reads = {}
        for name in ("graph", "on", "off"):
            with switched.get(name, contextlib.nullcontext)():
                reads[name] = host_reads(steps[name])
    ms = {name: statistics.median(t) for name, t in times.items()}
    return [case.name, str(len(set(sizes))), f"{ms['sdpa']:.3f}",
            *(cell for name in ("graph", "on", "off") for cell in (
                f"{ms[name]:.3f}", f"{ms[name] / ms['sdpa']:.2f}x", str(reads[name])))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these ops are too small to share, "
                        "and on a busy machine a second thread spin-waits for a core)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: results/overhead-<device>.md)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    header = ["case", "size groups", "bare SDPA ms", "graph= ms", "ratio", "host reads",
              "ptr= ms", "ratio", "host reads", "ptr=, validation off, ms", "ratio",
              "host reads"]
    rows = [measure(case, device, dtype, args.reps) for case in cases()]
    load_end = os.getloadavg()[0]
    lines = [f"# Per-call overhead on small graphs ({device.type})", "",
             *(line.replace("(default)", "(--threads)")
               for line in environment(torch.get_num_threads()) if not line.startswith("- dtype")),
             f"- device: {_device_name(device)}, "
             f"dtype {args.dtype}, H={HEADS}, C={CHANNELS}, forward only, no autograd",
             f"- load average (1 min) at start / end: {load_start:.2f} / {load_end:.2f}", "",
             *table(header, rows),
             f"Median of {args.reps} interleaved reps per column after one warm-up call (which "
             "fills gatattn's structure cache, as the first layer of a model does). Bare SDPA "
             "gets the nodes already grouped by size, one call per size group; gatattn gets "
             "them packed, with a graph built once by gatattn.build_graph (graph=) or with ptr "
             "(auto route). Host reads: per call, counted separately.",
             "",
             "Routes (auto): on CPU every case but the one of equal-size graphs in order runs "
             "the written-out logits route (graphs up to 128 nodes), the exception SDPA. A "
             "graph= call reads nothing and re-derives nothing; on non-finite inputs the "
             "logits route contains them exactly by itself (every pair is an edge), and the "
             "SDPA route makes the whole output NaN (on CPU one pass of a compiled scan over "
             "q, k, v; the SDPA call itself one compiled step, no autograd). After the "
             "warm-up call, which checked everything and chose the route, both cases of one "
             "size group run the step their graph planned for such calls (one complete "
             "graph's logits in one compiled step; SDPA and the guard), checking only rows, "
             "eager mode and that nothing watches. With ptr= the call "
             "looks up, before anything else, the graph the warm-up call built from this ptr, "
             "checks that ptr still holds the same values and takes that graph's plan; that "
             "check and, on the SDPA route, whether q, k, v are finite (the same scan, read "
             "as a bool) are its one host read (the logits route needs no flag); inputs found "
             "not finite take the full call, which contains them along edges exactly. "
             "Validation off (switched around the timed call, as a model sets it once) "
             "checks nothing else and guards nothing (the ptr comparison stays: it decides "
             "which graph is served)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or RESULTS / f"overhead-{device.type}.md"
    out.write_text(text)
    print(f"written to {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
