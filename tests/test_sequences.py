"""Sequence batches <-> graph batches."""

import pytest
import torch

import gatattn


@pytest.mark.parametrize("batch_first", [True, False])
def test_round_trip_with_lengths(batch_first):
    x = torch.randn(3, 5, 2)
    lengths = torch.tensor([5, 0, 2])
    x_in = x if batch_first else x.transpose(0, 1)
    flat, ptr = gatattn.sequences_to_graph(x_in, lengths=lengths, batch_first=batch_first)
    assert ptr.tolist() == [0, 5, 5, 7]
    torch.testing.assert_close(flat, torch.cat([x[0], x[2, :2]]))
    back, padding = gatattn.graph_to_sequences(flat, ptr, max_len=5, batch_first=batch_first)
    back = back if batch_first else back.transpose(0, 1)
    assert torch.equal(padding, torch.arange(5) >= lengths.unsqueeze(1))
    torch.testing.assert_close(back[~padding], x[~padding])
    assert back[padding].abs().sum() == 0


def test_round_trip_with_arbitrary_padding_mask():
    x = torch.randn(2, 4, 3)
    padding = torch.tensor([[False, True, False, True], [True, False, False, False]])
    flat, ptr = gatattn.sequences_to_graph(x, key_padding_mask=padding)
    assert ptr.tolist() == [0, 2, 5]
    back, _ = gatattn.graph_to_sequences(flat, ptr, key_padding_mask=padding)
    torch.testing.assert_close(back[~padding], x[~padding])


def test_bad_sequence_input():
    with pytest.raises(ValueError, match="lengths or key_padding_mask"):
        gatattn.sequences_to_graph(torch.randn(2, 3, 1), lengths=torch.tensor([1, 2]),
                                   key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths has max 4"):
        gatattn.sequences_to_graph(torch.randn(2, 3, 1), lengths=torch.tensor([1, 4]))


def float_mask(padding):
    """nn.MultiheadAttention's float form of a key_padding_mask: -inf at padding, 0 elsewhere."""
    return torch.zeros(padding.shape).masked_fill(padding, float("-inf"))


@pytest.mark.parametrize("form_in", ["bool", "float"])
@pytest.mark.parametrize("form_out", ["bool", "float"])
def test_padding_masks_in_either_form_both_ways(form_in, form_out):
    x = torch.randn(2, 4, 3)
    padding = torch.tensor([[False, True, False, True], [True, False, False, False]])
    mask = {"bool": padding, "float": float_mask(padding)}
    flat, ptr = gatattn.sequences_to_graph(x, key_padding_mask=mask[form_in])
    assert ptr.tolist() == [0, 2, 5]
    torch.testing.assert_close(flat, x[~padding])
    back, returned = gatattn.graph_to_sequences(flat, ptr, key_padding_mask=mask[form_out])
    assert returned is mask[form_out]
    torch.testing.assert_close(back[~padding], x[~padding])
    assert back[padding].abs().sum() == 0


def test_a_float_mask_with_a_score_bias_is_refused():
    mask = torch.tensor([[0.0, -1.5, float("-inf")]])
    with pytest.raises(ValueError, match="holds -1.5.*Give a bool mask"):
        gatattn.sequences_to_graph(torch.randn(1, 3, 2), key_padding_mask=mask)
    with pytest.raises(TypeError, match="torch.int64"):
        gatattn.sequences_to_graph(torch.randn(1, 3, 2), key_padding_mask=torch.zeros(1, 3).long())


def test_a_mask_that_does_not_match_ptr_is_refused():
    flat, ptr = gatattn.sequences_to_graph(torch.randn(2, 3, 2), lengths=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"keeps \[2, 2\] tokens.*holds \[3, 1\]"):
        gatattn.graph_to_sequences(flat, ptr, key_padding_mask=torch.tensor(
            [[False, False, True], [False, False, True]]))
