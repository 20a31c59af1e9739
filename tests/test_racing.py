"""``auto`` on a GPU verifies the fused kernels, races them against torch and remembers the choice
(gatattn/backends/racing.py), run here with the kernels in Triton's interpreter and a fake
timer: a deliberately wrong kernel must be rejected, a faster torch route must win."""

import functools
import json
import warnings

import pytest
import torch

pytest.importorskip("triton")

from conftest import check_against_reference, masked_reference  # noqa: E402
from test_functional import same_graph_mask  # noqa: E402

import gatattn  # noqa: E402
import gatattn.kernels.csr_attention as csr_kernels  # noqa: E402
import gatattn.kernels.flash_attention as flash_kernels  # noqa: E402
from gatattn import reference  # noqa: E402
from gatattn.backends import racing, routing, varlen  # noqa: E402
from gatattn.backends.racing import Router, RouteRejectedWarning  # noqa: E402
from gatattn.graph import describe_graph  # noqa: E402


class FakeTimer:
    """Runs what it is asked to time once and reports the time it was told for that route."""

    def __init__(self, **milliseconds):
        self.milliseconds = milliseconds
        self.timed = []

    def __call__(self, name, fn):
        fn()
        self.timed.append(name)
        return self.milliseconds[name]


def batched(dtype=torch.float32, grad=True, causal=False, seed=0):
    sizes = torch.tensor([5, 17, 9, 1])
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(32, 2, 16, generator=gen).to(dtype).requires_grad_(grad)
               for _ in range(3))
    return q, k, v, describe_graph(32, 32, ptr=ptr, causal=causal)[0]


def edge_set(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    edge_index = torch.randint(0, 12, (2, 40), generator=gen)
    q, k, v = (torch.randn(12, 2, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    return q, k, v, describe_graph(12, 12, edge_index=edge_index)[0]


def wrong_by(factor, launcher):
    """A kernel launcher whose first output comes back scaled by ``factor``."""
    def wrong(*args, **kwargs):
        first, *rest = launcher(*args, **kwargs)
        return (first * factor, *rest)
    return wrong


def test_a_verified_kernel_serves_when_it_is_fastest():
    q, k, v, graph = batched()
    timer = FakeTimer(triton=1.0, sdpa=2.0)
    router = Router(bench=timer)
    assert router.route(q, k, v, graph, 0.25) == "triton"
    (choice,) = router.choices
    assert choice.timings_ms == {"triton": 1.0, "sdpa": 2.0} and not choice.rejected
    assert choice.key.grad and choice.key.graph == "segments"
    assert "triton" in str(choice) and "1 ms" in str(choice)


def test_a_faster_torch_route_wins():
    q, k, v, graph = batched()
    assert Router(bench=FakeTimer(triton=3.0, sdpa=2.0)).route(q, k, v, graph, 0.25) == "sdpa"


def test_a_kernel_with_a_wrong_output_is_rejected_once_and_never_served(monkeypatch):
    monkeypatch.setattr(flash_kernels, "flash_attention_forward",
                        wrong_by(1.02, flash_kernels.flash_attention_forward))
    q, k, v, graph = batched()
    timer = FakeTimer(triton=1.0, sdpa=2.0)
    router = Router(bench=timer)
    with pytest.warns(RouteRejectedWarning, match="python -m gatattn.check"):
        assert router.route(q, k, v, graph, 0.25) == "sdpa"
    (choice,) = router.choices
    assert "out max error" in choice.rejected["triton"]
    assert timer.timed == ["sdpa"]  # a rejected kernel is not even timed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second verification, no second warning
        assert router.route(q, k, v, graph, 0.25) == "sdpa"
        q2, k2, v2, graph2 = batched(causal=True)  # a new key: verified afresh, rejected again,
        assert router.route(q2, k2, v2, graph2, 0.25) == "sdpa"  # warned about once only
    assert len(router.choices) == 2 and timer.timed == ["sdpa", "sdpa"]


def test_a_kernel_with_wrong_gradients_serves_only_where_no_gradient_is_needed(monkeypatch):
    monkeypatch.setattr(flash_kernels, "flash_attention_backward",
                        wrong_by(1.02, flash_kernels.flash_attention_backward))
    router = Router(bench=FakeTimer(triton=1.0, sdpa=2.0))
    q, k, v, graph = batched(grad=True)
    with pytest.warns(RouteRejectedWarning):
        assert router.route(q, k, v, graph, 0.25) == "sdpa"
    assert router.choices[0].rejected["triton"].startswith("dq max error")
    q, k, v, graph = batched(grad=False)
    assert router.route(q, k, v, graph, 0.25) == "triton"


def test_a_kernel_that_raises_is_rejected(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(flash_kernels, "flash_attention_forward", broken)
    q, k, v, graph = batched()
    router = Router(bench=FakeTimer(triton=1.0, sdpa=2.0))
    with pytest.warns(RouteRejectedWarning, match="PTX compile failed"):
        assert router.route(q, k, v, graph, 0.25) == "sdpa"


def test_edge_sets_race_the_csr_kernel_against_message_passing(monkeypatch):
    q, k, v, graph = edge_set()
    assert Router(bench=FakeTimer(triton=1.0, sparse=2.0)).route(q, k, v, graph, 0.25) == (
        "triton")
    monkeypatch.setattr(csr_kernels, "csr_attention_forward",
                        wrong_by(0.99, csr_kernels.csr_attention_forward))
    with pytest.warns(RouteRejectedWarning):
        assert Router(bench=FakeTimer(triton=1.0, sparse=2.0)).route(q, k, v, graph, 0.25) == (
            "sparse")


def test_half_precision_is_judged_against_torch_in_float32_and_in_half():
    # A correct float16 kernel passes the rule, whose bound includes torch's own float16 error.
    q, k, v, graph = batched(dtype=torch.float16)
    router = Router(bench=FakeTimer(triton=1.0, sdpa=2.0))
    assert router.route(q, k, v, graph, 0.25) == "triton"
    assert router.choices[0].key.dtype == "float16"


def test_a_small_error_in_half_precision_is_still_caught(monkeypatch):
    monkeypatch.setattr(flash_kernels, "flash_attention_forward",
                        wrong_by(1.01, flash_kernels.flash_attention_forward))
    q, k, v, graph = batched(dtype=torch.float16)
    with pytest.warns(RouteRejectedWarning):
        assert Router(bench=FakeTimer(triton=1.0, sdpa=2.0)).route(q, k, v, graph, 0.25) == (
            "sdpa")


def test_choices_persist_on_disk_for_a_new_process(tmp_path, monkeypatch):
    path = tmp_path / "routes.json"
    monkeypatch.setenv(racing.ROUTE_CACHE_ENV, str(path))
    q, k, v, graph = batched()
    Router(bench=FakeTimer(triton=3.0, sdpa=2.0)).route(q, k, v, graph, 0.25)
    saved = json.loads(path.read_text())["choices"]
    assert [entry["route"] for entry in saved.values()] == ["sdpa"]

    def no_timing(name, fn):
        raise AssertionError("a choice on disk is not timed again")

    monkeypatch.setattr(racing, "_verify", lambda *a: pytest.fail("nor verified again"))
    fresh = Router(bench=no_timing)
    assert fresh.route(q, k, v, graph, 0.25) == "sdpa"
    assert fresh.choices[0].source == "disk"


def test_an_unreadable_route_cache_is_ignored_with_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "routes.json"
    path.write_text("{not json")
    monkeypatch.setenv(racing.ROUTE_CACHE_ENV, str(path))
    q, k, v, graph = batched()
    with pytest.warns(RuntimeWarning, match="unreadable route cache"):
        assert Router(bench=FakeTimer(triton=1.0, sdpa=2.0)).route(q, k, v, graph, 0.25) == (
            "triton")
    assert json.loads(path.read_text())["format"] == 1  # rewritten whole


def test_tuning_off_verifies_but_does_not_time(monkeypatch):
    monkeypatch.setenv("GATATTN_AUTOTUNE", "0")
    q, k, v, graph = batched()
    timer = FakeTimer()
    router = Router(bench=timer)
    assert router.route(q, k, v, graph, 0.25) == "triton" and timer.timed == []
    monkeypatch.setattr(flash_kernels, "flash_attention_forward",
                        wrong_by(1.02, flash_kernels.flash_attention_forward))
    q, k, v, graph = batched(causal=True)
    with pytest.warns(RouteRejectedWarning):
        assert router.route(q, k, v, graph, 0.25) == "sdpa"


def test_empty_or_nonfinite_calls_do_not_decide_a_key():
    router = Router(bench=FakeTimer(triton=1.0, sdpa=2.0))
    q, k, v, graph = batched()
    with torch.no_grad():
        q[3, 0, 0] = float("nan")
    assert router.route(q, k, v, graph, 0.25) == "sdpa" and not router.choices
    empty = torch.zeros(0, 2, 16)
    graph = describe_graph(0, 0, ptr=torch.zeros(1, dtype=torch.long))[0]
    assert router.route(empty, empty, empty, graph, 0.25) == "sdpa" and not router.choices


def _stand_in_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale,
                          window_size):
    """torch's varlen_attn as documented (packed segments, window (-1, 0) = causal), on CPU."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    assert max_q == max_k == max(lengths)
    out = torch.zeros_like(query)
    for start, length in zip(cu_seq_q[:-1].tolist(), lengths, strict=True):
        rows = slice(start, start + length)
        out[rows] = torch.nn.functional.scaled_dot_product_attention(
            query[rows].transpose(0, 1), key[rows].transpose(0, 1), value[rows].transpose(0, 1),
            is_causal=window_size == (-1, 0), scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_the_varlen_route_matches_the_reference(monkeypatch, causal):
    """The glue around varlen_attn (graph order, cu_seqlens, longest graph, causal window, scale)
    with a CPU stand-in for the CUDA-only kernel."""
    monkeypatch.setattr(varlen, "_kernel", lambda: _stand_in_varlen_attn)
    batch = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1, 1, 0])  # unsorted: permuted into order
    q, k, v = (torch.randn(11, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    graph = describe_graph(11, 11, batch=batch, causal=causal)[0]
    out = varlen.varlen_attention(q, k, v, graph, scale=0.3)
    mask = same_graph_mask(batch, batch, causal)
    expected = reference.attention(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_varlen_is_raced_where_it_applies(monkeypatch):
    monkeypatch.setattr(varlen, "_kernel", lambda: _stand_in_varlen_attn)
    monkeypatch.setattr(racing, "varlen_unavailable_reason", lambda *a: None)
    q, k, v, graph = batched()
    router = Router(bench=FakeTimer(triton=2.0, sdpa=3.0, varlen=1.0))
    assert router.route(q, k, v, graph, 0.25) == "varlen"
    assert set(router.choices[0].timings_ms) == {"triton", "sdpa", "varlen"}


def test_varlen_states_why_it_does_not_apply():
    q, k, v, graph = batched(dtype=torch.float16)
    bipartite, _ = describe_graph(4, 6, ptr=(torch.tensor([0, 4]), torch.tensor([0, 6])),
                                  bipartite=True)
    assert "self-attention" in varlen.varlen_unavailable_reason(q, v, bipartite)
    assert "float16" in varlen.varlen_unavailable_reason(q.float(), v.float(), graph)
    assert "multiples of 8" in varlen.varlen_unavailable_reason(q[..., :12], v[..., :12], graph)
    assert "CUDA" in varlen.varlen_unavailable_reason(q, v, graph)


@pytest.mark.heavy  # races every route, kernels in the interpreter: ~9 s
def test_auto_through_the_public_api_serves_only_verified_routes(monkeypatch):
    """``gatattn.attention(backend="auto")`` as on a GPU (the kernels in the interpreter): a
    verified kernel serves; a wrong one is reported and torch serves, with the right result."""
    monkeypatch.setattr(routing, "races_on", lambda device: True)
    ptr = torch.tensor([0, 5, 22, 31, 32])
    check = functools.partial(
        check_against_reference, lambda q, k, v: gatattn.attention(q, k, v, ptr=ptr, causal=True),
        batched(dtype=torch.float16)[:3],
        masked_reference(reference.block_mask([5, 17, 9, 1], causal=True)))

    monkeypatch.setattr(racing, "_ROUTER", Router(bench=FakeTimer(triton=1.0, sdpa=2.0)))
    check()  # an inference call, then a training call: two keys
    assert {(c.key.grad, c.route) for c in gatattn.route_choices()} == {(False, "triton"),
                                                                         (True, "triton")}

    monkeypatch.setattr(flash_kernels, "flash_attention_forward",
                        wrong_by(1.02, flash_kernels.flash_attention_forward))
    monkeypatch.setattr(racing, "_ROUTER", Router(bench=FakeTimer(triton=1.0, sdpa=2.0)))
    with pytest.warns(RouteRejectedWarning, match="python -m gatattn.check"):
        check()
    choices = gatattn.route_choices()
    assert len(choices) == 2
    assert all(c.route == "sdpa" and "out max error" in c.rejected["triton"] for c in choices)


def test_no_race_where_the_kernels_do_not_compete():
    q, k, v, _ = batched()
    before = len(gatattn.route_choices())
    gatattn.attention(q, k, v, ptr=torch.tensor([0, 5, 22, 31, 32]))  # CPU: SDPA, no race
    assert len(gatattn.route_choices()) == before


def test_after_a_keys_first_call_auto_reads_the_host_once_per_ptr_call(monkeypatch):
    """The race costs reads (and time) on a key's first call only; then auto is as lean as the
    route it chose (tests/test_host_syncs.py: one read per call with ptr)."""
    from test_host_syncs import count_host_reads

    monkeypatch.setattr(routing, "races_on", lambda device: True)
    monkeypatch.setattr(racing, "_ROUTER", Router(bench=FakeTimer(triton=1.0, sdpa=2.0)))
    q, k, v, _ = batched(dtype=torch.float16, grad=False)
    ptr = torch.tensor([0, 5, 22, 31, 32])
    first = gatattn.attention(q, k, v, ptr=ptr)
    for _ in range(2):
        with count_host_reads(monkeypatch) as reads:
            again = gatattn.attention(q, k, v, ptr=ptr)
        assert reads.count == 1
    assert torch.equal(first, again)
    assert [choice.route for choice in gatattn.route_choices()] == ["triton"]
