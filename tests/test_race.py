"""What the route racer and the tile tuner share (kernels/race.py): the timed choice, the tuning
switch, the size buckets and the GPU timer's call, here with fake timers on CPU."""

import pytest

from gatattn.kernels.race import (
    AUTOTUNE_ENV,
    REP_MS,
    WARMUP_MS,
    autotune_enabled,
    do_bench_ms,
    fastest,
    length_bucket,
    power_of_two_bucket,
)


class TooBig(Exception):
    pass


def test_fastest_times_every_run_in_order_and_keeps_the_quickest():
    ran = []
    runs = {name: (lambda name=name: ran.append(name)) for name in ("a", "b", "c")}

    def timer(candidate, run):
        run()
        return {"a": 3.0, "b": 1.0, "c": 2.0}[candidate]

    assert fastest(runs, timer) == ("b", {"a": 3.0, "b": 1.0, "c": 2.0})
    assert ran == ["a", "b", "c"]


def test_fastest_drops_runs_that_raise_what_it_skips_only():
    def run_b():
        raise TooBig

    def timer(candidate, run):
        run()
        return 1.0

    runs = {"a": lambda: None, "b": run_b}
    assert fastest(runs, timer, skip=(TooBig,)) == ("a", {"a": 1.0})
    assert fastest({"b": run_b}, timer, skip=(TooBig,)) == (None, {})
    with pytest.raises(TooBig):
        fastest(runs, timer)


@pytest.mark.parametrize("value,enabled", [(None, True), ("", True), ("1", True), ("0", False)])
def test_autotune_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    else:
        monkeypatch.setenv(AUTOTUNE_ENV, value)
    assert autotune_enabled() is enabled


@pytest.mark.parametrize("value", ["off", "false", "2"])
def test_autotune_switch_refuses_other_values(monkeypatch, value):
    monkeypatch.setenv(AUTOTUNE_ENV, value)
    with pytest.raises(ValueError, match="GATATTN_AUTOTUNE must be 1 .* or 0"):
        autotune_enabled()


def test_do_bench_ms_warms_up_and_times_the_run(monkeypatch):
    calls = []

    def fake_do_bench(fn, warmup, rep):
        calls.append((fn, warmup, rep))
        return 0.25

    testing = pytest.importorskip("triton.testing")
    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    run = object()
    assert do_bench_ms("candidate", run) == 0.25
    assert calls == [(run, WARMUP_MS, REP_MS)] and WARMUP_MS > 0


@pytest.mark.parametrize("n,low,high,bucket", [
    (0, 1, None, 1), (1, 1, None, 1), (2, 1, None, 2), (3, 1, None, 4), (1025, 1, None, 2048),
    (3, 16, None, 16), (5000, 1, 4096, 4096)])
def test_power_of_two_bucket(n, low, high, bucket):
    assert power_of_two_bucket(n, low, high) == bucket


@pytest.mark.parametrize("total,segments,bucket", [
    (0, 0, 16), (1, 1, 16), (100, 10, 16), (170, 10, 32), (4096, 1, 4096), (4097, 1, 8192),
    (10**9, 1, 16384), (2048, 3, 1024)])
def test_length_bucket(total, segments, bucket):
    assert length_bucket(total, segments) == bucket
