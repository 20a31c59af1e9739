"""The compiled steps of calls that nothing records, on CPU: the SDPA route's one-step call per
size group (gatattn/csrc/packed_sdpa.cpp) and the scan for non-finite inputs
(gatattn/csrc/nonfinite.cpp), which computes a keyword call's finite flag and a ``graph=``
call's guard. Each against the form written in torch ops that serves where they do not."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gatattn
from gatattn import functional, reference
from gatattn.backends import native, nonfinite, sdpa
from tests.conftest import make_qkv

HEADS, CHANNELS = 4, 8


def _layouts(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``values`` ``(N, H, C)`` as it lies, as a slice of wider rows (strided heads and rows)
    and with its two leading dimensions swapped (transposed rows): the last dimension stays
    contiguous, which the scan needs."""
    wide = torch.full((*values.shape[:2], values.size(2) + 3), float("nan"), dtype=values.dtype)
    wide[..., :values.size(2)] = values
    swapped = values.transpose(0, 1).contiguous().transpose(0, 1)
    return {"contiguous": values, "slice": wide[..., :values.size(2)], "transposed": swapped}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# Contiguous: 16, 32, 64 and 528 entries, runs shorter than, equal to (float64: 32, float32:
# 64) and past the scan's lanes; the other layouts: runs of 8.
@pytest.mark.parametrize("rows", [1, 2, 4, 33])
@pytest.mark.parametrize("layout", ["contiguous", "slice", "transposed"])
def test_the_scan_finds_every_nonfinite_entry(kernels, dtype, rows, layout):
    gen = torch.Generator().manual_seed(rows)
    clean = [torch.randn(rows, 2, 8, generator=gen, dtype=dtype) for _ in range(3)]
    assert bool(kernels.all_finite([_layouts(t)[layout] for t in clean]))
    out = torch.randn(rows, 2, 8, dtype=dtype)
    kernels.poison_if_nonfinite_(out, [_layouts(t)[layout] for t in clean])
    assert not out.isnan().any()
    for which in range(3):
        for index in ((0, 0, 0), (rows // 2, 1, 3), (rows - 1, 1, 7)):
            for value in (float("nan"), float("inf"), float("-inf")):
                inputs = [t.clone() for t in clean]
                inputs[which][index] = value
                inputs = [_layouts(t)[layout] for t in inputs]
                flag = kernels.all_finite(inputs)
                assert flag.dtype == torch.bool and flag.dim() == 0 and not bool(flag)
                out = torch.randn(rows, 2, 8, dtype=dtype)
                kernels.poison_if_nonfinite_(out, inputs)
                assert out.isnan().all(), (which, index, value)


def test_the_scan_refuses_what_it_cannot_serve(kernels):
    q = torch.randn(4, 2, 8)
    recorded = torch.randn(4, 2, 8, requires_grad=True) * 1
    with pytest.raises(RuntimeError, match="not for an output autograd records"):
        kernels.poison_if_nonfinite_(recorded, [q, q, q])
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        kernels.all_finite([q, q.transpose(1, 2), q])
    with pytest.raises(RuntimeError, match="one dtype"):
        kernels.all_finite([q, q.double(), q])


GRAPHS = {  # name: (num_dst, num_src, keywords of build_graph, whether the one step serves)
    "one complete graph": (24, 24, {"num_nodes": 24}, True),
    "equal graphs in order": (30, 30, {"ptr": torch.tensor([0, 10, 20, 30])}, True),
    "batched unsorted": (19, 19, {"batch": torch.tensor([1, 0, 2, 1, 0] * 3 + [2, 2, 0, 1])},
                         True),
    "batched causal": (21, 21, {"ptr": torch.tensor([0, 9, 21]), "causal": True}, True),
    # A band other than SDPA's is_causal is a mask: the Python form calls SDPA with it.
    "bipartite bottom-right": (7, 16, {"ptr": (torch.tensor([0, 3, 7]), torch.tensor([0, 9, 16])),
                                       "causal": "bottom_right"}, False),
}


def _dense_mask(graph) -> torch.Tensor:
    """The graph's ``(num_dst, num_src)`` pairs, from its materialised edges."""
    src, dst = graph.to_edge_index()
    mask = torch.zeros(graph.num_dst, graph.num_src, dtype=torch.bool)
    mask[dst, src] = True
    return mask


class _Counting:
    """The kernels module, counting the calls of its one-step SDPA."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __getattr__(self, name):
        return getattr(self.module, name)

    def packed_sdpa(self, *args):
        self.calls += 1
        return self.module.packed_sdpa(*args)


@pytest.mark.parametrize("kind", list(GRAPHS))
@pytest.mark.parametrize("kv_heads", [HEADS, 2])
def test_inference_calls_equal_recorded_calls(kernels, monkeypatch, kind, kv_heads):
    """A call without gradients takes the one-step call and gives bitwise what a call that
    autograd records gives (the same SDPA kernel on the same views), and the reference."""
    num_dst, num_src, keywords, one_step = GRAPHS[kind]
    graph = gatattn.build_graph(**keywords)
    q, k, v = make_qkv(num_dst, num_src, HEADS, CHANNELS, dtype=torch.float64)
    k, v = (t.detach()[:, :kv_heads].clone().requires_grad_() for t in (k, v))
    recorded = gatattn.attention(q, k, v, graph=graph, backend="sdpa")
    counting = _Counting(kernels)
    monkeypatch.setattr(sdpa, "cpu_kernels", lambda: counting)
    with torch.no_grad():
        inferred = gatattn.attention(q, k, v, graph=graph, backend="sdpa")
    assert (counting.calls > 0) == one_step
    assert torch.equal(inferred, recorded.detach())
    expanded = [t.detach().repeat_interleave(HEADS // kv_heads, dim=1) for t in (k, v)]
    expected = reference.attention(q.detach(), *expanded, _dense_mask(graph))
    torch.testing.assert_close(inferred, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_kernels", [True, False])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_inference_graph_calls_never_hide_a_nonfinite_input(monkeypatch, with_kernels, tensor):
    """The guard of a ``graph=`` call without gradients, in the compiled scan (writing the
    output in place) and in torch ops: SDPA alone returns a finite row here (target 6 is the
    first of its causal graph, its only key the NaN one); the whole output turns NaN. The
    keyword call's flag, scanned either way, sends the exact repair."""
    if with_kernels and native.cpu_kernels() is None:
        pytest.skip("no compiled kernels here (tests/test_native_kernels.py says why)")
    if not with_kernels:
        for module in (sdpa, nonfinite):
            monkeypatch.setattr(module, "cpu_kernels", lambda: None)
    keywords = {"ptr": torch.tensor([0, 6, 14]), "causal": True}
    graph = gatattn.build_graph(**keywords)
    q, k, v = (t.detach() for t in make_qkv(14, 14, HEADS, CHANNELS))
    {"q": q, "k": k, "v": v}[tensor][6, 1, 3] = float("nan")
    with torch.no_grad():
        assert gatattn.attention(q, k, v, graph=graph, backend="sdpa").isnan().all()
        with gatattn.validation(True):
            exact = gatattn.attention(q, k, v, **keywords, backend="sdpa")
    expected = reference.attention(q, k, v, _dense_mask(graph))
    assert torch.equal(exact.isnan(), expected.isnan())
    assert not exact.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_complete_graph_in_one_step_equals_its_torch_ops(kernels, monkeypatch, dtype):
    """The logits route on one complete graph (``auto`` on CPU) runs as one compiled step of
    the same torch ops: outputs and gradients bitwise equal to the ops called from Python,
    first and second derivatives recorded by autograd, and against the reference. Traces and
    torch.func transforms get the Python form."""
    graph = gatattn.build_graph(num_nodes=20)
    q, k, v = make_qkv(20, 20, HEADS, CHANNELS, dtype=dtype)
    steps = []
    monkeypatch.setattr(sdpa, "cpu_kernels", lambda: _Recording(kernels, steps))
    out = gatattn.attention(q, k, v, graph=graph)
    assert steps == ["complete_graph_logits"]
    grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in grads), (q, k, v))
    monkeypatch.setattr(sdpa, "cpu_kernels", lambda: None)
    python_out = gatattn.attention(q, k, v, graph=graph)
    python_grads = torch.autograd.grad(python_out.square().sum(), (q, k, v), create_graph=True)
    python_second = torch.autograd.grad(sum(g.sum() for g in python_grads), (q, k, v))
    assert torch.equal(out, python_out)
    for ours, theirs in zip((*grads, *second), (*python_grads, *python_second), strict=True):
        assert torch.equal(ours, theirs)
    expected = reference.attention(q, k, v, torch.ones(20, 20, dtype=torch.bool))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    steps.clear()
    monkeypatch.setattr(sdpa, "cpu_kernels", lambda: _Recording(kernels, steps))
    torch.func.vmap(lambda q: gatattn.attention(q, k.detach(), v.detach(), graph=graph))(
        q.detach().unsqueeze(0))
    traced = torch.jit.trace(lambda q, k, v: gatattn.attention(q, k, v),
                             (q.detach(), k.detach(), v.detach()), check_trace=False)
    assert steps == [], "a trace or torch.func transform must see the ops from Python"
    torch.testing.assert_close(traced(q.detach(), k.detach(), v.detach()), expected,
                               rtol=tolerance, atol=tolerance)


class _Recording:
    """The kernels module, recording the names of the steps called."""

    def __init__(self, module, steps: list):
        self.module, self.steps = module, steps

    def __getattr__(self, name):
        attribute = getattr(self.module, name)
        if not callable(attribute):
            return attribute

        def call(*args):
            self.steps.append(name)
            return attribute(*args)

        return call


# ------------------------------------------------------------------ planned graph= calls

PLANNED = {  # name: (keywords of build_graph, rows, the planned step)
    "one complete graph": ({"ptr": torch.tensor([0, 24])}, 24, "one graph"),
    "equal graphs in order": ({"ptr": torch.tensor([0, 10, 20, 30])}, 30, "packed sdpa"),
}


def _planned_calls(monkeypatch) -> list:
    """Records the planned steps that serve calls (the full call plans them)."""
    served, step = [], sdpa.planned_step

    def recording(name, *args):
        out = step(name, *args)
        served.append(name if out is not None else None)
        return out

    monkeypatch.setattr(functional, "planned_sdpa_step", recording)
    return served


@pytest.mark.parametrize("kind", list(PLANNED))
@pytest.mark.parametrize("validate", [True, False])
def test_a_graph_plans_its_calls_and_the_planned_step_equals_the_full_call(
        kernels, monkeypatch, kind, validate):
    """The first ``graph=`` call checks everything and plans; the next with the same shapes,
    dtypes and settings runs the planned step alone: bitwise the full call's output (the
    full call here: the same graph's twin, which plans nothing yet), non-finite inputs
    included, with validation on and off."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # (2 threads: another route)
    keywords, rows, step = PLANNED[kind]
    graph, twin = gatattn.build_graph(**keywords), gatattn.build_graph(**keywords)
    q, k, v = (t.detach() for t in make_qkv(rows, rows, HEADS, CHANNELS))
    q0 = q
    served = _planned_calls(monkeypatch)
    with torch.no_grad(), gatattn.validation(validate):
        first = gatattn.attention(q, k, v, graph=graph)
        assert served == [] and len(graph.planned_steps) == 1
        for nonfinite in (False, True):
            if nonfinite:
                q = q.clone()
                q[3, 1, 2] = float("nan")
            planned = gatattn.attention(q, k, v, graph=graph)
            full = gatattn.attention(q, k, v, graph=twin)
            twin.planned_steps.clear()
            assert torch.equal(planned.isnan(), full.isnan())
            assert torch.equal(planned.nan_to_num(), full.nan_to_num())
            if validate or step == "one graph":  # (SDPA alone may hide a NaN query)
                assert bool(planned.isnan().any()) == nonfinite
    assert served == [step, step]
    expected = reference.attention(q0, k, v, _dense_mask(graph))
    torch.testing.assert_close(first, expected)


def test_planned_calls_with_gradients_are_the_full_calls(kernels, monkeypatch):
    """One complete graph's planned step is recorded by autograd (first and second
    derivatives bitwise the full call's); SDPA's planned step serves inference only."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    served = _planned_calls(monkeypatch)
    graph, twin = gatattn.build_graph(num_nodes=20), gatattn.build_graph(num_nodes=20)
    q, k, v = make_qkv(20, 20, HEADS, CHANNELS)
    gatattn.attention(q, k, v, graph=graph)
    outs = []
    for g in (graph, twin):
        out = gatattn.attention(q, k, v, graph=g)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        outs.append((out, *grads, *torch.autograd.grad(sum(x.sum() for x in grads), (q, k, v))))
    assert served == ["one graph"]
    for ours, theirs in zip(*outs, strict=True):
        assert torch.equal(ours, theirs)
    served.clear()
    batched = gatattn.build_graph(ptr=torch.tensor([0, 10, 20]))
    gatattn.attention(q, k, v, graph=batched)
    assert not batched.planned_steps, "a training call plans no step that serves inference only"
    with torch.no_grad():
        gatattn.attention(q, k, v, graph=batched)  # (plans it)
    gatattn.attention(q, k, v, graph=batched).sum().backward()
    assert served == [None], "SDPA's planned step must leave recorded calls to the full call"


def test_a_plan_serves_only_calls_like_the_one_that_made_it(kernels, monkeypatch):
    """Other dtypes, head shapes, scales, thread counts and route limits plan anew; traces,
    torch.func, user dispatch modes, tensor subclasses and rows that do not match the graph
    never take a plan (the last are refused by the full call's checks)."""
    served = _planned_calls(monkeypatch)
    graph = gatattn.build_graph(num_nodes=12)
    q, k, v = (t.detach() for t in make_qkv(12, 12, HEADS, CHANNELS))
    gatattn.attention(q, k, v, graph=graph)
    for call in (lambda: gatattn.attention(q.double(), k.double(), v.double(), graph=graph),
                 lambda: gatattn.attention(q, k[:, :2], v[:, :2], graph=graph),
                 lambda: gatattn.attention(q, k, v, graph=graph, scale=0.5),
                 lambda: gatattn.attention(q, k, v, graph=graph, temperature=2.0)):
        call()
    assert served == [] and len(graph.planned_steps) == 5
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: 7)
        gatattn.attention(q, k, v, graph=graph)
    with monkeypatch.context() as patch:
        patch.setattr(gatattn.graph, "MAX_KEPT_EDGES", 5)
        gatattn.attention(q, k, v, graph=graph)
    assert served == [] and len(graph.planned_steps) == 7
    torch.func.vmap(lambda q: gatattn.attention(q, k, v, graph=graph))(q.unsqueeze(0))
    with FlopCounterMode(display=False):
        gatattn.attention(q, k, v, graph=graph)
    gatattn.attention(torch.nn.Parameter(q), k, v, graph=graph)
    assert served == []
    with pytest.raises(ValueError, match="12 targets and 12 sources, but q has 11 rows"):
        gatattn.attention(q[:11], k, v, graph=graph)
    gatattn.attention(q, k, v, graph=graph)
    assert served == ["one graph"]


def test_keyword_calls_take_the_plan_of_their_reused_graph(kernels, monkeypatch):
    """``ptr=`` calls get the graph the first call built (one host read) and then its plan;
    inputs that the call finds not finite take the exact repair, not the plan: NaN only
    where an edge reads it, as the reference."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    served = _planned_calls(monkeypatch)
    ptr = torch.tensor([0, 10, 20, 30])
    graph = gatattn.build_graph(ptr=ptr)
    q, k, v = (t.detach() for t in make_qkv(30, 30, HEADS, CHANNELS))
    with torch.no_grad():
        first = gatattn.attention(q, k, v, ptr=ptr)
        again = gatattn.attention(q, k, v, ptr=ptr)
        assert served == ["packed sdpa"] and torch.equal(first, again)
        q[12, 1, 0] = float("nan")
        exact = gatattn.attention(q, k, v, ptr=ptr)
    assert served == ["packed sdpa"]
    expected = reference.attention(q, k, v, _dense_mask(graph))
    assert torch.equal(exact.isnan(), expected.isnan()) and not exact.isnan().all()


@pytest.mark.parametrize("kind", list(PLANNED))
@pytest.mark.parametrize("validate", [True, False])
def test_a_keyword_call_serves_the_plan_only_for_the_values_it_was_made_for(
        kernels, monkeypatch, kind, validate):
    """A ``ptr=`` call takes the plan of the graph an earlier call built from this very tensor
    (bitwise the full call) while ``ptr`` holds the same values; written in place, it is read
    and checked again (no stale graph, no stale plan); a new tensor with equal values is
    another description (it builds its own graph)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    keywords, rows, step = PLANNED[kind]
    ptr = keywords["ptr"].clone()
    q, k, v = (t.detach() for t in make_qkv(rows, rows, HEADS, CHANNELS))
    served = _planned_calls(monkeypatch)
    with torch.no_grad(), gatattn.validation(validate):
        first = gatattn.attention(q, k, v, ptr=ptr)
        again = gatattn.attention(q, k, v, ptr=ptr)
        assert served == [step] and torch.equal(first, again)
        full = gatattn.attention(q, k, v, graph=gatattn.build_graph(ptr=ptr.clone()))
        assert torch.equal(again, full)
        gatattn.attention(q, k, v, ptr=ptr.clone())
        assert served == [step]
        if ptr.numel() == 2:
            return  # (one graph of these rows: no other values to write)
        ptr[1] = 1  # graph sizes 1, 19, 10: no longer one group
        written = gatattn.attention(q, k, v, ptr=ptr)
        assert served == [step]
    expected = reference.attention(q, k, v, _dense_mask(gatattn.build_graph(ptr=ptr)))
    torch.testing.assert_close(written, expected)


def test_a_keyword_call_under_a_transform_or_a_watching_mode_takes_no_plan(kernels, monkeypatch):
    """vmap, a dispatch mode and a tensor subclass see the full call (as with ``graph=``)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    ptr = torch.tensor([0, 10, 20, 30])
    q, k, v = (t.detach() for t in make_qkv(30, 30, HEADS, CHANNELS))
    served = _planned_calls(monkeypatch)
    with torch.no_grad():
        expected = gatattn.attention(q, k, v, ptr=ptr)
        batched = torch.func.vmap(lambda q: gatattn.attention(q, k, v, ptr=ptr))(q.unsqueeze(0))
        with FlopCounterMode(display=False):
            watched = gatattn.attention(q, k, v, ptr=ptr)
        parameter = gatattn.attention(torch.nn.Parameter(q), k, v, ptr=ptr)
        assert served == []
        gatattn.attention(q, k, v, ptr=ptr)
    assert served == ["packed sdpa"]  # (the plan was there)
    for out in (batched[0], watched, parameter):
        torch.testing.assert_close(out, expected)
