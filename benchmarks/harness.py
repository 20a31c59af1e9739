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
import torch_geometric
from torch import Tensor
from tqdm import tqdm

MB = 1e6
GiB = 2**30
CHILD_TIMEOUT_S = 900
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


def method_notes() -> list[str]:
    return [
        "Time: median over interleaved reps after one warm-up, all peers of a case in one "
        "process. Memory: a fresh process per (case, peer), forked from a server that imported "
        "torch, PyG and gatattn; peak RSS is its ru_maxrss, which counts those libraries' pages "
        "once touched (so its floor is lower than a fresh interpreter's), increase is that peak "
        "minus the RSS just before the step. Memory ratios compare increases. Max abs diff: "
        "largest output difference to our layer. Forward-only cases run under torch.no_grad().",
    ]


def report(title: str, cases, results, threads, load, elapsed, extra: list[str]) -> str:
    lines = [f"# {title}", "", *environment(threads),
             f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}",
             f"- total run time: {elapsed:.0f} s", "", *measurement_table(cases, results), "",
             *target_table(cases, results), "", *extra, *method_notes(), ""]
    return "\n".join(lines)


def command_line(description: str, with_device: bool = False) -> argparse.Namespace:
    """``--quick`` (and ``--device`` if asked) from the command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes; print, write nothing")
    if with_device:
        parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return parser.parse_args()


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
