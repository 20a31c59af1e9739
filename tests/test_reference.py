"""The reference itself, checked against the definition written as plain loops."""

import math

import torch

from gatattn import reference


def loop_attention(q, k, v, mask, scale):
    """Attention for one target at a time, straight from the definition."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for i in range(q.shape[0]):
        sources = mask[i].nonzero().flatten().tolist()
        for h in range(q.shape[1]):
            logits = [float(q[i, h] @ k[j, h]) * scale for j in sources]
            if not logits:
                continue
            top = max(logits)
            exps = [math.exp(s - top) for s in logits]
            total = sum(exps)
            for j, e in zip(sources, exps, strict=True):
                out[i, h] += e / total * v[j, h]
    return out


def test_reference_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(6, 6, generator=gen) < 0.5
    mask[2] = False  # a target with no source
    out = reference.attention(q, k, v, mask, temperature=2.0)
    expected = loop_attention(q, k, v, mask, scale=1 / (2.0 * math.sqrt(3)))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out[2].abs().max() == 0


def test_reference_edge_terms_shift_keys_and_values():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 1, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    e = torch.randn(4, 4, 1, 2, generator=gen, dtype=torch.float64)
    out = reference.attention(q, k, v, mask, edge_key=e, edge_value=e)
    for i in range(4):  # target i sees keys k_j + e_ij and values v_j + e_ij
        expected = reference.attention(q[i:i + 1], k + e[i], v + e[i], mask[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], expected)


def test_reference_rows_without_sources_have_zero_gradient_not_nan():
    q, k, v = (torch.randn(3, 1, 2, requires_grad=True) for _ in range(3))
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True
    out = reference.attention(q, k, v, mask)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert q.grad[1:].abs().max() == 0


def test_block_mask_layout():
    mask = reference.block_mask([2, 1], [3, 2], causal=True)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
