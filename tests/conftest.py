"""Shared test helpers: random inputs and the tolerance rule of docs/design.md, section 1."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen
# before any kernel is decorated, so here, before test modules import gatattn.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gatattn import reference

# Property tests: CI runs a fixed sample (reproducible failures); HYPOTHESIS_PROFILE=fuzz
# searches ten times as many random cases.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100)
settings.register_profile("fuzz", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Marks a Triton case that repeats, in Triton's interpreter (seconds per case), what a quick case
#: of the same test already sends through it (another head layout, dtype, graph form or size):
#: `make test` leaves it to `make test-heavy` (CI runs both; on a GPU the interpreter is off).
INTERPRETER_REPEAT = pytest.mark.heavy

# The tolerance rule's floors, shared with the check tool users run (python -m gatattn.check).
from gatattn.tolerance import FLOOR, LOW_PRECISION  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # The longest work, the kernel builds, first: the other xdist worker runs the rest beside
    # them instead of waiting for them at the end.
    items.sort(key=lambda item: item.path.name != "test_kernel_builds.py")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_process_tree(command, *, timeout, **kwargs):
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, but the
    child leads a process group of its own, killed whole however the call ends (done, failed,
    timed out, interrupted). subprocess.run's timeout kills the child alone: the workers of its
    process pool, blocked on the pool's queue, would outlive it."""
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            _kill_group(process.pid)  # leaving the with block then reaps the child
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is empty: every process in it has exited
        pass


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's CPU thread count set to ``count`` inside the block, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_qkv(n_dst, n_src, heads, channels, value_channels=None, dtype=torch.float32, seed=0):
    """Leaf ``q, k, v`` with gradients; values of unit scale."""
    gen = torch.Generator().manual_seed(seed)
    value_channels = value_channels or channels
    shapes = ((n_dst, heads, channels), (n_src, heads, channels), (n_src, heads, value_channels))
    return tuple(torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in shapes)


def assert_close(name, got, ref_hi, ref_lo=None):
    """``|got - ref_hi| <= 2 |ref_lo - ref_hi| + floor`` (low precision) or ``<= floor``."""
    floor = FLOOR[got.dtype] * max(1.0, ref_hi.abs().max().item() if ref_hi.numel() else 0.0)
    err = (got.double() - ref_hi.double()).abs()
    if ref_lo is None:
        bound = torch.full_like(err, floor)
        ref_err = 0.0
    else:
        ref_diff = (ref_lo.double() - ref_hi.double()).abs()
        bound = 2 * ref_diff + floor
        ref_err = ref_diff.max().item() if ref_diff.numel() else 0.0
    got_err = err.max().item() if err.numel() else 0.0
    print(f"{name}: max error {got_err:.3e}, reference's own low-precision error {ref_err:.3e}")
    assert not torch.isnan(got).any(), f"{name} has NaN"
    assert bool((err <= bound).all()), (
        f"{name}: max error {got_err:.3e} exceeds the bound (floor {floor:.1e}, reference "
        f"error {ref_err:.3e})")


def _forward_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    differentiable = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(out, differentiable, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g
             for t, g in zip(differentiable, grads, strict=True)]
    return out, grads


def check_against_reference(run, inputs, reference_fn, names=("q", "k", "v")):
    """Compare ``run(*inputs)`` and its gradients with ``reference_fn(*inputs, compute_dtype)``
    in float64 (and, for half precision, with the same reference in the inputs' dtype)."""
    grad_out = _upstream(run, inputs)
    out, grads = _forward_and_grads(run, inputs, grad_out)
    hi_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref_hi, grads_hi = _forward_and_grads(
        lambda *a: reference_fn(*a, compute_dtype=torch.float64), hi_inputs, grad_out.double())
    ref_lo, grads_lo = None, [None] * len(grads)
    if out.dtype in LOW_PRECISION:
        ref_lo, grads_lo = _forward_and_grads(
            lambda *a: reference_fn(*a, compute_dtype=None), inputs, grad_out)
    assert_close("out", out, ref_hi, ref_lo)
    for name, g, g_hi, g_lo in zip(names, grads, grads_hi, grads_lo, strict=True):
        assert_close(f"d{name}", g, g_hi, g_lo)


def _upstream(run, inputs):
    with torch.no_grad():
        out = run(*inputs)
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(out.shape, generator=gen).to(out.dtype)


def masked_reference(mask, **kwargs):
    """A reference function of ``(q, k, v, compute_dtype)`` for a fixed mask."""
    def fn(q, k, v, compute_dtype):
        return reference.attention(q, k, v, mask, compute_dtype=compute_dtype, **kwargs)
    return fn


@pytest.fixture
def kernels():
    """The compiled module: required wherever a C++ compiler is installed (a failed build
    there is a defect, not a skip)."""
    from gatattn.backends import native

    module = native.cpu_kernels()
    if module is None:
        if shutil.which("c++") and os.environ.get(native.ENVIRONMENT_SWITCH, "1") != "0":
            pytest.fail("a C++ compiler is installed but gatattn's CPU kernels did not build")
        pytest.skip("no C++ compiler here: the torch-ops form serves")
    return module
