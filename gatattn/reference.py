"""The one plain-PyTorch statement of the math that every route is tested against.

Attention is computed densely from a mask ``(N_dst, N_src)`` in which ``mask[i, j]`` says that
target (query) ``i`` may attend to source (key) ``j``, i.e. that the edge ``j -> i`` exists; an
integer mask gives each edge's multiplicity (a duplicated edge counts twice in the softmax, as
in message passing). Everything here is deliberately naive: no tiling, no fused kernels, no
graph code of the library, so that it can serve as an independent oracle. Its cost is
O(N_dst * N_src * H); use it only on small inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    *,
    scale: float | None = None,
    temperature: float = 1.0,
    edge_key: Tensor | None = None,
    edge_value: Tensor | None = None,
    bias: Tensor | None = None,
    compute_dtype: torch.dtype | None = torch.float64,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    r"""Masked multi-head attention, computed densely.

    .. math::
        s_{ij} = \langle q_i, k_j + e_{ij} \rangle \cdot \frac{\text{scale}}{\tau} + b_{ij},\quad
        a_{ij} = \frac{\exp s_{ij}}{\sum_{j' : \text{mask}_{ij'}} \exp s_{ij'}},\quad
        o_i = \sum_{j : \text{mask}_{ij}} a_{ij} (v_j + e^v_{ij})

    A target with no allowed source gets a zero output (and zero weights), never NaN.

    Non-finite inputs travel along edges only, as in message passing: a value reaches an output
    only through an edge, so a NaN in ``q_i`` makes row ``i`` NaN (if it has an edge), a NaN in
    ``k_j`` (head ``h``) the rows of ``j``'s targets in head ``h``, and a NaN in ``v_j[h, c]``
    their channel ``c``; every other output is unchanged. ``inf`` follows IEEE arithmetic along
    the same edges.

    Args:
        q: ``(N_dst, H, C)`` queries.
        k: ``(N_src, H_kv, C)`` keys; ``H_kv`` divides ``H`` (grouped-query attention: query
            head ``h`` reads kv head ``h // (H // H_kv)``).
        v: ``(N_src, H_kv, C_v)`` values.
        mask: ``(N_dst, N_src)`` bool, ``True`` where ``j -> i`` is an edge; or integer edge
            multiplicities (:func:`edge_counts`).
        scale: logit scale; default ``1 / sqrt(C)``. (default: :obj:`None`)
        temperature: logits are divided by it. (default: :obj:`1.0`)
        edge_key: ``(N_dst, N_src, H, C)`` per-edge additions to the keys. (default: :obj:`None`)
        edge_value: ``(N_dst, N_src, H, C_v)`` per-edge additions to the values.
            (default: :obj:`None`)
        bias: ``(N_dst, N_src, H)`` additive logit bias ``b_ij`` (after the scale); entries off
            the mask are ignored. (default: :obj:`None`)
        compute_dtype: dtype of the computation; ``None`` computes in the inputs' dtype (the
            "low precision reference" of the tolerance rule). (default: :obj:`torch.float64`)
        return_weights: also return the ``(H, N_dst, N_src)`` weights, summed over duplicate
            edges. (default: :obj:`False`)
        return_lse: also return the ``(N_dst, H)`` log-sum-exp of each target's logits over its
            allowed sources (duplicates counted with their multiplicity), the softmax's
            normaliser ``log sum_j exp s_ij``, in the compute dtype; ``-inf`` for a target with
            no allowed source. (default: :obj:`False`)

    Returns:
        ``(N_dst, H, C_v)`` in the dtype of ``q``, then the weights and the log-sum-exp, each
        if asked.
    """
    out_dtype = q.dtype
    dtype = compute_dtype or q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    logits = torch.einsum("ihc,jhc->hij", q, k)
    if edge_key is not None:
        logits = logits + torch.einsum("ihc,ijhc->hij", q, edge_key.to(dtype))
    logits = logits * (scale / temperature)
    if bias is not None:
        logits = logits + bias.to(dtype).permute(2, 0, 1)

    allowed = mask.to(torch.bool).unsqueeze(0)  # (1, N_dst, N_src)
    multiplicity = mask.to(dtype).unsqueeze(0)
    logits = logits.masked_fill(~allowed, float("-inf"))  # also drops non-edges' NaNs
    row_max = logits.amax(dim=-1, keepdim=True) if logits.shape[-1] > 0 else logits[..., :1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.exp(logits - row_max) * multiplicity  # exp(-inf) = 0 off the graph
    denominator = unnormalised.sum(dim=-1, keepdim=True)
    weights = unnormalised / torch.where(denominator > 0, denominator, torch.ones_like(denominator))

    out = _aggregate(weights, v, allowed)
    if edge_value is not None:
        out = out + torch.einsum("hij,ijhc->ihc", weights, edge_value.to(dtype))
    out = out.to(out_dtype)
    extras = (weights,) if return_weights else ()
    if return_lse:
        # max + log(sum); a target without sources sums to 0: -inf (not max's placeholder 0),
        # with a zero gradient (log's at 0 would meet exp(-inf) = 0 and give NaN).
        empty = denominator == 0
        lse = row_max + torch.where(empty, torch.ones_like(denominator), denominator).log()
        extras += (lse.masked_fill(empty, float("-inf")).squeeze(-1).t(),)
    return (out, *extras) if extras else out


def _aggregate(weights: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """``sum_j weights[h, i, j] v[j, h]`` over edges only: a zero weight off the graph must not
    meet a non-finite value (0 * NaN = NaN would reach rows without that edge)."""
    if bool(torch.isfinite(v).all()):
        return torch.einsum("hij,jhc->ihc", weights, v)
    terms = weights.unsqueeze(-1) * v.transpose(0, 1).unsqueeze(1)  # (H, N_dst, N_src, C_v)
    return terms.where(allowed.unsqueeze(-1), 0).sum(2).transpose(0, 1)


def block_mask(
    sizes_dst: list[int], sizes_src: list[int] | None = None, causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
) -> Tensor:
    """Mask of one complete graph per segment: segment ``g`` has ``sizes_dst[g]`` targets and
    ``sizes_src[g]`` sources (default: the same). ``causal`` keeps ``pos(j) <= pos(i)`` within a
    segment when ``True`` or ``"top_left"`` (as SDPA's ``is_causal``), ``pos(j) <= pos(i) +
    n_src - n_dst`` when ``"bottom_right"`` (each segment's last target sees its last source).
    ``window`` ``(left, right)`` keeps only ``pos(i) + d - left <= pos(j) <= pos(i) + d + right``
    around that diagonal ``d`` (0 unless bottom-right; ``None``: no bound on a side; with
    ``causal`` the right bound is the diagonal itself)."""
    if not isinstance(causal, bool) and causal not in ("top_left", "bottom_right"):
        raise ValueError(
            f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")
    left, right = (None, None) if window is None else window
    sizes_src = sizes_dst if sizes_src is None else sizes_src
    blocks = []
    for n_dst, n_src in zip(sizes_dst, sizes_src, strict=True):
        block = torch.ones(n_dst, n_src, dtype=torch.bool)
        diagonal = n_src - n_dst if causal == "bottom_right" else 0
        if causal:
            block = block.tril(diagonal)
        elif right is not None:
            block = block.tril(diagonal + right)
        if left is not None:
            block = block.triu(diagonal - left)
        blocks.append(block)
    if not blocks:
        return torch.zeros(0, 0, dtype=torch.bool)
    return torch.block_diag(*blocks)


def edge_mask(edge_index: Tensor, num_dst: int, num_src: int) -> Tensor:
    """Mask with ``mask[dst, src] = True`` for every edge ``src -> dst`` of ``edge_index``."""
    mask = torch.zeros(num_dst, num_src, dtype=torch.bool)
    mask[edge_index[1].cpu(), edge_index[0].cpu()] = True
    return mask


def edge_counts(edge_index: Tensor, num_dst: int, num_src: int) -> Tensor:
    """Integer mask with ``counts[dst, src]`` = how often ``src -> dst`` occurs in
    ``edge_index`` (duplicate edges count with their multiplicity)."""
    counts = torch.zeros(num_dst, num_src, dtype=torch.long)
    counts.index_put_((edge_index[1].cpu(), edge_index[0].cpu()),
                      torch.ones(edge_index.size(1), dtype=torch.long), accumulate=True)
    return counts


def dense_edge_features(edge_index: Tensor, edge_attr: Tensor, num_dst: int,
                        num_src: int) -> Tensor:
    """Scatter per-edge features ``(E, ...)`` into a dense ``(N_dst, N_src, ...)`` tensor."""
    dense = edge_attr.new_zeros(num_dst, num_src, *edge_attr.shape[1:])
    dense[edge_index[1], edge_index[0]] = edge_attr
    return dense
