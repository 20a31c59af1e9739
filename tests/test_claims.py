"""Each claim of the seed text, as measured by ``gatattn.claims``, holds. No clock is read:
cost claims are checked on counted bytes only."""

import math

import pytest
import torch

from gatattn import claims


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attention_is_permutation_equivariant_until_positions_are_added(seed):
    measured = claims.permutation_equivariance(seed=seed)
    assert measured["plain"] < 1e-5
    assert measured["with_positions"] > 1e-2


@pytest.mark.parametrize("n", [1, 7, 64])
def test_fused_attention_equals_message_passing_on_the_complete_graph(n):
    assert claims.complete_graph_equivalence(n=n) < 1e-5


def test_peak_tensor_bytes_counts_what_is_held_at_once():
    def two_live_one_freed():
        a = torch.empty(1000)  # 4000 B, freed before b is made
        del a
        b = torch.empty(500)  # 2000 B
        c = torch.empty(250)  # 1000 B, alive with b
        return b, c

    assert claims.peak_tensor_bytes(two_live_one_freed) == 4000
    x = torch.randn(100, 100)
    assert claims.peak_tensor_bytes(lambda: x.view(-1, 1)[:5].t()) == 0  # views of an input


def test_naive_memory_is_quadratic_and_fused_memory_linear():
    sizes = [64, 128, 256, 512]
    measured = claims.scaling(sizes, timed=False)
    naive, fused = measured["naive"]["bytes"], measured["fused"]["bytes"]
    assert abs(claims.fit_exponent(sizes, naive) - 2) < 0.15, naive
    assert abs(claims.fit_exponent(sizes, fused) - 1) < 0.05, fused
    heads, channels = 2, 32
    for n, nbytes in zip(sizes, naive, strict=True):
        assert nbytes >= heads * n * n * 4  # at least one float32 score matrix
    for n, nbytes in zip(sizes, fused, strict=True):
        assert nbytes <= 3 * n * heads * channels * 4  # a few (n, H, C) tensors, no n x n


def test_fit_exponent_recovers_a_power_law():
    assert claims.fit_exponent([2, 4, 8, 16], [3 * s**1.5 for s in [2, 4, 8, 16]]) == (
        pytest.approx(1.5))


def test_averaging_heads_divides_the_variance_by_their_number():
    heads = [1, 2, 4, 8]
    variances = claims.head_average_variance(heads)
    assert claims.fit_exponent(heads, variances) == pytest.approx(-1, abs=0.1)
    for h, var in zip(heads, variances, strict=True):
        assert h * var / variances[0] == pytest.approx(1, rel=0.15)


@pytest.mark.parametrize("n", [1, 5, 16])
def test_causal_score_gradient_is_lower_triangular(n):
    grad = claims.score_gradient(n, causal=True)
    assert not grad.triu(1).any()
    # Every allowed entry is generically non-zero, except row 0: a softmax over one key is
    # constant, so its only entry has zero gradient.
    nonzero = grad != 0
    assert int(nonzero.sum()) == n * (n + 1) // 2 - 1
    assert not nonzero[0].any()


def test_full_score_gradient_is_dense():
    assert int((claims.score_gradient(8) != 0).sum()) == 64


def test_entropy_goes_from_zero_to_log_n_with_temperature():
    n = 16
    entropies = [claims.attention_entropy(n, t) for t in (1e-4, 1e-2, 1.0, 1e2, 1e4)]
    assert entropies[0] < 1e-6
    assert entropies[-1] == pytest.approx(math.log(n), rel=1e-4)
    assert entropies == sorted(entropies)


def test_score_gradient_vanishes_at_both_temperature_extremes():
    sweep = claims.temperature_sweep([1e-4, 1e-1, 1.0, 1e4])
    cold, *middle, hot = sweep["grad_norm"]
    peak = max(middle)
    assert cold < 1e-6 * peak
    assert hot < 1e-3 * peak


def test_attention_gradient_does_not_decay_with_distance_but_an_rnn_does():
    paths = claims.gradient_by_distance(length=48)
    attn, rnn = paths["attention"], paths["rnn"]
    assert min(attn[1:]) > 0.05 * max(attn[1:])
    assert rnn[-1] < 1e-8 * rnn[1]


def test_cnn_receptive_field_is_fixed_and_attention_sees_the_whole_past():
    paths = claims.gradient_by_distance(length=40, cnn_layers=3, kernel_size=3)
    reach = {name: sum(g > 0 for g in series) for name, series in paths.items()}
    assert reach["cnn"] == 1 + 3 * (3 - 1)
    assert reach["attention"] == 40
    assert reach["rnn"] == 40  # everything reaches an RNN, only weakly (previous test)
