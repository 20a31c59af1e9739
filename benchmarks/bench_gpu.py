"""GPU benchmarks of the fused Triton attention against its peers: docs/design.md's GPU targets.

bfloat16 on one CUDA device; all peers of a case run in one process on shared inputs
(``harness.run_in_process``), each checked once against the case's reference, then timed in
three modes. ``method_notes`` below, printed with every report, says how.

1. Equal-length segments, as the FlashAttention papers measure: C in {64, 128} channels per head
   with H = 2048 / C heads, segment length N from 512 to 16k, 16k tokens in all, causal and not.
   Peers: SDPA's flash, memory-efficient and cuDNN backends (each forced; one that raises is
   skipped with its reason and SDPA's warnings), ``varlen_attn``, FlexAttention (no mask or a
   causal BlockMask), ours through ``gatattn.attention(..., ptr=, backend="triton")``, and the
   kernels' launchers called directly (the gap between the two is gatattn's host-side work).
2. Batched graphs of 10-1000 nodes (H=8, C=64), attention core on packed ``(nodes, H, C)``:
   padded SDPA, ``varlen_attn`` (cu_seqlens = ptr), FlexAttention with a document mask (its
   BlockMask built once, and rebuilt per call as a new batch of graphs would need), ours.
3. The same batches as a layer: GPSConv-style ``to_dense_batch`` + ``nn.MultiheadAttention``
   against the same MHA's weights used as in_proj -> ``gatattn.attention`` -> out_proj.
4. Biased graphs: 2's first two batches (1024 graphs of 10-40 nodes, 64 of 100-1000) with a
   learnable additive bias (a leaf needing grad, Graphormer style), gradients into q, k, v and
   the bias. Ours takes the stacked layout of :mod:`gatattn.bias` (each graph's n x n block,
   target-major, graphs in id order): ``backend="triton"`` (fused kernels, dBias without
   atomics) and ``auto`` (which does not race the fused kernels when given a bias: SDPA per
   size group, the bias gathered to float masks).
   Peers: SDPA on ``to_dense_batch`` padding with the bias held padded ``(B, H, L, L)``, ``-inf``
   on padded keys, as the float ``attn_mask`` (the reference: torch only); FlexAttention in the
   packed document form, ``(1, H, T, C)`` with the document BlockMask and a ``score_mod`` that
   reads the same stacked bias through a per-query row table (what a Flex user with jagged
   graphs writes: no padding, and the BlockMask skips blocks between graphs; a padded
   ``(B, H, L, L)`` bias in ``score_mod`` would pay the padding as SDPA does). Flex scatters
   the bias gradient with atomic adds, non-deterministic in general; here every pair owns its
   bias entry, so only masked-out pairs (clamped onto the first or last row) add zeros.
   docs/design.md has no GPU number for a bias (its CPU row: <= 0.5x padded SDPA's time); the
   targets set here are floors, in fwd+bwd and fwd: ours (triton) never slower than padded SDPA or
   Flex, and auto never slower than padded SDPA.
5. Sliding windows (does a window cost its band, with the tiles outside it skipped?): 1's
   segments of 4k and 16k rows (16k tokens in all) with a causal window (256, 0) at C=128 and
   a two-sided (128, 128) at C=64. Peers: ours through ``gatattn.attention(..., ptr=, causal=,
   window=, backend="triton")``; ``varlen_attn`` with ``window_size`` (bottom-right aligned,
   the same band for self-attention); FlexAttention with a sliding-window ``mask_mod`` (and the
   causal one where causal), its BlockMask built once; SDPA with the band as a dense boolean
   mask (what a user without windows writes; the reference); ours without the window (what the
   window saves). FLOPs count the band's pairs exactly. No GPU number in docs/design.md: the
   targets (``window_targets``) are ours at least as fast as Flex's window, >= 1.0x (fwd) and
   0.9x (fwd+bwd) varlen_attn's window as the segments' targets against SDPA flash, and faster
   than the dense mask and the unwindowed graph by a quarter of their pairs over the band's.
   These four cases come last: a budgeted run reaches them after the groups above.

Not measured: FlexAttention's recompilation when graph sizes change between batches.

Usage::

    python benchmarks/bench_gpu.py          # full run; writes benchmarks/results/gpu-<device>.md
                                            # and .json next to it, after every case
    python benchmarks/bench_gpu.py --quick  # a few small cases (minutes), prints only
    python benchmarks/bench_gpu.py --budget-s 480            # part of the run;
    python benchmarks/bench_gpu.py --resume --budget-s 480   # then the rest, until complete
    python benchmarks/bench_gpu.py --out DIR     # write into DIR instead
    python benchmarks/bench_gpu.py --smoke [--out DIR]   # CI check of the script, measuring
                                            # nothing: tiny cases on the CPU in float32, Triton's
                                            # interpreter, a host timer; prints (and
                                            # writes gpu-<cpu>.smoke.* only to --out)

``--smoke`` runs every step of a real run, so that CI catches a broken script before GPU time is
spent on it. Peers the CPU lacks are reported as skipped, as an unavailable peer is on a GPU:
SDPA's efficient and cuDNN backends, varlen_attn (CUDA only), FlexAttention (no CPU backward,
the biased graphs' Flex peer too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# --smoke runs the kernels in Triton's CPU interpreter, which Triton chooses when a kernel is
# decorated, that is when gatattn's kernels are imported below: so the flag is read here, before
# argparse (whose allow_abbrev=False keeps this reading and its own the same).
if "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from harness import (
    Case,
    Peer,
    Runner,
    Target,
    autograd_runner,
    command_line,
    cuda_timer,
    device_environment,
    device_slug,
    host_timer,
    mode_ms,
    mode_speedup,
    peer_table,
    ratio,
    require_cuda,
    run_in_process,
    saved_path,
)
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention
from torch_geometric.utils import to_dense_batch

import gatattn
from gatattn.backends.varlen import varlen_unavailable_reason
from gatattn.bias import block_offsets, stacked_from_padded
from gatattn.graph import describe_graph
from gatattn.graph.edges import band_pair_count
from gatattn.kernels import flash_attention as kernels

try:
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10
except ImportError:
    varlen_attn = None  # the varlen peer is skipped, saying so

SMOKE = "--smoke" in sys.argv[1:]  # as read before the imports
# A real run times bfloat16 on the GPU. The smoke run takes float32 on the CPU: Triton 3.9's
# interpreter miscomputes bfloat16 tl.dot (see tests/test_kernels.py), and exact float32 makes
# the smoke run's correctness table a real check of every peer's layouts.
DEVICE = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float32 if SMOKE else torch.bfloat16
HIDDEN, TOTAL_TOKENS = 2048, 16384  # H * C: 16 heads at C=128, 32 at C=64
CHANNELS, LENGTHS = (64, 128), (512, 1024, 2048, 4096, 8192, 16384)
GRAPH_HEADS, GRAPH_CHANNELS = 8, 64
GRAPH_BATCHES = ((1024, 10, 40), (64, 100, 1000), (256, 10, 1000))  # (graphs, min, max nodes)
# The third batch's padded bias would be 256 * 8 * 1000^2 entries (4 GB, and its gradient) for
# no new information.
BIASED_BATCHES = GRAPH_BATCHES[:2]
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
RESULTS = Path(__file__).resolve().parent / "results"
TITLE = "GPU benchmarks (docs/design.md, GPU targets)"

SDPA_FLASH, SDPA_EFFICIENT, SDPA_CUDNN = "SDPA flash", "SDPA efficient", "SDPA cuDNN"
VARLEN, FLEX = "varlen_attn", "Flex"
FLEX_DOC, FLEX_DOC_REBUILT = "Flex doc mask", "Flex doc mask, rebuilt per call"
PADDED_SDPA, PADDED_MHA = "padded SDPA", "padded nn.MultiheadAttention"
PADDED_BIAS, FLEX_BIAS = "padded SDPA, float mask", "Flex score_mod + doc mask"
OURS, LAUNCHERS = "gatattn.attention (triton)", "kernel launchers"
OURS_AUTO = "gatattn.attention (auto)"  # verified and raced against the torch routes it knows
GATATTN_SDPA = "gatattn SDPA route (one SDPA call per graph size, no padding)"
OURS_LAYER = "projections + gatattn.attention (triton)"
DENSE_BAND, FLEX_WINDOW = "SDPA, band as a dense bool mask", "Flex sliding-window mask"
OURS_UNWINDOWED = "gatattn.attention (triton), no window (more pairs)"


# --- cases ---


@dataclass(frozen=True)
class Shape:
    group: str  # "segments", "graphs" (attention core), "layer" or "biased graphs"
    heads: int
    channels: int
    lengths: tuple[int, ...]  # rows of each segment (graph)
    causal: bool = False
    graphs: str = ""  # how the graph batch was drawn
    window: tuple[int, int] | None = None  # (left, right) around the diagonal; causal: right 0

    @property
    def label(self) -> str:
        if self.group in ("segments", "sliding windows"):
            kind = "causal" if self.causal else "non-causal"
            if self.window is not None:
                kind += f", window {self.window}"
            return f"C={self.channels}, {kind}, N={self.lengths[0]} x{len(self.lengths)}"
        return f"{self.graphs}, H={self.heads}, C={self.channels}"

    def pairs(self, windowed: bool = True) -> float:
        """(target, source) pairs of the graphs: causal counted as half of n^2, as the
        FlashAttention papers count it; a window's band exactly."""
        if windowed and self.window is not None:
            left, right = self.window
            return float(sum(band_pair_count(n, n, -left, right) for n in self.lengths))
        return sum(n * n for n in self.lengths) * (0.5 if self.causal else 1.0)

    def flops(self, mode: str) -> float:
        return 4 * self.channels * self.heads * self.pairs() * FLOP_FACTOR[mode]


def segment_shapes(size: str) -> list[Shape]:
    """Shapes of a run of ``size``: "full", "quick" or "smoke"."""
    hidden, channels, lengths, total = {
        "full": (HIDDEN, CHANNELS, LENGTHS, TOTAL_TOKENS),
        "quick": (HIDDEN, (128,), (4096,), 8192),
        "smoke": (32, (16,), (32,), 64),  # H=2, two segments of two of the interpreter's tiles
    }[size]
    return [Shape("segments", hidden // c, c, (n,) * (total // n), causal)
            for c in channels for causal in (False, True) for n in lengths]


def window_shapes(size: str) -> list[Shape]:
    """Sliding windows on equal segments, 16k tokens as above: a causal window as language
    models use and a two-sided one, each at 4k and 16k rows per segment (the band's pairs per
    token stay the same, the dense mask's grow with N)."""
    windows = {  # (C, causal, window): the C of each kind chosen so that both C are measured
        "full": ((128, True, (256, 0)), (64, False, (128, 128))),
        "quick": ((128, True, (256, 0)),),
        # two segments of three of the interpreter's 16-row tiles: tiles outside the band exist
        "smoke": ((16, True, (8, 0)), (16, False, (4, 4))),
    }[size]
    hidden, lengths, total = {"full": (HIDDEN, (4096, 16384), TOTAL_TOKENS),
                              "quick": (HIDDEN, (4096,), 8192),
                              "smoke": (32, (48,), 96)}[size]
    return [Shape("sliding windows", hidden // c, c, (n,) * (total // n), causal, window=window)
            for c, causal, window in windows for n in lengths]


def graph_shapes(size: str, groups: tuple[str, ...] = ("graphs", "layer"),
                 full_batches: tuple = GRAPH_BATCHES) -> list[Shape]:
    heads, channels, batches = {
        "full": (GRAPH_HEADS, GRAPH_CHANNELS, full_batches),
        "quick": (GRAPH_HEADS, GRAPH_CHANNELS, ((32, 10, 1000),)),
        "smoke": (2, 16, ((4, 5, 40),)),
    }[size]
    shapes = []
    for count, low, high in batches:
        gen = torch.Generator().manual_seed(2)
        sizes = tuple(torch.randint(low, high + 1, (count,), generator=gen).tolist())
        drawn = f"{count} graphs of {low}-{high} nodes ({sum(sizes)} nodes)"
        shapes += [Shape(group, heads, channels, sizes, graphs=drawn) for group in groups]
    return shapes


def biased_shapes(size: str) -> list[Shape]:
    return graph_shapes(size, ("biased graphs",), BIASED_BATCHES)


def targets(shape: Shape) -> tuple[Target, ...]:
    """The GPU targets of docs/design.md that apply to ``shape``: anchor time / ours >= limit."""
    def at_least(ours: str, mode: str, limit: float, anchor: str, what: str = "") -> Target:
        label = f"{ours}, {mode}: >= {limit}x {anchor}{what}"
        return Target(label, mode_speedup(ours, anchor, mode), True, limit, "x")

    if shape.group == "segments":
        if shape.channels != 128 or shape.lengths[0] < 4096:
            return ()
        return tuple(target for ours in (OURS, LAUNCHERS) for target in (
            at_least(ours, "fwd", 1.0, SDPA_FLASH, " (C=128, N>=4k)"),
            at_least(ours, "fwd+bwd", 0.9, SDPA_FLASH, " (C=128, N>=4k)"))) + never_slower()
    if shape.group == "sliding windows":
        return window_targets(shape, at_least)
    if shape.group == "layer":
        return tuple(at_least(OURS_LAYER, mode, 3.0, PADDED_MHA) for mode in ("fwd+bwd", "fwd"))
    if shape.group == "biased graphs":  # no GPU number in docs/design.md: floors, never slower
        return tuple(at_least(ours, mode, 1.0, anchor, " (bias; no GPU row: never slower)")
                     for mode in ("fwd+bwd", "fwd")
                     for ours, anchor in ((OURS, PADDED_BIAS), (OURS, FLEX_BIAS),
                                          (OURS_AUTO, PADDED_BIAS)))
    return tuple(target for mode in ("fwd+bwd", "fwd") for target in (
        at_least(OURS, mode, 3.0, PADDED_SDPA), at_least(OURS, mode, 1.0, VARLEN),
        at_least(OURS, mode, 1.0, FLEX_DOC, " (mask prebuilt)"))) + never_slower()


def window_targets(shape: Shape, at_least: Callable[..., Target]) -> tuple[Target, ...]:
    """No GPU number in docs/design.md for windows. Ours skips the tiles outside the band, so it
    should beat Flex's sliding-window BlockMask (which skips blocks too), stand to varlen_attn's
    window as the segments' targets to SDPA flash, and gain on the dense band mask and on the
    graph without the window a quarter of their pairs over the band's: tiles across a band's
    edges compute masked pairs (a 257-wide band over 128-row tiles visits up to twice its
    pairs)."""
    band = shape.pairs()
    dense = max(1, int(sum(n * n for n in shape.lengths) / band / 4))
    unwindowed = max(1, int(shape.pairs(windowed=False) / band / 4))
    return tuple(target for mode in ("fwd+bwd", "fwd") for target in (
        at_least(OURS, mode, 1.0, FLEX_WINDOW, " (mask prebuilt)"),
        at_least(OURS, mode, 0.9 if mode == "fwd+bwd" else 1.0, VARLEN,
                 " (window_size; as the segments' SDPA flash targets)"),
        at_least(OURS, mode, dense, DENSE_BAND, " (1/4 of its pairs / the band's)"),
        at_least(OURS, mode, unwindowed, OURS_UNWINDOWED,
                 " (1/4 of its pairs / the band's)")))


def never_slower() -> tuple[Target, ...]:
    """docs/design.md: ``auto`` is never slower than the torch routes it races (SDPA per size group,
    varlen_attn); 5% is left for timing noise between two runs of the same route."""
    def value(mode):
        def fastest_torch_over_auto(result):
            times = [mode_ms(result, peer, mode) for peer in (GATATTN_SDPA, VARLEN)]
            times = [t for t in times if t is not None]
            return ratio(min(times), mode_ms(result, OURS_AUTO, mode)) if times else None
        return fastest_torch_over_auto

    return tuple(Target(f"{OURS_AUTO}, {mode}: >= 0.95x the fastest of SDPA per group and "
                        "varlen_attn", value(mode), True, 0.95, "x")
                 for mode in ("fwd+bwd", "fwd"))


def all_cases(size: str) -> list[Case]:
    return [Case(f"{shape.group}: {shape.label}", f"{shape.group}: {shape.label}", 0,
                 PEERS[shape.group], targets(shape), setup=functools.partial(make_setup, shape),
                 reference=REFERENCES[shape.group],
                 info={**dataclasses.asdict(shape), "label": shape.label,
                       "flops_fwd": shape.flops("fwd")})
            for shape in (segment_shapes(size) + graph_shapes(size) + biased_shapes(size)
                          + window_shapes(size))]


# --- inputs ---


@dataclass
class Setup:
    """What all peers of one case share."""

    shape: Shape
    # gradients flow to these: (q, k, v), (q, k, v, bias) or (x, *MHA parameters)
    leaves: tuple[Tensor, ...]
    grad_out: Tensor  # upstream gradient of the correctness check, packed like the output
    ptr: Tensor  # (B + 1,) int64 segment offsets, as PyG's Batch.ptr
    cu_seqlens: Tensor  # the same offsets in int32, for the launchers and varlen_attn
    batch: Tensor  # (total,) segment id of every row
    scale: float
    document: Callable  # FlexAttention mask_mod: same graph; one object, so Flex compiles once
    mha: nn.MultiheadAttention | None = None
    bias: Tensor | None = None  # (sum_b n_b^2, H) stacked, the last leaf; biased graphs only


def make_setup(shape: Shape) -> Setup:
    torch.manual_seed(0)
    H, C = shape.heads, shape.channels
    lengths = torch.tensor(shape.lengths, device=DEVICE)
    ptr = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    batch = torch.repeat_interleave(torch.arange(len(shape.lengths), device=DEVICE), lengths)
    shared = dict(ptr=ptr, cu_seqlens=ptr.to(torch.int32), batch=batch, scale=C**-0.5,
                  document=document_mask(batch))
    if shape.group == "layer":
        mha = nn.MultiheadAttention(H * C, H, batch_first=True, device=DEVICE, dtype=DTYPE)
        x = torch.randn(batch.numel(), H * C, device=DEVICE, dtype=DTYPE, requires_grad=True)
        return Setup(shape, (x, *mha.parameters()), torch.randn_like(x), mha=mha, **shared)
    q, k, v = (torch.randn(batch.numel(), H, C, device=DEVICE, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    if shape.group == "biased graphs":
        rows = sum(n * n for n in shape.lengths)
        bias = torch.randn(rows, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
        return Setup(shape, (q, k, v, bias), torch.randn_like(q), bias=bias, **shared)
    return Setup(shape, (q, k, v), torch.randn_like(q), **shared)


# --- peers: each builds the runner of one peer on one case's setup ---


def runner(setup: Setup, forward: Callable[[], Tensor],
           pack: Callable[[Tensor], Tensor] = lambda out: out) -> Runner:
    return autograd_runner(forward, setup.leaves, setup.grad_out, pack)


def as_batches(setup: Setup, t: Tensor) -> Tensor:
    """Packed ``(B * N, H, C)`` of equal segments -> a ``(B, H, N, C)`` view."""
    return t.view(-1, setup.shape.lengths[0], *t.shape[1:]).transpose(1, 2)


def from_batches(out: Tensor) -> Tensor:
    return out.transpose(1, 2).flatten(0, 1)  # (B, H, N, C) -> (B * N, H, C)


def sdpa_segments(backend: SDPBackend | None) -> Callable[[Setup], Runner]:
    def build(setup: Setup) -> Runner:
        def forward():
            q, k, v = (as_batches(setup, t) for t in setup.leaves)
            with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=setup.shape.causal,
                                                      scale=setup.scale)

        return runner(setup, forward, from_batches)

    return build


def varlen(setup: Setup) -> Runner:
    """torch's varlen_attn on the packed rows, offsets as int32, longest length as a host int;
    window_size is the graph's (left, right) sides, -1 for a side without bound: (-1, 0) is
    causal (bottom-right aligned: top-left, as ours, for self-attention; its windows too).
    Skipped where gatattn's own varlen route would not run it, with that route's reason."""
    q, _, v = setup.leaves
    if DEVICE.type != "cuda":
        raise RuntimeError(f"varlen_attn runs on CUDA only; this run is on {DEVICE.type}")
    graph = describe_graph(q.size(0), q.size(0), ptr=setup.ptr, causal=setup.shape.causal,
                           window=setup.shape.window)[0]
    if reason := varlen_unavailable_reason(q, v, graph):
        raise RuntimeError(reason)
    longest = max(setup.shape.lengths)
    window = tuple(-1 if side is None else side for side in graph.window_sides())
    return runner(setup, lambda: varlen_attn(*setup.leaves, setup.cu_seqlens, setup.cu_seqlens,
                                             longest, longest, scale=setup.scale,
                                             window_size=window))


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


def window_mask(left: int, right: int) -> Callable:
    def in_band(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    return in_band


def segment_mask(shape: Shape) -> Callable | None:
    """The mask_mod of one segment: causal, a sliding window (with the causal mask where
    causal, as a Flex user writes it), both, or none."""
    mods = []
    if shape.causal:
        mods.append(causal_mask)
    if shape.window is not None:
        mods.append(window_mask(*shape.window))
    return and_masks(*mods) if len(mods) > 1 else mods[0] if mods else None


def document_mask(batch: Tensor) -> Callable:
    def same_graph(b, h, q_idx, kv_idx):
        return batch[q_idx] == batch[kv_idx]

    return same_graph


def flex_segments(setup: Setup) -> Runner:
    mask_mod = segment_mask(setup.shape)
    mask = block_mask_of(mask_mod, setup.shape.lengths[0]) if mask_mod else None

    def forward():
        q, k, v = (as_batches(setup, t) for t in setup.leaves)
        return flex(q, k, v, block_mask=mask, scale=setup.scale)

    return runner(setup, forward, from_batches)


def flex_documents(rebuild: bool) -> Callable[[Setup], Runner]:
    def build(setup: Setup) -> Runner:
        total, mask_mod = setup.batch.numel(), setup.document
        if setup.shape.causal:
            mask_mod = and_masks(causal_mask, mask_mod)
        fixed = block_mask_of(mask_mod, total)

        def forward():
            q, k, v = (t.unsqueeze(0).transpose(1, 2) for t in setup.leaves)  # (1, H, total, C)
            mask = block_mask_of(mask_mod, total) if rebuild else fixed
            return flex(q, k, v, block_mask=mask, scale=setup.scale)

        return runner(setup, forward, lambda out: out[0].transpose(0, 1))

    return build


def band_mask(setup: Setup) -> Tensor:
    """``(N, N)`` booleans, True on one segment's band: the mask a user without windows gives
    SDPA (every pair is computed, then masked)."""
    (left, right), n = setup.shape.window, setup.shape.lengths[0]
    return torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril(right).triu(-left)


def sdpa_band(setup: Setup) -> Runner:
    mask = band_mask(setup)

    def forward():
        q, k, v = (as_batches(setup, t) for t in setup.leaves)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=setup.scale)

    return runner(setup, forward, from_batches)


def padded_attention(setup: Setup, bias: Tensor | None = None) -> Tensor:
    """SDPA on ``to_dense_batch`` padding, unpadded to ``(total, H, C)``; the mask is the key
    padding mask, or ``bias`` (a padded float mask, ``-inf`` on padded keys) when given."""
    count, longest = len(setup.shape.lengths), max(setup.shape.lengths)
    H, C = setup.shape.heads, setup.shape.channels
    dense = [to_dense_batch(t.flatten(1), setup.batch, batch_size=count, max_num_nodes=longest)
             for t in setup.leaves[:3]]  # (B, L, H * C) each, zero-padded
    mask = dense[0][1]  # (B, L), True on real nodes
    q, k, v = (h.unflatten(-1, (H, C)).transpose(1, 2) for h, _ in dense)  # (B, H, L, C)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, :] if bias is None else bias, scale=setup.scale)
    return out.transpose(1, 2)[mask]  # (total, H, C)


def padded_sdpa(setup: Setup) -> Runner:
    if setup.shape.causal:
        raise ValueError("the padded peer here is non-causal only")
    return runner(setup, lambda: padded_attention(setup))


def padded_bias(setup: Setup) -> Tensor:
    """The stacked bias held padded, ``(B, H, L, L)``, as a padded implementation holds it:
    ``-inf`` on padded keys (padded query rows keep finite logits: no NaN), a leaf."""
    sizes = setup.ptr.diff()
    longest, H = max(setup.shape.lengths), setup.shape.heads
    positions = torch.arange(longest, device=DEVICE)
    real = positions < sizes.view(-1, 1)  # (B, L)
    padded = torch.zeros(len(sizes), longest, longest, H, device=DEVICE, dtype=DTYPE)
    padded[real[:, :, None] & real[:, None, :]] = setup.bias.detach()  # rows in (b, i, j) order
    padded = padded.permute(0, 3, 1, 2).masked_fill(~real[:, None, None, :], float("-inf"))
    return padded.contiguous().requires_grad_()


def padded_sdpa_biased(setup: Setup) -> Runner:
    """Padded SDPA with the bias as a float mask; the check reports the mask's gradient in the
    stacked layout (``stacked_from_padded``), as ours and the reference's are."""
    mask = padded_bias(setup)
    built = autograd_runner(lambda: padded_attention(setup, mask), (*setup.leaves[:3], mask),
                            setup.grad_out)

    def check():
        out, (*grads, grad_mask) = built.check()
        return out, (*grads, stacked_from_padded(grad_mask, setup.ptr.diff()))

    return dataclasses.replace(built, check=check)


def stacked_bias_score_mod(bias: Tensor, ptr: Tensor, batch: Tensor) -> Callable:
    """A Flex ``score_mod`` adding the stacked ``bias`` on packed graphs: pair (i, j) of a graph
    is row ``first_row[i] + j`` (the graph's block start + i's position * n - the graph's first
    node). Pairs between graphs, which a document BlockMask masks but Flex may still evaluate in
    partial blocks, are clamped into range."""
    sizes = ptr.diff()
    starts = block_offsets(sizes, sizes)[:-1]
    positions = torch.arange(batch.numel(), device=batch.device) - ptr[batch]
    first_row = starts[batch] + positions * sizes[batch] - ptr[batch]
    last_row = bias.size(0) - 1

    def graph_bias(score, b, h, q_idx, kv_idx):
        return score + bias[(first_row[q_idx] + kv_idx).clamp(0, last_row), h]

    return graph_bias


def flex_biased(setup: Setup) -> Runner:
    """Flex on the packed rows with the document BlockMask (built once) and the stacked bias
    read in ``score_mod``."""
    score_mod = stacked_bias_score_mod(setup.bias, setup.ptr, setup.batch)
    mask = block_mask_of(setup.document, setup.batch.numel())

    def forward():
        q, k, v = (t.unsqueeze(0).transpose(1, 2) for t in setup.leaves[:3])  # (1, H, T, C)
        return flex(q, k, v, score_mod=score_mod, block_mask=mask, scale=setup.scale)

    return runner(setup, forward, lambda out: out[0].transpose(0, 1))


def ours_api(setup: Setup, backend: str = "triton", windowed: bool = True) -> Runner:
    window = setup.shape.window if windowed else None
    return runner(setup, lambda: gatattn.attention(*setup.leaves[:3], ptr=setup.ptr,
                                                   causal=setup.shape.causal, window=window,
                                                   attn_bias=setup.bias, backend=backend))


def launchers(setup: Setup) -> Runner:
    q, k, v = (t.detach() for t in setup.leaves)
    args = (setup.cu_seqlens, setup.cu_seqlens, setup.scale, setup.shape.causal)

    def forward():
        return kernels.flash_attention_forward(q, k, v, *args)

    def backward(grad, out, lse):
        return kernels.flash_attention_backward(grad, q, k, v, out, lse, *args)

    out, lse = forward()
    grad = torch.randn_like(out)

    def check():
        out, lse = forward()
        return out, backward(setup.grad_out, out, lse)

    return Runner({"fwd": forward, "bwd": lambda: backward(grad, out, lse),
                   "fwd+bwd": lambda: backward(grad, *forward())}, check)


def padded_mha(setup: Setup) -> Runner:
    count, longest = len(setup.shape.lengths), max(setup.shape.lengths)
    x, mha = setup.leaves[0], setup.mha

    def forward():
        h, mask = to_dense_batch(x, setup.batch, batch_size=count, max_num_nodes=longest)
        return mha(h, h, h, key_padding_mask=~mask, need_weights=False)[0][mask]

    return runner(setup, forward)


def ours_layer(setup: Setup) -> Runner:
    x, mha, H, C = setup.leaves[0], setup.mha, setup.shape.heads, setup.shape.channels

    def forward():
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(-1, 3, H, C).unbind(1)
        return mha.out_proj(gatattn.attention(q, k, v, ptr=setup.ptr, backend="triton").flatten(1))

    return runner(setup, forward)


PACKED, BATCHED = "packed (T, H, C)", "(B, H, N, C) views"
PADDED = "to_dense_batch to (B, L_max, H * C), key padding mask, unpadded"
STACKED = "packed (T, H, C), stacked bias (sum n^2, H)"
PADDED_FLOAT = "to_dense_batch, bias padded (B, H, L_max, L_max) as the float mask, unpadded"
PEERS: dict[str, tuple[Peer, ...]] = {
    "segments": (Peer(SDPA_FLASH, BATCHED, sdpa_segments(SDPBackend.FLASH_ATTENTION)),
                 Peer(SDPA_EFFICIENT, BATCHED, sdpa_segments(SDPBackend.EFFICIENT_ATTENTION)),
                 Peer(SDPA_CUDNN, BATCHED, sdpa_segments(SDPBackend.CUDNN_ATTENTION)),
                 Peer(VARLEN, PACKED, varlen), Peer(FLEX, BATCHED, flex_segments),
                 Peer(OURS, PACKED, ours_api), Peer(LAUNCHERS, PACKED, launchers),
                 Peer(GATATTN_SDPA, PACKED, functools.partial(ours_api, backend="sdpa")),
                 Peer(OURS_AUTO, PACKED, functools.partial(ours_api, backend="auto"))),
    "graphs": (Peer(PADDED_SDPA, PADDED, padded_sdpa), Peer(VARLEN, PACKED, varlen),
               Peer(FLEX_DOC, "(1, H, T, C)", flex_documents(rebuild=False)),
               Peer(FLEX_DOC_REBUILT, "(1, H, T, C)", flex_documents(rebuild=True)),
               Peer(OURS, PACKED, ours_api), Peer(LAUNCHERS, PACKED, launchers),
               Peer(GATATTN_SDPA, PACKED, functools.partial(ours_api, backend="sdpa")),
               Peer(OURS_AUTO, PACKED, functools.partial(ours_api, backend="auto"))),
    "layer": (Peer(PADDED_MHA, PADDED, padded_mha), Peer(OURS_LAYER, PACKED, ours_layer)),
    "biased graphs": (
        Peer(PADDED_BIAS, PADDED_FLOAT, padded_sdpa_biased),
        Peer(FLEX_BIAS, "(1, H, T, C), stacked bias", flex_biased),
        Peer(OURS, STACKED, ours_api),
        Peer(OURS_AUTO, STACKED, functools.partial(ours_api, backend="auto"))),
    "sliding windows": (Peer(DENSE_BAND, BATCHED, sdpa_band), Peer(VARLEN, PACKED, varlen),
                        Peer(FLEX_WINDOW, BATCHED, flex_segments),
                        Peer(OURS, PACKED, ours_api),
                        Peer(OURS_UNWINDOWED, PACKED,
                             functools.partial(ours_api, windowed=False))),
}
REFERENCES = {
    "segments": Peer("SDPA, default dispatch", BATCHED, sdpa_segments(None)),
    "graphs": Peer(GATATTN_SDPA, PACKED, functools.partial(ours_api, backend="sdpa")),
    "layer": Peer(PADDED_MHA, PADDED, padded_mha),
    "biased graphs": Peer(PADDED_BIAS, PADDED_FLOAT, padded_sdpa_biased),
    "sliding windows": Peer(DENSE_BAND, BATCHED, sdpa_band),
}


# --- report sections ---


def show_tflops(result: dict, mode: str, ms: float) -> str:
    return f"{result['info']['flops_fwd'] * FLOP_FACTOR[mode] / ms / 1e9:.0f}"


TABLES = {  # group: heading, how a median is shown
    "segments": ("Equal-length segments: TFLOP/s of the attention FLOPs (4 N^2 C per head and "
                 "segment, halved if causal; backward 2.5x, forward+backward 3.5x)", show_tflops),
    "graphs": ("Batched graphs, attention core: ms (effective TFLOP/s)",
               lambda r, mode, ms: f"{ms:.3f} ({show_tflops(r, mode, ms)})"),
    "layer": ("Batched graphs, layer (in_proj, attention, out_proj): ms",
              lambda r, mode, ms: f"{ms:.3f}"),
    "biased graphs": ("Batched graphs with a learnable attn_bias, attention core (gradients into "
                      "q, k, v and the bias): ms (effective TFLOP/s)",
                      lambda r, mode, ms: f"{ms:.3f} ({show_tflops(r, mode, ms)})"),
    "sliding windows": ("Sliding windows on equal-length segments: ms (TFLOP/s of the band's "
                        "pairs, counted exactly: masked pairs a peer computes do not count)",
                        lambda r, mode, ms: f"{ms:.3f} ({show_tflops(r, mode, ms)})"),
}


def sections(cases: list[Case], results: list[dict]) -> list[str]:
    lines = []
    for group, (heading, show) in TABLES.items():
        rows = [([r["info"]["label"], MODE_TITLES[mode]], r, mode)
                for r in results if r["info"]["group"] == group for mode in MODES]
        lines += [f"## {heading}", "",
                  *peer_table(["case", "mode"], rows, [p.name for p in PEERS[group]], show)]
    return lines


def method_notes() -> list[str]:
    return [
        "fwd is the training forward (inputs require grad, as FlashAttention's benchmark does); "
        "bwd replays the backward of one retained forward graph; fwd+bwd runs both. Time: "
        "median of the timer above; compilation (Triton, torch.compile, BlockMask) happens in "
        "untimed first calls. Kernel launchers: flash_attention_forward / "
        "flash_attention_backward called directly, without gatattn.attention's validation and "
        "segment plan. Target ratios: anchor time / our time (higher is better).",
        "SDPA backends are forced one at a time with torch.nn.attention.sdpa_kernel. varlen_attn "
        "takes the packed rows, cu_seqlens = ptr in int32 and the longest length as a host int; "
        "window_size (-1, 0) when causal, (left, right) with a window. FlexAttention is "
        "torch.compile(flex_attention, dynamic=False, fullgraph=True), compiled once per shape "
        "outside the timing; its BlockMask comes from a compiled create_block_mask (causal, a "
        "sliding window, or a document mask over packed graphs).",
        "Padded peers: to_dense_batch with batch size and largest graph given, a key padding "
        "mask, and unpadding; they are credited with the useful FLOPs only.",
        "Biased graphs: the bias is a (sum_b n_b^2, H) leaf in gatattn's stacked layout, and "
        "its gradient is part of every check. Padded SDPA holds it as a (B, H, L, L) float "
        "mask leaf, -inf on padded keys (its gradient mapped back with stacked_from_padded), "
        "and is the reference (torch only). Flex: packed (1, H, T, C), the document BlockMask "
        "built once, a score_mod adding bias[first_row[q_idx] + kv_idx, h]; its bias "
        "gradient is scattered with atomic adds (non-deterministic in general; every pair owns "
        "its entry here). Ours: backend='triton' (fused kernels, dBias without atomics) and "
        "auto (SDPA per size group with gathered float masks: with a bias it does not race "
        "the fused kernels).",
        "Sliding windows: SDPA takes the band as one (N, N) boolean attn_mask (default "
        "dispatch) and is the reference (torch only); varlen_attn gets window_size (left, "
        "right); Flex a mask_mod keeping q_idx - left <= kv_idx <= q_idx + right "
        "(and with the causal mask where causal), the BlockMask built once. Ours without the "
        "window computes the whole (causal) segments: its max abs diff to the reference is "
        "the window's effect, not an error (the same call is checked in the segment cases). "
        "TFLOP/s count the band's pairs exactly, for every peer.",
        "Max abs diff: largest difference of the output and of all input gradients (one shared "
        f"upstream gradient) to the case's reference, in {str(DTYPE).removeprefix('torch.')}; "
        "on CUDA the JSON also records each peer's peak memory in that check (check_peak_mb).",
    ]


# --- entry point ---


def note_tuned(env: dict) -> None:
    tuned = [f"{key}: {config}" for key, config in kernels.TUNER.chosen.items()]
    env["notes"] = [f"launch configurations the tuner chose ({len(tuned)}): "
                    + ("; ".join(tuned) or "none")]


def main() -> None:
    args = command_line(__doc__.split("\n")[0], saving_to=RESULTS, smoke=True)
    if not SMOKE:
        require_cuda("bench_gpu.py")
    size = "smoke" if SMOKE else "quick" if args.quick else "full"
    # do_bench's warm-up and measuring time, ms; the smoke run's numbers mean nothing: few reps
    timer = host_timer(0.01) if SMOKE else cuda_timer(*((10, 40) if args.quick else (25, 100)))
    env = device_environment(DEVICE, DTYPE, timer, quick=args.quick, smoke=SMOKE)
    title = TITLE + (": SMOKE RUN (CPU, Triton interpreter), numbers are not measurements"
                     if SMOKE else "")
    completed = run_in_process(
        all_cases(size), title=title, timer=timer, device=DEVICE, env=env,
        path=saved_path(args, RESULTS, f"gpu-{device_slug(env['device'])}"),
        resume=args.resume, budget_s=args.budget_s, sections=sections, method=method_notes(),
        refresh_env=note_tuned)
    if not completed:
        sys.exit("bench_gpu.py: the CUDA context broke; the report says where")


if __name__ == "__main__":
    main()
