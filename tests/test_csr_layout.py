"""An edge_index that is a strided view (the transpose of an ``(E, 2)`` tensor, the usual way to
build one from a list of pairs) reaches every message-passing route correctly. Sorted by target
it needs no sort, and its rows were passed on as they lie: the Triton CSR kernels, which index
``col`` as a dense array, then read the targets row as sources (wrong rows, silently)."""

import pytest
import torch

import gatattn
from gatattn import reference
from tests.conftest import check_against_reference, make_qkv, masked_reference

pytest.importorskip("triton")


@pytest.mark.parametrize("backend", ["sparse", "triton"])
def test_a_transposed_target_sorted_edge_index(backend):
    pairs = torch.tensor([[2, 0], [4, 0], [1, 1], [2, 1], [0, 3], [3, 3], [4, 3], [1, 4]])
    edge_index = pairs.t()  # (2, E) with strides (1, 2): each row a strided view
    assert not edge_index[0].is_contiguous()
    inputs = make_qkv(5, 5, 2, 4)
    mask = reference.edge_counts(edge_index, 5, 5)
    check_against_reference(
        lambda q, k, v: gatattn.attention(q, k, v, edge_index=edge_index, backend=backend),
        inputs, masked_reference(mask))


def test_the_csr_kernels_refuse_strided_arrays():
    from gatattn.kernels.csr_attention import csr_attention_forward

    q, k, v = make_qkv(2, 3, 1, 4)
    col = torch.tensor([[2, 0], [1, 0], [0, 1]]).t()[0]  # strided: 2, 1, 0
    with pytest.raises(AssertionError, match="contiguous"):
        csr_attention_forward(q.detach(), k.detach(), v.detach(), torch.tensor([0, 2, 3]), col,
                              0.5)
