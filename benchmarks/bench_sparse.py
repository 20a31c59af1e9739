"""CPU benchmark of the message-passing route (``SelfAttentionConv`` with an ``edge_index``)
against PyG's ``TransformerConv`` and ``GATConv`` on the same graphs: the sparse row of
docs/design.md's performance targets, and issue 4.

Graphs (128 input features, 4 heads of 32 channels, float32):

* random: 100,000 nodes, each with 16 in-edges from uniformly random sources;
* power-law: a Barabasi-Albert graph of 100,000 nodes, 8 edges per new node (networkx's
  generator), in-degrees heavily skewed;
* grid: a 316 x 316 two-dimensional grid (each node linked to its 4 neighbours);
* star: one hub with 100,000 in-edges (and the edges back), the worst case of degree skew;
* karate: Zachary's karate club as shipped with networkx, a real (small) graph.

``TransformerConv`` computes exactly our function (our layer copies its weights, and the max abs
diff column shows the agreement); ``GATConv`` is the other attention layer PyG users reach for,
with its own (additive) scores, so its outputs are not compared. Edges per second are edges
divided by the median time of one step. How it measures: see ``harness.py``.

On a GPU (``--device cuda``) the same graphs run in one process: time is the median of
``triton.testing.do_bench``, memory the peak of ``torch.cuda.max_memory_allocated`` over the
allocation before the step, and our layer runs twice, through the default route (cuSPARSE
SDDMM / SpMM) and through the Triton CSR kernels (``backend="triton"``).

Usage::

    python benchmarks/bench_sparse.py           # full run, writes benchmarks/results/sparse-cpu.md
    python benchmarks/bench_sparse.py --quick   # small graphs, prints only
    python benchmarks/bench_sparse.py --device cuda   # writes results/sparse-gpu-<device>.md
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import networkx as nx
import torch
from harness import (
    Case,
    CaseResult,
    Peer,
    Step,
    Target,
    attention_flops,
    command_line,
    inference,
    memory_ratio,
    run_benchmark,
    time_ratio,
    training,
)
from torch import Tensor
from torch_geometric.nn import GATConv, TransformerConv
from torch_geometric.utils import grid, to_undirected
from tqdm import tqdm

import gatattn
from gatattn import SelfAttentionConv

FEATURES, HEADS, CHANNELS = 128, 4, 32
RESULTS = Path(__file__).resolve().parent / "results" / "sparse-cpu.md"


# --- graphs ---


def random_in_edges(num_nodes: int, degree: int = 16) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    sources = torch.randint(0, num_nodes, (num_nodes * degree,), generator=gen)
    return torch.stack([sources, torch.arange(num_nodes).repeat_interleave(degree)])


@functools.lru_cache(maxsize=1)
def power_law(num_nodes: int) -> Tensor:
    return gatattn.networkx_to_edge_index(nx.barabasi_albert_graph(num_nodes, 8, seed=4))[0]


def grid_2d(side: int) -> Tensor:
    return grid(side, side)[0]


def star(leaves: int) -> Tensor:
    spokes = torch.stack([torch.arange(1, leaves + 1), torch.zeros(leaves, dtype=torch.long)])
    return to_undirected(spokes)  # the hub has `leaves` in-edges


def karate() -> Tensor:
    return gatattn.networkx_to_edge_index(nx.karate_club_graph())[0]


GRAPHS = {  # name -> (full size, quick size, builder)
    "random 16 in-edges": (100_000, 5_000, random_in_edges),
    "power-law (Barabasi-Albert, 8 edges per node)": (100_000, 5_000, power_law),
    "2-D grid": (316, 60, grid_2d),
    "star": (100_000, 5_000, star),
}


# --- peers ---


def seeded_transformer_conv() -> TransformerConv:
    torch.manual_seed(0)
    return TransformerConv(FEATURES, CHANNELS, heads=HEADS, root_weight=False)


def make_step(layer, edge_index: Tensor, backward: bool) -> Step:
    num_nodes = int(edge_index.max()) + 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_nodes, FEATURES, generator=gen).requires_grad_(backward)
    if backward:
        return training(lambda: layer(x, edge_index), [x, *layer.parameters()])
    layer.eval()
    return inference(lambda: layer(x, edge_index))


def peers(edges, backward: bool, shapes: str, num_edges: int) -> tuple[Peer, ...]:
    def ours():
        return make_step(SelfAttentionConv.from_transformer_conv(seeded_transformer_conv()),
                         edges(), backward)

    def transformer_conv():
        return make_step(seeded_transformer_conv(), edges(), backward)

    def gat_conv():
        torch.manual_seed(0)
        return make_step(GATConv(FEATURES, CHANNELS, heads=HEADS), edges(), backward)

    # GATConv's additive scores are not this attention: no rate for it.
    flops = attention_flops(num_edges, HEADS, CHANNELS, backward)
    return (Peer("SelfAttentionConv, edge_index", shapes, ours, flops=flops),
            Peer("TransformerConv", shapes, transformer_conv, flops=flops),
            Peer("GATConv", shapes, gat_conv))


NUM_EDGES: dict[str, int] = {}  # case name -> edges, filled by all_cases


def graph_size(build, size: int) -> tuple[int, int]:
    """Nodes and edges. Children look cases up through ``all_cases``, so the slow power-law
    graph is counted by formula and built only by the children that run it."""
    if build is power_law:  # networkx starts from a star of 8 edges; each new node adds 8
        return size, 2 * 8 * (size - 8)
    edge_index = build(size)
    return int(edge_index.max()) + 1, edge_index.size(1)


def describe(num_nodes: int, num_edges: int) -> str:
    return f"N={num_nodes:_}, E={num_edges:_}, F={FEATURES}, H={HEADS}, C={CHANNELS}"


def all_cases(quick: bool) -> list[Case]:
    targets = (Target("time vs TransformerConv <= 0.15x", time_ratio, False, 0.15, "x"),
               Target("memory increase vs TransformerConv <= 0.15x", memory_ratio, False, 0.15,
                      "x"))
    cases = []
    for index, (name, (full, small, build)) in enumerate(GRAPHS.items(), start=1):
        size = small if quick else full

        def edges(build=build, size=size):
            return build(size)

        num_nodes, num_edges = graph_size(build, size)
        shapes = describe(num_nodes, num_edges)
        NUM_EDGES[f"{index}f"] = NUM_EDGES[f"{index}"] = num_edges
        if index == 1:  # forward alone on the headline graph
            cases.append(Case(f"{index}f", f"{name}, forward", 3,
                              peers(edges, False, shapes, num_edges), ()))
        cases.append(Case(f"{index}", f"{name}, forward+backward", 3,
                          peers(edges, True, shapes, num_edges), targets if index == 1 else ()))
    num_nodes, NUM_EDGES["5"] = graph_size(lambda _: karate(), 0)
    cases.append(Case("5", "karate club (networkx), forward+backward", 20,
                      peers(karate, True, describe(num_nodes, NUM_EDGES["5"]), NUM_EDGES["5"]),
                      ()))
    return cases


def edges_per_second(cases: list[Case], results: list[CaseResult]) -> list[str]:
    lines = ["| case | peer | edges/s (one step) |", "|---|---|---|"]
    for case, result in zip(cases, results, strict=True):
        for i, peer in enumerate(case.peers):
            ms = result.time_ms(i)
            rate = "-" if ms is None else f"{NUM_EDGES[case.name] / (ms / 1e3):.3g}"
            lines.append(f"| {case.name}. {case.title} | {peer.name} | {rate} |")
    return [*lines, ""]


# --- GPU: one process, do_bench and CUDA memory statistics ---


def gpu_peers() -> dict[str, Callable[[], torch.nn.Module]]:
    def ours(backend: str):
        layer = SelfAttentionConv.from_transformer_conv(seeded_transformer_conv())
        layer.backend = backend
        return layer

    def gat_conv():
        torch.manual_seed(0)
        return GATConv(FEATURES, CHANNELS, heads=HEADS)

    return {"SelfAttentionConv (SDDMM/SpMM)": lambda: ours("auto"),
            "SelfAttentionConv (Triton CSR)": lambda: ours("triton"),
            "TransformerConv": seeded_transformer_conv, "GATConv": gat_conv}


def measure_on_gpu(step: Step) -> tuple[float, float]:
    """Median milliseconds and peak MB allocated above what was live before the step."""
    from triton.testing import do_bench

    step()  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 1e6
    return do_bench(step, return_mode="median"), peak_mb


def gpu_rows(quick: bool) -> list[dict]:
    rows = []
    graphs = [(name, (small if quick else full), build)
              for name, (full, small, build) in GRAPHS.items()]
    for name, size, build in tqdm(graphs, desc="graphs"):
        edge_index = build(size).cuda()
        for backward in (False, True):
            for peer, make in gpu_peers().items():
                step = make_step(make().cuda(), edge_index, backward)
                try:
                    ms, peak_mb = measure_on_gpu(step)
                except (RuntimeError, MemoryError) as error:
                    ms, peak_mb = None, str(error).splitlines()[0][:80]
                rows.append({"graph": name, "edges": edge_index.size(1), "peer": peer,
                             "pass": "fwd+bwd" if backward else "fwd", "ms": ms,
                             "peak_mb": peak_mb})
                del step
                torch.cuda.empty_cache()
    return rows


def gpu_report(rows: list[dict], quick: bool) -> str:
    device = torch.cuda.get_device_name()
    lines = [f"# Sparse route, GPU ({device})", "",
             f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
             f"{importlib.metadata.version('triton')}, torch_geometric "
             f"{importlib.metadata.version('torch_geometric')}",
             f"- dtype: float32, F={FEATURES}, H={HEADS}, C={CHANNELS}"
             + (", quick sizes" if quick else ""), "",
             "| graph | pass | peer | ms (median) | edges/s | peak MB | time vs TransformerConv |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        peer_ms = next(r["ms"] for r in rows if r["graph"] == row["graph"]
                       and r["pass"] == row["pass"] and r["peer"] == "TransformerConv")
        ms = row["ms"]
        rate = "-" if ms is None else f"{row['edges'] / (ms / 1e3):.3g}"
        ratio = "-" if ms is None or peer_ms is None else f"{ms / peer_ms:.3f}x"
        shown = "failed" if ms is None else f"{ms:.2f}"
        peak = row["peak_mb"] if isinstance(row["peak_mb"], str) else f"{row['peak_mb']:.0f}"
        lines.append(f"| {row['graph']} | {row['pass']} | {row['peer']} | {shown} | {rate} "
                     f"| {peak} | {ratio} |")
    lines += ["", "Target (docs/design.md, performance targets): fwd+bwd >= 3x "
              "TransformerConv's speed, i.e. a time ratio <= 0.333x, on the random graph.", ""]
    return "\n".join(lines)


def run_on_gpu(quick: bool) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; nothing was measured")
    text = gpu_report(gpu_rows(quick), quick)
    print(text)
    if not quick:
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
        path = RESULTS.parent / f"sparse-gpu-{slug}.md"
        path.write_text(text)
        print(f"written to {path}")


if __name__ == "__main__":
    args = command_line(__doc__.split("\n")[0], with_device=True)
    if args.device == "cuda":
        run_on_gpu(args.quick)
    else:
        run_benchmark(all_cases, quick=args.quick,
                      title="Sparse route, CPU (docs/design.md, performance targets, sparse row)",
                      results_path=RESULTS, extra=edges_per_second)
