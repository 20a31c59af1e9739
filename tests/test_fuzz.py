"""Property suite: random graphs of every kind, random shapes, dtypes and scales, on every route,
against ``gatattn.reference``: forward and every gradient, second derivatives on small cases, and
the non-finite policy.

CI runs a fixed, derandomised sample (the ``ci`` profile in conftest.py); a deeper random search:
``HYPOTHESIS_PROFILE=fuzz pytest -m heavy tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gatattn
from gatattn import reference
from tests.conftest import check_against_reference, masked_reference
from tests.test_functional import same_graph_mask

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"

# Minutes of CPU (gradgradcheck alone perturbs every entry of 40 problems): `make test-heavy`.
pytestmark = pytest.mark.heavy


@dataclass
class Case:
    """One random attention problem: sizes, the graph as the caller gives it, and its mask."""

    n_dst: int
    n_src: int
    kwargs: dict  # edge_index / batch / ptr / causal, as passed to gatattn.attention
    mask: torch.Tensor  # (n_dst, n_src) edge multiplicities for the reference
    implicit: bool


def _positions(batch: torch.Tensor) -> torch.Tensor:
    return torch.tensor([int((batch[:i] == b).sum()) for i, b in enumerate(batch.tolist())],
                        dtype=torch.long)


@st.composite
def cases(draw, max_nodes=9) -> Case:
    bipartite = draw(st.booleans())
    causal = draw(st.booleans())
    batched = draw(st.booleans())
    sizes_dst = draw(st.lists(st.integers(0, max_nodes), min_size=1, max_size=4)) if batched \
        else [draw(st.integers(0, 2 * max_nodes))]
    sizes_src = ([draw(st.integers(0, max_nodes)) for _ in sizes_dst] if bipartite
                 else sizes_dst)
    batch_dst = torch.repeat_interleave(torch.arange(len(sizes_dst)), torch.tensor(sizes_dst))
    batch_src = torch.repeat_interleave(torch.arange(len(sizes_src)), torch.tensor(sizes_src))
    if batched and draw(st.booleans()):  # unsorted batch vectors: any node order
        seed = draw(st.integers(0, 2**16))
        gen = torch.Generator().manual_seed(seed)
        batch_dst = batch_dst[torch.randperm(batch_dst.numel(), generator=gen)]
        batch_src = (batch_src[torch.randperm(batch_src.numel(), generator=gen)] if bipartite
                     else batch_dst)
    n_dst, n_src = batch_dst.numel(), batch_src.numel()

    kwargs = {"causal": causal}
    if batched:
        sorted_batch = bool((batch_dst.diff() >= 0).all()) and bool((batch_src.diff() >= 0).all())
        if sorted_batch and draw(st.booleans()):
            ptr = [torch.tensor([0, *torch.tensor(s).cumsum(0).tolist()]) for s in
                   (sizes_dst, sizes_src)]
            kwargs["ptr"] = tuple(ptr) if bipartite else ptr[0]
        else:
            kwargs["batch"] = (batch_dst, batch_src) if bipartite else batch_dst

    if draw(st.booleans()):  # an explicit edge set, duplicates and self loops included
        pairs = draw(st.lists(st.tuples(st.integers(0, max(n_src - 1, 0)),
                                        st.integers(0, max(n_dst - 1, 0))),
                              max_size=40)) if n_src and n_dst else []
        edge_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t()
        mask = reference.edge_counts(edge_index, n_dst, n_src)
        if causal:
            keep = _positions(batch_src).view(1, -1) <= _positions(batch_dst).view(-1, 1)
            mask = mask * keep
        kwargs["edge_index"] = edge_index
        return Case(n_dst, n_src, kwargs, mask, implicit=False)
    mask = same_graph_mask(batch_dst, batch_src, causal).long()
    return Case(n_dst, n_src, kwargs, mask, implicit=True)


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float64), max_nodes=9):
    case = draw(cases(max_nodes))
    heads = draw(st.integers(1, 3))
    channels, value_channels = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(st.one_of(st.none(), st.floats(-2.0, 2.0)))
    temperature = draw(st.sampled_from([0.25, 1.0, 3.0, float("inf")]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    shapes = ((case.n_dst, heads, channels), (case.n_src, heads, channels),
              (case.n_src, heads, value_channels))
    inputs = tuple(torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in shapes)
    return case, inputs, {"scale": scale, "temperature": temperature}


def _routes(case: Case, dtype: torch.dtype) -> list[str]:
    routes = ["auto", "sparse"] + (["sdpa"] if case.implicit else [])
    if TRITON_ON_CPU and dtype == torch.float32:
        routes.append("triton")
    return routes


def _check(case, inputs, scalars, backend):
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, backend=backend, **case.kwargs, **scalars),
        inputs, masked_reference(case.mask, **scalars))


FAST = settings(suppress_health_check=[HealthCheck.too_slow])


def examples(count_in_ci: int) -> int:
    """``count_in_ci`` under the ci profile, scaled up with the fuzz profile."""
    return max(1, count_in_ci * settings.default.max_examples // 100)


@FAST
@given(problems())
def test_every_torch_route_matches_the_reference(problem):
    case, inputs, scalars = problem
    for backend in ("auto", "sparse", "sdpa"):
        if backend == "sdpa" and not case.implicit:
            continue
        _check(case, inputs, scalars, backend)


@st.composite
def windowed(draw, dtypes=(torch.float32, torch.float64)):
    """A problem of :func:`problems` narrowed by a random sliding window (causal: right 0 or
    None), its mask cut to the band ``-left <= pos(j) - pos(i) <= right`` (top-left)."""
    case, inputs, scalars = draw(problems(dtypes=dtypes, max_nodes=8))
    left, right = draw(st.tuples(*[st.one_of(st.none(), st.integers(0, 4))] * 2))
    right = draw(st.sampled_from([None, 0])) if case.kwargs["causal"] else right
    batch_dst, batch_src = case.kwargs.get("batch", (None, None)), None
    if isinstance(batch_dst, torch.Tensor):  # self-attention: one batch for both sides
        batch_src = batch_dst
    elif batch_dst is not None:
        batch_dst, batch_src = batch_dst
    positions = [torch.arange(n) if b is None else _positions(b)
                 for n, b in ((case.n_dst, batch_dst), (case.n_src, batch_src))]
    if "ptr" in case.kwargs:  # nodes in graph order: a position counts from its graph's start
        ptrs = case.kwargs["ptr"] if isinstance(case.kwargs["ptr"], tuple) else (
            case.kwargs["ptr"],) * 2
        positions = [torch.arange(int(p[-1])) - p[:-1].repeat_interleave(p.diff())
                     for p in ptrs]
    offset = positions[1].view(1, -1) - positions[0].view(-1, 1)
    keep = torch.ones_like(offset, dtype=torch.bool)
    keep = keep if left is None else keep & (offset >= -left)
    keep = keep if right is None else keep & (offset <= right)
    case = Case(case.n_dst, case.n_src, {**case.kwargs, "window": (left, right)},
                case.mask * keep, case.implicit)
    return case, inputs, scalars


@FAST
@given(windowed())
def test_windows_on_every_torch_route_match_the_reference(problem):
    case, inputs, scalars = problem
    for backend in ("auto", "sparse", "sdpa") if case.implicit else ("auto", "sparse"):
        _check(case, inputs, scalars, backend)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the kernels' CPU cases need Triton's interpreter")
@settings(FAST, max_examples=examples(40))
@given(windowed(dtypes=(torch.float32,)))
def test_windows_in_the_kernels_match_the_reference(problem):
    case, inputs, scalars = problem
    _check(case, inputs, scalars, "triton")


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the kernels' CPU cases need Triton's interpreter")
@settings(FAST, max_examples=examples(60))
@given(problems(dtypes=(torch.float32,), max_nodes=6))
def test_the_kernels_match_the_reference(problem):
    case, inputs, scalars = problem
    _check(case, inputs, scalars, "triton")


@settings(FAST, max_examples=examples(40))
@given(problems(dtypes=(torch.float64,), max_nodes=4))
def test_second_derivatives(problem):
    case, inputs, scalars = problem
    for backend in ["sparse"] + (["sdpa"] if case.implicit else []):
        assert torch.autograd.gradgradcheck(
            lambda q, k, v, backend=backend: gatattn.attention(
                q, k, v, backend=backend, **case.kwargs, **scalars),
            inputs, atol=1e-6, rtol=1e-4)


@FAST
@given(problems(max_nodes=6), st.sampled_from("qkv"), st.data())
def test_a_nan_travels_along_edges_only(problem, tensor, data):
    case, inputs, scalars = problem
    inputs = dict(zip("qkv", (t.detach().clone() for t in inputs), strict=True))
    target = inputs[tensor]
    if target.numel() == 0:
        return
    index = tuple(data.draw(st.integers(0, s - 1)) for s in target.shape)
    target[index] = float("nan")
    expected = reference.attention(*inputs.values(), case.mask, **scalars)
    for backend in _routes(case, target.dtype):
        out = gatattn.attention(*inputs.values(), backend=backend, **case.kwargs, **scalars)
        assert torch.equal(out.isnan(), expected.isnan()), backend
        finite = ~expected.isnan()
        torch.testing.assert_close(out[finite], expected[finite])
