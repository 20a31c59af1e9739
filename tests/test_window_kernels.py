"""Sliding windows in the tiled Triton kernels against the reference, forward and all gradients.

The interpreter runs 16-row tiles (``INTERPRETER_CONFIG``), so the sizes here put band edges
inside tiles, across them and far from them; the GPU runs the same cases (marker ``cuda``).
"""

import pytest
import torch

import gatattn
from gatattn import reference
from gatattn.bias import stacked_to_dense
from tests.conftest import assert_close, check_against_reference, make_qkv
from tests.test_functional import ptr_from_sizes
from tests.test_kernels import DEVICES, INTERPRETER, on, reference_on_cpu
from tests.test_lse import _check as check_out_and_lse

pytest.importorskip("triton")


def run_triton(**kwargs):
    def run(q, k, v, bias=None, **more):
        return gatattn.attention(q, k, v, attn_bias=bias, backend="triton", **kwargs, **more)
    return run


# (rows, window, causal) of one segment: bands narrower than a 16-row tile, wider than two, a
# lone diagonal, one side unbounded, causal with a left side.
SINGLE = [(50, (3, 5), False), (50, (20, 36), False), (50, (0, 0), False),
          (50, (None, 4), False), (50, (7, None), False), (50, (20, 0), True), (50, (0, 0), True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,window,causal", SINGLE, ids=str)
@pytest.mark.heavy  # kernels in the interpreter: ~6 s
def test_single_segment(device, n, window, causal):
    inputs = on(device, make_qkv(n, n, 2, 16))
    mask = reference.block_mask([n], causal=causal, window=window)
    check_against_reference(run_triton(causal=causal, window=window), inputs,
                            reference_on_cpu(mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,causal", [((6, 3), False), ((9, 0), True)], ids=str)
@pytest.mark.heavy  # kernels in the interpreter: ~13 s
def test_varlen_segments(device, window, causal):
    sizes = [1, 5, 40, 0, 17, 33]
    ptr = ptr_from_sizes(sizes)
    inputs = on(device, make_qkv(sum(sizes), sum(sizes), 2, 24))
    mask = reference.block_mask(sizes, causal=causal, window=window)
    check_against_reference(run_triton(ptr=ptr.to(device), causal=causal, window=window),
                            inputs, reference_on_cpu(mask))


# (targets, sources) per segment: more targets than sources, blind rows inside a tile and across
# several (40/3, 33/1), more sources than targets (5/48, 2/60), equal (20/20), none (3/0, 0/7).
SIZES = ([5, 40, 3, 0, 20, 2, 33], [48, 3, 0, 7, 20, 60, 1])
BIPARTITE = [(False, (4, 6)), ("top_left", (4, 0)), ("bottom_right", (4, 0)),
             ("bottom_right", (30, 0))]


def bipartite_case(causal, window, heads=2, kv_heads=2, device="cpu"):
    """``(run, inputs, ref)`` of :data:`SIZES` with a stacked attn_bias (one column per query
    head); ``ref`` expands grouped kv heads for gatattn.reference under ``block_mask``."""
    sizes_dst, sizes_src = SIZES
    ptr_dst, ptr_src = ptr_from_sizes(sizes_dst), ptr_from_sizes(sizes_src)
    rows = sum(d * s for d, s in zip(sizes_dst, sizes_src, strict=True))
    gen = torch.Generator().manual_seed(7)
    shapes = [(sum(sizes_dst), heads, 16), (sum(sizes_src), kv_heads, 16),
              (sum(sizes_src), kv_heads, 24), (rows, heads)]
    inputs = on(device, [torch.randn(*shape, generator=gen) for shape in shapes])
    mask = reference.block_mask(sizes_dst, sizes_src, causal=causal, window=window)
    ptr = (ptr_dst.to(device), ptr_src.to(device))
    group = heads // kv_heads

    def ref(q, k, v, bias, compute_dtype, return_lse=False):
        k, v = (t.cpu().repeat_interleave(group, dim=1) for t in (k, v))
        dense = stacked_to_dense(bias.cpu(), ptr_dst, ptr_src)
        result = reference.attention(q.cpu(), k, v, mask, bias=dense,
                                     compute_dtype=compute_dtype, return_lse=return_lse)
        return tuple(t.to(q.device) for t in result) if return_lse else result.to(q.device)

    return run_triton(ptr=ptr, causal=causal, window=window), inputs, ref, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,window", BIPARTITE, ids=str)
@pytest.mark.heavy  # kernels in the interpreter: ~9 s
def test_bipartite_segments_with_bias(device, causal, window):
    # Out, dq, dk, dv and dbias; targets whose band misses every source get zeros, never NaN.
    run, inputs, ref, mask = bipartite_case(causal, window, device=device)
    assert not mask.any(1).all()  # some blind targets
    check_against_reference(run, inputs, ref, names=("q", "k", "v", "bias"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2)])
@pytest.mark.heavy  # kernels in the interpreter: ~12 s
def test_grouped_heads(device, heads, kv_heads):
    run, inputs, ref, _ = bipartite_case("bottom_right", (4, 0), heads, kv_heads, device)
    check_against_reference(run, inputs, ref, names=("q", "k", "v", "bias"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,window", [(False, (4, 6)), ("bottom_right", (4, 0))], ids=str)
def test_log_sum_exp(device, causal, window):
    # -inf exactly at the blind targets; gradients through both the output and the lse.
    run, inputs, ref, _ = bipartite_case(causal, window, device=device)
    check_out_and_lse(lambda *a: run(*a, return_lse=True),
                      lambda *a, compute_dtype=torch.float64: ref(*a, compute_dtype,
                                                                  return_lse=True), inputs)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=lambda t: f"M{t[0]}xN{t[1]}")
@INTERPRETER
@pytest.mark.heavy  # kernels in the interpreter: ~9 s
def test_unequal_query_and_key_tiles(monkeypatch, tiles):
    # The band's tile bounds (left edge, right edge, full tiles between) must hold for any pair
    # of tile heights.
    from gatattn.kernels import flash_attention
    from gatattn.kernels.tuning import TileConfig, Tuner

    monkeypatch.setattr(flash_attention, "TUNER",
                        Tuner(interpreter_config=TileConfig(*tiles, 1, 1)))
    run, inputs, ref, _ = bipartite_case("bottom_right", (20, 0))
    check_against_reference(run, inputs, ref, names=("q", "k", "v", "bias"))
    sizes = [70, 3, 40]
    inputs = make_qkv(sum(sizes), sum(sizes), 1, 16)
    mask = reference.block_mask(sizes, window=(5, 21))
    check_against_reference(run_triton(ptr=ptr_from_sizes(sizes), window=(5, 21)), inputs,
                            reference_on_cpu(mask))


def launch_with_poisoned_tiles(q, k, v, causal, window, poisoned, bottom_right=False):
    """The launchers straight, 16-row tiles, on one segment whose key rows ``poisoned`` hold NaN
    in k and v: ``(out, lse, dq, dk, dv)``. A kernel that read a poisoned tile would spread NaN
    (through 0 * NaN even where every probability is 0)."""
    from gatattn.kernels.flash_attention import flash_attention_backward, flash_attention_forward
    from gatattn.kernels.tuning import INTERPRETER_CONFIG

    assert (INTERPRETER_CONFIG.block_m, INTERPRETER_CONFIG.block_n) == (16, 16)
    k, v = k.detach().clone(), v.detach().clone()
    k[poisoned], v[poisoned] = float("nan"), float("nan")
    cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32)
    options = dict(config=INTERPRETER_CONFIG, bottom_right=bottom_right, window=window)
    out, lse = flash_attention_forward(q.detach(), k, v, cu_q, cu_k, 0.25, causal, **options)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = flash_attention_backward(do, q.detach(), k, v, out, lse, cu_q, cu_k, 0.25, causal,
                                     **options)
    return out, lse, do, grads


@INTERPRETER
@pytest.mark.parametrize("causal,window,poisoned", [
    # 16 targets, 128 sources: top-left, targets 0-15 see sources up to 19 (key tiles 0-1);
    # key tiles 2-7 (sources 32-127) lie wholly to the right of every band.
    (False, (4, 4), slice(32, 128)),
    # bottom-right (d = 112): targets see sources 104-127 (key tiles 6-7); key tiles 0-5
    # (sources 0-95) lie wholly to the left of every band.
    ("bottom_right", (8, 0), slice(0, 96)),
], ids=["right of the band", "left of the band"])
def test_tiles_outside_the_band_are_never_read(causal, window, poisoned):
    q, k, v = make_qkv(16, 128, 2, 16)
    out, lse, do, (dq, dk, dv) = launch_with_poisoned_tiles(
        q, k, v, bool(causal), window, poisoned, bottom_right=causal == "bottom_right")
    assert out.isfinite().all() and lse.isfinite().all() and dq.isfinite().all()
    assert (dk[poisoned] == 0).all() and (dv[poisoned] == 0).all()
    assert dk.isfinite().all() and dv.isfinite().all()

    # The same values against the reference on the finite data (which the band never reaches).
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = reference.block_mask([16], [128], causal=causal, window=window)
    assert not mask[:, poisoned].any()
    expected = reference.attention(q, k, v, mask, scale=0.25)
    grads = torch.autograd.grad(expected, (q, k, v), do.double())
    assert_close("out", out, expected)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, strict=True):
        assert_close(name, got, want)


def test_the_launchers_refuse_a_bad_window():
    from gatattn.kernels.flash_attention import band_sides

    with pytest.raises(ValueError, match="right = 0"):
        band_sides(True, (4, 2), 100)
    with pytest.raises(ValueError, match=">= 0"):
        band_sides(False, (-1, 2), 100)
    assert band_sides(True, (4, None), 100) == (4, 0)
    assert band_sides(False, (100, 99), 100) == (None, 99)  # a side as wide as all rows: none


def test_the_tuner_keys_the_window():
    from gatattn.kernels.tuning import Tuner
    from tests.test_kernels import sm90_limits

    tuner = Tuner(bench=lambda config, fn: 1.0, limits=sm90_limits)
    q, k, v = make_qkv(40, 40, 1, 16)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    for window in [None, (4, 4), (5, 3), (40, 4), (None, 4)]:
        tuner.for_launch("forward", q, k, v, cu, causal=False, bottom_right=False,
                         has_bias=False, window=window, launch=lambda config: None)
    assert sorted(map(str, (key.window for key in tuner.chosen))) == [
        "(16, 16)", "(64, 16)", "(None, 16)", "None"]


def test_the_race_keys_the_window():
    from gatattn.backends.racing import route_key
    from gatattn.graph import build_graph

    q = torch.zeros(40, 2, 16)
    kinds = {route_key(q, q, build_graph(ptr=torch.tensor([0, 40]), causal=causal,
                                         window=window), False).graph
             for causal, window in [(False, None), (True, None), (False, (4, 4)),
                                    (True, (20, 0)), (False, (None, 3))]}
    assert kinds == {"segments", "causal segments", "window 16/16 segments",
                     "window 32/16 causal segments", "window none/16 segments"}


def _windowed_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale,
                          window_size):
    """torch's varlen_attn as documented, on CPU: (left, right) around the bottom-right
    diagonal of each segment, -1 for a side without bound."""
    out = torch.zeros_like(query)
    bounds = zip(cu_seq_q.tolist(), cu_seq_q[1:].tolist(), cu_seq_k.tolist(),
                 cu_seq_k[1:].tolist(), strict=False)
    for q_start, q_end, k_start, k_end in bounds:
        rows, cols = torch.arange(q_end - q_start)[:, None], torch.arange(k_end - k_start)
        diagonal = (k_end - k_start) - (q_end - q_start)
        left, right = window_size
        keep = torch.ones(rows.shape[0], cols.shape[0], dtype=torch.bool)
        keep &= (cols >= rows + diagonal - left) if left >= 0 else keep
        keep &= (cols <= rows + diagonal + right) if right >= 0 else keep
        out[q_start:q_end] = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(0, 1) for t in (query[q_start:q_end], key[k_start:k_end],
                                          value[k_start:k_end])),
            attn_mask=keep, scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("window,causal", [((3, 2), False), ((4, 0), True), ((None, 1), False)],
                         ids=str)
def test_the_varlen_route_passes_the_window(monkeypatch, window, causal):
    from gatattn.backends import varlen
    from gatattn.graph import build_graph

    monkeypatch.setattr(varlen, "_kernel", lambda: _windowed_varlen_attn)
    sizes = [6, 1, 9]
    ptr = ptr_from_sizes(sizes)
    graph = build_graph(ptr=ptr, causal=causal, window=window)
    q, k, v = (torch.randn(16, 2, 8, dtype=torch.float64) for _ in range(3))
    out = varlen.varlen_attention(q, k, v, graph, scale=0.3)
    mask = reference.block_mask(sizes, causal=causal, window=window)
    torch.testing.assert_close(out, reference.attention(q, k, v, mask, scale=0.3))
