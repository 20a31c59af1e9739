"""The fused Triton kernels against the reference, forward and all gradients.

Without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) on CPU
tensors; the same cases run on CUDA when a GPU is present (marker ``cuda``).
"""

import os

import pytest
import torch

import gatattn
from gatattn import reference
from gatattn.bias import stacked_to_dense
from tests.conftest import assert_close, check_against_reference, make_qkv, masked_reference
from tests.test_functional import batch_from_sizes, ptr_from_sizes, same_graph_mask

pytest.importorskip("triton")
# The kernels' full sweep in Triton's interpreter takes minutes of CPU: it runs in `make
# test-heavy` (CI runs both). `make test` still sends every kernel feature through the
# interpreter in smaller cases: test_window_kernels.py, test_lse.py, test_gqa.py,
# test_racing.py and gatattn.check's triton rows (test_check.py).
pytestmark = pytest.mark.heavy
# On a GPU machine the interpreter is off (conftest.py), so the CPU cases give way to CUDA ones.
INTERPRETER = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton's interpreter is off: kernels run on the GPU")
DEVICES = [pytest.param("cpu", id="interpreter", marks=INTERPRETER),
           pytest.param("cuda", marks=pytest.mark.cuda)]


def on(device, tensors):
    return tuple(t.detach().to(device).requires_grad_() for t in tensors)


def run_triton(**kwargs):
    return lambda q, k, v: gatattn.attention(q, k, v, backend="triton", **kwargs)


def reference_on_cpu(mask):
    ref = masked_reference(mask)
    return lambda q, k, v, compute_dtype: ref(q.cpu(), k.cpu(), v.cpu(), compute_dtype).to(q.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,channels", [(1, 16), (7, 40), (97, 64), (130, 40), (33, 96),
                                        (45, 80), (20, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_single_segment(device, n, channels, causal):
    inputs = on(device, make_qkv(n, n, 2, channels))
    mask = torch.ones(n, n, dtype=torch.bool)
    mask = mask.tril() if causal else mask
    check_against_reference(run_triton(causal=causal), inputs, reference_on_cpu(mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_segments(device, causal):
    sizes = [1, 5, 64, 33, 0, 17]
    batch = batch_from_sizes(sizes)
    inputs = on(device, make_qkv(batch.numel(), batch.numel(), 2, 40))
    check_against_reference(run_triton(batch=batch.to(device), causal=causal), inputs,
                            reference_on_cpu(same_graph_mask(batch, batch, causal)))


@pytest.mark.parametrize("device", DEVICES)
def test_unsorted_batch(device):
    batch = batch_from_sizes([3, 20, 1, 9])
    batch = batch[torch.randperm(batch.numel(), generator=torch.Generator().manual_seed(0))]
    inputs = on(device, make_qkv(batch.numel(), batch.numel(), 2, 16))
    check_against_reference(run_triton(batch=batch.to(device), causal=True), inputs,
                            reference_on_cpu(same_graph_mask(batch, batch, True)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_segments(device, causal):
    sizes_dst, sizes_src = [3, 17, 0, 9, 4], [20, 2, 5, 0, 33]
    batch_dst, batch_src = batch_from_sizes(sizes_dst), batch_from_sizes(sizes_src)
    inputs = on(device, make_qkv(batch_dst.numel(), batch_src.numel(), 2, 16, value_channels=24))
    check_against_reference(
        run_triton(batch=(batch_dst.to(device), batch_src.to(device)), causal=causal), inputs,
        reference_on_cpu(same_graph_mask(batch_dst, batch_src, causal)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        # Triton 3.9's interpreter returns garbage for tl.dot on bfloat16 operands (a 16x16
        # product off by 1e10 while loads and casts are exact): this case runs on CUDA only.
        pytest.skip("Triton's interpreter miscomputes bfloat16 tl.dot")
    sizes = [7, 40]
    batch = batch_from_sizes(sizes)
    inputs = on(device, make_qkv(batch.numel(), batch.numel(), 2, 48, dtype=dtype))
    check_against_reference(run_triton(batch=batch.to(device), causal=True), inputs,
                            reference_on_cpu(same_graph_mask(batch, batch, True)))


@pytest.mark.parametrize("device", DEVICES)
def test_scale_temperature_and_empty_inputs(device):
    inputs = on(device, make_qkv(19, 19, 1, 16))
    mask = torch.ones(19, 19, dtype=torch.bool)
    ref = masked_reference(mask, scale=0.3, temperature=0.5)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, scale=0.3, temperature=0.5, backend="triton"),
        inputs, lambda q, k, v, compute_dtype: ref(q.cpu(), k.cpu(), v.cpu(), compute_dtype))
    q, k, v = on(device, make_qkv(0, 0, 2, 16))
    out = gatattn.attention(q, k, v, backend="triton")
    assert out.shape == (0, 2, 16)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (64, 16), (16, 64)],
                         ids=lambda t: f"M{t[0]}xN{t[1]}")
@pytest.mark.parametrize("causal", [False, True])
@INTERPRETER
def test_unequal_query_and_key_tiles(monkeypatch, tiles, causal):
    # GPU configurations pair BLOCK_M with a different BLOCK_N: the causal bounds of full and
    # diagonal tiles must hold for any pair, so the interpreter runs such pairs too.
    from gatattn.kernels import flash_attention
    from gatattn.kernels.tuning import TileConfig, Tuner

    monkeypatch.setattr(flash_attention, "TUNER",
                        Tuner(interpreter_config=TileConfig(*tiles, 1, 1)))
    batch = batch_from_sizes([70, 1, 33, 16, 0, 97])
    inputs = make_qkv(batch.numel(), batch.numel(), 1, 16)
    check_against_reference(run_triton(batch=batch, causal=causal), inputs,
                            masked_reference(same_graph_mask(batch, batch, causal)))
    dst, src = batch_from_sizes([5, 40, 17]), batch_from_sizes([48, 3, 30])
    inputs = make_qkv(dst.numel(), src.numel(), 1, 16)
    check_against_reference(run_triton(batch=(dst, src), causal=causal), inputs,
                            masked_reference(same_graph_mask(dst, src, causal)))


# (targets, sources) per segment for the causal alignments: more targets than sources, with
# blind targets inside one tile and across several (40/3, 33/1, 70/50, 3/0: a segment without
# sources), more sources than targets (5/48, 1/33, 50/70, and 2/60: with 16-row tiles all of
# its first key tile is seen from query row 15 - 58 = -43 on, a bound the kernels must clamp),
# equal (20/20), no targets (0/7).
BIPARTITE_SIZES = ([5, 40, 17, 3, 0, 20, 2, 33, 1, 70, 50],
                   [48, 3, 30, 0, 7, 20, 60, 1, 33, 50, 70])


def bipartite_case(causal, heads=1, channels=16, dtype=torch.float32, device="cpu"):
    """``(run, inputs, ref)`` of :data:`BIPARTITE_SIZES` with a stacked attn_bias: ``run`` goes
    through the Triton route, ``ref`` is gatattn.reference under ``block_mask``."""
    sizes_dst, sizes_src = BIPARTITE_SIZES
    ptr_dst, ptr_src = ptr_from_sizes(sizes_dst), ptr_from_sizes(sizes_src)
    q, k, v = make_qkv(sum(sizes_dst), sum(sizes_src), heads, channels, value_channels=24,
                       dtype=dtype)
    rows = sum(d * s for d, s in zip(sizes_dst, sizes_src, strict=True))
    bias = torch.randn(rows, heads, generator=torch.Generator().manual_seed(5)).to(dtype)
    inputs = on(device, (q, k, v, bias))
    mask = reference.block_mask(sizes_dst, sizes_src, causal=causal)
    ptr = (ptr_dst.to(device), ptr_src.to(device))

    def run(q, k, v, bias):
        return gatattn.attention(q, k, v, ptr=ptr, causal=causal, attn_bias=bias,
                                 backend="triton")

    def ref(q, k, v, bias, compute_dtype):
        dense = stacked_to_dense(bias.cpu(), ptr_dst, ptr_src)
        return reference.attention(q.cpu(), k.cpu(), v.cpu(), mask, bias=dense,
                                   compute_dtype=compute_dtype).to(q.device)

    return run, inputs, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
def test_causal_alignments_on_bipartite_segments(device, dtype, causal):
    # Out, dq, dk, dv and dbias against the float64 reference (and, in fp16, its own fp16
    # error); blind bottom-right targets must give zeros and zero gradients, never NaN.
    run, inputs, ref = bipartite_case(causal, dtype=dtype, device=device)
    check_against_reference(run, inputs, ref, names=("q", "k", "v", "bias"))


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (64, 16), (16, 64)],
                         ids=lambda t: f"M{t[0]}xN{t[1]}")
@INTERPRETER
def test_bottom_right_on_unequal_query_and_key_tiles(monkeypatch, tiles):
    # The diagonal shifts the forward / dQ key range and the dK/dV query range by segment: the
    # bounds of full, diagonal and blind tiles must hold for any pair of tile heights.
    from gatattn.kernels import flash_attention
    from gatattn.kernels.tuning import TileConfig, Tuner

    monkeypatch.setattr(flash_attention, "TUNER",
                        Tuner(interpreter_config=TileConfig(*tiles, 1, 1)))
    run, inputs, ref = bipartite_case("bottom_right")
    check_against_reference(run, inputs, ref, names=("q", "k", "v", "bias"))


def launched_bottom_right(sizes, inputs, heads):
    """Bottom-right causal segments ``sizes`` run straight through the launchers: ``(out, lse,
    kept_pairs, backward)``, ``backward(fill)`` giving ``(dq, dk, dv, dbias)`` with dbias
    starting ``fill``-filled (NaN shows which entries the kernels wrote); ``kept_pairs`` marks
    the stacked bias rows of pairs a segment keeps."""
    from gatattn.kernels.flash_attention import flash_attention_backward, flash_attention_forward

    sizes_dst, sizes_src = sizes
    cu_q = ptr_from_sizes(sizes_dst).to(torch.int32)
    cu_k = ptr_from_sizes(sizes_src).to(torch.int32)
    q, k, v, bias = (t.detach() for t in inputs)
    do = torch.randn(q.shape[0], heads, v.shape[2], generator=torch.Generator().manual_seed(6))
    mask = reference.block_mask(sizes_dst, sizes_src, causal="bottom_right")
    kept = stacked_to_dense(torch.ones(bias.shape[0], 1), cu_q.long(), cu_k.long())[..., 0] > 0
    kept_pairs = mask[kept]  # stacked order: segment by segment, target-major
    out, lse = flash_attention_forward(q, k, v, cu_q, cu_k, 0.25, True, bias=bias,
                                       bottom_right=True)

    def backward(fill):
        dbias = torch.full_like(bias, fill)
        grads = flash_attention_backward(do, q, k, v, out, lse, cu_q, cu_k, 0.25, True,
                                         bias=bias, dbias=dbias, bottom_right=True)
        return (*grads, dbias)

    return out, lse, kept_pairs, backward


@INTERPRETER
def test_bottom_right_blind_rows_and_dbias_in_the_kernels():
    # Straight through the launchers: blind rows store out = 0 and lse = inf and get dq = 0;
    # the backward writes dBias at every pair a segment keeps (a NaN-filled dbias shows which
    # it wrote), 0 at the excluded pairs it visits, and the same bits on a second run.
    _, inputs, _ = bipartite_case("bottom_right", heads=2)
    out, lse, kept_pairs, backward = launched_bottom_right(BIPARTITE_SIZES, inputs, heads=2)
    mask = reference.block_mask(*BIPARTITE_SIZES, causal="bottom_right")
    dq, _, _, dbias = backward(float("nan"))
    blind = ~mask.any(1)
    assert blind.sum() == 37 + 3 + 32 + 20  # segments 40/3, 3/0, 33/1, 70/50
    assert bool((out[blind] == 0).all()) and bool((dq[blind] == 0).all())
    assert bool(torch.isinf(lse[:, blind]).all())
    assert not dbias[kept_pairs].isnan().any()
    assert bool((dbias[~kept_pairs].nan_to_num(0.0) == 0).all())
    again = backward(0.0)[3]  # a second run, on the zeros the autograd glue gives
    assert torch.equal(dbias.nan_to_num(0.0), again)
    assert bool((again[~kept_pairs] == 0).all())


# Grouped-query heads, (H, H_kv): query head h reads kv head h // (H / H_kv). Segments
# (targets, sources) cross 16-row tiles, with blind bottom-right targets (40/3, 3/0), more
# sources than targets (5/20, 2/35) and no targets (0/7).
GROUPED_HEADS = [(4, 1), (4, 2), (6, 3)]
GROUPED_SIZES = ([5, 40, 17, 3, 0, 2], [20, 3, 30, 0, 7, 35])


def grouped_case(heads, kv_heads, causal, dtype=torch.float32, device="cpu", bias=True):
    """``(run, inputs, ref)`` of :data:`GROUPED_SIZES`, k and v with ``kv_heads`` heads (and a
    stacked attn_bias per query head): ``run`` goes through the Triton route; ``ref`` is
    gatattn.reference on k and v expanded by ``repeat_interleave``, so that its dk and dv are
    the expanded gradients summed over each group."""
    sizes_dst, sizes_src = GROUPED_SIZES
    ptr_dst, ptr_src = ptr_from_sizes(sizes_dst), ptr_from_sizes(sizes_src)
    n_dst, n_src = int(ptr_dst[-1]), int(ptr_src[-1])
    rows = sum(d * s for d, s in zip(sizes_dst, sizes_src, strict=True))
    shapes = [(n_dst, heads, 16), (n_src, kv_heads, 16), (n_src, kv_heads, 24)]
    shapes += [(rows, heads)] if bias else []
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    inputs = on(device, [torch.randn(*shape, generator=gen).to(dtype) for shape in shapes])
    mask = reference.block_mask(sizes_dst, sizes_src, causal=causal)
    ptr = (ptr_dst.to(device), ptr_src.to(device))
    group = heads // kv_heads

    def run(q, k, v, bias=None):
        return gatattn.attention(q, k, v, ptr=ptr, causal=causal, attn_bias=bias,
                                 backend="triton")

    def ref(q, k, v, bias=None, *, compute_dtype):
        k, v = (t.cpu().repeat_interleave(group, dim=1) for t in (k, v))
        dense = None if bias is None else stacked_to_dense(bias.cpu(), ptr_dst, ptr_src)
        return reference.attention(q.cpu(), k, v, mask, bias=dense,
                                   compute_dtype=compute_dtype).to(q.device)

    return run, inputs, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("heads,kv_heads", GROUPED_HEADS)
def test_grouped_heads_against_the_reference(device, heads, kv_heads, causal):
    # Out, dq, dk, dv and dbias in fp32: dk and dv keep H_kv heads, each summing its group.
    run, inputs, ref = grouped_case(heads, kv_heads, causal, device=device)
    check_against_reference(run, inputs, ref, names=("q", "k", "v", "bias"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (6, 3)])
def test_grouped_heads_in_half_precision(device, heads, kv_heads, causal):
    run, inputs, ref = grouped_case(heads, kv_heads, causal, torch.float16, device, bias=False)
    check_against_reference(run, inputs, ref)


@INTERPRETER
def test_grouped_heads_reach_the_kernels_unexpanded(monkeypatch):
    # The tiled kernels get k, v (and give dk, dv) with H_kv heads; a re-expansion anywhere on
    # the way fails here. Explicit edge sets still give the CSR kernels H heads.
    from gatattn.kernels import csr_attention, flash_attention

    seen = []

    def spy(module, name, heads_of):
        launcher = getattr(module, name)

        def wrapped(*args, **kwargs):
            result = launcher(*args, **kwargs)
            seen.append((name, heads_of(args, result)))
            return result

        monkeypatch.setattr(module, name, wrapped)

    spy(flash_attention, "flash_attention_forward", lambda args, _: args[1].shape[1])
    spy(flash_attention, "flash_attention_backward",
        lambda args, grads: (args[2].shape[1], grads[1].shape[1], grads[2].shape[1]))
    spy(csr_attention, "csr_attention_forward", lambda args, _: args[1].shape[1])
    run, inputs, ref = grouped_case(4, 2, True, bias=False)
    check_against_reference(run, inputs, ref)
    assert set(seen) == {("flash_attention_forward", 2), ("flash_attention_backward", (2, 2, 2))}

    seen.clear()
    q, k, v = inputs
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 2]])
    gatattn.attention(q[:3], k[:3], v[:3], edge_index=edge_index, backend="triton")
    assert seen == [("csr_attention_forward", 4)]


@INTERPRETER
def test_grouped_heads_deterministic_dk_dv_and_dbias_in_the_kernels():
    # Straight through the launchers: a dK/dV program sums its group's query heads in a fixed
    # order, so dk, dv and dbias are the same bits on a second run; dBias is written at every
    # pair a segment keeps, for every query head (a NaN-filled dbias shows which it wrote).
    _, inputs, _ = grouped_case(4, 2, "bottom_right")
    _, _, kept_pairs, backward = launched_bottom_right(GROUPED_SIZES, inputs, heads=4)
    k, v = inputs[1], inputs[2]
    _, dk, dv, dbias = backward(float("nan"))
    assert dk.shape == k.shape and dv.shape == v.shape
    assert not dbias[kept_pairs].isnan().any()
    _, dk_again, dv_again, dbias_again = backward(0.0)
    assert torch.equal(dk, dk_again) and torch.equal(dv, dv_again)
    assert torch.equal(dbias.nan_to_num(0.0), dbias_again)


def test_bad_grouping_is_refused_by_the_launcher():
    from gatattn.kernels.flash_attention import flash_attention_forward

    q, k = torch.zeros(4, 4, 16), torch.zeros(4, 3, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="q has H=4 heads and k, v have H_kv=3"):
        flash_attention_forward(q, k, k, cu, cu, 1.0, False)
    with pytest.raises(ValueError, match="k and v need the same number of heads, got 3 and 4"):
        flash_attention_forward(q, k, q, cu, cu, 1.0, False)


@INTERPRETER
@pytest.mark.parametrize("found", ["by the call's read", "by the route's caller"])
def test_grouped_heads_with_nonfinite_values(found):
    # Inputs known not to be finite go through the non-finite repair, which spreads what a kv
    # head reaches to its group's query heads: a NaN in kv head 1 reaches query heads 2 and 3
    # only, along the segment's edges. (A call that reads nothing only guards:
    # tests/test_graph_object.py.)
    from gatattn.backends import triton_attention
    from gatattn.graph import validation

    run, inputs, _ = grouped_case(4, 2, "top_left", bias=False)
    q, k, v = (t.detach() for t in inputs)
    v[22, 1, 2] = float("nan")  # segment 1's last source: its targets 2 on (rows 7 on) see it
    mask = reference.block_mask(*GROUPED_SIZES, causal="top_left")
    if found == "by the call's read":
        with validation(True):
            got = run(q, k, v)
    else:
        ptr = tuple(ptr_from_sizes(sizes) for sizes in GROUPED_SIZES)
        graph = gatattn.build_graph(ptr=ptr, causal="top_left")
        got = triton_attention(q, k, v, graph, scale=16 ** -0.5, inputs_finite=False)
    expected = reference.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask)
    assert expected[7:45, 2:, 2].isnan().all() and expected[:, :2].isfinite().all()
    assert expected[:7].isfinite().all() and expected[45:].isfinite().all()
    torch.testing.assert_close(got, expected, equal_nan=True)


@INTERPRETER
def test_grouped_heads_second_derivatives(monkeypatch):
    # A recorded backward differentiates the SDPA math route, which gets k and v unexpanded:
    # the first-order gradients match the kernels' and keep H_kv heads, and the second-order
    # ones exist for every input.
    from gatattn.backends import fused

    recomputed = []
    sdpa = fused.sdpa_attention
    monkeypatch.setattr(fused, "sdpa_attention", lambda q, k, v, *args, **kwargs: (
        recomputed.append(k.shape[1]) or sdpa(q, k, v, *args, **kwargs)))
    run, inputs, _ = grouped_case(4, 2, "top_left", bias=False)
    grad_out = torch.randn(run(*inputs).shape, generator=torch.Generator().manual_seed(2))
    kernels = torch.autograd.grad(run(*inputs), inputs, grad_out)
    assert not recomputed
    recorded = torch.autograd.grad(run(*inputs), inputs, grad_out, create_graph=True)
    assert recomputed == [2]
    for name, got, expected in zip("qkv", recorded, kernels, strict=True):
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
    second = torch.autograd.grad(sum((g * g).sum() for g in recorded), inputs)
    assert [g.shape[1] for g in second] == [4, 2, 2]
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in second)


def sm90_limits(device):
    from gatattn.kernels.tuning import DeviceLimits

    return DeviceLimits(capability=(9, 0), shared_memory=232448)


@INTERPRETER
def test_gpu_tuning_path_in_the_interpreter(monkeypatch):
    # On a GPU the launchers tune: candidates for the GPU, a key, a timed choice, a launch with
    # the winner. Here that path runs in the interpreter with sm_90's figures and a timer that
    # favours the first candidate (the largest tiles); every candidate is launched once.
    from gatattn.kernels import flash_attention
    from gatattn.kernels.tuning import Tuner, candidates

    launched = []

    def first_is_fastest(config, fn):
        fn()
        launched.append(config)
        return float(len(launched))

    tuner = Tuner(bench=first_is_fastest, limits=sm90_limits)
    monkeypatch.setattr(flash_attention, "TUNER", tuner)
    batch = batch_from_sizes([70, 1, 33, 150])
    inputs = make_qkv(batch.numel(), batch.numel(), 1, 16)
    check_against_reference(run_triton(batch=batch, causal=True), inputs,
                            masked_reference(same_graph_mask(batch, batch, True)))

    chosen = tuner.chosen
    assert {key.kernel for key in chosen} == {"forward", "dkdv", "dq"}
    for key, config in chosen.items():
        assert key.lengths == (64, 64)  # mean length 254 / 4, rounded up
        assert (key.head_dims, key.dtype, key.causal, key.bottom_right, key.bias, key.group,
                key.capability) == ((16, 16), torch.float32, True, False, False, 1, (9, 0))
        assert config == candidates(key.kernel, 16, 16, 4, 232448)[0]
    assert len(launched) == sum(len(candidates(kernel, 16, 16, 4, 232448))
                                for kernel in ("forward", "dkdv", "dq"))


def test_tuner_keys_the_causal_alignment():
    # A bottom-right launch is another build: it is timed under its own key, which a
    # non-causal call never reaches (the flag means nothing there).
    from gatattn.kernels.tuning import Tuner

    tuner = Tuner(bench=lambda config, fn: 1.0, limits=sm90_limits)
    q, k, v = make_qkv(40, 40, 1, 16)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    for causal, bottom_right in [(True, False), (True, True), (False, True), (False, False)]:
        tuner.for_launch("forward", q, k, v, cu, causal=causal, bottom_right=bottom_right,
                         has_bias=False, launch=lambda config: None)
    alignments = sorted((key.causal, key.bottom_right) for key in tuner.chosen)
    assert alignments == [(False, False), (True, False), (True, True)]


def test_tuner_keys_the_group_size():
    # The query heads per kv head set the dK/dV grid and its work per program: a grouped call
    # is timed under its own key.
    from gatattn.kernels.tuning import Tuner

    tuner = Tuner(bench=lambda config, fn: 1.0, limits=sm90_limits)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    q = torch.zeros(40, 4, 16)
    for kv_heads in (4, 2, 1, 2):
        k = torch.zeros(40, kv_heads, 16)
        tuner.for_launch("dkdv", q, k, k, cu, causal=False, bottom_right=False, has_bias=False,
                         launch=lambda config: None)
    assert sorted(key.group for key in tuner.chosen) == [1, 2, 4]


def test_tuner_off_the_gpu_takes_the_interpreter_config():
    from gatattn.kernels.tuning import INTERPRETER_CONFIG, Tuner

    def no_timing(config, fn):
        raise AssertionError("the interpreter's one configuration is not timed")

    q = torch.zeros(40, 1, 16)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    config = Tuner(bench=no_timing).for_launch("forward", q, q, q, cu, causal=False,
                                               bottom_right=False, has_bias=False,
                                               launch=lambda config: None)
    assert config == INTERPRETER_CONFIG


def test_tile_schedule_skips_no_work():
    from gatattn.kernels.flash_attention import tile_schedule

    cu_seqlens = torch.tensor([0, 1, 1, 40, 50], dtype=torch.int32)
    segment, tile = tile_schedule(cu_seqlens, 50, 16)
    work = segment >= 0
    assert segment[work].tolist() == [0, 2, 2, 2, 3]
    assert tile[work].tolist() == [0, 0, 1, 2, 0]
    assert segment.numel() == 4 + 4  # cdiv(50, 16) + 4 segments bounds the grid


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,density,channels", [(1, 1.0, 16), (7, 0.4, 40), (97, 0.1, 64),
                                                (60, 1.0, 24)])
def test_csr_kernel_on_edge_sets(device, n, density, channels):
    gen = torch.Generator().manual_seed(n)
    mask = torch.rand(n, n, generator=gen) < density
    mask[: max(1, n // 6)] = False  # targets without in-edges
    edge_index = gatattn.mask_to_edge_index(mask)
    edge_index = edge_index[:, torch.randperm(edge_index.size(1), generator=gen)]
    inputs = on(device, make_qkv(n, n, 2, channels, value_channels=channels + 8))
    check_against_reference(run_triton(edge_index=edge_index.to(device)), inputs,
                            reference_on_cpu(mask))


@pytest.mark.parametrize("device", DEVICES)
def test_csr_kernel_on_a_hub_and_a_bipartite_graph(device):
    hub = torch.stack([torch.arange(1, 150), torch.zeros(149, dtype=torch.long)])  # 149 -> 0
    inputs = on(device, make_qkv(150, 150, 1, 16))
    check_against_reference(run_triton(edge_index=hub.to(device)), inputs,
                            reference_on_cpu(gatattn.edge_index_to_mask(hub, 150)))
    mask = torch.rand(5, 11, generator=torch.Generator().manual_seed(1)) < 0.5
    inputs = on(device, make_qkv(5, 11, 2, 16))
    check_against_reference(
        run_triton(edge_index=gatattn.mask_to_edge_index(mask).to(device)), inputs,
        reference_on_cpu(mask))


@pytest.mark.cuda
def test_auto_serves_the_route_it_reports_on_cuda():
    """On a GPU, auto verifies and races the kernels (tests/test_racing.py): what it returns is
    what the route it reports returns, and no kernel of ours is rejected there."""
    from gatattn.backends.racing import route_key
    from gatattn.backends.varlen import varlen_attention
    from gatattn.graph import describe_graph

    batch = batch_from_sizes([3, 20, 1, 9]).cuda()
    q, k, v = (t.detach().cuda() for t in make_qkv(batch.numel(), batch.numel(), 2, 64,
                                                    dtype=torch.bfloat16))
    edge_index = gatattn.mask_to_edge_index(torch.rand(33, 33) < 0.3).cuda()
    for graph in (dict(batch=batch), dict(batch=batch, causal=True), dict(edge_index=edge_index)):
        out = gatattn.attention(q, k, v, **graph)
        key = route_key(q, v, describe_graph(33, 33, **graph)[0], needs_grad=False)
        (choice,) = [c for c in gatattn.route_choices() if c.key == key]
        assert not choice.rejected, choice
        if choice.route == "varlen":
            expected = varlen_attention(q, k, v, describe_graph(33, 33, **graph)[0],
                                        scale=64**-0.5)
        else:
            expected = gatattn.attention(q, k, v, backend=choice.route, **graph)
        assert torch.equal(out, expected), (graph, choice)


def layer_graphs(name):
    """``(inputs of the layer, keyword arguments)`` for one kind of graph, on CPU."""
    gen = torch.Generator().manual_seed(3)
    batch = batch_from_sizes([5, 40, 1, 17])
    if name == "bipartite":
        batch_src = batch_from_sizes([9, 3, 30, 2])
        x = (torch.randn(batch_src.numel(), 8, generator=gen),
             torch.randn(batch.numel(), 12, generator=gen))
        return x, dict(batch=(batch_src, batch))
    x = torch.randn(batch.numel(), 12, generator=gen)
    if name == "edges":
        mask = torch.rand(batch.numel(), batch.numel(), generator=gen) < 0.2
        return x, dict(edge_index=gatattn.mask_to_edge_index(mask))
    return x, dict(batch=batch, causal=name == "causal")


def run_layer(conv, inputs, kwargs, device, dtype):
    """The layer's output and input gradients in ``dtype`` on ``device``, back on the CPU."""
    conv = conv.to(device=device, dtype=dtype)
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    xs = tuple(x.to(device=device, dtype=dtype).requires_grad_() for x in xs)
    kwargs = {key: tuple(t.to(device) for t in value) if isinstance(value, tuple) else
              value.to(device) if isinstance(value, torch.Tensor) else value
              for key, value in kwargs.items()}
    out = conv(xs if isinstance(inputs, tuple) else xs[0], **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
    grads = torch.autograd.grad(out, xs, upstream)
    return [t.detach().cpu() for t in (out, *grads)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", ["batch", "causal", "edges", "bipartite"])
def test_layer_through_the_kernels(monkeypatch, device, graph):
    # On CUDA the layer's default route (auto) must reach the kernels; in the interpreter only
    # an explicit backend does. fp16 either way: the interpreter miscomputes bf16 dots. The
    # reference is the same layer on CPU in float64 (its routes are checked against
    # gatattn.reference in test_conv.py and test_functional.py), and in fp16 for the bound.
    import gatattn.functional as functional

    calls = []
    kernels = functional.triton_attention
    monkeypatch.setattr(functional, "triton_attention",
                        lambda *a, **kw: calls.append(1) or kernels(*a, **kw))
    inputs, kwargs = layer_graphs(graph)
    in_channels = (8, 12) if graph == "bipartite" else 12
    torch.manual_seed(0)
    conv = gatattn.SelfAttentionConv(in_channels, 16, heads=4, root_weight=True)
    ref_hi = run_layer(conv, inputs, kwargs, "cpu", torch.float64)
    ref_lo = run_layer(conv, inputs, kwargs, "cpu", torch.float16)
    conv.backend = "auto" if device == "cuda" else "triton"
    got = run_layer(conv, inputs, kwargs, device, torch.float16)
    assert calls, "the layer did not reach the Triton kernels"
    names = ["out"] + [f"d(input {i})" for i in range(len(got) - 1)]
    for name, g, hi, lo in zip(names, got, ref_hi, ref_lo, strict=True):
        assert_close(name, g, hi, lo)
