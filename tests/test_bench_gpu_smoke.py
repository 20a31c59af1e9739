"""benchmarks/bench_gpu.py runs end to end in its --smoke mode (CPU, Triton's interpreter).

The GPU benchmark runs only where a GPU is lent, for a few minutes: this catches a broken peer,
report or save before it costs that time. Two runs: one stopped by its budget before the first
case, then --resume, so that the partial save and the resume path run too.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"
OURS = {"segments": ("gatattn.attention (triton)", "kernel launchers"),
        "graphs": ("gatattn.attention (triton)", "kernel launchers"),
        "layer": ("projections + gatattn.attention (triton)",)}
NUMBER = re.compile(r"\d+(\.\d+)?( \(\d+\))?")  # ms or TFLOP/s, maybe "ms (TFLOP/s)"
MODES = {"fwd", "bwd", "fwd+bwd"}
HEADINGS = ("## Targets", "## Equal-length segments", "## Batched graphs, attention core",
            "## Batched graphs, layer", "## Correctness", "## Skipped or failed")


def run_smoke(*args: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def column(text: str, name: str) -> list[str]:
    """Cells under the header ``name`` in every markdown table of ``text`` that has one."""
    cells, index = [], None
    for line in text.splitlines():
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            index = None
        elif index is None:
            index = row.index(name) if name in row else -1
        elif index >= 0 and not line.startswith("|---"):
            cells.append(row[index])
    return cells


def test_bench_gpu_smoke(tmp_path):
    first = run_smoke("--out", str(tmp_path), "--budget-s", "0")
    assert "stopped early: time budget" in first and "INCOMPLETE" in first

    text = run_smoke("--out", str(tmp_path), "--resume")
    assert text.startswith("# GPU benchmarks")
    assert "SMOKE RUN (CPU, Triton interpreter): numbers are not measurements" in text
    assert "INCOMPLETE" not in text and "Run 1 " in text
    for heading in HEADINGS:
        assert f"\n{heading}" in text, heading
    for name in {name for names in OURS.values() for name in names}:
        cells = column(text, name)  # timing tables: a number in every row, no skip or error
        assert cells and all(NUMBER.fullmatch(cell) for cell in cells), (name, cells)

    [saved] = tmp_path.glob("smoke-*.json")
    assert saved.with_suffix(".md").read_text() in text
    payload = json.loads(saved.read_text())
    assert {r["case"]["group"] for r in payload["results"]} == {"segments", "graphs", "layer"}
    for result in payload["results"]:
        assert "reference_error" not in result, result["reference_error"]
        for name in OURS[result["case"]["group"]]:  # measured in every mode, and checked
            entry = result["peers"][name]
            assert set(entry["ms"]) == MODES and not entry["errors"], (name, entry)
            assert "max_abs_diff_out" in entry, (name, entry)
        for name, entry in result["peers"].items():
            if "max_abs_diff_out" in entry:  # float32 on the CPU: every peer agrees closely
                diff = max(entry["max_abs_diff_out"], entry["max_abs_diff_grad"])
                assert diff < 1e-4, (result["label"], name, diff)
    assert payload["targets"] and not list((REPO / "benchmarks" / "results").glob("smoke-*"))
