"""The project's tolerance rule, flash-attention's: an error is judged against the reference's own.

For a run in float16 / bfloat16,

    |got - ref_hi| <= 2 |ref_lo - ref_hi| + floor

where ``ref_hi`` is the reference in high precision and ``ref_lo`` the same reference in the
run's own low precision; for float32 / float64 only a fixed floor. The floor is scaled by the
reference's magnitude (gradients of sums grow with N). The test suite, ``python -m
gatattn.check`` and ``auto``'s verification of the fused kernels on a GPU all judge by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Comparison:
    error: float  # max |got - ref_hi| where the reference is finite
    bound: float  # the bound at the element nearest to failing
    passed: bool
    note: str = ""


def compare(got: Tensor, ref_hi: Tensor, ref_lo: Tensor | None, dtype: torch.dtype) -> Comparison:
    """``got`` (computed in ``dtype``) against ``ref_hi`` under the rule, on ``got``'s device.
    Where the reference is non-finite (a NaN input it propagates) ``got`` must be too."""
    got = got.detach().double()
    ref_hi = ref_hi.detach().to(got.device, torch.float64)
    if not got.numel():
        return Comparison(0.0, 0.0, True, "empty")
    finite_ref = torch.isfinite(ref_hi)
    magnitude = ref_hi[finite_ref].abs().max().item() if finite_ref.any() else 0.0
    bound = torch.full_like(ref_hi, FLOOR[dtype] * max(1.0, magnitude))
    if ref_lo is not None:
        bound = bound + 2 * (ref_lo.detach().to(got.device, torch.float64) - ref_hi).abs()
    error = torch.where(finite_ref, (got - ref_hi).abs(), 0.0)
    within = (error <= bound) | ~finite_ref  # a non-finite bound judges nothing
    stray = int((torch.isfinite(got) != finite_ref).sum())  # NaN where the reference has none
    worst = torch.where(within, (error / bound).nan_to_num(0.0), torch.inf).argmax()
    passed = stray == 0 and bool(within.all())
    return Comparison(error.max().item(), bound.flatten()[worst].item(), passed,
                      f"{stray} non-finite values where the reference has none" if stray else "")
