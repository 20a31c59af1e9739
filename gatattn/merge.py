"""Merging partial attention results by their log-sum-exps.

Attention of a target over a source set ``S`` is a softmax-weighted average; over disjoint parts
``S_1, ..., S_P`` it is the average of the parts' averages, each weighted by its share of the
softmax normaliser: with ``lse_p = log sum_{j in S_p} exp s_ij``,

    lse = log sum_p exp lse_p,        out = sum_p exp(lse_p - lse) out_p.

Ring attention (keys and values passed around ranks) and split-KV decoding (a long cache cut
into chunks attended in parallel) compute the parts separately, each with
``gatattn.attention(..., return_lse=True)``, and merge them here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    r"""Merge attention outputs over disjoint source sets into the output over their union.

    .. math::
        \text{lse}_i = \log \sum_p \exp \text{lse}_{p,i}, \qquad
        o_i = \sum_p \exp(\text{lse}_{p,i} - \text{lse}_i)\, o_{p,i}

    A part in which a target has no source (``lse = -inf``, output 0, as every route of
    :func:`gatattn.attention` returns) gets weight 0, and its gradients are 0; a target with
    no source in any part gets a zero output and ``lse = -inf``, never NaN. NaN propagates.
    Differentiable (twice) through the outputs and the log-sum-exps.

    Args:
        outs: the parts' ``(N_dst, H, C_v)`` outputs, as many as ``lses``.
        lses: the parts' ``(N_dst, H)`` log-sum-exps (``return_lse=True``).

    Returns:
        ``(out, lse)``: ``out`` ``(N_dst, H, C_v)`` in the dtype of ``outs[0]``, ``lse``
        ``(N_dst, H)`` in the dtype of ``lses[0]`` (float32, or float64); the weights are
        computed in the latter.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attention needs one lse per output and at least one part, got "
                         f"{len(outs)} outputs and {len(lses)} lses")
    for p, (out, lse) in enumerate(zip(outs, lses, strict=True)):
        if out.dim() != 3 or lse.shape != out.shape[:2] or out.shape != outs[0].shape:
            raise ValueError(
                f"part {p}: out must be (N_dst, H, C_v) and lse (N_dst, H), the same for every "
                f"part; got out {tuple(out.shape)} and lse {tuple(lse.shape)} (part 0's out: "
                f"{tuple(outs[0].shape)})")
    dtype = lses[0].dtype
    lse = torch.stack([x.to(dtype) for x in lses])  # (P, N_dst, H)
    # Shifted by the (detached) largest part: the weights and the merged lse do not depend on
    # the shift, and -inf parts then weigh exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
    top = lse.detach().amax(dim=0)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weights = (lse - top).exp()
    total = weights.sum(dim=0)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    merged_lse = (top + safe_total.log()).masked_fill(empty, float("-inf"))
    weights = weights / safe_total
    out = sum(w.unsqueeze(-1) * o.to(dtype) for w, o in zip(weights, outs, strict=True))
    return out.to(outs[0].dtype), merged_lse
