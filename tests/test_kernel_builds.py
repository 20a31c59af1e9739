"""The Triton kernels build for real GPUs, here without one.

Triton compiles ahead of time for sm_80 and sm_90 with the ptxas it ships, so CI checks what
the interpreter cannot: that every kernel (causal top-left or bottom-right and not, with and
without an attn_bias, with a sliding window) lowers to a cubin, that the largest kept launch
configuration of each dense kernel fits the architecture's shared memory, and that keep()'s
shared-memory estimate bounds the real figure (which is what makes its filter safe).
Grouped-query heads are a constexpr group size (H / H_kv), so one grouped build per dense
kernel is checked too, and one with a sliding window's left bound (HAS_LEFT).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_process_tree

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


# The builds take minutes (fp32 ones 10-30 s each), so their tests are heavy (`make test-heavy`,
# which keeps a file's tests on one xdist worker: the fixture, per worker, builds once).
@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    if not PTXAS.exists():
        pytest.skip("this Triton build ships no ptxas: it cannot compile for NVIDIA GPUs here")
    out = tmp_path_factory.mktemp("builds")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")
    done = run_process_tree(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--tightest",
         "--archs", "80", "90", "--dtypes", "bfloat16", "float32", "--head-dims", "40", "256",
         "--jobs", "2", "--out", str(out / "report.md"), "--json", str(out / "rows.json")],
        env=env, cwd=ROOT, timeout=3600)  # a hang guard: 11 min measured at load 7
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "rows.json").read_text())


@pytest.mark.heavy
def test_every_kernel_compiles_for_sm80_and_sm90(builds):
    kernels = {(tuple(row["build"]["capability"]), row["build"]["kernel"], row["build"]["causal"],
                row["build"]["bottom_right"], row["build"]["bias"], row["build"]["group"],
                row["build"]["window"]) for row in builds}
    # Per arch: 3 dense kernels not causal, causal, with a bias, with a bias causal
    # bottom-right, and that with 4 query heads per kv head or with a sliding window; 3 CSR
    # kernels with and without a bias.
    assert len(kernels) == 2 * (3 * 6 + 3 * 2), kernels
    failed = [(row["build"], row["error"]) for row in builds if row["error"] is not None]
    assert not failed, failed


@pytest.mark.heavy
def test_kept_configurations_fit_shared_memory(builds):
    too_big = [row["build"] for row in builds if row["verdict"].endswith("TOO BIG")]
    assert not too_big, too_big


@pytest.mark.heavy
def test_shared_memory_estimate_bounds_the_real_figure(builds):
    dense = [row for row in builds if row["shared_estimate"] is not None]
    assert dense
    for row in dense:
        assert row["shared"] <= row["shared_estimate"], row


# kernel_resources.py's shape: a process pool whose worker is busy when the build times out.
POOL_SCRIPT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
def work(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
with ProcessPoolExecutor(1) as pool:
    pool.submit(work, sys.argv[1]).result()
"""


def test_a_timed_out_build_leaves_no_process(tmp_path):
    pid_file = tmp_path / "worker.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_process_tree([sys.executable, "-c", POOL_SCRIPT, str(pid_file)], timeout=5)
    worker = int(pid_file.read_text())  # it ran when the timeout struck
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker), f"pool worker {worker} outlived the timed-out build"


def alive(pid):
    """Running: neither gone nor a zombie waiting for its new parent to reap it."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"
