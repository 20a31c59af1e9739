"""The compiled steps of calls that nothing records, on CPU: the SDPA route's one-step call per
size group (gatattn/csrc/packed_sdpa.cpp) and the scan for non-finite inputs
(gatattn/csrc/nonfinite.cpp), which computes a keyword call's finite flag and a ``graph=``
call's guard. Each against the form written in torch ops that serves where they do not."""

import pytest
import torch

import gatattn
from gatattn import reference
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
@pytest.mark.parametrize("rows", [1, 5, 33])  # runs shorter than, equal to, past 16 lanes
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
