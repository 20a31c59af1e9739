"""The launch-configuration list, its keep() filter and the keyed tuner (kernels/tuning.py)."""

import pytest

pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources  # noqa: E402

from gatattn.kernels.tuning import (  # noqa: E402
    CONFIGS,
    KERNELS,
    TileConfig,
    Tuner,
    candidates,
    keep,
    shared_memory_estimate,
)

SM90_SHARED = 232448
SM86_SHARED = 101376


class FakeTimer:
    """Times a launch by the config it runs: smaller BLOCK_N is faster, except where it raises."""

    def __init__(self, too_big=()):
        self.too_big = set(too_big)
        self.timed = []

    def __call__(self, config, fn):
        fn()
        assert self.timed[-1] == config  # what ran is what the time is reported for
        return float(config.block_n)

    def launch(self, config):
        if config in self.too_big:
            raise OutOfResources(300000, SM90_SHARED, "shared memory")
        self.timed.append(config)


def test_tuner_times_each_candidate_once_per_key_and_keeps_the_fastest():
    timer = FakeTimer()
    tuner = Tuner(bench=timer)
    configs = [TileConfig(128, 64, 8, 2), TileConfig(64, 32, 4, 2), TileConfig(128, 128, 8, 3)]
    assert tuner.choose(("forward", 1), configs, timer.launch) == TileConfig(64, 32, 4, 2)
    assert timer.timed == configs
    assert tuner.choose(("forward", 1), configs, timer.launch) == TileConfig(64, 32, 4, 2)
    assert len(timer.timed) == 3  # remembered: no second round of timing
    tuner.choose(("forward", 2), configs, timer.launch)
    assert len(timer.timed) == 6  # a new key is timed afresh


def test_tuner_drops_a_candidate_that_does_not_fit():
    fastest = TileConfig(64, 32, 4, 2)
    timer = FakeTimer(too_big=[fastest])
    best = Tuner(bench=timer).choose("key", [TileConfig(128, 64, 8, 2), fastest], timer.launch)
    assert best == TileConfig(128, 64, 8, 2)
    timer = FakeTimer(too_big=[fastest, TileConfig(128, 64, 8, 2)])
    with pytest.raises(RuntimeError, match="none of 2 launch configurations fits"):
        Tuner(bench=timer).choose("key", [TileConfig(128, 64, 8, 2), fastest], timer.launch)


def test_tuner_without_candidates_or_with_tuning_off(monkeypatch):
    timer = FakeTimer()
    with pytest.raises(RuntimeError, match="no launch configuration fits"):
        Tuner(bench=timer).choose("key", [], timer.launch)
    monkeypatch.setenv("GATATTN_AUTOTUNE", "0")
    configs = [TileConfig(128, 64, 8, 2), TileConfig(64, 32, 4, 2)]
    assert Tuner(bench=timer).choose("key", configs, timer.launch) == configs[0]
    assert timer.timed == []


@pytest.mark.parametrize("kernel", KERNELS)
def test_keep_drops_what_cannot_fit_in_shared_memory(kernel):
    # Head dim 256 in fp32 on an sm_86-sized limit: some tiles cannot fit, the smallest can.
    kept = candidates(kernel, 256, 256, 4, SM86_SHARED)
    assert kept, "the smallest tiles fit"
    assert len(kept) < len(CONFIGS)
    for config in CONFIGS:
        fits = shared_memory_estimate(kernel, config, 256, 256, 4) <= SM86_SHARED
        assert fits or not keep(kernel, config, 256, 256, 4, SM86_SHARED)
    assert all(shared_memory_estimate(kernel, c, 256, 256, 4) <= SM86_SHARED for c in kept)


def test_keep_leaves_candidates_for_every_kernel_head_dim_and_dtype():
    for kernel in KERNELS:
        for block_d in (16, 32, 64, 128, 256):
            for itemsize in (2, 4):
                assert candidates(kernel, block_d, block_d, itemsize, SM90_SHARED), (
                    kernel, block_d, itemsize)


def test_keep_prefers_large_tiles_first():
    kept = candidates("forward", 64, 64, 2, SM90_SHARED)
    assert kept[0].block_m * kept[0].block_n == max(c.block_m * c.block_n for c in kept)


def test_shared_memory_estimate_rejects_unknown_kernels():
    with pytest.raises(ValueError, match="kernel must be one of"):
        shared_memory_estimate("backward", CONFIGS[0], 64, 64, 2)
