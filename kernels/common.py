"""What the tiled kernels (:mod:`gatattn.kernels.flash_attention`) and the CSR kernels
(:mod:`gatattn.kernels.csr_attention`) share: the base-2 softmax constant, compile options, the
head-dim constexprs and the backward pass's Delta preprocess."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Softmax state is kept in base 2: log2(e) folds into the logit scale so loops use exp2.
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # jit code reads constexpr globals only

# Compile options of every launch. FMA fusion is stated, not defaulted: Triton 3.9 warns when
# it is unset (its default flips to off in 3.10), and the kernels were measured with it on.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

DELTA_ROWS = 64  # Delta is a row reduction: any tile height will do


@triton.jit
def base2(x):
    """Natural-log logits (an additive bias) in the kernels' base 2, fp32."""
    return x.to(tl.float32) * _LOG2E


def padded_dim(head_dim: int) -> int:
    """A head dim's tile width: a power of two, at least 16 (``tl.dot``'s smallest operand)."""
    return max(16, triton.next_power_of_2(head_dim))


def kernel_constants(head_dim: int, head_dim_v: int, **constexprs) -> dict:
    """The head-dim constexprs every kernel takes (``HEAD_DIM``, ``HEAD_DIM_V`` and their tile
    widths ``BLOCK_D``, ``BLOCK_DV``), with the kernel's own ``constexprs``."""
    return dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=padded_dim(head_dim),
                BLOCK_DV=padded_dim(head_dim_v), **constexprs)


@triton.jit
def _delta_kernel(Out, DO, Delta, total, stride_om, stride_oh, stride_dom, stride_doh,
                  stride_delta_h, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """Delta_i = <dO_i, O_i>, the row term of the softmax gradient."""
    block, head = tl.program_id(0), tl.program_id(1)
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < total) & (cols[None, :] < HEAD_DIM_V)
    o = tl.load(Out + rows[:, None] * stride_om + head * stride_oh + cols[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dom + head * stride_doh + cols[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head * stride_delta_h + rows, delta, mask=rows < total)


def softmax_delta(out: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """``(H, total)`` fp32 ``Delta = <dO, O>`` per row and head, less ``dlse`` (the gradient of
    the natural-log log-sum-exp, whose logit gradient ``P * dlse`` joins ``dS = P (dP - Delta)``
    this way). ``out`` and ``do``: ``(total, H, C_v)``, channels contiguous."""
    total, heads, head_dim_v = out.shape
    delta = torch.empty(heads, total, dtype=torch.float32, device=out.device)
    _delta_kernel[(triton.cdiv(total, DELTA_ROWS), heads)](
        out, do, delta, total, out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        delta.stride(0), HEAD_DIM_V=head_dim_v, BLOCK_M=DELTA_ROWS,
        BLOCK_DV=padded_dim(head_dim_v), **COMPILE_OPTIONS)
    if dlse is not None:
        delta.sub_(dlse)
    return delta
