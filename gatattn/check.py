"""Every route on this machine against :mod:`gatattn.reference`: ``python -m gatattn.check``.

The test suite's equivalence checks, as a tool for any machine and device: each available route
(``sdpa``, ``logits``, ``sparse``, ``triton``) runs each graph kind it takes (complete, batched
with awkward sizes, causal, bipartite, sliding windows, an edge set with duplicates and isolated
targets; four of them with an ``attn_bias``; one with grouped-query heads, ``k`` and ``v`` with a
single head) in each dtype it computes in, forward and the gradients of ``q``, ``k``, ``v`` (and
of the bias), and is compared with the reference in float64 under the project's tolerance rule:

    |out - ref_hi| <= 2 |ref_lo - ref_hi| + floor

where ``ref_lo`` is the reference computed in the run's own low precision (float16/bfloat16
only) and ``floor`` a small fixed bound per dtype, scaled by the reference's magnitude
(:mod:`gatattn.tolerance`). A route that is silently wrong (say an SDPA 1% off) fails here. The
command prints one table and exits with status 1 if any row fails; :func:`run` returns the rows.

On CPU the Triton kernels run only in Triton's interpreter (``TRITON_INTERPRET=1``, set before
Python starts), whose bfloat16 matrix product is broken: that combination is not run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm import tqdm

from gatattn import reference
from gatattn.backends.fused import triton_unavailable_reason
from gatattn.backends.sdpa import logits_attention
from gatattn.functional import attention
from gatattn.graph import build_graph
from gatattn.tolerance import LOW_PRECISION, compare

ROUTES = ("sdpa", "logits", "sparse", "triton")
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
QUANTITIES = ("out", "dq", "dk", "dv", "dbias")  # dbias: cases with an attn_bias only


@dataclass(frozen=True)
class Case:
    """One attention graph: the keyword arguments of :func:`gatattn.attention` that describe it,
    and its mask (``mask[i, j]`` = how often ``j -> i`` is an edge), built independently of the
    library's own graph code."""

    name: str
    num_dst: int
    num_src: int
    graph: dict = field(default_factory=dict)
    mask: Tensor | None = None
    #: With an ``attn_bias``: its ``(rows, H)`` layout's row count, and the map (differentiable)
    #: from that layout to the reference's dense ``(N_dst, N_src, H)`` bias.
    bias_rows: int | None = None
    dense_bias: Callable[[Tensor], Tensor] | None = None
    #: Grouped-query heads: ``k`` and ``v`` with this many heads (1 divides any head count);
    #: ``None``: as many as ``q``.
    kv_heads: int | None = None

    @property
    def implicit(self) -> bool:
        return "edge_index" not in self.graph


@dataclass(frozen=True)
class Row:
    route: str
    case: str
    dtype: str
    quantity: str  # "out", "dq", "dk", "dv", or "run" when the route raised
    error: float  # max |got - ref_hi|
    bound: float  # the bound at the element nearest to failing
    passed: bool
    note: str = ""


def run(device: str | torch.device | None = None, routes=ROUTES, dtypes=DTYPES, *,
        heads: int = 2, channels: int = 24, seed: int = 0,
        progress: bool = False) -> list[Row]:
    """Check ``routes`` x graph kinds x ``dtypes`` on ``device`` (default: CUDA if present);
    rows for every quantity of every combination that runs here (see :func:`skipped`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = [(route, case, dtype) for route in routes for case in cases()
            for dtype in dtypes if _applies(route, case, dtype, device) is None]
    rows = []
    for route, case, dtype in tqdm(plan, desc="gatattn.check", disable=not progress):
        rows += _check(route, case, dtype, device, heads, channels, seed)
    return rows


def skipped(device: str | torch.device | None = None, routes=ROUTES,
            dtypes=DTYPES) -> list[tuple[str, str, str, str]]:
    """``(route, case, dtype, reason)`` for the combinations :func:`run` leaves out here."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return [(route, case.name, _name(dtype), reason) for route in routes for case in cases()
            for dtype in dtypes
            if (reason := _applies(route, case, dtype, device)) is not None]


def cases() -> list[Case]:
    return [
        _implicit("complete, 33 nodes", [33], [33]),
        _implicit("batched, unsorted batch, graphs of 0, 1, 7, 20 nodes", [0, 1, 7, 20],
                  [0, 1, 7, 20], shuffle=True),
        _implicit("causal, ptr, sequences of 5, 17, 1", [5, 17, 1], [5, 17, 1], causal=True),
        _implicit("bipartite, 3x6 and 8x2 per graph", [3, 8], [6, 2]),
        _implicit("bipartite causal, 9x4 and 2x7 per graph", [9, 2], [4, 7], causal=True),
        _implicit("bipartite causal bottom-right, 9x4 and 2x7 per graph", [9, 2], [4, 7],
                  causal="bottom_right"),
        _edges("edge set, duplicates, self loops, isolated targets", 20, 16, 70),
        _with_bias(_implicit("attn_bias, causal, ptr, sequences of 5, 17, 1", [5, 17, 1],
                             [5, 17, 1], causal=True)),
        _with_bias(_implicit("attn_bias, bipartite, 3x6 and 8x2 per graph", [3, 8], [6, 2])),
        _with_bias(_implicit("attn_bias, bipartite causal bottom-right, 3x6 and 8x2 per graph",
                             [3, 8], [6, 2], causal="bottom_right")),
        _with_bias(_edges("attn_bias, edge set, self loops, isolated targets", 20, 16, 70,
                          duplicates=False)),
        replace(_implicit("grouped-query (one kv head), causal, ptr, sequences of 6, 1, 11",
                          [6, 1, 11], [6, 1, 11], causal=True), kv_heads=1),
        _implicit("window (3, 2), ptr, sequences of 5, 17, 1", [5, 17, 1], [5, 17, 1],
                  window=(3, 2)),
        _implicit("causal window (4, 0), unsorted batch, graphs of 0, 1, 7, 20", [0, 1, 7, 20],
                  [0, 1, 7, 20], causal=True, shuffle=True, window=(4, 0)),
        _implicit("bipartite causal bottom-right window (2, 0), 9x4 and 2x7 per graph", [9, 2],
                  [4, 7], causal="bottom_right", window=(2, 0)),
        _with_bias(_implicit("attn_bias, window (None, 3), bipartite, 3x6 and 8x2 per graph",
                             [3, 8], [6, 2], window=(None, 3))),
    ]


def _applies(route: str, case: Case, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why ``route`` does not run ``case`` in ``dtype`` here, or ``None`` if it does."""
    if route == "sdpa" and not case.implicit:
        return "sdpa runs implicit graphs only"
    if route == "logits":
        return _logits_refusal(case, dtype, device)
    if route == "triton":
        if dtype == torch.float64:
            return "the kernels refuse float64 (sdpa and sparse compute in it)"
        return triton_unavailable_reason(device, dtype, case.implicit)
    return None


def _logits_refusal(case: Case, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the written-out logits route (which only ``auto`` takes) does not run ``case``."""
    if device.type != "cpu":
        return "logits is a CPU route (auto takes it there for small complete graphs)"
    if dtype not in (torch.float32, torch.float64):
        return "logits computes in float32 and float64 (half precision goes to sdpa)"
    if not case.implicit or case.graph.get("causal") or case.graph.get("window") is not None:
        return "logits runs complete graphs only (no edge set, causal mask or window)"
    if case.bias_rows is not None or case.kv_heads is not None:
        return "logits takes no attn_bias and no grouped-query heads"
    return None


def _route(route: str, graph: dict):
    """``(q, k, v, *bias) -> out`` through ``route``: a ``backend`` of :func:`attention`, or
    the logits route's own function (``auto`` takes it only where it serves)."""
    if route == "logits":
        built = build_graph(**{key: value for key, value in graph.items()
                               if key not in ("causal", "window")})
        return lambda q, k, v: logits_attention(q, k, v, built, scale=q.size(-1) ** -0.5)
    return lambda q, k, v, *bias: attention(q, k, v, backend=route,
                                            attn_bias=bias[0] if bias else None, **graph)


def _check(route: str, case: Case, dtype: torch.dtype, device: torch.device, heads: int,
           channels: int, seed: int) -> list[Row]:
    inputs = _inputs(case, heads, channels, seed)  # q, k, v and, if the case has one, the bias
    grad_out = torch.randn(case.num_dst, heads, channels,
                           generator=torch.Generator().manual_seed(seed + 1))

    def ref(compute_dtype):
        def fn(q, k, v, *bias):
            dense = case.dense_bias(bias[0]) if bias else None
            return reference.attention(q, k, v, case.mask, bias=dense,
                                       compute_dtype=compute_dtype)
        return fn

    ref_hi = _forward_and_grads(ref(torch.float64), _cast(inputs, torch.float64, "cpu"),
                                grad_out.double())
    ref_lo = None
    if dtype in LOW_PRECISION:
        ref_lo = _forward_and_grads(ref(None), _cast(inputs, dtype, "cpu"), grad_out.to(dtype))
    graph = {key: value.to(device) if isinstance(value, Tensor) else value
             for key, value in case.graph.items()}
    try:
        got = _forward_and_grads(_route(route, graph), _cast(inputs, dtype, device),
                                 grad_out.to(device, dtype))
    except Exception as error:  # a route that raises on a supported case fails the check
        note = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return [Row(route, case.name, _name(dtype), "run", float("nan"), float("nan"), False,
                    note)]
    return [_compare(route, case.name, dtype, quantity, g, hi, None if ref_lo is None else lo)
            for quantity, g, hi, lo in zip(QUANTITIES[:len(got)], got, ref_hi,
                                           ref_lo or ref_hi, strict=True)]


def _compare(route, case, dtype, quantity, got: Tensor, ref_hi: Tensor,
             ref_lo: Tensor | None) -> Row:
    verdict = compare(got.cpu(), ref_hi, ref_lo, dtype)
    return Row(route, case, _name(dtype), quantity, verdict.error, verdict.bound, verdict.passed,
               verdict.note)


def _forward_and_grads(fn: Callable[..., Tensor], inputs, grad_out: Tensor) -> list[Tensor]:
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [out, *(torch.zeros_like(t) if g is None else g
                   for t, g in zip(inputs, grads, strict=True))]


def _inputs(case: Case, heads: int, channels: int, seed: int) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    kv_heads = heads if case.kv_heads is None else case.kv_heads
    qkv = (torch.randn(case.num_dst, heads, channels, generator=gen),
           torch.randn(case.num_src, kv_heads, channels, generator=gen),
           torch.randn(case.num_src, kv_heads, channels, generator=gen))
    if case.bias_rows is None:
        return qkv
    return (*qkv, torch.randn(case.bias_rows, heads, generator=gen))


def _cast(tensors, dtype: torch.dtype, device) -> tuple[Tensor, ...]:
    return tuple(t.to(device=device, dtype=dtype) for t in tensors)


def _implicit(name: str, sizes_dst: list[int], sizes_src: list[int], *,
              causal: bool | str = False, shuffle: bool = False,
              window: tuple[int | None, int | None] | None = None) -> Case:
    """One complete graph per entry of ``sizes_*``, given by ``batch`` (shuffled: nodes of a
    graph need not be contiguous) or ``ptr``; causal keeps ``pos(j) <= pos(i) + d`` per graph,
    ``d = n_src - n_dst`` when ``"bottom_right"``, else 0; a window ``(left, right)`` keeps
    ``-left <= pos(j) - pos(i) - d <= right``."""
    batch_dst = torch.repeat_interleave(torch.arange(len(sizes_dst)), torch.tensor(sizes_dst))
    batch_src = torch.repeat_interleave(torch.arange(len(sizes_src)), torch.tensor(sizes_src))
    if shuffle:
        gen = torch.Generator().manual_seed(7)
        batch_dst = batch_dst[torch.randperm(batch_dst.numel(), generator=gen)]
        batch_src = batch_dst if sizes_src == sizes_dst else batch_src
    pos_dst, pos_src = _positions(batch_dst), _positions(batch_src)
    mask = batch_dst[:, None] == batch_src[None, :]
    diagonal = torch.tensor(sizes_src) - torch.tensor(sizes_dst)
    offset = pos_src[None, :] - pos_dst[:, None]  # pos(j) - pos(i) - d
    offset = offset - (diagonal[batch_dst][:, None] if causal == "bottom_right" else 0)
    left, right = window or (None, None)
    right = 0 if causal else right
    if right is not None:
        mask &= offset <= right
    if left is not None:
        mask &= offset >= -left
    bipartite = sizes_dst != sizes_src
    if shuffle:
        graph = {"batch": (batch_dst, batch_src) if bipartite else batch_dst}
    else:
        ptr_dst, ptr_src = (torch.tensor([0, *sizes]).cumsum(0) for sizes in (sizes_dst, sizes_src))
        graph = {"ptr": (ptr_dst, ptr_src) if bipartite else ptr_dst}
    return Case(name, sum(sizes_dst), sum(sizes_src),
                {**graph, "causal": causal, "window": window}, mask)


def _positions(batch: Tensor) -> Tensor:
    """Each node's position within its graph, in order of appearance."""
    seen: dict[int, int] = {}
    positions = []
    for graph in batch.tolist():
        positions.append(seen.get(graph, 0))
        seen[graph] = positions[-1] + 1
    return torch.tensor(positions, dtype=torch.long)


def _edges(name: str, num_dst: int, num_src: int, num_edges: int, *,
           duplicates: bool = True) -> Case:
    gen = torch.Generator().manual_seed(3)
    src = torch.randint(0, num_src, (num_edges,), generator=gen)
    dst = torch.randint(0, num_dst - 3, (num_edges,), generator=gen)  # the last 3: no in-edge
    edge_index = torch.cat([torch.stack([src, dst]), _self_loops(min(num_dst, num_src))], 1)
    if duplicates:
        edge_index = torch.cat([edge_index, edge_index[:, :5]], 1)
    else:  # one bias per pair: the dense reference bias cannot hold two
        edge_index = torch.unique(edge_index, dim=1)
    mask = reference.edge_counts(edge_index, num_dst, num_src)
    return Case(name, num_dst, num_src, {"edge_index": edge_index}, mask)


def _with_bias(case: Case) -> Case:
    """``case`` with an ``attn_bias``: per edge, or each graph's ``n_dst x n_src`` block
    target-major, graphs stacked in order (the graphs' nodes are contiguous, given by ``ptr``)."""
    if not case.implicit:
        src, dst = case.graph["edge_index"]

        def from_edges(bias: Tensor) -> Tensor:
            dense = bias.new_zeros(case.num_dst, case.num_src, bias.size(1))
            return dense.index_put((dst, src), bias)
        return replace(case, bias_rows=src.numel(), dense_bias=from_edges)
    ptr = case.graph["ptr"]
    ptr_dst, ptr_src = ptr if isinstance(ptr, tuple) else (ptr, ptr)
    blocks = list(zip(ptr_dst[:-1].tolist(), ptr_dst.diff().tolist(), ptr_src[:-1].tolist(),
                      ptr_src.diff().tolist(), strict=True))

    def from_blocks(bias: Tensor) -> Tensor:
        dense, row = bias.new_zeros(case.num_dst, case.num_src, bias.size(1)), 0
        for start_dst, n_dst, start_src, n_src in blocks:
            block = bias[row:row + n_dst * n_src].reshape(n_dst, n_src, -1)
            dense = dense.index_put(_block_indices(start_dst, n_dst, start_src, n_src), block)
            row += n_dst * n_src
        return dense
    return replace(case, bias_rows=sum(d * s for _, d, _, s in blocks), dense_bias=from_blocks)


def _block_indices(start_dst: int, n_dst: int, start_src: int, n_src: int):
    rows = torch.arange(start_dst, start_dst + n_dst)[:, None].expand(n_dst, n_src)
    cols = torch.arange(start_src, start_src + n_src)[None, :].expand(n_dst, n_src)
    return rows, cols


def _self_loops(n: int) -> Tensor:
    """Self loops on every 4th node, none on the last 3."""
    return torch.arange(0, n - 3, 4).repeat(2, 1)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def table(rows: list[Row]) -> str:
    """One line per (route, case, dtype): each quantity's max error and bound, and the verdict."""
    combos: dict[tuple[str, str, str], dict[str, Row]] = {}
    for row in rows:
        combos.setdefault((row.route, row.case, row.dtype), {})[row.quantity] = row
    lines = ["| route | case | dtype | " + " | ".join(QUANTITIES) + " | result |",
             "|---" * (len(QUANTITIES) + 4) + "|"]
    for (route, case, dtype), by_quantity in combos.items():
        if "run" in by_quantity:
            cells = [by_quantity["run"].note] + [""] * (len(QUANTITIES) - 1)
        else:
            cells = [_cell(by_quantity[q]) if q in by_quantity else "-" for q in QUANTITIES]
        verdict = "pass" if all(r.passed for r in by_quantity.values()) else "**FAIL**"
        lines.append(f"| {route} | {case} | {dtype} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def _cell(row: Row) -> str:
    text = f"{row.error:.1e} <= {row.bound:.1e}"
    return text + (f" ({row.note})" if row.note else "")


def _combinations(left_out: list[tuple[str, str, str, str]]) -> str:
    routes, case_names, dtypes = ({c[i] for c in left_out} for i in range(3))
    every_case = case_names == {case.name for case in cases()}
    return (f"{', '.join(sorted(routes))} on "
            f"{'every case' if every_case else '; '.join(sorted(case_names))}, "
            f"{', '.join(sorted(dtypes))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gatattn.check", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument("--dtypes", nargs="+", choices=[_name(d) for d in DTYPES],
                        default=[_name(d) for d in DTYPES])
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = run(device, args.routes, dtypes, progress=sys.stderr.isatty())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gatattn.check on {device} ({name}), torch {torch.__version__}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}\n")
    print(table(rows))
    left_out = skipped(device, args.routes, dtypes)
    if left_out:
        print("\nNot run here:")
        for reason in dict.fromkeys(r for *_, r in left_out):
            print(f"- {reason}: {_combinations([c for c in left_out if c[3] == reason])}")
    failed = sum(not row.passed for row in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} checks pass" +
          (f"; {failed} FAIL" if failed else ""))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
