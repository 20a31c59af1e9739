"""benchmarks/bench_gpu.py runs end to end in its --smoke mode (CPU, Triton's interpreter) and
saves every case with every peer's result or skip reason.

The GPU benchmark runs only where a GPU is lent, for a few minutes: this catches a broken peer or
a broken save before it costs that time. Three runs: one stopped by its budget before the first
case, then --resume, which measures them all; then, with one case taken out of the save as a
cut-off run would leave it, --resume again, which measures only that case.

FlexAttention has no CPU backward, so the smoke run skips its peers; the biased graphs' Flex
``score_mod`` (which indexes gatattn's stacked bias) is checked here in a forward on the CPU, as
are the sliding-window cases' Flex ``mask_mod`` and SDPA's dense band mask.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import gatattn
from gatattn import reference
from tests.conftest import run_process_tree

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"
OURS, LAUNCHERS = "gatattn.attention (triton)", "kernel launchers"
OURS_LAYER = "projections + gatattn.attention (triton)"
AUTO = "gatattn.attention (auto)"
SDPA_ROUTE = "gatattn SDPA route (one SDPA call per graph size, no padding)"
# Ours without the window computes more pairs than the windowed case's reference: it must differ.
UNWINDOWED = "gatattn.attention (triton), no window (more pairs)"
OURS_ALL = (OURS, LAUNCHERS, OURS_LAYER, AUTO, SDPA_ROUTE, UNWINDOWED)
# Every peer of every group; the smoke run's case count per group.
PEERS = {
    "segments": {"SDPA flash", "SDPA efficient", "SDPA cuDNN", "varlen_attn", "Flex", OURS,
                 LAUNCHERS, SDPA_ROUTE, AUTO},
    "graphs": {"padded SDPA", "varlen_attn", "Flex doc mask", "Flex doc mask, rebuilt per call",
               OURS, LAUNCHERS, SDPA_ROUTE, AUTO},
    "layer": {"padded nn.MultiheadAttention", OURS_LAYER},
    "biased graphs": {"padded SDPA, float mask", "Flex score_mod + doc mask", OURS, AUTO},
    "sliding windows": {"SDPA, band as a dense bool mask", "varlen_attn",
                        "Flex sliding-window mask", OURS, UNWINDOWED},
}
CASES = {"segments": 2, "graphs": 1, "layer": 1, "biased graphs": 1, "sliding windows": 2}
MODES = {"fwd", "bwd", "fwd+bwd"}


def run_smoke(out: Path, *args: str) -> dict:
    """The saved JSON after a smoke run into ``out``."""
    # Its measurements run in forked children: a timeout must not leave them running.
    done = run_process_tree([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args],
                            cwd=REPO, timeout=1800)  # a hang guard
    assert done.returncode == 0, done.stderr[-3000:]
    [saved] = out.glob("gpu-*.smoke.json")
    assert saved.with_suffix(".md").exists()
    return json.loads(saved.read_text())


def check_complete(payload: dict) -> None:
    results = payload["results"]
    assert len({r["key"] for r in results}) == len(results), "a case saved twice"
    groups = [r["info"]["group"] for r in results]
    assert {group: groups.count(group) for group in CASES} == CASES
    for result in results:
        assert "reference_error" not in result, result["reference_error"]
        assert set(result["peers"]) == PEERS[result["info"]["group"]], result["label"]
        for name, entry in result["peers"].items():
            check_entry(result["label"], name, entry)


def check_entry(case: str, name: str, entry: dict) -> None:
    """A skip with its reason, or a time or an error for every mode, and the check's result."""
    if "skipped" in entry:
        assert entry["skipped"].strip() and name not in OURS_ALL, entry
        return
    assert set(entry["ms"]) | set(entry["errors"]) >= MODES, (case, name, entry)
    if name in OURS_ALL:  # ours: measured in every mode, and checked
        assert set(entry["ms"]) == MODES and not entry["errors"], (case, name, entry)
    if "check" not in entry["errors"]:  # float32 on the CPU: every peer agrees closely
        diff = max(entry["max_abs_diff_out"], entry["max_abs_diff_grad"])
        if name == UNWINDOWED:  # the window changes the output: the case's band is narrow
            assert diff > 0.1, (case, name, diff)
        else:
            assert diff < 1e-4, (case, name, diff)


@pytest.mark.heavy  # three runs of the whole benchmark, each in a fresh interpreter
def test_bench_gpu_smoke(tmp_path):
    first = run_smoke(tmp_path, "--budget-s", "0")
    assert first["results"] == [] and "time budget" in first["runs"][0]["stopped"]

    payload = run_smoke(tmp_path, "--resume")
    assert len(payload["runs"]) == 2 and not payload["runs"][1]["stopped"]
    assert all(r["run"] == 1 for r in payload["results"])
    check_complete(payload)
    for result in payload["results"]:  # CUDA only, or no CPU backward: skipped, and says why
        if "varlen_attn" in result["peers"]:
            assert "CUDA only" in result["peers"]["varlen_attn"].get("skipped", ""), result
        for name, entry in result["peers"].items():
            if name.startswith("Flex"):
                assert "backward on CPU" in entry.get("skipped", ""), (name, entry)
    assert payload["targets"]

    [saved] = tmp_path.glob("gpu-*.smoke.json")
    cut = payload["results"][:-1]  # the last case, as a cut-off run leaves it
    saved.write_text(json.dumps({**payload, "results": cut}))
    resumed = run_smoke(tmp_path, "--resume")
    check_complete(resumed)
    assert [r["run"] for r in resumed["results"]] == [1] * len(cut) + [2]
    assert not list((REPO / "benchmarks" / "results").glob("*smoke*"))


def load_smoke_module(monkeypatch):
    """bench_gpu.py imported as its --smoke run does (CPU, float32)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--smoke"])
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.heavy  # FlexAttention compiled on CPU: ~15 s
def test_flex_bias_score_mod_reads_the_stacked_bias(monkeypatch):
    """The Flex peer's score_mod and document mask, forward only, against gatattn's SDPA route
    with the same stacked bias; graphs cross Flex's 128-row blocks and end in a partial one."""
    bench = load_smoke_module(monkeypatch)
    setup = bench.make_setup(bench.Shape("biased graphs", 2, 16, (5, 40, 17, 150)))
    q, k, v, bias = (t.detach() for t in setup.leaves)
    score_mod = bench.stacked_bias_score_mod(bias, setup.ptr, setup.batch)
    mask = bench.block_mask_of(setup.document, q.size(0))
    out = bench.flex(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), score_mod=score_mod,
                     block_mask=mask, scale=setup.scale)[0].transpose(0, 1)
    expected = gatattn.attention(q, k, v, ptr=setup.ptr, attn_bias=bias, backend="sdpa")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal, window", [(True, (130, 0)), (False, (3, 140))])
@pytest.mark.heavy  # FlexAttention compiled on CPU: ~12 s
def test_flex_window_mask_and_dense_band_are_the_window(monkeypatch, causal, window):
    """The windowed cases' Flex mask_mod (forward) and SDPA's dense band mask against gatattn's
    SDPA route with the window; segments of 300 rows, bands wider than Flex's 128-row blocks."""
    bench = load_smoke_module(monkeypatch)
    shape = bench.Shape("sliding windows", 2, 16, (300, 300), causal, window=window)
    setup = bench.make_setup(shape)
    q, k, v = (t.detach() for t in setup.leaves)
    expected = gatattn.attention(q, k, v, ptr=setup.ptr, causal=causal, window=window,
                                 backend="sdpa")
    batched = [bench.as_batches(setup, t) for t in (q, k, v)]
    mask = bench.block_mask_of(bench.segment_mask(shape), 300)
    flex_out = bench.flex(*batched, block_mask=mask, scale=setup.scale)
    torch.testing.assert_close(bench.from_batches(flex_out), expected, atol=1e-5, rtol=1e-5)
    band = bench.band_mask(setup)
    assert torch.equal(band, reference.block_mask([300], causal=causal, window=window))
    sdpa_out = torch.nn.functional.scaled_dot_product_attention(*batched, attn_mask=band,
                                                                scale=setup.scale)
    torch.testing.assert_close(bench.from_batches(sdpa_out), expected, atol=1e-5, rtol=1e-5)
