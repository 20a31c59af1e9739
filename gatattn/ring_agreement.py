"""What every rank of :func:`gatattn.distributed.ring_attention` states in its one
``all_gather``, and the checks of it: every rank refuses the same inputs together instead of
leaving the others waiting."""

from __future__ import annotations

import torch
from torch import Tensor

from gatattn.graph.switches import Window

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What each rank states in the one all_gather: its own node count, then values all must share
# (the graph node count is -1 without a graph, ptr or batch).
FIELDS = ("nodes", "heads", "kv heads", "channels", "value channels", "dtype", "needs grad",
          "causal", "load_balance", "logit multiplier", "graph node count", "graph count",
          "graph sizes fingerprint", "window left", "window right", "refused")
FINGERPRINT_MODULUS = 2**50  # exact in float64


def validate_local(q: Tensor, k: Tensor, causal, load_balance) -> None:
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False (self-attention: both alignments are "
                         f"the same), got {causal!r}")
    if not isinstance(load_balance, bool):
        raise ValueError(f"load_balance must be True or False, got {load_balance!r}")
    if q.size(0) != k.size(0):
        raise ValueError(
            f"ring_attention shards one graph's nodes: q and k must have one row per node of "
            f"this rank's shard, got {q.size(0)} and {k.size(0)} rows (cross-attention is not "
            "supported)")
    if q.dtype not in DTYPES:
        raise ValueError(f"ring_attention computes in {DTYPES}, got {q.dtype}")


def rank_statement(q: Tensor, k: Tensor, v: Tensor, causal: bool, load_balance: bool,
                   multiplier: float, total: int, sizes: list[int] | None,
                   window: Window | None) -> list[float]:
    """This rank's row of the table (:data:`FIELDS`, ``refused`` 0)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    fingerprint = (sum((g + 1) * n for g, n in enumerate(sizes)) % FINGERPRINT_MODULUS
                   if sizes is not None else 0)
    return [q.size(0), q.size(1), k.size(1), q.size(2), v.size(2), DTYPES.index(q.dtype),
            needs_grad, causal, load_balance, multiplier,
            total, 1 if sizes is None else len(sizes),
            fingerprint, *(-1 if w is None else w for w in window or (None, None)), 0.0]


def check_agreement(table: Tensor) -> None:
    """Raises on every rank where one refused its inputs or the ranks' statements differ."""
    refused = table[:, -1].nonzero().flatten().tolist()
    if refused:
        raise ValueError(f"ring_attention: the inputs of rank(s) {refused} were refused there "
                         "(see their error); every rank stops")
    for column, name in enumerate(FIELDS[1:-1], start=1):
        values = table[:, column]
        if not bool((values == values[0]).all()):
            shown = [DTYPES[int(x)] for x in values] if name == "dtype" else values.tolist()
            raise ValueError(
                f"ring_attention: every rank must give the same {name}, got {shown} by rank; "
                "pass the same shapes, dtype, graph, causal, window, scale, temperature and "
                "load_balance on every rank, and inputs that require grad on all ranks or none")
