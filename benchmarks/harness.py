"""The measuring harness shared by the CPU benchmarks: peers run side by side, memory per fresh
process, results as markdown tables with the environment they were measured in.

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

A benchmark script defines ``all_cases(quick) -> list[Case]`` at module level (children look
cases up through it) and calls :func:`run_benchmark`. Benchmarks measure, never assert: a
missed target is reported as MISS.

In-process runs (:func:`run_in_process`, the GPU benchmark): a GPU is not shared with forked
children, and its timer and memory statistics are per process, so every peer of a case runs in
one process on the case's shared inputs. Each peer gives a :class:`Runner` (one step per mode,
and a correctness check against the case's reference); a peer that cannot be built is recorded
as skipped with the reason, a mode that fails as an error, and the run goes on. Results are
saved (JSON and markdown) after every case, so ``--budget-s`` can stop a run between cases and
``--resume`` measures only the cases missing from the save.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch._dynamo.config
import torch._functorch.config
import torch.utils.benchmark as benchmark
import torch_geometric
from torch import Tensor
from tqdm import tqdm

MB = 1e6
GiB = 2**30
CHILD_TIMEOUT_S = 900
REPO = Path(__file__).resolve().parents[1]
CONTEXT = multiprocessing.get_context("forkserver")

Step = Callable[[], Tensor]
CaseList = Callable[[bool], list["Case"]]


# --- workloads: a step runs the op once and returns its output ---


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


# --- cases and targets ---


@dataclass(frozen=True)
class Peer:
    name: str
    shapes: str
    #: Forked runs: ``build() -> Step``. In-process runs: ``build(setup) -> Runner``, on the
    #: inputs the case's ``setup()`` made for all its peers.
    build: Callable[..., Step | Runner]
    timed: bool = True
    #: Address space the memory child may add before allocations fail; None leaves it uncapped.
    cap_bytes: int | None = None
    #: FLOPs of one step's attention over the pairs the graphs contain (:func:`attention_flops`),
    #: the same for every peer of a case; the table shows the rate next to a large bmm's.
    flops: float | None = None


@dataclass(frozen=True)
class Target:
    label: str
    #: Of a CaseResult (forked runs) or of a saved result dict (in-process runs).
    value: Callable[[Any], float | None]
    higher_is_better: bool
    limit: float
    unit: str

    def verdict(self, result: Any) -> tuple[str, str]:
        value = self.value(result)
        if value is None:
            return "n/a", "n/a"
        met = value >= self.limit if self.higher_is_better else value <= self.limit
        return f"{value:.3g}{self.unit}", "PASS" if met else "MISS"


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    reps: int  # timed reps of forked runs (in-process runs: their timer decides)
    peers: tuple[Peer, ...]  # peers[0] is our layer (forked runs)
    targets: tuple[Target, ...]
    #: In-process runs only: the inputs all peers share, built when the case is measured ...
    setup: Callable[[], Any] | None = None
    #: ... the peer whose check every other peer's is compared with ...
    reference: Peer | None = None
    #: ... and what the saved result records about the case (sizes, FLOPs).
    info: dict = field(default_factory=dict)


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


# --- children: timing of one case, memory of one (case, peer) ---


def time_case(case: Case) -> dict:
    steps = {i: peer.build() for i, peer in enumerate(case.peers) if peer.timed}
    outputs = {i: step() for i, step in steps.items()}  # warm-up
    samples = {i: [] for i in steps}
    order = list(steps)
    # Not torch.utils.benchmark: its blocked_autorange times one statement at a time, while the
    # peers' reps interleave here so that a shared machine's drift slows them all alike.
    for rep in range(case.reps):
        for i in order[rep % len(order):] + order[:rep % len(order)]:
            start = time.perf_counter()
            steps[i]()
            samples[i].append((time.perf_counter() - start) * 1e3)
    reference = outputs.get(0)
    bmm = matmul_gflops() if any(peer.flops for peer in case.peers) else None
    return {"threads": torch.get_num_threads(), "bmm_gflops": bmm, "peers": {
        str(i): {"median_ms": statistics.median(s), "min_ms": min(s), "max_ms": max(s),
                 "reps": len(s), "max_abs_diff": _max_abs_diff(outputs[i], reference)}
        for i, s in samples.items()}}


def attention_flops(pairs: int, heads: int, channels: int, backward: bool) -> float:
    """The attention's FLOPs over ``pairs`` (target, source) pairs: ``4 * H * C`` per pair
    forward (the logit and the weighted value, a multiply and an add each), 2.5 times that
    more for the backward. Padding and masked pairs a peer computes do not count."""
    forward = 4.0 * heads * channels * pairs
    return forward * (3.5 if backward else 1.0)


def matmul_gflops(reps: int = 3) -> float:
    """GFLOP/s of a large ``torch.bmm`` (8 products of 1024 x 1024 float32 matrices) in this
    process, with its threads: the machine's matmul throughput that the attention rates are
    read against. Median of ``reps`` after one warm-up."""
    a, b = torch.randn(8, 1024, 1024), torch.randn(8, 1024, 1024)
    torch.bmm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.bmm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 8 * 1024**3 / statistics.median(times) / 1e9


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


def case_named(all_cases: CaseList, name: str, quick: bool) -> Case:
    return next(case for case in all_cases(quick) if case.name == name)


def timing_child(all_cases: CaseList, case_name: str, quick: bool) -> dict:
    return time_case(case_named(all_cases, case_name, quick))


def memory_child(all_cases: CaseList, case_name: str, peer: int, quick: bool) -> dict:
    return measure_memory(case_named(all_cases, case_name, quick).peers[peer])


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


def run_case(all_cases: CaseList, case: Case, quick: bool, bar: tqdm) -> CaseResult:
    bar.set_postfix_str(f"case {case.name}: timing")
    timing = run_child(timing_child, all_cases, case.name, quick)
    memory = []
    for i, peer in enumerate(case.peers):
        bar.set_postfix_str(f"case {case.name}: memory of {peer.name}")
        memory.append(run_child(memory_child, all_cases, case.name, i, quick))
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


def fmt_rate(peer: Peer, stats: dict | None, bmm_gflops: float | None) -> str:
    """The peer's attention GFLOP/s and its fraction of the run's large bmm."""
    if not peer.flops or not stats or not bmm_gflops:
        return "-"
    rate = peer.flops / stats["median_ms"] / 1e6
    return f"{rate:.1f} ({rate / bmm_gflops:.0%} of {bmm_gflops:.0f})"


def measurement_table(cases: list[Case], results: list[CaseResult]) -> list[str]:
    lines = ["| case | peer | shapes | time ms: median [min-max] x reps | attention GFLOP/s "
             "(of a large bmm's) | peak RSS MB | increase MB | max abs diff vs ours |",
             "|---|---|---|---|---|---|---|---|"]
    for case, result in zip(cases, results, strict=True):
        bmm = result.timing.get("bmm_gflops")
        for i, peer in enumerate(case.peers):
            stats = result.timing.get("peers", {}).get(str(i))
            peak, delta = fmt_memory(result.memory[i])
            diff = stats.get("max_abs_diff") if stats else None
            lines.append(f"| {case.name}. {case.title} | {peer.name} | {peer.shapes} "
                         f"| {fmt_time(stats)} | {fmt_rate(peer, stats, bmm)} | {peak} "
                         f"| {delta} | {'-' if diff is None else f'{diff:.1e}'} |")
        if "error" in result.timing:
            lines.append(f"| {case.name}. timing | - | - | {result.timing['error']} | | | | |")
    return lines


def target_verdicts(cases: list[Case], results: list) -> list[dict]:
    return [{"case": case.name, "target": target.label, "measured": measured, "met": met}
            for case, result in zip(cases, results, strict=True) for target in case.targets
            for measured, met in [target.verdict(result)]]


def target_table(cases: list[Case], results: list) -> list[str]:
    return table(["case", "target", "measured", "met"], [
        [row["case"], row["target"], row["measured"], row["met"]]
        for row in target_verdicts(cases, results)])[:-1]


def target_summary(verdicts: list[dict]) -> list[str]:
    """One line per target over all its cases: PASS only if every measured case met it."""
    by_target: dict[str, list[str]] = {}
    for row in verdicts:
        by_target.setdefault(row["target"], []).append(row["met"])
    rows = []
    for label, mets in by_target.items():
        measured = [met for met in mets if met != "n/a"]
        missed = measured.count("MISS")
        verdict = ("n/a" if not measured else
                   f"{'MISS' if missed else 'PASS'} ({len(measured) - missed} of "
                   f"{len(measured)} cases met)")
        rows.append([label, verdict])
    return table(["target", "verdict"], rows)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table and the blank line that ends it."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


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


def method_notes() -> list[str]:
    return [
        "Time: median over interleaved reps after one warm-up, all peers of a case in one "
        "process. Memory: a fresh process per (case, peer), forked from a server that imported "
        "torch, PyG and gatattn; peak RSS is its ru_maxrss, which counts those libraries' pages "
        "once touched (so its floor is lower than a fresh interpreter's), increase is that peak "
        "minus the RSS just before the step. Memory ratios compare increases. Max abs diff: "
        "largest output difference to our layer. Forward-only cases run under torch.no_grad(). "
        "Attention GFLOP/s: the attention's FLOPs over the pairs the graphs contain (4*H*C per "
        "pair forward, 2.5x that for the backward; padding a peer computes does not count) per "
        "median step, which also holds the projections and everything else the step runs, next "
        "to a large torch.bmm (8 products of 1024x1024 matrices) timed in the same process.",
    ]


def report(title: str, cases, results, threads, load, elapsed, extra: list[str]) -> str:
    lines = [f"# {title}", "", *environment(threads),
             f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}",
             f"- total run time: {elapsed:.0f} s", "", *measurement_table(cases, results), "",
             *target_table(cases, results), "", *extra, *method_notes(), ""]
    return "\n".join(lines)


def command_line(description: str, with_device: bool = False, *,
                 saving_to: Path | None = None, smoke: bool = False) -> argparse.Namespace:
    """``--quick`` (and ``--device`` if asked) from the command line. ``saving_to`` (the
    results folder) adds ``--out``, ``--resume`` and ``--budget-s``; ``smoke`` adds ``--smoke``.
    No abbreviations: a script may read ``--smoke`` from ``sys.argv`` before its imports."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes; print, write nothing")
    if smoke:
        size.add_argument("--smoke", action="store_true",
                          help="check the script, measure nothing: tiny cases on the CPU; "
                               "print, and write only to --out")
    if with_device:
        parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    if saving_to is not None:
        parser.add_argument("--out", type=Path, default=None,
                            help=f"folder of the .md and .json (default: {shown(saving_to)}, "
                                 "and none for --smoke)")
        parser.add_argument("--resume", action="store_true",
                            help="keep the cases already saved, measure only the missing ones")
        parser.add_argument("--budget-s", type=float, default=None,
                            help="start no new case after this many seconds (results are saved "
                                 "after every case; finish with --resume)")
    args = parser.parse_args()
    if saving_to is not None:
        _check_saving(parser, args, saving_to)
    return args


def _check_saving(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  results: Path) -> None:
    smoke = getattr(args, "smoke", False)
    if args.quick and (args.resume or args.out):
        parser.error("--quick writes nothing: no --resume, no --out")
    if smoke and args.out and is_within(args.out, results):
        parser.error(f"--smoke numbers are not measurements: give an --out outside "
                     f"{shown(results)}")
    if smoke and args.resume and not args.out:
        parser.error("--smoke writes nothing without --out, so there is nothing to resume")


def saved_path(args: argparse.Namespace, results: Path, stem: str) -> Path | None:
    """The JSON a saving run writes (its markdown goes next to it), or None if it only prints:
    ``<stem>.json`` in ``--out`` or ``results``; a smoke run's name says ``.smoke.``."""
    smoke = getattr(args, "smoke", False)
    if args.quick or (smoke and not args.out):
        return None
    return (args.out or results) / f"{stem}{'.smoke' if smoke else ''}.json"


def is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def shown(path: Path) -> Path:
    return path.relative_to(REPO) if is_within(path, REPO) else path


def run_benchmark(all_cases: CaseList, *, quick: bool, title: str, results_path: Path,
                  extra: Callable[[list[Case], list[CaseResult]], list[str]] | None = None,
                  ) -> None:
    """Run every case with a progress bar, print the report and (full runs only) write it to
    ``results_path``. ``extra`` adds script-specific lines to the report."""
    # Children start with the heavy imports done. ("__main__" itself cannot be preloaded before
    # Python 3.12: the forkserver never receives its path, so children re-run the script's
    # module level, which is cheap once these are imported.)
    CONTEXT.set_forkserver_preload(["torch", "torch_geometric", "gatattn", "tqdm", "harness"])

    cases, start, load_start = all_cases(quick), time.perf_counter(), os.getloadavg()[0]
    with tqdm(cases, desc="cases", unit="case") as bar:
        results = [run_case(all_cases, case, quick, bar) for case in bar]
    threads = next((r.timing["threads"] for r in results if "threads" in r.timing), None)
    text = report(title, cases, results, threads, (load_start, os.getloadavg()[0]),
                  time.perf_counter() - start, extra(cases, results) if extra else [])
    print(text)
    if not quick:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(text)
        print(f"written to {results_path}")


# --- in-process runs: all peers of a case in one process, results saved after every case ---


@dataclass(frozen=True)
class Runner:
    """A peer built on a case's inputs: one step per mode, and its packed output and leaf
    gradients for the correctness check."""

    steps: dict[str, Step]
    check: Callable[[], tuple[Tensor, tuple[Tensor, ...]]]
    leaves: tuple[Tensor, ...] = ()  # their gradients are set to None before every timed rep


def autograd_runner(forward: Step, leaves: Sequence[Tensor], grad_out: Tensor,
                    pack: Callable[[Tensor], Tensor] = lambda out: out) -> Runner:
    """Modes ``fwd`` (the training forward), ``bwd`` (the backward of one retained forward
    graph) and ``fwd+bwd`` of a differentiable ``forward``; ``pack`` maps its output to the
    layout of the case's reference, and ``grad_out`` is the check's upstream gradient."""
    out = forward()  # the graph that "bwd" replays; a peer that cannot run fails here
    grad = torch.randn_like(out)

    def check():
        packed = pack(forward())
        return packed.detach(), torch.autograd.grad(packed, leaves, grad_out)

    return Runner({"fwd": forward, "bwd": lambda: out.backward(grad, retain_graph=True),
                   "fwd+bwd": lambda: forward().backward(grad)}, check, tuple(leaves))


@dataclass(frozen=True)
class Timer:
    """``median_ms(step, leaves)``, and how it times, for the report."""

    median_ms: Callable[[Step, Sequence[Tensor]], float]
    note: str


def cuda_timer(warmup_ms: int, rep_ms: int) -> Timer:
    """``triton.testing.do_bench``'s median: L2 flushed and gradients set to None per rep."""
    import triton.testing

    def median_ms(step: Step, leaves: Sequence[Tensor]) -> float:
        return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms,
                                             grad_to_none=list(leaves), return_mode="median"))

    return Timer(median_ms, f"triton.testing.do_bench, median, warmup {warmup_ms} ms, "
                            f"rep {rep_ms} ms")


def host_timer(min_run_time_s: float) -> Timer:
    """``torch.utils.benchmark``'s ``blocked_autorange`` median: its own warm-up and block size,
    run for at least ``min_run_time_s`` at the thread count the run set; the gradients are set
    to None before each step as do_bench does (a few microseconds, inside the timed block)."""
    def median_ms(step: Step, leaves: Sequence[Tensor]) -> float:
        def run() -> None:
            for leaf in leaves:
                leaf.grad = None
            step()

        timer = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time_s).median * 1e3

    return Timer(median_ms, f"torch.utils.benchmark blocked_autorange, median, min run time "
                            f"{min_run_time_s:g} s, {torch.get_num_threads()} threads")


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: no CUDA device (torch {torch.__version__}, built with CUDA "
                         f"{torch.version.cuda}; torch.cuda.is_available() is False); nothing "
                         "was measured.")


def allow_compiled_peers() -> None:
    """Every case has new shapes, so a torch.compile'd peer recompiles per case: past dynamo's
    recompile limits it would silently fall back to eager. And the ``bwd`` mode replays one
    compiled backward (retain_graph=True), which donated buffers forbid."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 10_000)
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False


class DeviceBroken(RuntimeError):
    """The CUDA context is unusable (e.g. after an illegal memory access): stop measuring."""


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    # torch.compile's errors open with a generic line ("Observed exception") and name the
    # exception raised in the compiled code further down.
    cause = [line.strip() for line in lines if line.strip().startswith("Developer debug context")]
    return f"{type(error).__name__}: {'; '.join([lines[0], *cause[:1]])}"[:300]


def recover(device: torch.device) -> None:
    """Surface a failed step's queued CUDA errors and free its memory before the next peer."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except RuntimeError as error:
        raise DeviceBroken(first_line(error)) from error


def build_runner(peer: Peer, setup: Any) -> tuple[Runner | None, str]:
    """The peer's runner, or None and why it cannot run (SDPA explains itself in warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return peer.build(setup), ""
        except Exception as error:
            said = dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught
                                 if str(w.message).strip())
            return None, "; ".join([first_line(error), *list(said)[:4]])


def check_against(runner: Runner, reference: tuple | None, device: torch.device) -> dict:
    """Max abs differences of output and input gradients to the reference's; on CUDA also the
    peak memory the check (one forward and backward) allocated above what was live."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    out, grads = runner.check()
    entry = {}
    if device.type == "cuda":
        entry["check_peak_mb"] = (torch.cuda.max_memory_allocated() - before) / MB
    if reference is not None:
        entry["max_abs_diff_out"] = max_abs_diff(out, reference[0])
        entry["max_abs_diff_grad"] = max(max_abs_diff(g, r)
                                         for g, r in zip(grads, reference[1], strict=True))
    return entry


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def measure_peer(peer: Peer, setup: Any, reference: tuple | None, timer: Timer,
                 device: torch.device) -> dict:
    """``{"skipped": why}``, or the median ms of every mode that ran, the errors of those that
    did not, and the correctness check."""
    runner, reason = build_runner(peer, setup)
    if runner is None:
        recover(device)
        return {"skipped": reason}
    entry = {"ms": {}, "errors": {}}
    try:
        entry.update(check_against(runner, reference, device))
    except Exception as error:
        entry["errors"]["check"] = first_line(error)
        recover(device)
    for mode, step in runner.steps.items():
        try:
            entry["ms"][mode] = timer.median_ms(step, runner.leaves)
        except Exception as error:
            entry["errors"][mode] = first_line(error)
            recover(device)
    return entry


def measure_in_process(case: Case, timer: Timer, device: torch.device, bar: tqdm) -> dict:
    setup = case.setup()
    result = {"label": case.title, "info": case.info, "peers": {},
              "reference": case.reference.name if case.reference else None}
    reference = None
    if case.reference is not None:
        try:
            reference = case.reference.build(setup).check()
        except Exception as error:
            result["reference_error"] = first_line(error)
            recover(device)
    for peer in case.peers:
        bar.set_postfix_str(f"{case.title}: {peer.name}")
        result["peers"][peer.name] = measure_peer(peer, setup, reference, timer, device)
        bar.update()
    del setup, reference
    recover(device)
    return result


def mode_ms(result: dict, peer: str, mode: str) -> float | None:
    return result["peers"].get(peer, {}).get("ms", {}).get(mode)


def mode_speedup(ours: str, anchor: str, mode: str) -> Callable[[dict], float | None]:
    """A Target value: the anchor's time over ours in ``mode`` (higher is better)."""
    return lambda result: ratio(mode_ms(result, anchor, mode), mode_ms(result, ours, mode))


# --- in-process runs: saving, resuming, the report ---


def run_in_process(cases: list[Case], *, title: str, timer: Timer, device: torch.device,
                   env: dict, path: Path | None, resume: bool = False,
                   budget_s: float | None = None,
                   sections: Callable[[list[Case], list[dict]], list[str]] = lambda c, r: [],
                   method: Sequence[str] = (),
                   refresh_env: Callable[[dict], None] = lambda env: None) -> bool:
    """Measures the cases not yet in ``path`` (all of them unless ``resume``), saving after
    every case; stops starting cases after ``budget_s``. Prints the report; returns False if
    the device broke (the report says where)."""
    allow_compiled_peers()
    runs, results = load_saved(path) if resume and path else ([], [])
    env = {**env, "run_time_s": 0.0, "stopped": ""}
    runs.append(env)
    done, start, broken = {r["key"] for r in results}, time.perf_counter(), False

    def save_now() -> str:
        env["run_time_s"] = time.perf_counter() - start
        refresh_env(env)
        text, payload = render(title, cases, runs, results, sections, method)
        if path is not None:
            save(path, text, payload)
        return text

    todo = [case for case in cases if case.name not in done]
    with tqdm(total=sum(len(case.peers) for case in todo), unit="peer") as bar:
        for count, case in enumerate(todo):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                env["stopped"] = (f"time budget of {budget_s:.0f} s reached with "
                                  f"{len(todo) - count} case(s) left; rerun with --resume")
                break
            try:
                result = measure_in_process(case, timer, device, bar)
            except DeviceBroken as error:
                env["stopped"], broken = f"at {case.title}: the CUDA context broke ({error})", True
                break
            results.append({**result, "key": case.name, "run": len(runs) - 1})
            save_now()
    print(save_now())
    if path is not None:
        print(f"written to {shown(path.with_suffix('.md'))} and {path.name}")
    return not broken


def load_saved(path: Path) -> tuple[list[dict], list[dict]]:
    """Runs and case results of an earlier (partial) run saved to ``path``."""
    if not path.exists():
        return [], []
    saved = json.loads(path.read_text())
    return saved["runs"], saved["results"]


def save(path: Path, text: str, payload: dict) -> None:
    """Writes the JSON and the markdown next to it; each replaces its file in one step, so a
    run killed mid-way leaves the previous complete files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, content in ((path, json.dumps(payload, indent=1) + "\n"),
                            (path.with_suffix(".md"), text)):
        partial = target.with_name(target.name + ".partial")
        partial.write_text(content)
        os.replace(partial, target)


def render(title: str, cases: list[Case], runs: list[dict], results: list[dict],
           sections: Callable[[list[Case], list[dict]], list[str]],
           method: Sequence[str]) -> tuple[str, dict]:
    """The markdown report and the JSON payload, cases in their listed order."""
    by_key = {r["key"]: r for r in results}
    measured = [case for case in cases if case.name in by_key]
    ordered = [by_key[case.name] for case in measured]
    verdicts = target_verdicts(measured, ordered)
    lines = [f"# {title}", ""]
    for i, env in enumerate(runs):
        if len(runs) > 1:  # blank lines: a line right after a list item would continue it
            lines += [f"Run {i} (cases marked run={i} in the JSON):", ""]
        lines += [*run_lines(env), ""]
    if len(measured) < len(cases):
        lines += [f"- INCOMPLETE: {len(cases) - len(measured)} case(s) not measured yet "
                  "(rerun with --resume)", ""]
    lines += ["## Targets", "", *target_summary(verdicts), *table(
        ["case", "target", "measured", "met"],
        [[v["case"], v["target"], v["measured"], v["met"]] for v in verdicts]),
              *sections(measured, ordered),
              "## Correctness (once per case, before timing)", "", *correctness_table(ordered),
              "## Skipped or failed", "", *failure_notes(ordered), "",
              "## Method", "", *(f"- {line}" for line in method), ""]
    return "\n".join(lines), {"runs": runs, "targets": verdicts, "results": ordered}


def peer_table(lead: list[str], rows: list[tuple[list[str], dict, str]], peers: list[str],
               show: Callable[[dict, str, float], str]) -> list[str]:
    """One row per (lead cells, result, mode), one column per peer: ``show(result, mode, ms)``,
    or skip / error / - where the peer did not run."""
    def cell(result: dict, peer: str, mode: str) -> str:
        entry = result["peers"].get(peer, {})
        if "skipped" in entry:
            return "skip"
        if mode in entry.get("errors", {}):
            return "error"
        ms = entry.get("ms", {}).get(mode)
        return "-" if ms is None else show(result, mode, ms)

    return table([*lead, *peers], [[*cells, *(cell(result, p, mode) for p in peers)]
                                   for cells, result, mode in rows])


def correctness_table(results: list[dict]) -> list[str]:
    rows = [[r["label"], name, r["reference"], f"{entry['max_abs_diff_out']:.1e}",
             f"{entry['max_abs_diff_grad']:.1e}"]
            for r in results for name, entry in r["peers"].items()
            if "max_abs_diff_out" in entry]
    return table(["case", "peer", "reference", "max abs diff out", "max abs diff grads"], rows)


def failure_notes(results: list[dict]) -> list[str]:
    """Each distinct (peer, reason) once, with the cases it hit."""
    hits: dict[tuple[str, str, str], list[str]] = {}
    for r in results:
        if "reference_error" in r:
            hits.setdefault((r["reference"], "reference", r["reference_error"]), []).append(
                r["label"])
        for name, entry in r["peers"].items():
            failures = {"all modes": entry["skipped"]} if "skipped" in entry else entry["errors"]
            for what, reason in failures.items():
                hits.setdefault((name, what, reason), []).append(r["label"])
    lines = []
    for (name, what, reason), labels in hits.items():
        more = f"; and {len(labels) - 3} more" if len(labels) > 3 else ""
        lines.append(f"- {name} ({what}), {len(labels)} case(s) [{'; '.join(labels[:3])}{more}]: "
                     f"{reason}")
    return lines or ["- none"]


# --- in-process runs: the environment ---


def device_environment(device: torch.device, dtype: torch.dtype, timer: Timer,
                       **flags: bool) -> dict:
    """What a saved run records about where and how it was measured."""
    import triton

    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        **(gpu_description() if device.type == "cuda" else cpu_description()),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__, "torch_geometric": torch_geometric.__version__,
        "gatattn_commit": git_commit(), "dtype": str(dtype).removeprefix("torch."),
        "timer": timer.note, **flags,
    }


def gpu_description() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": torch.cuda.get_device_name(), "capability": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / GiB, 1), "nvidia_smi": nvidia_smi()}


def cpu_description() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"device": cpu_model(), "capability": f"CPU, {os.cpu_count()} cores",
            "memory_gib": round(memory / GiB, 1), "nvidia_smi": "not queried (CPU run)"}


def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,power.limit,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30, check=True)
        return "; ".join(line.strip() for line in done.stdout.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable ({first_line(error)})"


def git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                              capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    return "unknown"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_lines(env: dict) -> list[str]:
    flags = "".join(f" (--{name})" for name in ("quick", "smoke") if env.get(name))
    lines = [
        f"- date: {env['date']}",
        f"- device: {env['device']} ({env['capability']}, {env['memory_gib']} GiB); "
        f"nvidia-smi name, power limit, driver: {env['nvidia_smi']}",
        f"- python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN "
        f"{env['cudnn']}), triton {env['triton']}, torch_geometric {env['torch_geometric']}, "
        f"gatattn {env['gatattn_commit']}",
        f"- dtype: {env['dtype']}; time: {env['timer']}",
        f"- total run time: {env['run_time_s']:.0f} s{flags}",
    ]
    if env["stopped"]:
        lines.append(f"- stopped early: {env['stopped']}")
    return lines + [f"- {note}" for note in env.get("notes", [])]
