"""Host reads per call: at most one with ``ptr`` (none with validation off on the fused route),
graph structure derived once per batch and reused, a reuse that never goes stale, and a
validation switch that changes no result on valid inputs."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import triton.runtime.interpreter as triton_interpreter
from torch.utils._python_dispatch import TorchDispatchMode

import gatattn
import gatattn.graph.membership as membership_module
import gatattn.graph.plan as plan_module
import gatattn.graph.reuse as reuse_module
from gatattn import reference
from gatattn.graph import set_validation, validation, validation_enabled
from tests.conftest import INTERPRETER_REPEAT, assert_close
from tests.test_functional import batch_from_sizes, ptr_from_sizes, same_graph_mask

SIZES = [10, 15, 5, 15]  # 45 nodes
HEADS, CHANNELS = 2, 8


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host, each of which waits for the device on a GPU.

    ``int()``, ``bool()``, ``float()`` and ``.item()`` dispatch ``aten._local_scalar_dense``,
    which this mode sees, as it sees ``aten.equal`` (``torch.equal``, whose answer is a Python
    bool: on a GPU it waits for the device too); ``.tolist()``, ``.cpu()`` and ``.numpy()``
    dispatch neither, so :func:`count_host_reads` patches them (and ``.item()``) to count
    themselves. ``depth`` is set while a patched method or a kernel launch runs, so nothing is
    counted twice and nothing inside a launch is counted."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default,
                    torch.ops.aten.equal.default) and self.depth == 0:
            self.count += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def not_counting(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


@contextlib.contextmanager
def count_host_reads(monkeypatch, pause_launches=True):
    """The host reads made by gatattn's own code inside the block.

    On CPU the Triton kernels run in Triton's interpreter, which copies every argument to the
    host (``UntypedStorage.cpu()``, not hooked here) and runs the kernel in numpy; on a GPU a
    launch is asynchronous and reads nothing. So with ``pause_launches`` the interpreter's
    launch (``GridExecutor.__call__``) is not counted, whatever a Triton version does inside
    it; everything before it, the launchers' own code included, is."""
    reads = HostReads()

    def counted(method):
        def wrapper(self, *args, **kwargs):
            reads.count += reads.depth == 0
            with reads.not_counting():
                return method(self, *args, **kwargs)
        return wrapper

    def launch_not_counted(launch):
        def wrapper(self, *args, **kwargs):
            with reads.not_counting():
                return launch(self, *args, **kwargs)
        return wrapper

    for name in ("tolist", "cpu", "numpy", "item"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    if pause_launches:
        monkeypatch.setattr(triton_interpreter.GridExecutor, "__call__",
                            launch_not_counted(triton_interpreter.GridExecutor.__call__))
    with reads:
        yield reads


@pytest.fixture
def fresh_caches(monkeypatch):
    """Empty structure caches, restored afterwards."""
    monkeypatch.setattr(plan_module, "_plan_cache", {})
    monkeypatch.setattr(reuse_module, "_cache", {})


def inputs(n_dst=45, n_src=45, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((n_dst, HEADS, CHANNELS), (n_src, HEADS, CHANNELS), (n_src, HEADS, CHANNELS))
    return tuple(torch.randn(*s, generator=gen).requires_grad_(requires_grad) for s in shapes)


def expected(q, k, v, batch_dst, batch_src, causal=False):
    return reference.attention(q, k, v, same_graph_mask(batch_dst, batch_src, causal),
                               compute_dtype=torch.float64).float()


# --- the counter itself -------------------------------------------------------------------

@pytest.mark.parametrize("read", [
    lambda t: t.tolist(), lambda t: t.item(), lambda t: int(t), lambda t: bool(t),
    lambda t: float(t), lambda t: t.cpu(), lambda t: t.numpy(), lambda t: t[0].tolist(),
    lambda t: torch.equal(t, t.clone())])
def test_counter_sees_each_kind_of_read_once(monkeypatch, read):
    t = torch.tensor([3])
    with count_host_reads(monkeypatch) as reads:
        read(t)
    assert reads.count == 1


@pytest.mark.parametrize("pause_launches", [True, False])
def test_kernel_launchers_read_nothing(monkeypatch, pause_launches):
    """The launchers (tile schedule included) read nothing; and today the interpreter's launch
    makes no read these hooks see either, so not counting it hides nothing."""
    from gatattn.kernels.flash_attention import flash_attention_backward, flash_attention_forward

    q, k, v = inputs()
    cu_seqlens = ptr_from_sizes(SIZES).to(torch.int32)
    args = (cu_seqlens, cu_seqlens, CHANNELS ** -0.5, True)
    with count_host_reads(monkeypatch, pause_launches=pause_launches) as reads:
        out, lse = flash_attention_forward(q, k, v, *args)
        flash_attention_backward(torch.ones_like(out), q, k, v, out, lse, *args)
    assert reads.count == 0


# --- at most one read per call with ptr ---------------------------------------------------

PTR_CASES = {"self": (SIZES, SIZES), "bipartite": ([4, 15, 0, 11], SIZES)}


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["self", "bipartite"])
def test_one_host_read_per_call_with_ptr(monkeypatch, backend, causal, kind):
    sizes_dst, sizes_src = PTR_CASES[kind]
    ptr_src = ptr_from_sizes(sizes_src)
    ptr = ptr_src if kind == "self" else (ptr_from_sizes(sizes_dst), ptr_src)
    q, k, v = inputs(sum(sizes_dst), sum(sizes_src))
    for _ in range(2):  # the first call (structure derived) and a later one (reused)
        with count_host_reads(monkeypatch) as reads:
            out = gatattn.attention(q, k, v, ptr=ptr, causal=causal, backend=backend)
        assert reads.count == 1
    torch.testing.assert_close(out, expected(q, k, v, batch_from_sizes(sizes_dst),
                                             batch_from_sizes(sizes_src), causal))


@pytest.mark.parametrize("causal", [False, True])
def test_no_host_read_on_the_fused_route_with_validation_off(monkeypatch, causal):
    ptr = ptr_from_sizes(SIZES)
    q, k, v = inputs()
    with validation(False), count_host_reads(monkeypatch) as reads:
        out = gatattn.attention(q, k, v, ptr=ptr, causal=causal, backend="triton")
    assert reads.count == 0
    batch = batch_from_sizes(SIZES)
    torch.testing.assert_close(out, expected(q, k, v, batch, batch, causal))


def test_backward_of_a_ptr_call_reads_nothing(monkeypatch):
    ptr = ptr_from_sizes(SIZES)
    for backend in ("triton", "sdpa"):
        q, k, v = inputs(requires_grad=True)
        out = gatattn.attention(q, k, v, ptr=ptr, backend=backend)
        with count_host_reads(monkeypatch) as reads:
            out.sum().backward()
        assert reads.count == 0, backend


def test_sdpa_route_with_validation_off_reads_only_the_sizes(monkeypatch):
    """Grouping graphs by size needs the sizes on the host: one read, even with checks off."""
    ptr = ptr_from_sizes(SIZES)
    q, k, v = inputs()
    with validation(False), count_host_reads(monkeypatch) as reads:
        gatattn.attention(q, k, v, ptr=ptr, backend="sdpa")
    assert reads.count == 1


@pytest.mark.parametrize("validate,most", [(True, 1), (False, 0)])
def test_stacked_layers_read_at_most_once_per_call(monkeypatch, validate, most):
    layers = torch.nn.ModuleList(
        [gatattn.SelfAttentionConv(16, 8, heads=2, backend="triton") for _ in range(3)])
    x, ptr = torch.randn(sum(SIZES), 16), ptr_from_sizes(SIZES)
    with validation(validate):
        for layer in layers:
            with count_host_reads(monkeypatch) as reads:
                x = layer(x, ptr=ptr)
            assert reads.count <= most


@pytest.mark.parametrize("form,first,later", [("ptr", 1, 1), ("batch", 1, 1)])
def test_host_reads_per_batched_call_on_the_sdpa_route(monkeypatch, fresh_caches, form, first,
                                                      later):
    """A batch tensor is read once when first seen (id range, order and sizes counted into one
    slot per node, with the inputs' finite flag), once later (the cache's equality check, with
    the flag). 13 / 7 reads before the structure was read together; 2 / 1 before the sizes
    joined the first read."""
    graph = {"ptr": ptr_from_sizes(SIZES), "batch": batch_from_sizes(SIZES)}[form]
    q, k, v = inputs()
    for most in (first, later):
        with count_host_reads(monkeypatch) as reads:
            gatattn.attention(q, k, v, **{form: graph}, backend="sdpa")
        assert reads.count == most


# --- structure derived once per batch, never stale ----------------------------------------

def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("form", ["ptr", "batch"])
def test_stacked_model_derives_the_structure_once(monkeypatch, fresh_caches, form):
    plans = _count_calls(monkeypatch, plan_module, "_plan_from_sizes")
    memberships = _count_calls(monkeypatch, membership_module, "_membership_of_ids")
    layers = torch.nn.ModuleList([gatattn.SelfAttentionConv(16, 8, heads=2) for _ in range(3)])
    sizes = [10, 15, 5, 15, 7]  # unsorted sizes: the plan permutes nodes
    graph = {"ptr": ptr_from_sizes(sizes), "batch": batch_from_sizes(sizes)}[form]
    x = torch.randn(sum(sizes), 16)
    for _ in range(2):  # two passes over the same batch
        h = x
        for layer in layers:
            h = layer(h, **{form: graph})
    assert len(plans) == 1
    assert len(memberships) == (form == "batch")


def _attend(q, k, v, **graph):
    return gatattn.attention(q, k, v, backend="sdpa", **graph)


@pytest.mark.parametrize("write", ["in_place", "numpy"])
def test_batch_written_between_calls_is_not_served_stale(fresh_caches, write):
    batch = batch_from_sizes([3, 4, 5])[torch.randperm(12, generator=torch.Generator()
                                                       .manual_seed(0))]
    q, k, v = inputs(12, 12)
    torch.testing.assert_close(_attend(q, k, v, batch=batch), expected(q, k, v, batch, batch))
    new_ids = torch.tensor([1, 1, 0, 2, 2, 2, 0, 0, 1, 3, 3, 0])
    if write == "in_place":
        batch.copy_(new_ids)
    else:  # through shared memory: no version bump
        batch.numpy()[:] = new_ids.numpy()
    torch.testing.assert_close(_attend(q, k, v, batch=batch), expected(q, k, v, batch, batch))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_ptr_written_between_calls_is_not_served_stale(fresh_caches, backend):
    ptr = ptr_from_sizes([3, 4, 5])
    q, k, v = inputs(12, 12)
    for sizes in ([3, 4, 5], [6, 1, 5]):
        np.copyto(ptr.numpy(), ptr_from_sizes(sizes).numpy())
        batch = batch_from_sizes(sizes)
        out = gatattn.attention(q, k, v, ptr=ptr, backend=backend)
        torch.testing.assert_close(out, expected(q, k, v, batch, batch))


def test_every_layer_given_one_ptr_gets_one_graph(fresh_caches):
    """The graph of a keyword description is kept for the next call given the same tensor (as if
    built once with build_graph); a new tensor, or one written since, gets its own."""
    from gatattn.graph import describe_graph

    ptr = ptr_from_sizes(SIZES)
    first, _ = describe_graph(45, 45, ptr=ptr)
    assert describe_graph(45, 45, ptr=ptr)[0] is first
    assert describe_graph(45, 45, ptr=ptr, causal=True)[0] is not first  # another graph
    assert describe_graph(45, 45, ptr=ptr.clone())[0] is not first
    assert describe_graph(45, 45, ptr=ptr, validate=False)[0] is not first  # derived unchecked
    ptr.numpy()[1] += 1  # no version bump
    rebuilt, _ = describe_graph(45, 45, ptr=ptr)
    assert rebuilt is not first and rebuilt.host_sizes()[0] == [11, 14, 5, 15]


def test_a_kept_batch_graph_is_compared_with_its_own_private_ids(fresh_caches):
    """A batch's membership holds a private copy of its ids; the kept entry compares with that
    copy (no second copy of N ids), which a write to the caller's tensor does not reach."""
    from gatattn.graph import describe_graph

    batch = batch_from_sizes(SIZES)
    graph, _ = describe_graph(45, 45, batch=batch)
    [entry] = reuse_module._cache.values()
    assert entry.copies[0] is graph.batch_dst and graph.batch_dst is not batch
    batch.numpy()[0] = 3  # no version bump; the graph's ids keep the old values
    assert int(graph.batch_dst[0]) == 0
    assert describe_graph(45, 45, batch=batch)[0] is not graph


def test_a_new_ptr_at_a_freed_ptrs_address_is_not_compared(monkeypatch, fresh_caches):
    """An entry holds a weak reference to the tensor it describes: a new tensor (which Python
    may place at the freed one's address) is derived at once, in one read, not first compared
    with a dead tensor's values (a second read)."""
    q, k, v = inputs()
    gatattn.attention(q, k, v, ptr=ptr_from_sizes(SIZES), backend="sdpa")
    for sizes in ([5, 15, 10, 15], [20, 5, 5, 15]):
        ptr = ptr_from_sizes(sizes)
        with count_host_reads(monkeypatch) as reads:
            out = gatattn.attention(q, k, v, ptr=ptr, backend="sdpa")
        assert reads.count == 1
        batch = batch_from_sizes(sizes)
        torch.testing.assert_close(out, expected(q, k, v, batch, batch))
        del ptr


@pytest.mark.parametrize("form", ["ptr", "none"])
def test_the_logits_route_reads_no_finite_flag(monkeypatch, fresh_caches, form):
    """The written-out logits route contains non-finite inputs by IEEE arithmetic alone, so a
    call that knows its graph before reading (a kept ptr graph, one complete graph) reads no
    finite flag: a reused ptr graph reads only the equality check, a complete graph nothing.
    The SDPA route still reads the flag (its repair needs it)."""
    import gatattn.functional as functional_module

    flags = _count_calls(monkeypatch, functional_module, "finite_flag")
    q, k, v = inputs()
    graph = {"ptr": ptr_from_sizes(SIZES)} if form == "ptr" else {}
    gatattn.attention(q, k, v, **graph)  # (a ptr graph is derived: the flag read with it)
    flags.clear()
    with count_host_reads(monkeypatch) as reads:
        out = gatattn.attention(q, k, v, **graph)
    assert (reads.count, len(flags)) == ((1, 0) if form == "ptr" else (0, 0))
    batch = batch_from_sizes(SIZES if form == "ptr" else [45])
    torch.testing.assert_close(out, expected(q, k, v, batch, batch))
    for name in ("q", "k", "v"):  # IEEE arithmetic contains them: NaN along edges only
        poisoned = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        poisoned[name][3, 1, 2] = float("nan")
        got = gatattn.attention(*poisoned.values(), **graph)
        want = expected(*poisoned.values(), batch, batch)
        assert bool(want.isnan().any()) and bool(want.isfinite().any())
        torch.testing.assert_close(got, want, equal_nan=True)
    assert not flags
    gatattn.attention(q, k, v, **graph, backend="sdpa")
    assert len(flags) == 1


def test_unvalidated_ptr_graph_is_reused_where_the_route_reads_sizes(monkeypatch,
                                                                    fresh_caches):
    """With validation off, a ptr on a route that reads the graph sizes anyway is kept like a
    validated one: later calls read only the equality check in place of the sizes."""
    plans = _count_calls(monkeypatch, plan_module, "_plan_from_sizes")
    ptr, (q, k, v) = ptr_from_sizes(SIZES), inputs()
    with validation(False):
        for _ in range(3):
            with count_host_reads(monkeypatch) as reads:
                gatattn.attention(q, k, v, ptr=ptr, backend="sdpa")
            assert reads.count == 1
    assert len(plans) == 1


# --- the validation switch ------------------------------------------------------------------

def test_validation_switch_restores_and_refuses_non_booleans():
    assert validation_enabled()
    with validation(False):
        assert not validation_enabled()
        with validation(True):
            assert validation_enabled()
        assert not validation_enabled()
    assert validation_enabled()
    set_validation(False)
    try:
        assert not validation_enabled()
    finally:
        set_validation(True)
    with pytest.raises(TypeError, match="True or False, got 0"):
        validation(0)
    with pytest.raises(TypeError, match="True or False, got 'off'"):
        set_validation("off")


@pytest.mark.parametrize("causal,form,backend", [
    pytest.param(causal, form, backend, marks=[INTERPRETER_REPEAT] if backend == "triton" and (
        causal, form) != (True, "ptr") else [])
    for causal in (False, True) for form in ("ptr", "batch", "none") for backend in ("sdpa",
                                                                                   "triton")])
def test_validation_off_gives_the_same_results(backend, form, causal):
    """Forward and gradients with all-finite inputs: the same. With NaN / inf, validation on
    contains them exactly (the reference's edge-wise policy); off, inputs are assumed finite
    (nothing checked, nothing repaired), so only the validated result is specified."""
    sizes = [10, 15, 5, 15]
    graph = {"ptr": {"ptr": ptr_from_sizes(sizes)}, "none": {},
             "batch": {"batch": batch_from_sizes(sizes)[torch.randperm(
                 45, generator=torch.Generator().manual_seed(1))]}}[form]
    for poison in (False, True):
        results = []
        for enabled in (True, False):
            q, k, v = inputs(45, 45, requires_grad=True)
            if poison:
                with torch.no_grad():
                    q[3, 1, 2], k[20, 0, 0], v[40, 1, 5] = float("nan"), float("inf"), float("nan")
            with validation(enabled):
                out = gatattn.attention(q, k, v, causal=causal, backend=backend, **graph)
                out.nan_to_num(0.0).sum().backward()
            results.append((out, q.grad, k.grad, v.grad))
        on, off = results
        if poison:  # contained along edges (tests/test_fuzz.py checks exactly where)
            assert bool(on[0].isnan().any()) and bool(on[0].isfinite().any())
        else:
            torch.testing.assert_close(on[0], off[0], rtol=0, atol=0)
            for a, b in zip(on[1:], off[1:], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_invalid_ptr_with_validation_off_fails_the_device_assertion():
    q, k, v = inputs(5, 5)
    with validation(False), pytest.raises(RuntimeError, match="non-decreasing"):
        gatattn.attention(q, k, v, ptr=torch.tensor([0, 3, 2, 5]), backend="triton")


@pytest.mark.cuda
def test_host_reads_on_a_gpu(monkeypatch):
    """The same counts with real kernels (no interpreter), after the launch configurations are
    tuned (tuning times the kernels, which waits for them, on the first call only)."""
    ptr = ptr_from_sizes(SIZES).cuda()
    q, k, v = (t.cuda().half() for t in inputs())
    gatattn.attention(q, k, v, ptr=ptr, backend="triton")
    for enabled, count in ((True, 1), (False, 0)):
        with validation(enabled), count_host_reads(monkeypatch, pause_launches=False) as reads:
            out = gatattn.attention(q, k, v, ptr=ptr, backend="triton")
        assert reads.count == count
        batch = batch_from_sizes(SIZES).cuda()
        mask = same_graph_mask(batch, batch)
        ref_hi = reference.attention(q, k, v, mask, compute_dtype=torch.float64)
        ref_lo = reference.attention(q, k, v, mask, compute_dtype=None)
        assert_close("out", out, ref_hi, ref_lo)
