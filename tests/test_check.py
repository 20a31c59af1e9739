"""``python -m gatattn.check``: it passes every route here, and it catches a route that is
silently wrong (forward or gradients), or that raises."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gatattn.backends.sparse
from gatattn import check

IMPLICIT_CASES = [case.name for case in check.cases() if case.implicit]
ALL_CASES = [case.name for case in check.cases()]


@pytest.mark.heavy  # every route, case and dtype, the kernels in the interpreter
def test_every_route_passes_on_this_machine():
    rows = check.run("cpu")  # conftest sets TRITON_INTERPRET=1: the kernels run too
    failed = [row for row in rows if not row.passed]
    assert not failed, check.table(failed)
    covered = {(row.route, row.case) for row in rows}
    expected = ({("sdpa", c) for c in IMPLICIT_CASES} | {("sparse", c) for c in ALL_CASES}
                | {("triton", c) for c in ALL_CASES}
                | {("logits", c) for c in ("complete, 33 nodes",
                                           "batched, unsorted batch, graphs of 0, 1, 7, 20 nodes",
                                           "bipartite, 3x6 and 8x2 per graph")})
    assert covered == expected
    assert {row.dtype for row in rows if row.route == "sparse"} == {
        "float64", "float32", "float16", "bfloat16"}
    assert {row.quantity for row in rows} == set(check.QUANTITIES)


def _one_percent_off(sdpa):
    def corrupted(*args, **kwargs):
        return sdpa(*args, **kwargs) * 1.01
    return corrupted


def _gradients_one_percent_off(sdpa):
    def corrupted(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out + 0.01 * (out - out.detach())  # same values, gradients scaled by 1.01
    return corrupted


def calls_torch_sdpa(row) -> bool:
    """Whether the route ran F.scaled_dot_product_attention: the SDPA route writes its masked
    attention out when given an attn_bias (torch's SDPA has no bias gradient on CPU), so those
    cases never call a corrupted SDPA, and pass."""
    return not row.case.startswith("attn_bias")


def test_an_sdpa_one_percent_off_fails_and_only_sdpa_fails(monkeypatch, capsys):
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        _one_percent_off(F.scaled_dot_product_attention))
    rows = check.run("cpu", routes=("sdpa", "sparse"), dtypes=(torch.float32, torch.float16))
    calls_sdpa = [row for row in rows if row.route == "sdpa" and row.quantity == "out"
                  and calls_torch_sdpa(row)]
    assert calls_sdpa and not any(row.passed for row in calls_sdpa)
    assert all(row.passed for row in rows if row.case.startswith("attn_bias"))
    assert all(row.passed for row in rows if row.route == "sparse")
    assert check.main(["--device", "cpu", "--routes", "sdpa", "--dtypes", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_wrong_gradients_with_a_right_forward_fail(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        _gradients_one_percent_off(F.scaled_dot_product_attention))
    rows = check.run("cpu", routes=("sdpa",), dtypes=(torch.float32,))
    assert all(row.passed for row in rows if row.quantity == "out")
    assert not any(row.passed for row in rows
                   if row.quantity in ("dq", "dk", "dv") and calls_torch_sdpa(row))
    assert all(row.passed for row in rows if not calls_torch_sdpa(row))


@pytest.mark.parametrize("form", ["torch ops", "compiled"])
def test_a_wrong_message_passing_route_fails(monkeypatch, form):
    sparse = gatattn.backends.sparse
    if form == "torch ops":
        spmm = sparse._spmm
        monkeypatch.setattr(sparse, "cpu_kernels", lambda: None)
        monkeypatch.setattr(sparse, "_spmm", lambda *args: spmm(*args) * 1.01)
    else:
        kernels = sparse.cpu_kernels()
        if kernels is None:
            pytest.skip("the CPU kernels are not built here (tests/test_native_kernels.py)")

        class Wrong:
            backward = kernels.backward

            @staticmethod
            def forward(*args):
                out, alpha, lse = kernels.forward(*args)
                return out * 1.01, alpha, lse

        monkeypatch.setattr(sparse, "cpu_kernels", lambda: Wrong)
    rows = check.run("cpu", routes=("sparse",), dtypes=(torch.float64,))
    assert not any(row.passed for row in rows if row.quantity == "out")


def test_a_route_that_raises_fails_with_its_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(F, "scaled_dot_product_attention", broken)
    rows = check.run("cpu", routes=("sdpa",), dtypes=(torch.float32,))
    assert all(row.passed for row in rows if not calls_torch_sdpa(row))
    rows = [row for row in rows if calls_torch_sdpa(row)]
    assert rows and all(not row.passed and row.quantity == "run" for row in rows)
    assert "kernel exploded" in rows[0].note
    assert "kernel exploded" in check.table(rows)


def test_combinations_left_out_are_named_with_their_reason():
    left_out = check.skipped("cpu", routes=("sdpa", "triton"), dtypes=(torch.float64,))
    reasons = {(route, reason) for route, _, _, reason in left_out}
    assert ("sdpa", "sdpa runs implicit graphs only") in reasons
    assert any(route == "triton" and "float64" in reason for route, reason in reasons)


@pytest.mark.parametrize("args,code", [(["--routes", "sparse", "--dtypes", "float32"], 0),
                                       (["--routes", "flash"], 2)])
@pytest.mark.heavy  # fresh interpreters run the check tool: ~17 s
def test_command_line(args, code):
    result = subprocess.run([sys.executable, "-m", "gatattn.check", "--device", "cpu", *args],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == code, result.stderr[-2000:]
    if code == 0:
        assert "| sparse | complete, 33 nodes | float32 |" in result.stdout
        assert "checks pass" in result.stdout and "FAIL" not in result.stdout
