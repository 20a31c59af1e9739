"""GPU benchmarks of the fused Triton attention against its peers: DESIGN.md section 7, GPU rows.

Everything runs in bfloat16 on one CUDA device, all peers of a case in the same process.

1. Equal-length segments, as the FlashAttention papers measure: C in {64, 128} channels per head
   with H = 2048 / C heads, segment length N from 512 to 16k, 16k tokens in all (batch
   16384 / N), causal and not. Peers: SDPA's flash, memory-efficient and cuDNN backends, each
   forced with ``sdpa_kernel`` (one that raises is skipped, and the reason, with SDPA's own
   warnings, is reported); FlexAttention compiled with ``torch.compile`` (no mask, or a causal
   BlockMask); ours through ``gatattn.attention(..., ptr=, backend="triton")``; and the kernels'
   launchers called directly, so that the gap between the two is gatattn's host-side work
   (validation, segment plan, cu_seqlens).
2. Batched graphs of 10-1000 nodes (H=8, C=64), attention core on packed ``(nodes, H, C)``
   tensors: padded SDPA (``to_dense_batch`` + a boolean key mask, then unpadding);
   FlexAttention with a document mask over the packed rows, its BlockMask built once, and
   rebuilt on every call as a new batch of graphs would need; ours (API and launchers).
3. The same batches as a layer: GPSConv-style ``to_dense_batch`` + ``nn.MultiheadAttention``
   with ``key_padding_mask`` against the same MHA's weights used as in_proj ->
   ``gatattn.attention`` -> out_proj.

How it measures:

* Modes: ``fwd`` is the training forward (inputs require grad, as FlashAttention's benchmark
  does); ``bwd`` replays the backward of one retained forward graph; ``fwd+bwd`` runs both. The
  launchers peer calls ``flash_attention_forward`` / ``flash_attention_backward`` directly.
* Time: median of ``triton.testing.do_bench`` (L2 flushed and gradients set to None before every
  rep). Compilation (Triton, torch.compile, BlockMask) happens in untimed first calls. The
  padded peers get the batch size and the largest graph size as host ints (their best case).
* FLOPs: forward ``4 * N^2 * C`` per head and segment (halved when causal), summed over
  segments; backward 2.5x, forward+backward 3.5x. Padded peers are credited with the same
  useful FLOPs, so theirs is an effective throughput.
* Correctness, once per case before timing: max abs difference of the output and of all input
  gradients (one shared upstream gradient) to a reference: SDPA with its default dispatch
  (segments), gatattn's SDPA route, one SDPA call per graph size and no padding (graphs), padded
  ``nn.MultiheadAttention`` (layers).
* Targets: ratios of medians against DESIGN.md section 7, PASS or MISS as measured; a ratio
  needing a peer that did not run is n/a.
* Results are saved after every case; ``--resume`` measures only the cases missing from the
  saved file (after ``--budget-s`` or a cut-off run). A case's peers are always measured
  together in one run, so every ratio compares one run; the report lists every run's device,
  versions and date.

Not measured: FlexAttention's recompilation when graph sizes change from batch to batch (it is
compiled with ``dynamic=False``, once per case); memory.

Usage::

    python benchmarks/bench_gpu.py          # full run; writes benchmarks/results/gpu-<device>.md
                                            # and .json next to it
    python benchmarks/bench_gpu.py --quick  # a few small cases (about 2 min), prints only
    python benchmarks/bench_gpu.py --budget-s 480            # part of the run, saved per case;
    python benchmarks/bench_gpu.py --resume --budget-s 480   # then the rest, until complete
    python benchmarks/bench_gpu.py --out DIR     # write gpu-<device>.md and .json into DIR
    python benchmarks/bench_gpu.py --smoke [--out DIR]  # CI check of the script, not a
                                            # measurement: tiny cases on the CPU in float32,
                                            # Triton's interpreter, a perf_counter timer;
                                            # prints (and writes smoke-<cpu>.* only to --out)

``--smoke`` runs every step of a real run (cases, peers, correctness check, timing loop,
targets, report, save) so that CI catches a broken script before GPU time is spent on it. Peers
the CPU lacks fail the way an unavailable peer fails on a GPU, into "Skipped or failed": SDPA's
efficient and cuDNN backends, and FlexAttention (no backward on the CPU; its block masks are
still compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# --smoke runs the kernels in Triton's CPU interpreter, which Triton chooses when a kernel is
# decorated, that is when gatattn's kernels are imported below: so the flag is read here, before
# argparse (whose allow_abbrev=False keeps this reading and its own the same).
if "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch._dynamo.config
import torch._functorch.config
import torch.nn.functional as F
import torch_geometric
import triton
import triton.testing
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention
from torch_geometric.utils import to_dense_batch
from tqdm import tqdm

import gatattn
from gatattn.kernels.flash_attention import tuned_configs

SMOKE = "--smoke" in sys.argv[1:]  # as read before the imports
# A real run times bfloat16 on the GPU. The smoke run takes float32 on the CPU: Triton 3.9's
# interpreter miscomputes bfloat16 tl.dot (see tests/test_kernels.py), and exact float32 makes
# the smoke run's correctness table a real check of every peer's layouts.
DEVICE = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float32 if SMOKE else torch.bfloat16
HIDDEN = 2048  # H * C: 16 heads at C=128, 32 at C=64
TOTAL_TOKENS = 16384
CHANNELS = (64, 128)
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
GRAPH_HEADS, GRAPH_CHANNELS = 8, 64
GRAPH_BATCHES = ((1024, 10, 40), (64, 100, 1000), (256, 10, 1000))  # (graphs, min, max nodes)
MODES = ("fwd", "bwd", "fwd+bwd")
SMOKE_REPS = 3  # timed runs per mode in --smoke: its numbers mean nothing, so few
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

SMOKE_BANNER = "SMOKE RUN (CPU, Triton interpreter): numbers are not measurements"

SDPA_FLASH, SDPA_EFFICIENT, SDPA_CUDNN = "SDPA flash", "SDPA efficient", "SDPA cuDNN"
FLEX, FLEX_DOC, FLEX_DOC_REBUILT = "Flex", "Flex doc mask", "Flex doc mask, rebuilt per call"
PADDED_SDPA, PADDED_MHA = "padded SDPA", "padded nn.MultiheadAttention"
OURS, LAUNCHERS = "gatattn.attention (triton)", "kernel launchers"
OURS_LAYER = "projections + gatattn.attention (triton)"


# --- cases ---


@dataclass(frozen=True)
class Case:
    group: str  # "segments", "graphs" (attention core) or "layer"
    heads: int
    channels: int
    lengths: tuple[int, ...]  # rows of each segment (graph)
    causal: bool = False
    graphs: str = ""  # how the graph batch was drawn

    @property
    def label(self) -> str:
        if self.group == "segments":
            kind = "causal" if self.causal else "non-causal"
            return f"C={self.channels}, {kind}, N={self.lengths[0]} x{len(self.lengths)}"
        return f"{self.graphs}, H={self.heads}, C={self.channels}"

    @property
    def key(self) -> str:
        return f"{self.group}: {self.label}"

    def flops(self, mode: str) -> float:
        per_head = sum(4 * n * n * self.channels for n in self.lengths)
        return per_head * self.heads * (0.5 if self.causal else 1.0) * FLOP_FACTOR[mode]


def segment_cases(size: str) -> list[Case]:
    """Cases of a run of ``size``: "full", "quick" or "smoke"."""
    hidden, channels, lengths, total = {
        "full": (HIDDEN, CHANNELS, LENGTHS, TOTAL_TOKENS),
        "quick": (HIDDEN, (128,), (4096,), 8192),
        "smoke": (32, (16,), (32, 64), 64),  # H=2; a few of the interpreter's 16-row tiles
    }[size]
    return [Case("segments", hidden // c, c, (n,) * (total // n), causal)
            for c in channels for causal in (False, True) for n in lengths]


def graph_cases(size: str) -> list[Case]:
    heads, channels, batches = {
        "full": (GRAPH_HEADS, GRAPH_CHANNELS, GRAPH_BATCHES),
        "quick": (GRAPH_HEADS, GRAPH_CHANNELS, ((32, 10, 1000),)),
        "smoke": (2, 16, ((4, 5, 40),)),
    }[size]
    cases = []
    for count, low, high in batches:
        gen = torch.Generator().manual_seed(2)
        sizes = tuple(torch.randint(low, high + 1, (count,), generator=gen).tolist())
        drawn = f"{count} graphs of {low}-{high} nodes ({sum(sizes)} nodes)"
        cases += [Case(group, heads, channels, sizes, graphs=drawn)
                  for group in ("graphs", "layer")]
    return cases


# --- inputs ---


@dataclass
class Setup:
    """What all peers of one case share."""

    case: Case
    leaves: tuple[Tensor, ...]  # gradients flow to these: (q, k, v), or (x, *MHA parameters)
    grad_out: Tensor  # upstream gradient of the correctness check, packed like the output
    ptr: Tensor  # (B + 1,) int64 segment offsets, as PyG's Batch.ptr
    cu_seqlens: Tensor  # the same offsets in int32, for the launchers
    batch: Tensor  # (total,) segment id of every row
    scale: float
    document: Callable  # FlexAttention mask_mod: same graph; one object, so Flex compiles once
    mha: nn.MultiheadAttention | None = None


def make_setup(case: Case) -> Setup:
    torch.manual_seed(0)
    device, H, C = DEVICE, case.heads, case.channels
    lengths = torch.tensor(case.lengths, device=device)
    ptr = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    batch = torch.repeat_interleave(torch.arange(len(case.lengths), device=device), lengths)
    total = sum(case.lengths)
    shared = dict(ptr=ptr, cu_seqlens=ptr.to(torch.int32), batch=batch, scale=C**-0.5,
                  document=document_mask(batch))
    if case.group == "layer":
        mha = nn.MultiheadAttention(H * C, H, batch_first=True, device=device, dtype=DTYPE)
        x = torch.randn(total, H * C, device=device, dtype=DTYPE, requires_grad=True)
        return Setup(case, (x, *mha.parameters()), torch.randn_like(x), mha=mha, **shared)
    q, k, v = (torch.randn(total, H, C, device=device, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    return Setup(case, (q, k, v), torch.randn_like(q), **shared)


# --- peers: each builder returns the timed steps of one peer on one case ---


Step = Callable[[], object]


@dataclass(frozen=True)
class Runner:
    steps: dict[str, Step]  # mode -> one run of it
    check: Callable[[], tuple[Tensor, tuple[Tensor, ...]]]  # packed output, leaf gradients


def autograd_runner(setup: Setup, forward: Callable[[], Tensor],
                    pack: Callable[[Tensor], Tensor] = lambda out: out) -> Runner:
    """Steps of a differentiable ``forward``; ``pack`` maps its output to the packed layout."""
    out = forward()  # the graph that the backward mode replays; a peer that cannot run fails here
    grad = torch.randn_like(out)

    def check():
        packed = pack(forward())
        return packed.detach(), torch.autograd.grad(packed, setup.leaves, setup.grad_out)

    return Runner({"fwd": forward,
                   "bwd": lambda: out.backward(grad, retain_graph=True),
                   "fwd+bwd": lambda: forward().backward(grad)}, check)


def as_batches(setup: Setup, t: Tensor) -> Tensor:
    """Packed ``(B * N, H, C)`` of equal segments -> a ``(B, H, N, C)`` view."""
    return t.view(-1, setup.case.lengths[0], *t.shape[1:]).transpose(1, 2)


def from_batches(out: Tensor) -> Tensor:
    return out.transpose(1, 2).flatten(0, 1)  # (B, H, N, C) -> (B * N, H, C)


def sdpa_segments(backend: SDPBackend | None):
    def build(setup: Setup) -> Runner:
        def forward():
            q, k, v = (as_batches(setup, t) for t in setup.leaves)
            with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=setup.case.causal,
                                                      scale=setup.scale)

        return autograd_runner(setup, forward, from_batches)

    return build


@functools.cache
def compiled(fn: Callable, fullgraph: bool = False) -> Callable:
    # One static compile per shape: dynamic shapes would trade Flex speed for fewer compiles.
    return torch.compile(fn, dynamic=False, fullgraph=fullgraph)


def flex(*args, **kwargs) -> Tensor:
    # fullgraph: a graph break would silently run the unfused eager FlexAttention instead.
    return compiled(flex_attention, fullgraph=True)(*args, **kwargs)


def block_mask_of(mask_mod: Callable, length: int):
    # Compiled, so that the mask is never materialised as length x length booleans.
    return compiled(create_block_mask)(mask_mod, None, None, length, length, device=DEVICE)


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def document_mask(batch: Tensor) -> Callable:
    def same_graph(b, h, q_idx, kv_idx):
        return batch[q_idx] == batch[kv_idx]

    return same_graph


def flex_segments(setup: Setup) -> Runner:
    n = setup.case.lengths[0]
    mask = block_mask_of(causal_mask, n) if setup.case.causal else None

    def forward():
        q, k, v = (as_batches(setup, t) for t in setup.leaves)
        return flex(q, k, v, block_mask=mask, scale=setup.scale)

    return autograd_runner(setup, forward, from_batches)


def flex_documents(rebuild: bool):
    def build(setup: Setup) -> Runner:
        total, mask_mod = setup.batch.numel(), setup.document
        if setup.case.causal:
            mask_mod = and_masks(causal_mask, mask_mod)
        fixed = block_mask_of(mask_mod, total)

        def forward():
            q, k, v = (t.unsqueeze(0).transpose(1, 2) for t in setup.leaves)  # (1, H, total, C)
            mask = block_mask_of(mask_mod, total) if rebuild else fixed
            return flex(q, k, v, block_mask=mask, scale=setup.scale)

        return autograd_runner(setup, forward, lambda out: out[0].transpose(0, 1))

    return build


def padded_sdpa(setup: Setup) -> Runner:
    if setup.case.causal:
        raise ValueError("the padded peer here is non-causal only")
    count, longest = len(setup.case.lengths), max(setup.case.lengths)
    H, C = setup.case.heads, setup.case.channels

    def forward():
        dense = [to_dense_batch(t.flatten(1), setup.batch, batch_size=count, max_num_nodes=longest)
                 for t in setup.leaves]  # (B, L, H * C) each, zero-padded
        mask = dense[0][1]  # (B, L), True on real nodes
        q, k, v = (h.unflatten(-1, (H, C)).transpose(1, 2) for h, _ in dense)  # (B, H, L, C)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                             scale=setup.scale)
        return out.transpose(1, 2)[mask]  # (total, H, C)

    return autograd_runner(setup, forward)


def ours_api(setup: Setup) -> Runner:
    return autograd_runner(setup, lambda: gatattn.attention(
        *setup.leaves, ptr=setup.ptr, causal=setup.case.causal, backend="triton"))


def gatattn_sdpa(setup: Setup) -> Runner:
    return autograd_runner(setup, lambda: gatattn.attention(
        *setup.leaves, ptr=setup.ptr, causal=setup.case.causal, backend="sdpa"))


def launchers(setup: Setup) -> Runner:
    from gatattn.kernels.flash_attention import flash_attention_backward, flash_attention_forward

    q, k, v = (t.detach() for t in setup.leaves)
    args = (setup.cu_seqlens, setup.cu_seqlens, setup.scale, setup.case.causal)

    def forward():
        return flash_attention_forward(q, k, v, *args)

    def backward(grad, out, lse):
        return flash_attention_backward(grad, q, k, v, out, lse, *args)

    out, lse = forward()
    grad = torch.randn_like(out)

    def check():
        out, lse = forward()
        return out, backward(setup.grad_out, out, lse)

    return Runner({"fwd": forward, "bwd": lambda: backward(grad, out, lse),
                   "fwd+bwd": lambda: backward(grad, *forward())}, check)


def padded_mha(setup: Setup) -> Runner:
    count, longest = len(setup.case.lengths), max(setup.case.lengths)
    x, mha = setup.leaves[0], setup.mha

    def forward():
        h, mask = to_dense_batch(x, setup.batch, batch_size=count, max_num_nodes=longest)
        return mha(h, h, h, key_padding_mask=~mask, need_weights=False)[0][mask]

    return autograd_runner(setup, forward)


def ours_layer(setup: Setup) -> Runner:
    x, mha, H, C = setup.leaves[0], setup.mha, setup.case.heads, setup.case.channels

    def forward():
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(-1, 3, H, C).unbind(1)
        return mha.out_proj(gatattn.attention(q, k, v, ptr=setup.ptr, backend="triton").flatten(1))

    return autograd_runner(setup, forward)


PEERS: dict[str, tuple[tuple[str, Callable[[Setup], Runner]], ...]] = {
    "segments": ((SDPA_FLASH, sdpa_segments(SDPBackend.FLASH_ATTENTION)),
                 (SDPA_EFFICIENT, sdpa_segments(SDPBackend.EFFICIENT_ATTENTION)),
                 (SDPA_CUDNN, sdpa_segments(SDPBackend.CUDNN_ATTENTION)),
                 (FLEX, flex_segments), (OURS, ours_api), (LAUNCHERS, launchers)),
    "graphs": ((PADDED_SDPA, padded_sdpa), (FLEX_DOC, flex_documents(rebuild=False)),
               (FLEX_DOC_REBUILT, flex_documents(rebuild=True)), (OURS, ours_api),
               (LAUNCHERS, launchers)),
    "layer": ((PADDED_MHA, padded_mha), (OURS_LAYER, ours_layer)),
}
REFERENCES = {
    "segments": ("SDPA, default dispatch", sdpa_segments(None)),
    "graphs": ("gatattn SDPA route (one SDPA call per graph size, no padding)", gatattn_sdpa),
    "layer": (PADDED_MHA, padded_mha),
}


# --- measuring ---


class DeviceBroken(RuntimeError):
    """The CUDA context is unusable (e.g. after an illegal memory access): stop measuring."""


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    # torch.compile's errors open with a generic line ("Observed exception") and name the
    # exception raised in the compiled code further down.
    cause = [line.strip() for line in lines if line.strip().startswith("Developer debug context")]
    return f"{type(error).__name__}: {'; '.join([lines[0], *cause[:1]])}"[:300]


def recover() -> None:
    if DEVICE.type != "cuda":
        return  # the CPU has no queued work to surface errors from, and no cache to empty
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except RuntimeError as error:
        raise DeviceBroken(first_line(error)) from error


def build_runner(build: Callable[[Setup], Runner], setup: Setup) -> tuple[Runner | None, str]:
    """The peer's runner, or None and why it cannot run (SDPA explains itself in warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return build(setup), ""
        except Exception as error:
            said = dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught
                                 if str(w.message).strip())
            return None, "; ".join([first_line(error), *list(said)[:4]])


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def bench_times(quick: bool) -> tuple[int, int]:
    return (10, 40) if quick else (25, 100)  # do_bench warm-up and measuring time, ms


def timer_note(quick: bool) -> str:
    if SMOKE:
        return f"time.perf_counter, median of {SMOKE_REPS} reps (smoke run: do_bench needs a GPU)"
    return "triton.testing.do_bench, median, warmup {} ms, rep {} ms".format(*bench_times(quick))


def bench(step: Step, setup: Setup, quick: bool) -> float:
    if SMOKE:
        return smoke_bench(step, setup)
    warmup, rep = bench_times(quick)
    return float(triton.testing.do_bench(step, warmup=warmup, rep=rep,
                                         grad_to_none=list(setup.leaves), return_mode="median"))


def smoke_bench(step: Step, setup: Setup) -> float:
    """Median ms of a few CPU reps, gradients set to None before each as do_bench does; no
    warm-up, as the correctness check has already run every kernel once."""
    times = []
    for _ in range(SMOKE_REPS):
        for leaf in setup.leaves:
            leaf.grad = None
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check_against(runner: Runner, reference: tuple | None) -> dict:
    out, grads = runner.check()
    if reference is None:
        return {}
    return {"max_abs_diff_out": max_abs_diff(out, reference[0]),
            "max_abs_diff_grad": max(max_abs_diff(g, r)
                                     for g, r in zip(grads, reference[1], strict=True))}


def measure_peer(build: Callable[[Setup], Runner], setup: Setup, reference: tuple | None,
                 quick: bool) -> dict:
    runner, reason = build_runner(build, setup)
    if runner is None:
        recover()
        return {"skipped": reason}
    entry = {"ms": {}, "errors": {}}
    try:
        entry.update(check_against(runner, reference))
    except Exception as error:
        entry["errors"]["check"] = first_line(error)
        recover()
    for mode, step in runner.steps.items():
        try:
            entry["ms"][mode] = bench(step, setup, quick)
        except Exception as error:
            entry["errors"][mode] = first_line(error)
            recover()
    return entry


def measure_case(case: Case, quick: bool, bar: tqdm) -> dict:
    setup = make_setup(case)
    ref_name, ref_build = REFERENCES[case.group]
    result = {"label": case.label, "case": dataclasses.asdict(case),
              "flops_fwd": case.flops("fwd"), "reference": ref_name, "peers": {}}
    try:
        reference = ref_build(setup).check()
    except Exception as error:
        reference, result["reference_error"] = None, first_line(error)
        recover()
    for name, build in PEERS[case.group]:
        bar.set_postfix_str(f"{case.label}: {name}")
        result["peers"][name] = measure_peer(build, setup, reference, quick)
        bar.update()
    del setup, reference
    recover()
    return result


def run_all(cases: list[Case], quick: bool, run: int, budget_s: float | None,
            after_case: Callable[[dict], None]) -> tuple[str, bool]:
    """Measures ``cases`` in order, handing each result to ``after_case``; returns why the run
    stopped early ("" if it did not) and whether the device broke."""
    start = time.perf_counter()
    with tqdm(total=sum(len(PEERS[c.group]) for c in cases), unit="peer") as bar:
        for done, case in enumerate(cases):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                return (f"time budget of {budget_s:.0f} s reached with {len(cases) - done} "
                        "case(s) left; rerun with --resume to measure them"), False
            try:
                after_case({**measure_case(case, quick, bar), "key": case.key, "run": run})
            except DeviceBroken as error:
                return f"stopped at {case.label}: the CUDA context broke ({error})", True
    return "", False


# --- targets (DESIGN.md section 7, GPU rows) ---


@dataclass(frozen=True)
class Target:
    label: str
    group: str
    ours: str
    anchor: str
    mode: str
    minimum: float  # anchor time / our time must be at least this
    applies: Callable[[dict], bool] = lambda case: True


def long_c128(case: dict) -> bool:
    return case["channels"] == 128 and case["lengths"][0] >= 4096


def targets() -> list[Target]:
    found = []
    for ours in (OURS, LAUNCHERS):
        found += [Target("forward >= 1.0x SDPA flash (C=128, N>=4k)", "segments", ours,
                         SDPA_FLASH, "fwd", 1.0, long_c128),
                  Target("forward+backward >= 0.9x SDPA flash (C=128, N>=4k)", "segments",
                         ours, SDPA_FLASH, "fwd+bwd", 0.9, long_c128)]
    for mode in ("fwd+bwd", "fwd"):
        found += [Target("batched graphs >= 3x padded nn.MultiheadAttention", "layer",
                         OURS_LAYER, PADDED_MHA, mode, 3.0),
                  Target("batched graphs >= 3x padded SDPA", "graphs", OURS, PADDED_SDPA,
                         mode, 3.0),
                  Target("batched graphs >= 1.0x Flex document mask (mask prebuilt)", "graphs",
                         OURS, FLEX_DOC, mode, 1.0)]
    return found


def median_ms(result: dict, peer: str, mode: str) -> float | None:
    return result["peers"].get(peer, {}).get("ms", {}).get(mode)


def verdict(ratio: float | None, minimum: float) -> str:
    if ratio is None:
        return "n/a"
    return "PASS" if ratio >= minimum else "MISS"


def target_rows(results: list[dict]) -> list[dict]:
    rows = []
    for target in targets():
        for result in results:
            if result["case"]["group"] != target.group or not target.applies(result["case"]):
                continue
            ours, anchor = (median_ms(result, p, target.mode) for p in (target.ours, target.anchor))
            ratio = None if ours is None or anchor is None else anchor / ours
            rows.append({"target": target.label, "ours": target.ours, "mode": target.mode,
                         "case": result["label"], "ours_ms": ours, "anchor_ms": anchor,
                         "ratio": ratio, "verdict": verdict(ratio, target.minimum)})
    return rows


# --- report ---


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cell(result: dict, peer: str, mode: str, show: Callable[[float], str]) -> str:
    entry = result["peers"].get(peer, {})
    if "skipped" in entry:
        return "skip"
    if mode in entry.get("errors", {}):
        return "error"
    ms = entry.get("ms", {}).get(mode)
    return "-" if ms is None else show(ms)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def show_tflops(result: dict, mode: str, ms: float) -> str:
    return f"{result['flops_fwd'] * FLOP_FACTOR[mode] / ms / 1e9:.0f}"


def show_ms(result: dict, mode: str, ms: float, with_flops: bool = True) -> str:
    return f"{ms:.3f} ({show_tflops(result, mode, ms)})" if with_flops else f"{ms:.3f}"


def segment_tables(results: list[dict]) -> list[str]:
    names, lines = [name for name, _ in PEERS["segments"]], []
    segments = [r for r in results if r["case"]["group"] == "segments"]
    for channels in sorted({r["case"]["channels"] for r in segments}):
        for causal in (False, True):
            rows = [r for r in segments
                    if r["case"]["channels"] == channels and r["case"]["causal"] == causal]
            if not rows:
                continue
            kind = "causal" if causal else "non-causal"
            for mode in MODES:
                lines += [f"### C={channels}, H={rows[0]['case']['heads']}, {kind}, "
                          f"{MODE_TITLES[mode]}: TFLOP/s", ""]
                lines += table(["N", "batch", *names], [
                    [str(r["case"]["lengths"][0]), str(len(r["case"]["lengths"])),
                     *(cell(r, n, mode, functools.partial(show_tflops, r, mode)) for n in names)]
                    for r in rows])
    return lines


def graph_tables(results: list[dict], group: str, with_flops: bool) -> list[str]:
    names, rows = [name for name, _ in PEERS[group]], []
    for r in (r for r in results if r["case"]["group"] == group):
        for mode in MODES:
            show = functools.partial(show_ms, r, mode, with_flops=with_flops)
            rows.append([r["label"], MODE_TITLES[mode], *(cell(r, n, mode, show) for n in names)])
    return table(["graphs", "mode", *names], rows) if rows else []


def correctness_table(results: list[dict]) -> list[str]:
    rows = []
    for r in results:
        for name, entry in r["peers"].items():
            if "max_abs_diff_out" in entry:
                rows.append([r["label"], name, r["reference"],
                             f"{entry['max_abs_diff_out']:.1e}",
                             f"{entry['max_abs_diff_grad']:.1e}"])
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
        shown = "; ".join(labels[:3]) + (f"; and {len(labels) - 3} more" if len(labels) > 3 else "")
        lines.append(f"- {name} ({what}), {len(labels)} case(s) [{shown}]: {reason}")
    return lines or ["- none"]


def target_tables(rows: list[dict]) -> list[str]:
    per_case = table(["target", "ours", "mode", "case", "ours ms", "anchor ms", "ratio", "met"], [
        [t["target"], t["ours"], t["mode"], t["case"], fmt(t["ours_ms"], ".3f"),
         fmt(t["anchor_ms"], ".3f"), fmt(t["ratio"], ".2f") + ("x" if t["ratio"] else ""),
         t["verdict"]] for t in rows])
    overall = {}
    for t in rows:
        overall.setdefault((t["target"], t["ours"], t["mode"]), []).append(t["verdict"])
    summary = table(["target", "ours", "mode", "verdict"], [
        [*key, summarise(verdicts)] for key, verdicts in overall.items()])
    return summary + per_case


def summarise(verdicts: list[str]) -> str:
    measured = [v for v in verdicts if v != "n/a"]
    if not measured:
        return "n/a"
    missed = measured.count("MISS")
    head = "MISS" if missed else "PASS"
    return f"{head} ({len(measured) - missed} of {len(measured)} cases met)"


def environment(quick: bool) -> dict:
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        **(cpu_description() if SMOKE else gpu_description()),
        "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__, "torch_geometric": torch_geometric.__version__,
        "gatattn_commit": git_commit(),
        "dtype": str(DTYPE).removeprefix("torch."),
        "timer": timer_note(quick),
        "quick": quick, "smoke": SMOKE,
    }


def gpu_description() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": torch.cuda.get_device_name(), "capability": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "nvidia_smi": nvidia_smi()}


def cpu_description() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"device": cpu_name(), "capability": f"CPU, {os.cpu_count()} cores",
            "memory_gib": round(memory / 2**30, 1), "nvidia_smi": "not queried (CPU run)"}


def cpu_name() -> str:
    # platform.processor() is empty on most Linux machines; /proc/cpuinfo names the model.
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,power.limit",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30, check=True)
        return "; ".join(line.strip() for line in done.stdout.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable ({first_line(error)})"


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_lines(env: dict) -> list[str]:
    lines = [
        f"- date: {env['date']}",
        f"- device: {env['device']} ({env['capability']}, {env['memory_gib']} GiB); "
        f"nvidia-smi name, power limit: {env['nvidia_smi']}",
        f"- python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN "
        f"{env['cudnn']}), triton {env['triton']}, torch_geometric {env['torch_geometric']}, "
        f"gatattn {env['gatattn_commit']}",
        f"- dtype: {env['dtype']}; time: {env['timer']}",
        f"- total run time: {env['run_time_s']:.0f} s" + (" (--quick)" if env["quick"] else "")
        + (" (--smoke)" if env["smoke"] else ""),
    ]
    if env["stopped"]:
        lines.append(f"- stopped early: {env['stopped']}")
    tuned = env.get("tuned", [])
    lines.append(f"- launch configurations the tuner chose ({len(tuned)}):")
    lines += [f"  - {line}" for line in tuned]
    return lines


def report(runs: list[dict], results: list[dict], rows: list[dict], missing: int) -> str:
    lines = ["# GPU benchmarks (DESIGN.md section 7, GPU rows)", ""]
    if any(env["smoke"] for env in runs):
        lines += [f"{SMOKE_BANNER}.", ""]
    for i, env in enumerate(runs):
        if len(runs) > 1:  # blank lines: a line right after a list item would continue it
            lines += [f"Run {i} (cases marked run={i} in the JSON):", ""]
        lines += [*run_lines(env), ""]
    if missing:
        lines += [f"- INCOMPLETE: {missing} case(s) not measured yet (rerun with --resume)", ""]
    lines += ["## Targets", "", "Ratio = anchor time / our time (higher is better).", "",
              *target_tables(rows),
              segment_heading(results), "",
              "Kernel throughput: TFLOP/s of the attention FLOPs (4 N^2 C per head and segment, "
              "halved if causal; backward 2.5x, forward+backward 3.5x).", "",
              *segment_tables(results),
              "## Batched graphs, attention core: ms (effective TFLOP/s)", "",
              *graph_tables(results, "graphs", with_flops=True),
              "## Batched graphs, layer (in_proj, attention, out_proj): ms", "",
              *graph_tables(results, "layer", with_flops=False),
              "## Correctness (once per case, before timing)", "",
              *correctness_table(results),
              "## Skipped or failed", "", *failure_notes(results), "",
              "## Method", "", *method_notes(runs[-1]["dtype"]), ""]
    return "\n".join(lines)


def segment_heading(results: list[dict]) -> str:
    cases = [r["case"] for r in results if r["case"]["group"] == "segments"]
    if not cases:
        return "## Equal-length segments"
    tokens, hidden = sum(cases[0]["lengths"]), cases[0]["heads"] * cases[0]["channels"]
    return f"## Equal-length segments ({tokens} tokens, H * C = {hidden})"


def method_notes(dtype: str) -> list[str]:
    return [
        "- fwd is the training forward (inputs require grad); bwd replays the backward of one "
        "retained forward graph; fwd+bwd runs both. Kernel launchers: flash_attention_forward / "
        "flash_attention_backward called directly, without gatattn.attention's validation and "
        "segment plan.",
        "- SDPA backends are forced one at a time with torch.nn.attention.sdpa_kernel. "
        "FlexAttention is torch.compile(flex_attention, dynamic=False, fullgraph=True), compiled "
        "once per shape outside the timing; its BlockMask comes from a compiled "
        "create_block_mask (causal, or a document mask over packed graphs).",
        "- Padded peers: to_dense_batch with batch size and largest graph given, a key padding "
        "mask, and unpadding; they are credited with the useful FLOPs only.",
        "- Max abs diff: largest difference of the output and of all input gradients (one shared "
        f"upstream gradient) to the case's reference, in {dtype}.",
    ]


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- entry point ---


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit(f"bench_gpu.py: no CUDA device (torch {torch.__version__}, built with CUDA "
                 f"{torch.version.cuda}; torch.cuda.is_available() is False). This benchmark "
                 "times GPU kernels and does not run without one; nothing was measured.")


def configure_torch() -> None:
    # Every case has new shapes, so FlexAttention recompiles per case; past dynamo's recompile
    # limits it would fall back to the unfused eager implementation without failing.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 10_000)
    # The bwd mode replays one compiled backward (retain_graph=True), which donated buffers
    # forbid.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False


def load_previous(path: Path) -> tuple[list[dict], list[dict]]:
    """Runs and case results of an earlier (partial) run written to ``path``."""
    if not path.exists():
        return [], []
    saved = json.loads(path.read_text())
    return saved["runs"], saved["results"]


def render(cases: list[Case], runs: list[dict], results: list[dict]) -> tuple[str, dict]:
    """The markdown report and the JSON payload, cases in their usual order."""
    order = {case.key: i for i, case in enumerate(cases)}
    results = sorted((r for r in results if r["key"] in order), key=lambda r: order[r["key"]])
    rows = target_rows(results)
    text = report(runs, results, rows, missing=len(cases) - len(results))
    return text, {"runs": runs, "targets": rows, "results": results}


def save(path: Path, text: str, payload: dict) -> None:
    """Writes the JSON and the markdown next to it; each replaces its file in one step, so a
    run killed mid-way leaves the previous complete files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, content in ((path, json.dumps(payload, indent=1) + "\n"),
                            (path.with_suffix(".md"), text)):
        partial = target.with_name(target.name + ".partial")
        partial.write_text(content)
        os.replace(partial, target)


def parse_args() -> argparse.Namespace:
    # No abbreviations: --smoke is also read from sys.argv before the imports, literally.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a few small cases (about 2 minutes on an H100); print, write nothing")
    size.add_argument("--smoke", action="store_true",
                      help="check the script, measure nothing: tiny cases on the CPU, kernels in "
                           "Triton's interpreter; print, and write only to --out")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the .md and .json (default: benchmarks/results, and "
                             "none for --smoke)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already in the saved gpu-<device>.json and "
                             "measure only the missing ones")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (results are saved after "
                             "every case; finish with --resume)")
    args = parser.parse_args()
    if args.quick and (args.resume or args.out):
        parser.error("--quick writes nothing: no --resume, no --out")
    if args.smoke and args.out and is_within(args.out, RESULTS):
        parser.error("--smoke numbers are not measurements: give an --out outside "
                     f"{RESULTS.relative_to(REPO)}")
    if args.smoke and args.resume and not args.out:
        parser.error("--smoke writes nothing without --out, so there is nothing to resume")
    return args


def is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def results_path(args: argparse.Namespace, device: str) -> Path | None:
    """The JSON to write (the markdown goes next to it), or None where the run only prints."""
    if args.quick or (args.smoke and not args.out):
        return None
    prefix = "smoke" if args.smoke else "gpu"
    return (args.out or RESULTS) / f"{prefix}-{device_slug(device)}.json"


def shown(path: Path) -> Path:
    return path.relative_to(REPO) if is_within(path, REPO) else path


def main() -> None:
    args = parse_args()
    if not SMOKE:
        require_cuda()
    configure_torch()

    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    cases = segment_cases(size) + graph_cases(size)
    env = {**environment(args.quick), "run_time_s": 0.0, "stopped": ""}
    path = results_path(args, env["device"])
    runs, results = load_previous(path) if args.resume else ([], [])
    runs.append(env)
    measured, start = {r["key"] for r in results}, time.perf_counter()

    def after_case(result: dict) -> None:
        results.append(result)
        env["run_time_s"] = time.perf_counter() - start
        env["tuned"] = tuned_configs()
        if path is not None:
            save(path, *render(cases, runs, results))

    env["stopped"], broken = run_all([c for c in cases if c.key not in measured], args.quick,
                                     len(runs) - 1, args.budget_s, after_case)
    env["run_time_s"] = time.perf_counter() - start
    env["tuned"] = tuned_configs()
    text, payload = render(cases, runs, results)
    print(text)
    if path is not None:
        save(path, text, payload)
        print(f"written to {shown(path.with_suffix('.md'))} and {path.name}")
    if broken:
        sys.exit(f"bench_gpu.py: {env['stopped']}")


if __name__ == "__main__":
    main()
