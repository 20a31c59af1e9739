"""The compiled CPU kernels of the message-passing route (gatattn/csrc/csr_attention.cpp)
against the same route written in torch ops, and against the reference.

The kernels replay the torch-ops form's arithmetic step for step, so besides agreeing within
rounding they put NaN and inf in exactly the same places. Every other test of the route
(tests/test_sparse.py, test_bias.py, test_lse.py, ...) runs them too where they build."""

import os
import subprocess
import sys

import pytest
import torch

import gatattn
from gatattn import reference
from gatattn.backends import native, sparse
from tests.conftest import check_against_reference, masked_reference


def run_route(use_kernels, monkeypatch, q, k, v, edge_index, bias=None, lse=False):
    """Output, lse (if asked) and the gradients of q, k, v, bias, through the CSR route with
    or without the compiled kernels."""
    if not use_kernels:
        monkeypatch.setattr(sparse, "cpu_kernels", lambda: None)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    result = gatattn.attention(*leaves[:3], edge_index=edge_index, backend="sparse",
                               attn_bias=leaves[3] if bias is not None else None,
                               return_lse=lse)
    out, lse_value = (result if lse else (result, None))
    gen = torch.Generator().manual_seed(7)
    loss = (out.nan_to_num() * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if lse:
        loss = loss + lse_value.nan_to_num(0.0, 0.0, 0.0).sum()
    loss.backward()
    monkeypatch.undo()
    return [out.detach(), *([lse_value.detach()] if lse else []),
            *(t.grad for t in leaves)]


def random_graph(n_dst, n_src, num_edges, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n_src, (num_edges,), generator=gen)
    dst = torch.randint(0, max(n_dst - 3, 1), (num_edges,), generator=gen)  # targets w/o edges
    return torch.stack([src, dst]), gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bipartite", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("lse", [False, True])
# (8, 5): any width; the kernels are also compiled for C = C_v of 16, 32 and 64, where float32
# sums four heads' products together (5 heads: one group of four and one head alone)
@pytest.mark.parametrize("channels, value_channels", [(8, 5), (16, 16), (32, 32), (64, 64)])
@pytest.mark.parametrize("heads", [3, 5])
def test_kernels_agree_with_the_torch_ops_form(kernels, monkeypatch, dtype, bipartite,
                                              with_bias, lse, channels, value_channels, heads):
    n_dst, n_src = 40, 30 if bipartite else 40
    edge_index, gen = random_graph(n_dst, n_src, 300)
    edge_index = torch.cat([edge_index, edge_index[:, :20]], dim=1)  # duplicate edges
    q = torch.randn(n_dst, heads, channels, generator=gen, dtype=dtype)
    k = torch.randn(n_src, heads, channels, generator=gen, dtype=dtype)
    v = torch.randn(n_src, heads, value_channels, generator=gen, dtype=dtype)
    bias = None
    if with_bias:
        bias = torch.randn(edge_index.size(1), heads, generator=gen, dtype=dtype)
        bias[edge_index[1] == 2] = float("-inf")  # a target whose every edge is removed
    got = run_route(True, monkeypatch, q, k, v, edge_index, bias, lse)
    expected = run_route(False, monkeypatch, q, k, v, edge_index, bias, lse)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=tolerance, rtol=tolerance, equal_nan=True)


@pytest.mark.parametrize("channels", [4, 16])  # any width; one compiled for
def test_non_finite_inputs_reach_the_same_outputs(kernels, monkeypatch, channels):
    edge_index, gen = random_graph(30, 30, 200, seed=1)
    q, k, v = (torch.randn(30, 2, channels, generator=gen) for _ in range(3))
    bias = torch.randn(200, 2, generator=gen)
    q[3, 1, 2] = float("nan")
    k[7, 0, 0] = float("inf")
    v[9, 1, 1] = float("nan")
    bias[5, 1] = float("inf")
    got = run_route(True, monkeypatch, q, k, v, edge_index, bias, lse=True)
    expected = run_route(False, monkeypatch, q, k, v, edge_index, bias, lse=True)
    assert any(t.isnan().any() for t in expected)  # the case reaches NaN at all
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g.isnan(), e.isnan())
        assert torch.equal(g.isinf(), e.isinf())
        torch.testing.assert_close(g.nan_to_num(), e.nan_to_num(), atol=1e-5, rtol=1e-5)


def test_kernels_against_the_reference(kernels):
    edge_index, gen = random_graph(25, 25, 150, seed=2)
    q, k, v = (torch.randn(25, 2, 6, generator=gen).requires_grad_() for _ in range(3))
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, edge_index=edge_index, backend="sparse"),
        (q, k, v), masked_reference(reference.edge_counts(edge_index, 25, 25)))


def test_half_precision_is_computed_in_float32_by_the_kernels(kernels, monkeypatch):
    edge_index, gen = random_graph(20, 20, 100, seed=3)
    q, k, v = (torch.randn(20, 2, 8, generator=gen).to(torch.bfloat16) for _ in range(3))
    got = run_route(True, monkeypatch, q, k, v, edge_index)
    expected = run_route(False, monkeypatch, q, k, v, edge_index)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, e)


def test_gradcheck_through_the_kernels(kernels):
    gen = torch.Generator().manual_seed(4)
    # Every target has edges: a lse of -inf has no finite difference.
    edge_index = torch.stack([torch.randint(0, 6, (32,), generator=gen),
                              torch.arange(8).repeat(4)])
    q = torch.randn(8, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(6, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    bias = torch.randn(32, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: gatattn.attention(q, k, v, edge_index=edge_index, attn_bias=b,
                                             backend="sparse", return_lse=True),
        (q, k, v, bias))


def test_no_edges(kernels, monkeypatch):
    edge_index = torch.empty(2, 0, dtype=torch.long)
    q, k, v = (torch.randn(5, 2, 4) for _ in range(3))
    got = run_route(True, monkeypatch, q, k, v, edge_index, lse=True)
    assert torch.equal(got[0], torch.zeros(5, 2, 4))
    assert bool((got[1] == float("-inf")).all())
    assert all(bool((g == 0).all()) for g in got[2:])


def test_the_environment_switch_keeps_the_torch_ops_form():
    code = ("import os, gatattn.backends.native as n; "
            "assert n.cpu_kernels() is None, 'switched off, yet built'")
    environment = {**os.environ, native.ENVIRONMENT_SWITCH: "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=environment)


def test_the_kernels_refuse_arrays_they_cannot_read(kernels):
    q = torch.randn(3, 2, 4)
    row_ptr, col = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1])
    kernels.forward(q, q, q, None, row_ptr, col, 0.5)  # well formed: runs
    with pytest.raises(RuntimeError, match="int64"):
        kernels.forward(q, q, q, None, row_ptr, col.int(), 0.5)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.forward(q, q, q, None, row_ptr[:-1], col, 0.5)  # one row pointer short
    with pytest.raises(RuntimeError, match="per-edge"):
        kernels.forward(q, q, q, torch.randn(3, 2), row_ptr, col, 0.5)  # 3 rows for 2 edges
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.forward(q.transpose(0, 1).contiguous().transpose(0, 1), q, q, None, row_ptr,
                        col, 0.5)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_gradients_through_the_lse_alone(monkeypatch, use_kernels):
    """A loss of the log-sum-exp alone gives the CSR route no output gradient (its weights'
    and output's zeros are not materialised): the gradients equal the gathered form's."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(12, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    edge_index, _ = random_graph(12, 12, 40)
    if not use_kernels:
        monkeypatch.setattr(sparse, "cpu_kernels", lambda: None)
    _, lse = gatattn.attention(q, k, v, edge_index=edge_index, backend="sparse", return_lse=True)
    *got, got_v = torch.autograd.grad(lse.sum(), [q, k, v], allow_unused=True)
    _, _, expected_lse = sparse.sparse_attention(q, k, v, edge_index, scale=0.5,
                                                 form="gathered", return_lse=True)
    expected = torch.autograd.grad(expected_lse.sum(), [q, k])  # (the lse reads no value)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert got_v is None or not got_v.any()
