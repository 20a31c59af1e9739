"""gatattn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention.

The behaviours PyTorch's own tests check (test/nn/test_multihead_attention.py and the ModuleInfo
samples of torch/testing/_internal/common_modules.py), written as our own tests and run on both
classes ("torch" and "gatattn"), so a check that is invalid here shows on the original too.
Where we differ on purpose, our variant is a strict xfail that says why.

Outputs, weights and every gradient are compared in float64 with a reference built here from
the module's own parameters and ``gatattn.reference`` (dense masked attention).
"""

from __future__ import annotations

import copy
import itertools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatattn import reference
from gatattn.multihead import (
    MultiheadAttention,
    MultiheadAttentionInputError,
    MultiheadAttentionMaskError,
)
from tests.conftest import assert_close

DTYPE = torch.float64
E, H = 8, 2  # embed_dim, num_heads

TORCH = pytest.param(nn.MultiheadAttention, id="torch")
OURS = pytest.param(MultiheadAttention, id="gatattn")
IMPLS = [TORCH, OURS]

# Boolean padding with float attention masks (and the reverse) is tested on purpose; PyTorch
# accepts the mix with a deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning")


def ours_differs(reason):
    return [TORCH, pytest.param(MultiheadAttention, id="gatattn",
                                marks=pytest.mark.xfail(strict=True, reason=reason))]


FULLY_MASKED = ("a fully masked query row gets a zero attention output (out_proj's bias) and "
                "zero weights in gatattn, NaN in PyTorch")


def make_module(impl, seed=0, **kwargs):
    """An ``impl`` with PyTorch's initialisation for ``seed``, and random (non-zero) biases."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dtype=DTYPE, **kwargs)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha if impl is nn.MultiheadAttention else MultiheadAttention.from_torch(mha)


def make_inputs(mha, N, L, S, seed=1, self_attention=False):
    """Batch-first ``query, key, value`` leaves; ``query is key is value`` for self-attention."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(N, L, E, generator=gen, dtype=DTYPE).requires_grad_()
    if self_attention:
        return query, query, query
    key = torch.randn(N, S, mha.kdim, generator=gen, dtype=DTYPE).requires_grad_()
    value = torch.randn(N, S, mha.vdim, generator=gen, dtype=DTYPE).requires_grad_()
    return query, key, value


def as_masked(mask):
    """PyTorch's mask (bool True = masked, or float: -inf masked) -> bool True = masked."""
    return mask if mask.dtype == torch.bool else mask == float("-inf")


def additive_part(attn_mask, N, H, L, S_all):
    """A float mask's finite entries, (N, H, L, S'): PyTorch adds them to the logits (0 for the
    extra keys of add_bias_kv / add_zero_attn, as PyTorch pads the mask with zeros)."""
    bias = torch.zeros(N, H, L, S_all, dtype=DTYPE)
    if attn_mask is not None and attn_mask.is_floating_point():
        finite = attn_mask.masked_fill(attn_mask == float("-inf"), 0)
        S = attn_mask.size(-1)
        bias[..., :S] = finite.view(-1, H if attn_mask.dim() == 3 else 1, L, S)
    return bias


def reference_mha(mha, query, key, value, key_padding_mask=None, attn_mask=None):
    """What nn.MultiheadAttention computes, from ``mha``'s parameters and gatattn.reference:
    batch-first ``(N, L, E)`` output and ``(N, H, L, S')`` weights (zeros where masked)."""
    E, H = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    (N, L, _), S = q.shape, k.size(1)
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.expand(N, 1, E)], 1)
        v = torch.cat([v, mha.bias_v.expand(N, 1, E)], 1)
    if mha.add_zero_attn:
        k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
    allowed = torch.ones(N, H, L, k.size(1), dtype=torch.bool)
    if key_padding_mask is not None:
        allowed[..., :S] &= ~as_masked(key_padding_mask).view(N, 1, 1, S)
    if attn_mask is not None:
        allowed[..., :S] &= ~as_masked(attn_mask).view(-1, H if attn_mask.dim() == 3 else 1, L, S)
    bias = additive_part(attn_mask, N, H, L, k.size(1))
    C = E // H
    outs, weights = [], []
    for b, h in itertools.product(range(N), range(H)):
        heads = slice(h * C, (h + 1) * C)
        out, w = reference.attention(q[b, :, None, heads], k[b, :, None, heads],
                                     v[b, :, None, heads], allowed[b, h],
                                     bias=bias[b, h].unsqueeze(-1), return_weights=True)
        outs.append(out[:, 0])
        weights.append(w[0])
    out = torch.stack(outs).view(N, H, L, C).transpose(1, 2).reshape(N, L, E)
    return mha.out_proj(out), torch.stack(weights).view(N, H, L, -1)


def call(mha, query, key, value, **kwargs):
    """``mha`` on batch-first inputs, whatever its ``batch_first``; batch-first results."""
    if mha.batch_first:
        return mha(query, key, value, **kwargs)
    same = query is key and key is value
    args = (query.transpose(0, 1),) * 3 if same else [x.transpose(0, 1) for x in (query, key,
                                                                                   value)]
    out, weights = mha(*args, **kwargs)
    return out.transpose(0, 1), weights


def random_masks(kind, N, L, S, seed=2):
    """``(key_padding_mask, attn_mask)`` of a kind, drawn so that no query row is fully masked."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        padding = torch.rand(N, S, generator=gen) < 0.4
        shape = (N * H, L, S) if kind.endswith("3d") else (L, S)
        masked = torch.rand(shape, generator=gen) < 0.4
        if kind in ("causal", "additive_causal"):
            masked = torch.ones(L, S, dtype=torch.bool).triu(1)
        allowed = ~padding.view(N, 1, 1, S) & ~masked.view(-1, H if masked.dim() == 3 else 1, L,
                                                           S)
        if allowed.any(-1).all():
            break
    if kind == "none":
        return padding, None
    if kind.startswith("additive"):  # finite entries added to the logits, some -inf
        values = torch.randn(shape, generator=gen, dtype=DTYPE)
        return padding, values.masked_fill(masked, float("-inf"))
    if kind.startswith("float") or kind == "causal":
        return padding, torch.zeros(shape, dtype=DTYPE).masked_fill(masked, float("-inf"))
    return padding, masked


def gradients(outputs, leaves, seed=3):
    """Gradients of ``sum(random * output)`` over ``outputs`` (the same randoms for equal
    shapes), zeros for leaves that do not reach them."""
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, upstream, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]


def check_against_reference(mha, inputs, **kwargs):
    """Output, weights and the gradients of every input and parameter (through the output and
    the weights) against the reference."""
    query, key, value = inputs
    leaves = list(dict.fromkeys([query, key, value])) + list(mha.parameters())
    masks = {k: kwargs[k] for k in ("key_padding_mask", "attn_mask") if k in kwargs}
    out, weights = call(mha, *inputs, **kwargs)
    ref, ref_weights = reference_mha(mha, *inputs, **masks)
    assert out.shape == ref.shape
    assert_close("out", out, ref)
    if kwargs.get("need_weights", True):
        if kwargs.get("average_attn_weights", True):
            ref_weights = ref_weights.mean(dim=1)
        assert weights.shape == ref_weights.shape
        assert_close("weights", weights.detach(), ref_weights.detach())
        outputs, ref_outputs = (out, weights), (ref, ref_weights)
    else:
        assert weights is None
        outputs, ref_outputs = (out,), (ref,)
    grads, ref_grads = gradients(outputs, leaves), gradients(ref_outputs, leaves)
    for i, (g, g_ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(f"grad {i}", g, g_ref)


# -- forward, weights and gradients over every configuration ------------------------------------

MASK_KINDS = ["none", "bool", "float", "bool3d", "float3d", "causal"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("padding", [False, True], ids=["no_padding", "padding"])
@pytest.mark.parametrize("extra_keys", ["none", "bias_kv", "zero_attn", "both"])
@pytest.mark.parametrize("kdim", [None, 5], ids=["packed", "kdim"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_matches_reference(impl, mask_kind, padding, extra_keys, kdim, need_weights):
    mha = make_module(impl, add_bias_kv=extra_keys in ("bias_kv", "both"),
                      add_zero_attn=extra_keys in ("zero_attn", "both"), kdim=kdim,
                      vdim=None if kdim is None else 3)
    N, L, S = 3, 3, 5  # cross-attention: L != S
    padding_mask, attn_mask = random_masks(mask_kind, N, L, S)
    kwargs = {"attn_mask": attn_mask} if attn_mask is not None else {}
    if padding:
        kwargs["key_padding_mask"] = padding_mask
    check_against_reference(mha, make_inputs(mha, N, L, S), need_weights=need_weights,
                            average_attn_weights=False, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_batch_first(impl, mask_kind, need_weights):
    mha = make_module(impl, add_bias_kv=True, batch_first=True)
    padding, attn_mask = random_masks(mask_kind, 3, 3, 5)
    check_against_reference(mha, make_inputs(mha, 3, 3, 5), key_padding_mask=padding,
                            attn_mask=attn_mask, need_weights=need_weights)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "causal"])
def test_need_weights_and_average(impl, need_weights, average, mask_kind):
    mha = make_module(impl, batch_first=True)
    padding, attn_mask = random_masks(mask_kind, 2, 4, 4)
    check_against_reference(mha, make_inputs(mha, 2, 4, 4), key_padding_mask=padding,
                            attn_mask=attn_mask, need_weights=need_weights,
                            average_attn_weights=average)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_query_is_key_is_value(impl, batch_first):
    mha = make_module(impl, batch_first=batch_first)
    padding, _ = random_masks("none", 3, 6, 6)
    check_against_reference(mha, make_inputs(mha, 3, 6, 6, self_attention=True),
                            key_padding_mask=padding, need_weights=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_with_right_padding_and_cross_attention(impl):
    """A causal mask combined with left-aligned padding (gatattn: a causal graph with the
    padding dropped) and with L != S (top-left alignment)."""
    mha = make_module(impl, batch_first=True)
    padding = torch.arange(6) >= torch.tensor([6, 3, 1]).unsqueeze(1)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    check_against_reference(mha, make_inputs(mha, 3, 6, 6), key_padding_mask=padding,
                            attn_mask=causal, is_causal=True)
    cross = torch.ones(4, 7, dtype=torch.bool).triu(1)
    check_against_reference(mha, make_inputs(mha, 2, 4, 7), attn_mask=cross, need_weights=False)


# -- PyTorch's own checks -----------------------------------------------------------------------

def unbatched_samples():
    """The ModuleInfo samples PyTorch checks nn.MultiheadAttention with (unbatched inputs;
    embed_dim = num_heads = 3; every combination of bias, add_bias_kv, add_zero_attn, a padding
    mask on the last key and an (H, L, S) attn_mask on the last key; both batch_first), as
    ``(constructor kwargs, (query, key, value), forward kwargs)``."""
    gen = torch.Generator().manual_seed(0)
    last_key = torch.tensor([False, False, True])
    for bias, bias_kv, zero_attn, padding, attn_mask, batch_first in itertools.product(
            (True, False), (True, False), (True, False), (None, last_key),
            (None, last_key.expand(3, 3, 3)), (True, False)):
        inputs = tuple(torch.randn(3, 3, generator=gen, dtype=DTYPE).requires_grad_()
                       for _ in range(3))
        yield ({"embed_dim": 3, "num_heads": 3, "bias": bias, "add_bias_kv": bias_kv,
                "add_zero_attn": zero_attn, "batch_first": batch_first},
               inputs, {"key_padding_mask": padding, "attn_mask": attn_mask})


def as_one_sequence_batch(mha, inputs, kwargs):
    """The unbatched call as a batch of one sequence, results squeezed back."""
    dim = 0 if mha.batch_first else 1
    padding = kwargs["key_padding_mask"]
    kwargs = dict(kwargs, key_padding_mask=None if padding is None else padding.unsqueeze(0))
    out, weights = mha(*(x.unsqueeze(dim) for x in inputs), **kwargs)
    return out.squeeze(dim), weights.squeeze(0)


@pytest.mark.parametrize("impl", IMPLS)
def test_unbatched_equals_a_batch_of_one(impl):
    samples = list(unbatched_samples())
    assert len(samples) == 64
    for constructor, inputs, kwargs in samples:
        torch.manual_seed(0)
        mha = impl(**constructor, dtype=DTYPE)
        out, weights = mha(*inputs, **kwargs)
        ref_out, ref_weights = as_one_sequence_batch(mha, inputs, kwargs)
        assert out.shape == ref_out.shape == (3, 3) and weights.shape == (3, 3 + mha.add_zero_attn
                                                                          + bias_kv(mha))
        assert_close("out", out, ref_out)
        assert_close("weights", weights, ref_weights)


def bias_kv(mha):
    return int(mha.bias_k is not None)


def test_unbatched_gatattn_equals_torch():
    for constructor, inputs, kwargs in unbatched_samples():
        torch.manual_seed(0)
        theirs = nn.MultiheadAttention(**constructor, dtype=DTYPE)
        ours = MultiheadAttention.from_torch(theirs)
        expected = theirs(*inputs, **kwargs)
        got = ours(*inputs, **kwargs)
        leaves = list(inputs) + list(theirs.parameters())
        grads = torch.autograd.grad(expected[0].sum(), leaves)
        ours_leaves = list(inputs) + list(ours.parameters())
        for a, b in zip(torch.autograd.grad(got[0].sum(), ours_leaves), grads, strict=True):
            assert_close("grad", a, b)
        for a, b in zip(got, expected, strict=True):
            assert_close("out / weights", a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_3d_attn_mask_equals_2d_mask_per_sequence(impl):
    N, T, S, heads = 8, 2, 3, 4
    mha = impl(8, heads, dtype=DTYPE)
    query, key = torch.rand(N, T, 8, dtype=DTYPE), torch.rand(N, S, 8, dtype=DTYPE)
    mask = torch.zeros(N, T, S, dtype=DTYPE).masked_fill(torch.rand(N, T, S) < 0.5,
                                                         float("-inf"))
    mask[:, :, 0] = 0  # no fully masked row (see test_fully_masked_query_rows)
    out = mha(query.transpose(0, 1), key.transpose(0, 1), key.transpose(0, 1),
              attn_mask=mask.repeat_interleave(heads, dim=0))[0].transpose(0, 1)
    for i in range(N):
        one = mha(query[i].unsqueeze(1), key[i].unsqueeze(1), key[i].unsqueeze(1),
                  attn_mask=mask[i])[0]
        assert_close(f"sequence {i}", out[i], one[:, 0])


@pytest.mark.parametrize("impl", IMPLS)
def test_no_bias(impl):
    mha = impl(8, 4, bias=False)
    assert mha.in_proj_bias is None and mha.out_proj.bias is None


@pytest.mark.parametrize("impl", IMPLS)
def test_in_proj_bias_none_and_in_proj_weight_none(impl):
    """bias=False, and kdim == vdim != embed_dim (separate projection weights)."""
    torch.manual_seed(0)
    mha = impl(4, 4, bias=False, kdim=2, vdim=2, dtype=DTYPE)
    assert mha.in_proj_weight is None and mha.k_proj_weight.shape == (4, 2)
    query, key = torch.rand(4, 4, 4, dtype=DTYPE), torch.rand(4, 4, 2, dtype=DTYPE)
    out, _ = mha(query, key, key)
    assert_close("out", out.transpose(0, 1),
                 reference_mha(mha, query.transpose(0, 1), key.transpose(0, 1),
                               key.transpose(0, 1))[0])


def invalid_calls():
    """(description, call) pairs: the bad shapes PyTorch's tests feed nn.MultiheadAttention."""
    # Distinct key and value tensors: PyTorch's inference fast path (self-attention only)
    # would otherwise check some of these itself, with other exceptions.
    q3, k3, v3 = torch.randn(4, 4, 4), torch.randn(4, 4, 4), torch.randn(4, 4, 4)
    q2, k2, v2 = torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4)
    bool_1d = torch.tensor([False, False, True, True])
    return [
        ("3-D query, 2-D key", lambda m: m(q3, k2, v3)),
        ("3-D query, 2-D value", lambda m: m(q3, k3, v2)),
        ("3-D query, 1-D key_padding_mask", lambda m: m(q3, k3, v3, key_padding_mask=bool_1d)),
        ("3-D query, 1-D attn_mask", lambda m: m(q3, k3, v3, attn_mask=bool_1d)),
        ("2-D query, 3-D key", lambda m: m(q2, k3, v2)),
        ("2-D query, 3-D value", lambda m: m(q2, k2, v3)),
        ("2-D query, 2-D key_padding_mask",
         lambda m: m(q2, k2, v2, key_padding_mask=bool_1d.repeat(2).view(1, 8))),
        ("2-D query, 1-D attn_mask", lambda m: m(q2, k2, v2, attn_mask=bool_1d)),
        ("2-D query, 3-D attn_mask of a wrong shape",
         lambda m: m(q2, k2, v2, attn_mask=torch.rand(5, 4, 4) < 0.5)),
        ("4-D query", lambda m: m(q3[None], k3[None], v3[None])),
        ("integer attn_mask", lambda m: m(q3, k3, v3, attn_mask=torch.zeros(4, 4, dtype=int))),
        ("key_padding_mask of a wrong length",
         lambda m: m(q3, k3, v3, key_padding_mask=torch.zeros(4, 3, dtype=torch.bool))),
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_invalid_shapes_raise_assertion_error(impl, mode):
    mha = impl(4, 4) if mode == "train" else impl(4, 4, batch_first=True).eval()
    with torch.set_grad_enabled(mode == "train"):
        for description, bad_call in invalid_calls():
            with pytest.raises(AssertionError) as info:
                bad_call(mha)
            if impl is MultiheadAttention:  # ours: also a ValueError that names the value
                assert isinstance(info.value, MultiheadAttentionInputError), description
                assert isinstance(info.value, ValueError), description
                assert "got" in str(info.value), description


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_attn_mask_of_wrong_shape_raises_runtime_error(impl):
    mha = impl(4, 2)
    x = torch.randn(3, 2, 4)  # L=3, N=2
    for bad in (torch.zeros(3, 4, dtype=torch.bool), torch.zeros(5, 3, 3, dtype=torch.bool)):
        with pytest.raises(RuntimeError) as info:
            mha(x, x, x, attn_mask=bad)
        if impl is MultiheadAttention:
            assert isinstance(info.value, MultiheadAttentionMaskError)
            assert "got" in str(info.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_constructor_errors(impl):
    with pytest.raises(ValueError):
        impl(0, 1)
    with pytest.raises(AssertionError):
        impl(6, 4)  # embed_dim not divisible by num_heads


# -- is_causal ----------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_is_causal_without_mask_is_refused(impl):
    mha = impl(4, 2)  # training mode: PyTorch's own forward (its fast path ignores the hint)
    x = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(x, x, x, is_causal=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_hint_with_causal_mask(impl, need_weights):
    mha = make_module(impl)
    inputs = make_inputs(mha, 2, 5, 5)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DTYPE)
    check_against_reference(mha, inputs, attn_mask=mask, is_causal=True,
                            need_weights=need_weights)


def test_is_causal_hint_with_a_non_causal_mask_is_refused():
    """PyTorch's result then depends on the code path (the hint or the mask); we refuse."""
    mha = make_module(MultiheadAttention)
    query, key, value = make_inputs(mha, 2, 4, 4)
    with pytest.raises(ValueError, match="not the causal mask"):
        call(mha, query, key, value, attn_mask=torch.rand(4, 4) < 0.3, is_causal=True)


# -- where we differ on purpose -----------------------------------------------------------------

def fully_masked_case(impl):
    mha = make_module(impl, batch_first=True)
    query, key, value = make_inputs(mha, 2, 3, 4)
    padding = torch.tensor([[False, True, False, True], [True, True, True, True]])
    attn_mask = torch.tensor([[True, False, True, False]] + [[False] * 4] * 2)  # row 0 of seq 0
    out, weights = mha(query, key, value, key_padding_mask=padding, attn_mask=attn_mask)
    dead = torch.tensor([[True, False, False], [True, True, True]])  # (N, L) fully masked rows
    return mha, out, weights, dead


@pytest.mark.parametrize("impl", ours_differs(FULLY_MASKED))
def test_fully_masked_query_rows_are_nan(impl):
    _, out, weights, dead = fully_masked_case(impl)
    assert out[dead].isnan().all() and weights[dead].isnan().all()


def test_fully_masked_query_rows_get_out_proj_bias_and_zero_weights():
    """gatattn's convention: a target with no in-edge gets a zero attention output."""
    mha, out, weights, dead = fully_masked_case(MultiheadAttention)
    assert torch.equal(out[dead], mha.out_proj.bias.expand(int(dead.sum()), E))
    assert torch.equal(weights[dead], torch.zeros_like(weights[dead]))
    out.sum().backward()
    assert all(p.grad.isfinite().all() for p in mha.parameters())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", ["additive", "additive3d", "additive_causal"])
@pytest.mark.parametrize("padding", [False, True], ids=["no_padding", "padding"])
@pytest.mark.parametrize("extra_keys", ["none", "both"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_additive_float_mask_matches_reference(impl, mask_kind, padding, extra_keys,
                                               need_weights):
    """A float attn_mask's finite entries are added to the logits (its -inf entries mask),
    on implicit graphs (causal, padded) and on edges (random masks, per-head masks)."""
    mha = make_module(impl, add_bias_kv=extra_keys == "both", add_zero_attn=extra_keys == "both")
    N, L, S = 3, 4, 4 if mask_kind == "additive_causal" else 5
    padding_mask, attn_mask = random_masks(mask_kind, N, L, S)
    kwargs = {"attn_mask": attn_mask}
    if padding:
        kwargs["key_padding_mask"] = padding_mask
    check_against_reference(mha, make_inputs(mha, N, L, S), need_weights=need_weights,
                            average_attn_weights=False, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_additive_float_mask_is_added_to_the_logits(impl):
    mha = make_module(impl, batch_first=True)
    query, key, value = make_inputs(mha, 2, 3, 4)
    bias = torch.randn(3, 4, dtype=DTYPE)
    out, weights = mha(query, key, value, attn_mask=bias, average_attn_weights=False)
    # The same function with the bias folded into the keys' logits by hand:
    q = F.linear(query, mha.in_proj_weight[:E], mha.in_proj_bias[:E]).view(2, 3, H, -1)
    k = F.linear(key, mha.in_proj_weight[E:2 * E], mha.in_proj_bias[E:2 * E]).view(2, 4, H, -1)
    logits = torch.einsum("nlhc,nshc->nhls", q, k) / (E // H) ** 0.5 + bias
    assert_close("weights", weights, logits.softmax(-1))


def alibi_mask(N, L):
    """ALiBi (Press et al.): a causal mask whose kept entries are ``-slope_h * (i - j)``, one
    geometric slope per head, as a 3-D (N * H, L, L) float mask."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=DTYPE) / H)
    distance = (torch.arange(L).view(L, 1) - torch.arange(L).view(1, L)).to(DTYPE)
    bias = -slopes.view(H, 1, 1) * distance
    bias = bias.masked_fill(distance < 0, float("-inf"))
    return bias.repeat(N, 1, 1)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_alibi_equals_torch(need_weights):
    """ALiBi through attn_mask: output, weights and gradients equal nn.MultiheadAttention's."""
    theirs = make_module(nn.MultiheadAttention, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    N, L = 2, 6
    mask = alibi_mask(N, L).requires_grad_()
    inputs = make_inputs(theirs, N, L, L, self_attention=True)
    results = []
    for mha in (theirs, ours):
        out, weights = mha(*inputs, attn_mask=mask, need_weights=need_weights)
        outputs = (out, weights) if need_weights else (out,)
        results.append((outputs, gradients(outputs, [inputs[0], mask])))
    for got, expected in zip(*(r[0] for r in results), strict=True):
        assert_close("output", got, expected)
    for got, expected in zip(*(r[1] for r in results), strict=True):
        assert_close("gradient", got, expected)


def test_float_mask_with_inf_or_nan_is_refused():
    mha = make_module(MultiheadAttention)
    query, key, value = make_inputs(mha, 2, 3, 3)
    mask = torch.zeros(3, 3, dtype=DTYPE)
    mask[1, 2] = float("inf")
    with pytest.raises(ValueError, match="attn_mask holds inf"):
        call(mha, query, key, value, attn_mask=mask)
    with pytest.raises(ValueError, match="key_padding_mask holds 2.0"):
        call(mha, query, key, value, key_padding_mask=torch.full((2, 3), 2.0, dtype=DTYPE))


def test_nested_tensors_are_refused_with_the_fix():
    mha = MultiheadAttention(10, 2, batch_first=True).eval()
    nt = torch.nested.nested_tensor([torch.randn(4, 10), torch.randn(6, 10)],
                                    layout=torch.jagged)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(nt, nt, nt)


# -- dropout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_acts_on_the_returned_weights(impl):
    """In training the output is computed from the dropped weights, which are returned."""
    mha = make_module(impl, dropout=0.5, batch_first=True)
    query, key, value = make_inputs(mha, 2, 6, 6)
    padding, _ = random_masks("none", 2, 6, 6)
    torch.manual_seed(5)
    out, weights = mha(query, key, value, key_padding_mask=padding, average_attn_weights=False)
    eval_weights = mha.eval()(query, key, value, key_padding_mask=padding,
                              average_attn_weights=False)[1]
    kept = weights != 0
    assert 0.2 < kept[eval_weights > 0].double().mean() < 0.8
    assert_close("kept weights", weights[kept], eval_weights[kept] / 0.5)
    v = F.linear(value, mha.in_proj_weight[2 * E:], mha.in_proj_bias[2 * E:])
    heads = weights @ v.view(2, 6, H, -1).transpose(1, 2)  # (N, H, L, C)
    assert_close("out", out, mha.out_proj(heads.transpose(1, 2).reshape(2, 6, E)))


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_only_in_training(impl):
    mha = make_module(impl, dropout=0.5)
    inputs = make_inputs(mha, 2, 5, 5)
    train = call(mha, *inputs, need_weights=False)[0]
    mha.eval()
    check_against_reference(mha, inputs, need_weights=False)
    assert not torch.allclose(train, call(mha, *inputs, need_weights=False)[0])


# -- state_dict, conversion, eval fast path -----------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"kdim": 5, "vdim": 3}, {"add_bias_kv": True},
                                    {"bias": False}])
def test_state_dict_loads_both_ways(kwargs):
    theirs = make_module(nn.MultiheadAttention, **kwargs)
    ours = MultiheadAttention(E, H, dtype=DTYPE, **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    back = nn.MultiheadAttention(E, H, dtype=DTYPE, **kwargs)
    back.load_state_dict(ours.state_dict())
    inputs = make_inputs(theirs, 2, 3, 4)
    expected = theirs(*[x.transpose(0, 1) for x in inputs])
    for mha in (ours, back):
        for a, b in zip(mha(*[x.transpose(0, 1) for x in inputs]), expected, strict=True):
            assert_close("out / weights", a, b)


def test_from_torch_copies_configuration_mode_and_dtype():
    theirs = make_module(nn.MultiheadAttention, dropout=0.1, add_zero_attn=True, kdim=5,
                         vdim=3, batch_first=True).eval()
    ours = MultiheadAttention.from_torch(theirs)
    assert type(ours) is MultiheadAttention and not ours.training
    for name in ("embed_dim", "num_heads", "dropout", "add_zero_attn", "kdim", "vdim",
                 "batch_first", "_qkv_same_embed_dim"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.k_proj_weight.dtype == DTYPE
    assert ours.k_proj_weight.data_ptr() != theirs.k_proj_weight.data_ptr()  # a copy


def test_eval_no_grad_equals_torch_fast_path():
    """PyTorch's module takes its fused inference path here; ours computes the same."""
    theirs = make_module(nn.MultiheadAttention, batch_first=True).eval()
    ours = MultiheadAttention.from_torch(theirs)
    x = make_inputs(theirs, 3, 5, 5)[0].detach()
    padding, _ = random_masks("none", 3, 5, 5)
    native = torch._native_multi_head_attention
    with torch.no_grad(), mock.patch("torch._native_multi_head_attention", wraps=native) as fast:
        for kwargs in ({}, {"key_padding_mask": padding}):
            expected = theirs(x, x, x, need_weights=False, **kwargs)[0]
            assert_close("out", ours(x, x, x, need_weights=False, **kwargs)[0], expected)
    assert fast.call_count == 2  # PyTorch's two calls, none of ours


# -- inside nn.TransformerEncoderLayer / nn.TransformerDecoderLayer ---------------------------

def with_our_attention(layer):
    ours = copy.deepcopy(layer)
    for name in ("self_attn", "multihead_attn"):
        if hasattr(ours, name):
            setattr(ours, name, MultiheadAttention.from_torch(getattr(layer, name)))
    return ours


def encoder_case(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                       batch_first=batch_first, dtype=DTYPE)
    src = torch.randn(3, 5, E, dtype=DTYPE, requires_grad=True)
    # Not left-aligned, and key 0 kept: no query row is fully masked under the causal mask.
    padding = torch.tensor([[0, 0, 1, 0, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    kwargs = {"src_mask": nn.Transformer.generate_square_subsequent_mask(5, dtype=DTYPE),
              "src_key_padding_mask": padding, "is_causal": True}
    return layer, src, kwargs


def decoder_case(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                       batch_first=batch_first, dtype=DTYPE)
    tgt = torch.randn(3, 4, E, dtype=DTYPE, requires_grad=True)
    memory = torch.randn(3, 6, E, dtype=DTYPE, requires_grad=True)
    padding, _ = random_masks("none", 3, 6, 6)
    tgt_padding = torch.arange(4) >= torch.tensor([4, 2, 3]).unsqueeze(1)
    kwargs = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(4, dtype=DTYPE),
              "tgt_is_causal": True, "tgt_key_padding_mask": tgt_padding,
              "memory_key_padding_mask": padding}
    return layer, (tgt, memory), kwargs


def run_layer(layer, inputs, kwargs, batch_first):
    inputs = inputs if batch_first else tuple(x.transpose(0, 1) for x in inputs)
    out = layer(*inputs, **kwargs)
    return out if batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("which", ["encoder", "decoder"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_layers_equal_torch(which, mode, batch_first):
    """Outputs and every gradient (inputs and parameters) equal PyTorch's with the same
    weights; with gradients on, the layers call our forward."""
    if which == "encoder":
        layer, src, kwargs = encoder_case(batch_first)
        inputs = (src,)
    else:
        layer, inputs, kwargs = decoder_case(batch_first)
    layer.train(mode == "train")
    ours = with_our_attention(layer)
    calls = count_forward_calls(ours)
    upstream = torch.randn(inputs[0].shape, dtype=DTYPE)
    results = []
    for module in (layer, ours):
        out = run_layer(module, inputs, kwargs, batch_first)
        leaves = list(inputs) + list(module.parameters())
        results.append((out, torch.autograd.grad(out, leaves, upstream)))
    assert sum(calls.values()) == (1 if which == "encoder" else 2)
    assert_close("out", results[1][0], results[0][0])
    for i, (a, b) in enumerate(zip(results[1][1], results[0][1], strict=True)):
        assert_close(f"grad {i}", a, b)


def count_forward_calls(layer):
    """Count calls of our attention modules' forward without hooks (hooks would disable
    PyTorch's fast path by themselves)."""
    calls = {}
    for name in ("self_attn", "multihead_attn"):
        module = getattr(layer, name, None)
        if isinstance(module, MultiheadAttention):
            calls[name] = 0

            def counted(*args, _name=name, _forward=module.forward, **kwargs):
                calls[_name] += 1
                return _forward(*args, **kwargs)
            module.forward = counted
    return calls


def test_encoder_layer_inference_fast_path_is_the_same_function():
    """In eval mode under no_grad, TransformerEncoderLayer (batch_first, even heads) runs
    PyTorch's fused kernel on our module's weights and never calls our forward: the result is
    the same function. With the fast path disabled our forward runs, with the same result."""
    layer, src, kwargs = encoder_case(batch_first=True)
    layer.eval()
    ours = with_our_attention(layer)
    calls = count_forward_calls(ours)
    kwargs = {"src_key_padding_mask": kwargs["src_key_padding_mask"]}
    with torch.no_grad():
        expected = layer(src, **kwargs)
        assert_close("fast path", ours(src, **kwargs), expected)
        assert calls["self_attn"] == 0
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert_close("our forward", ours(src, **kwargs), expected)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)
        assert calls["self_attn"] == 1


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad_nested_fast_path", "grad"])
def test_transformer_encoder_stack_equals_torch(grad):
    """nn.TransformerEncoder in eval mode: under no_grad with a padding mask it packs the batch
    into a nested tensor for PyTorch's fused layers (our forward is not called); with gradients
    each layer calls our forward. Both equal PyTorch."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True,
                                       dtype=DTYPE)
    theirs = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    ours = copy.deepcopy(theirs)
    for block in ours.layers:
        block.self_attn = MultiheadAttention.from_torch(block.self_attn)
    calls = [count_forward_calls(block) for block in ours.layers]
    src = torch.randn(3, 5, E, dtype=DTYPE)
    padding = torch.arange(5) >= torch.tensor([5, 3, 2]).unsqueeze(1)
    with torch.set_grad_enabled(grad):
        expected = theirs(src, src_key_padding_mask=padding)
        assert_close("out", ours(src, src_key_padding_mask=padding), expected)
    assert sum(c["self_attn"] for c in calls) == (2 if grad else 0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_float32_equals_torch(need_weights):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(64, 4, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    query, key = torch.randn(4, 10, 64), torch.randn(4, 12, 64)
    padding = torch.arange(12) >= torch.tensor([12, 5, 9, 1]).unsqueeze(1)
    expected = theirs(query, key, key, key_padding_mask=padding, need_weights=need_weights)
    got = ours(query, key, key, key_padding_mask=padding, need_weights=need_weights)
    assert got[0].dtype == torch.float32
    assert_close("out", got[0], expected[0])
    if need_weights:
        assert_close("weights", got[1], expected[1])


@pytest.mark.parametrize("sizes", [(0, 3, 4), (2, 0, 4), (2, 3, 0)], ids=["N=0", "L=0", "S=0"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_empty_batch_and_sequences_equal_torch(sizes, need_weights):
    N, L, S = sizes
    theirs = make_module(nn.MultiheadAttention, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    query, key, value = make_inputs(theirs, N, L, S)
    expected = theirs(query, key, value, need_weights=need_weights)
    got = ours(query, key, value, need_weights=need_weights)
    assert_close("out", got[0], expected[0])
    if need_weights:
        assert got[1].shape == expected[1].shape == (N, L, S)
    got[0].sum().backward()


@pytest.mark.parametrize("bias_dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kdim", [None, 5], ids=["packed", "kdim"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_in_proj_bias_of_another_dtype_equals_torch(bias_dtype, kdim, batch_first):
    """float32 weights with an in_proj_bias of another dtype: PyTorch's layer adds the bias
    into the float32 projections (batch_first=True; with sequence-first inputs its fused
    projection refuses the mix, so that layout is compared against its batch-first run)."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    ours.batch_first = batch_first
    bias = torch.randn(3 * E).to(bias_dtype)
    for mha in (theirs, ours):  # (load_state_dict would cast it to the parameter's dtype)
        mha.in_proj_bias.data = bias.clone()
    query = torch.randn(3, 4, E, requires_grad=True)
    key = torch.randn(3, 6, kdim or E, requires_grad=True)
    padding = torch.arange(6) >= torch.tensor([6, 2, 4]).unsqueeze(1)
    expected = theirs(query, key, key, key_padding_mask=padding)
    args = (query, key, key) if batch_first else (query.transpose(0, 1), key.transpose(0, 1),
                                                  key.transpose(0, 1))
    out, weights = ours(*args, key_padding_mask=padding)
    out = out if batch_first else out.transpose(0, 1)
    assert out.dtype == expected[0].dtype == torch.float32
    assert_close("out", out, expected[0])
    assert_close("weights", weights, expected[1])
    leaves = [query, key, theirs.in_proj_bias]
    for name, got, ref in zip(["dquery", "dkey", "dbias"], torch.autograd.grad(
            out.square().sum(), [query, key, ours.in_proj_bias]), torch.autograd.grad(
            expected[0].square().sum(), leaves), strict=True):
        assert got.dtype == ref.dtype, name
        # Both layers compute the gradients in float32, the projections' dtype: a float64
        # bias's gradient holds float32 values, so it is compared at float32's precision.
        assert_close(name, got.float() if got.dtype == torch.float64 else got, ref)
