"""CPU benchmarks of ``SelfAttentionConv`` against its peers: DESIGN.md section 7, CPU rows 1-5.

Every case uses 128 input features, 4 heads of 32 channels, float32:

1. one complete graph, N=2048, forward: against ``TransformerConv`` on all N^2 explicit edges
   (self loops included).
2. one complete graph, N=32768, forward: our peak memory; ``TransformerConv`` at N=4096 is run
   under an address-space cap to see whether it runs out of memory.
3. one complete graph, N=4096, forward: against ``F.scaled_dot_product_attention`` with the same
   three projections.
4. 1024 graphs of 10-40 nodes, forward+backward: against GPSConv-style padding
   (``to_dense_batch`` + ``nn.MultiheadAttention`` with a key padding mask).
5. 64 graphs of 100-1000 nodes, forward+backward: the same peer.

The peers compute the same function as our layer: their weights come from one seeded module
(through ``SelfAttentionConv.from_transformer_conv`` / ``from_multihead_attention``), and the
largest output difference to our layer is reported. In cases 4 and 5 our layer therefore has
``out_proj=True``, as ``nn.MultiheadAttention`` has an output projection.

How it measures (Linux):

* Every measurement runs in a fresh child process, forked from a multiprocessing forkserver that
  has only imported the modules: no earlier work shapes the child's memory or threads, and no
  parent's peak leaks into its ``ru_maxrss`` (an exec'd child inherits its parent's peak).
* Time: one child per case builds all peers, calls each once (warm-up, whose outputs also
  give the agreement check), then interleaves the timed reps, rotating the order so that no peer
  always runs first, and reports the median (``time.perf_counter``). Machines are noisy: the
  load average at start and end is recorded.
* Memory: one child per (case, peer) builds the inputs, resets the kernel's peak-RSS mark,
  runs the step once and reads ``ru_maxrss``; it reports the process peak and the increase over
  the RSS just before the step. A peer expected to exhaust memory runs under ``RLIMIT_AS`` so
  that it fails with an error instead of taking the machine down.
* Forward-only cases run in eval mode under ``torch.no_grad()``; forward+backward cases
  backpropagate ``out.sum()`` into the input and every parameter, gradients cleared each rep.

Benchmarks measure, never assert: a missed target is reported as MISS.

Usage::

    python benchmarks/bench_cpu.py           # full run (minutes), writes benchmarks/results/cpu.md
    python benchmarks/bench_cpu.py --quick   # tiny sizes (seconds), prints only
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_geometric
from torch import Tensor, nn
from torch_geometric.nn import TransformerConv
from torch_geometric.utils import to_dense_batch
from tqdm import tqdm

from gatattn import SelfAttentionConv

FEATURES, HEADS, CHANNELS = 128, 4, 32
MB = 1e6
GiB = 2**30
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cpu.md"
CHILD_TIMEOUT_S = 900
CONTEXT = multiprocessing.get_context("forkserver")

Step = Callable[[], Tensor]


# --- workloads: each builder returns a step that runs the op once and returns its output ---


def inference(forward: Step) -> Step:
    def step():
        with torch.no_grad():
            return forward()

    return step


def training(forward: Step, leaves: list[Tensor]) -> Step:
    def step():
        for leaf in leaves:  # every rep allocates its gradients afresh, as after zero_grad()
            leaf.grad = None
        out = forward()
        out.sum().backward()
        return out.detach()

    return step


def node_features(num_nodes: int, requires_grad: bool = False) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(num_nodes, FEATURES, generator=gen).requires_grad_(requires_grad)


def complete_edge_index(num_nodes: int) -> Tensor:
    nodes = torch.arange(num_nodes)
    return torch.stack([nodes.repeat(num_nodes), nodes.repeat_interleave(num_nodes)])


def seeded_transformer_conv() -> TransformerConv:
    torch.manual_seed(0)
    return TransformerConv(FEATURES, CHANNELS, heads=HEADS, root_weight=False)


def ours_complete(num_nodes: int) -> Step:
    layer = SelfAttentionConv.from_transformer_conv(seeded_transformer_conv()).eval()
    x = node_features(num_nodes)
    return inference(lambda: layer(x))


def transformer_conv_complete(num_nodes: int) -> Step:
    conv = seeded_transformer_conv().eval()
    x, edge_index = node_features(num_nodes), complete_edge_index(num_nodes)
    return inference(lambda: conv(x, edge_index))


def seeded_projections() -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(FEATURES, HEADS * CHANNELS) for _ in range(3)]


def ours_with_projections(num_nodes: int) -> Step:
    layer = SelfAttentionConv(FEATURES, CHANNELS, heads=HEADS).eval()
    for lin, source in zip((layer.lin_query, layer.lin_key, layer.lin_value),
                           seeded_projections(), strict=True):
        lin.load_state_dict(source.state_dict())
    x = node_features(num_nodes)
    return inference(lambda: layer(x))


def raw_sdpa(num_nodes: int) -> Step:
    projections = seeded_projections()
    x = node_features(num_nodes)

    def forward():
        q, k, v = (lin(x).view(1, num_nodes, HEADS, CHANNELS).transpose(1, 2)
                   for lin in projections)  # (1, H, N, C)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(num_nodes, HEADS * CHANNELS)

    return inference(forward)


def graph_batch(num_graphs: int, low: int, high: int) -> tuple[Tensor, Tensor]:
    """Node features (requiring grad) and a sorted batch vector of graphs of random sizes."""
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(low, high + 1, (num_graphs,), generator=gen)
    batch = torch.arange(num_graphs).repeat_interleave(sizes)
    return node_features(batch.numel(), requires_grad=True), batch


def seeded_mha() -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(FEATURES, HEADS, batch_first=True)


def ours_batched(num_graphs: int, low: int, high: int) -> Step:
    layer = SelfAttentionConv.from_multihead_attention(seeded_mha())
    x, batch = graph_batch(num_graphs, low, high)
    return training(lambda: layer(x, batch=batch), [x, *layer.parameters()])


def padded_mha(num_graphs: int, low: int, high: int) -> Step:
    mha = seeded_mha()
    x, batch = graph_batch(num_graphs, low, high)

    def forward():
        h, mask = to_dense_batch(x, batch)  # (B, L_max, F), zero-padded
        h = mha(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
        return h[mask]

    return training(forward, [x, *mha.parameters()])


# --- cases and targets ---


@dataclass(frozen=True)
class Peer:
    name: str
    shapes: str
    build: Callable[[], Step]
    timed: bool = True
    #: Address space the memory child may add before allocations fail; None leaves it uncapped.
    cap_bytes: int | None = None


@dataclass(frozen=True)
class Target:
    label: str
    value: Callable[[CaseResult], float | None]
    higher_is_better: bool
    limit: float
    unit: str

    def verdict(self, result: CaseResult) -> tuple[str, str]:
        value = self.value(result)
        if value is None:
            return "n/a", "n/a"
        met = value >= self.limit if self.higher_is_better else value <= self.limit
        return f"{value:.3g}{self.unit}", "PASS" if met else "MISS"


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    reps: int
    peers: tuple[Peer, ...]  # peers[0] is our layer
    targets: tuple[Target, ...]


@dataclass
class CaseResult:
    timing: dict
    memory: list[dict]

    def time_ms(self, peer: int) -> float | None:
        stats = self.timing.get("peers", {}).get(str(peer))
        return stats["median_ms"] if stats else None

    def memory_mb(self, peer: int, key: str) -> float | None:
        return self.memory[peer].get(key)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def time_ratio(result: CaseResult) -> float | None:
    return ratio(result.time_ms(0), result.time_ms(1))


def memory_ratio(result: CaseResult) -> float | None:
    return ratio(result.memory_mb(0, "delta_mb"), result.memory_mb(1, "delta_mb"))


def speedup(result: CaseResult) -> float | None:
    return ratio(result.time_ms(1), result.time_ms(0))


def complete_shapes(num_nodes: int) -> str:
    return f"N={num_nodes}, F={FEATURES}, H={HEADS}, C={CHANNELS}"


def batch_shapes(num_graphs: int, low: int, high: int) -> str:
    return f"{num_graphs} graphs of {low}-{high} nodes, F={FEATURES}, H={HEADS}, C={CHANNELS}"


def complete_cases(quick: bool) -> list[Case]:
    n1, n2, n2_peer, n3 = (256, 2048, 512, 512) if quick else (2048, 32768, 4096, 4096)
    # In quick mode the cap is tiny so that the out-of-memory path is exercised too.
    cap = 64 * 2**20 if quick else 16 * GiB
    ours = "SelfAttentionConv"
    return [
        Case("1", "complete graph, forward", 2 if quick else 3, (
            Peer(ours, complete_shapes(n1), lambda: ours_complete(n1)),
            Peer("TransformerConv, N^2 edges", complete_shapes(n1) + f", E={n1 * n1}",
                 lambda: transformer_conv_complete(n1)),
        ), (Target("speed-up over TransformerConv >= 30x", speedup, True, 30, "x"),)),
        Case("2", "complete graph, forward, memory", 1, (
            Peer(ours, complete_shapes(n2), lambda: ours_complete(n2)),
            Peer("TransformerConv, N^2 edges", complete_shapes(n2_peer) + f", E={n2_peer**2}",
                 lambda: transformer_conv_complete(n2_peer), timed=False, cap_bytes=cap),
        ), (Target("our peak RSS <= 1500 MB", lambda r: r.memory_mb(0, "peak_mb"), False, 1500,
                   " MB"),)),
        Case("3", "complete graph, forward", 3 if quick else 10, (
            Peer(ours, complete_shapes(n3), lambda: ours_with_projections(n3)),
            Peer("F.scaled_dot_product_attention + projections", complete_shapes(n3),
                 lambda: raw_sdpa(n3)),
        ), (Target("time vs SDPA <= 1.15x", time_ratio, False, 1.15, "x"),)),
    ]


def batched_cases(quick: bool) -> list[Case]:
    small = (64, 10, 40) if quick else (1024, 10, 40)
    large = (8, 100, 1000) if quick else (64, 100, 1000)

    def peers(sizes):
        return (Peer("SelfAttentionConv(out_proj=True), batch=", batch_shapes(*sizes),
                     lambda: ours_batched(*sizes)),
                Peer("to_dense_batch + nn.MultiheadAttention", batch_shapes(*sizes),
                     lambda: padded_mha(*sizes)))

    return [
        Case("4", "batched small graphs, forward+backward", 3 if quick else 10,
             peers(small),
             (Target("time vs padded MHA <= 0.7x", time_ratio, False, 0.7, "x"),
              Target("memory increase vs padded MHA <= 0.7x", memory_ratio, False, 0.7, "x"))),
        Case("5", "batched large graphs, forward+backward", 2 if quick else 5,
             peers(large), (Target("time vs padded MHA <= 0.5x", time_ratio, False, 0.5, "x"),)),
    ]


def all_cases(quick: bool) -> list[Case]:
    return complete_cases(quick) + batched_cases(quick)


# --- children: timing of one case, memory of one (case, peer) ---


def time_case(case: Case) -> dict:
    steps = {i: peer.build() for i, peer in enumerate(case.peers) if peer.timed}
    outputs = {i: step() for i, step in steps.items()}  # warm-up
    samples = {i: [] for i in steps}
    order = list(steps)
    for rep in range(case.reps):
        for i in order[rep % len(order):] + order[:rep % len(order)]:
            start = time.perf_counter()
            steps[i]()
            samples[i].append((time.perf_counter() - start) * 1e3)
    reference = outputs.get(0)
    return {"threads": torch.get_num_threads(), "peers": {
        str(i): {"median_ms": statistics.median(s), "min_ms": min(s), "max_ms": max(s),
                 "reps": len(s), "max_abs_diff": _max_abs_diff(outputs[i], reference)}
        for i, s in samples.items()}}


def _max_abs_diff(out: Tensor, reference: Tensor | None) -> float | None:
    if reference is None or out is reference:
        return None
    return float((out - reference).abs().max())


def measure_memory(peer: Peer) -> dict:
    step = peer.build()
    gc.collect()
    peak_so_far = _max_rss()
    before = _statm(1)
    # Reset the peak mark so that ru_maxrss afterwards reflects the step, not input building.
    reset = _reset_peak_rss()
    cap = _cap_address_space(peer.cap_bytes) if peer.cap_bytes else None
    try:
        step()
    except (RuntimeError, MemoryError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return {"error": f"{type(error).__name__}: {message}", "cap_bytes": cap}
    peak = _max_rss()
    return {"peak_mb": max(peak, peak_so_far) / MB, "delta_mb": (peak - before) / MB,
            "peak_reset": reset}


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _statm(field: int) -> int:
    """Field 0 of /proc/self/statm is the address-space size, field 1 the RSS, in pages."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[field]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _cap_address_space(headroom: int) -> int:
    """Let the process grow by at most ``headroom`` bytes of address space (less if the machine
    has less memory available, so the capped run cannot exhaust it); returns the cap used."""
    headroom = min(headroom, _available_memory() - 2 * GiB)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_statm(0) + headroom, hard))
    return headroom


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def case_named(name: str, quick: bool) -> Case:
    return next(case for case in all_cases(quick) if case.name == name)


def timing_child(case_name: str, quick: bool) -> dict:
    return time_case(case_named(case_name, quick))


def memory_child(case_name: str, peer: int, quick: bool) -> dict:
    return measure_memory(case_named(case_name, quick).peers[peer])


# --- parent: run the children, write the tables ---


def run_child(function: Callable[..., dict], *args) -> dict:
    """``function(*args)`` in a fresh child process; an error entry if the child dies."""
    receiver, sender = CONTEXT.Pipe(duplex=False)
    process = CONTEXT.Process(target=_child_entry, args=(sender, function, args))
    process.start()
    sender.close()  # so that the receiver sees EOF if the child dies
    try:
        if not receiver.poll(CHILD_TIMEOUT_S):
            process.kill()
            return {"error": f"no result within {CHILD_TIMEOUT_S} s"}
        return receiver.recv()
    except EOFError:
        process.join()
        how = (f"killed by signal {-process.exitcode}" if process.exitcode < 0
               else f"exit code {process.exitcode}")
        return {"error": f"child process died ({how})"}
    finally:
        process.join()


def _child_entry(sender, function: Callable[..., dict], args: tuple) -> None:
    sender.send(function(*args))


def run_case(case: Case, quick: bool, bar: tqdm) -> CaseResult:
    bar.set_postfix_str(f"case {case.name}: timing")
    timing = run_child(timing_child, case.name, quick)
    memory = []
    for i, peer in enumerate(case.peers):
        bar.set_postfix_str(f"case {case.name}: memory of {peer.name}")
        memory.append(run_child(memory_child, case.name, i, quick))
    return CaseResult(timing, memory)


def fmt_time(stats: dict | None) -> str:
    if not stats:
        return "not timed"
    return (f"{stats['median_ms']:.1f} [{stats['min_ms']:.1f}-{stats['max_ms']:.1f}] "
            f"x{stats['reps']}")


def fmt_memory(memory: dict) -> tuple[str, str]:
    if "error" in memory:
        cap = memory.get("cap_bytes")
        cap_note = f"with address space capped at +{cap / GiB:.3g} GiB: " if cap else ""
        return f"failed {cap_note}{memory['error']}", "-"
    # Without the reset, the increase also covers building the inputs: an upper bound.
    bound = "" if memory["peak_reset"] else " (upper bound)"
    return f"{memory['peak_mb']:.0f}", f"{memory['delta_mb']:.0f}{bound}"


def measurement_table(cases: list[Case], results: list[CaseResult]) -> list[str]:
    lines = ["| case | peer | shapes | time ms: median [min-max] x reps | peak RSS MB "
             "| increase MB | max abs diff vs ours |", "|---|---|---|---|---|---|---|"]
    for case, result in zip(cases, results, strict=True):
        for i, peer in enumerate(case.peers):
            stats = result.timing.get("peers", {}).get(str(i))
            peak, delta = fmt_memory(result.memory[i])
            diff = stats.get("max_abs_diff") if stats else None
            lines.append(f"| {case.name}. {case.title} | {peer.name} | {peer.shapes} "
                         f"| {fmt_time(stats)} | {peak} | {delta} "
                         f"| {'-' if diff is None else f'{diff:.1e}'} |")
        if "error" in result.timing:
            lines.append(f"| {case.name}. timing | - | - | {result.timing['error']} | | | |")
    return lines


def target_table(cases: list[Case], results: list[CaseResult]) -> list[str]:
    lines = ["| case | target | measured | met |", "|---|---|---|---|"]
    for case, result in zip(cases, results, strict=True):
        for target in case.targets:
            measured, met = target.verdict(result)
            lines.append(f"| {case.name} | {target.label} | {measured} | {met} |")
    return lines


def environment(threads: int | None) -> list[str]:
    return [
        f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"torch_geometric {torch_geometric.__version__}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}), "
        f"torch threads: {threads} (default)",
        "- dtype: float32",
    ]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown"


def notes() -> list[str]:
    return [
        "Time: median over interleaved reps after one warm-up, all peers of a case in one "
        "process. Memory: a fresh process per (case, peer), forked from a server that imported "
        "torch, PyG and gatattn; peak RSS is its ru_maxrss, which counts those libraries' pages "
        "once touched (so its floor is lower than a fresh interpreter's), increase is that peak "
        "minus the RSS just before the step. Memory ratios compare increases. Max abs diff: "
        "largest output difference to our layer (peers share its weights). Forward-only cases "
        "run under torch.no_grad().",
    ]


def report(cases, results, threads, load, elapsed) -> str:
    lines = ["# CPU benchmarks (DESIGN.md section 7, rows 1-5)", "", *environment(threads),
             f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}",
             f"- total run time: {elapsed:.0f} s", "", *measurement_table(cases, results), "",
             *target_table(cases, results), "", *notes(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; print, write nothing")
    args = parser.parse_args()
    # Children start with the heavy imports done. ("__main__" itself cannot be preloaded before
    # Python 3.12: the forkserver never receives its path, so children re-run this file's
    # module level, which is cheap once these are imported.)
    CONTEXT.set_forkserver_preload(["torch", "torch_geometric", "gatattn", "tqdm"])

    cases, start, load_start = all_cases(args.quick), time.perf_counter(), os.getloadavg()[0]
    with tqdm(cases, desc="cases", unit="case") as bar:
        results = [run_case(case, args.quick, bar) for case in bar]
    threads = next((r.timing["threads"] for r in results if "threads" in r.timing), None)
    text = report(cases, results, threads, (load_start, os.getloadavg()[0]),
                  time.perf_counter() - start)
    print(text)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"written to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
