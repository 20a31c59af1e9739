"""The calls of a windowed ring (gatattn.ring_layout.windowed_block_calls), checked in one
process for many layouts, world sizes and batches: together the calls of every (rank, key
block) pair hold each pair of the windowed graph exactly once and nothing else, and no call
holds a pair outside its graph or band. The gloo tests of tests/test_distributed.py run them
for real on 1, 2 and 3 ranks; these cover more ranks and layouts in a fraction of a second."""

from __future__ import annotations

import random

import pytest
import torch

from gatattn import reference
from gatattn.distributed import _attend, _Ring
from gatattn.merge import merge_attention
from gatattn.ring_layout import (
    contiguous_layout,
    rebased,
    windowed_block_calls,
    zigzag_layout,
)
from tests.conftest import torch_threads


def global_rows(holding) -> list[int]:
    """Global row of each local row of a rank's holding."""
    return [g for start, stop in holding for g in range(start, stop)]


def call_pairs(call, queries: list[int], keys: list[int]) -> list[tuple[int, int]]:
    """The global ``(query, key)`` pairs a call computes: inside its window by positions in
    the graphs of its ``ptr`` (one graph without)."""
    ptr_dst, ptr_src = call.ptr or ([0, len(queries)], [0, len(keys)])
    left, right = call.window
    pairs = []
    for g in range(len(ptr_dst) - 1):
        for a in range(ptr_dst[g + 1] - ptr_dst[g]):
            for b in range(ptr_src[g + 1] - ptr_src[g]):
                if (left is None or b - a >= -left) and (right is None or b - a <= right):
                    pairs.append((queries[ptr_dst[g] + a], keys[ptr_src[g] + b]))
    return pairs


def random_setup(rng: random.Random):
    world = rng.randint(1, 6)
    n = rng.randint(0, 30)
    cuts = sorted(rng.randint(0, n) for _ in range(world - 1))
    shards = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    causal = rng.random() < 0.5
    zigzag = causal and rng.random() < 0.7
    layout = zigzag_layout(n, world) if zigzag else contiguous_layout(shards)
    left = rng.choice([None, 0, 1, 2, 4, 9])
    right = 0 if causal else rng.choice([None, 0, 1, 3])
    left = 1 if left is None and right in (None, 0) else left  # a window, not causal alone
    cuts = sorted(rng.randint(0, n) for _ in range(rng.randint(0, 4)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    return layout, (left, right), causal, sizes


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread (a loaded machine's thread pool costs ms per op)."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("seed", range(4))
def test_windowed_calls_hold_each_pair_once(seed):
    rng = random.Random(seed)
    for _ in range(60):
        layout, window, causal, sizes = random_setup(rng)
        n = sum(sizes)
        counts = [[0] * n for _ in range(n)]
        for mine in layout:
            for theirs in layout:
                q_rows, k_rows = global_rows(mine), global_rows(theirs)
                for call in windowed_block_calls(mine, theirs, window,
                                                 sizes if len(sizes) > 1 else None):
                    # a window of the call's own rows: the library's ordinary window
                    assert all(side is None or side >= 0 for side in call.window)
                    keys = [g for s in call.keys for g in k_rows[s]]
                    pairs = call_pairs(call, q_rows[call.rows], keys)
                    assert pairs, "a call without a pair in its band"
                    for i, j in pairs:
                        counts[i][j] += 1
        expected = reference.block_mask(sizes, causal=causal, window=window).long().tolist()
        assert counts == expected, (layout, window, sizes)


def test_far_blocks_make_no_call():
    """A causal window narrower than a shard: each rank computes on its own block and its
    predecessor's only (plain ring), or on those of the ranks holding the chunks before its two
    (zig-zag)."""
    plain = contiguous_layout([8] * 5)
    for rank in range(5):
        seen = [o for o in range(5) if windowed_block_calls(plain[rank], plain[o], (3, 0), None)]
        assert seen == sorted({max(rank - 1, 0), rank})
    zigzag = zigzag_layout(40, 4)  # chunks of 5
    for rank in range(4):
        seen = {o for o in range(4) if windowed_block_calls(zigzag[rank], zigzag[o], (3, 0),
                                                              None)}
        assert seen == {max(rank - 1, 0), rank, min(rank + 1, 3)}


@pytest.mark.parametrize("causal, window", [(True, (4, 0)), (False, (2, 5)),
                                            (False, (None, 1))])
def test_emulated_ring_equals_the_reference(causal, window):
    """Every rank of a 5-rank ring (zig-zag when causal) on a batch, emulated in one process:
    the rows of each other rank's block that it would receive (``read_rows``), attended with
    its calls on them (``rebased``) by the ring's own ``_attend`` and merged by lse,
    equal the windowed reference: a ring larger than the gloo tests spawn."""
    torch.manual_seed(0)
    n, sizes = 31, [3, 11, 0, 12, 5]
    layout = zigzag_layout(n, 5) if causal else contiguous_layout([7, 0, 9, 6, 9])
    q, k, v = (torch.randn(n, 2, 3, dtype=torch.float64) for _ in range(3))
    out = torch.zeros(n, 2, 3, dtype=torch.float64)
    for rank, mine in enumerate(layout):
        ring = _Ring(None, rank, layout, layout, sizes, 3 ** -0.5, causal, window)
        rows = torch.tensor(global_rows(mine), dtype=torch.long)
        o = torch.zeros(len(rows), 2, 3, dtype=torch.float64)
        lse = torch.full((len(rows), 2), float("-inf"), dtype=torch.float64)
        for origin, theirs in enumerate(layout):
            keys = torch.tensor(global_rows(theirs), dtype=torch.long)
            calls, read = ring.block_calls(origin), ring.read_rows(rank, origin)
            if origin != rank and read is not None:  # what it receives of the block
                keys, calls = keys[read], rebased(calls, read)
            for call in calls:
                part, part_lse = _attend(call, q[rows], k[keys], v[keys], ring)
                o[call.rows], lse[call.rows] = merge_attention([o[call.rows], part],
                                                               [lse[call.rows], part_lse])
        out[rows] = o
    mask = reference.block_mask(sizes, causal=causal, window=window)
    expected = reference.attention(q, k, v, mask, scale=3 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
