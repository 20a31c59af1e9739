"""Where an attention bias matters: hop distances, learned as Graphormer's spatial encoding.

Each graph (a random tree of 10-30 nodes with a few extra edges) has one marked node; the task
is to classify every node by its hop distance to the mark (0, 1, 2, 3, 4, 5 or more). Three
small transformers of SelfAttentionConv layers (3 layers, 4 heads of 16 channels) are trained:

* on each graph's complete graph, nodes seeing only their own features (the mark flag): no
  structure at all, so it can do no better than guess from the class frequencies;
* the same, plus a learned spatial encoding (gatattn.bias.SpatialEncoding): each head adds a
  learned scalar per shortest-path distance to its logits (``attn_bias``), so attention can find
  the mark and tell how far it is;
* on the graph's own edges (message passing): 3 layers see 3 hops, so it cannot tell 4 from 5+.

Each model builds its graph once per batch (``gatattn.build_graph``: the complete graphs, or the
edges) and passes it to every layer as ``graph=``.

The plot shows test accuracy per epoch and the learned bias per head and distance.

Run: python examples/graphormer.py [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import _smoke  # noqa: E402  (examples/_smoke.py, beside this script)
import _threads  # noqa: E402  (examples/_threads.py)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch_geometric.data import Batch, Data  # noqa: E402

import gatattn  # noqa: E402
from gatattn import SelfAttentionConv  # noqa: E402
from gatattn.bias import SpatialEncoding  # noqa: E402

CLASSES = 6  # distance 0..4, then 5 or more
HEADS, CHANNELS, LAYERS = 4, 16, 3
MAX_DISTANCE = 8


def random_graph(gen: torch.Generator) -> Data:
    """A random tree plus n/5 random edges, undirected; one marked node."""
    n = int(torch.randint(10, 31, (1,), generator=gen))
    parent = [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    pairs = list(zip(range(1, n), parent, strict=True))
    pairs += [tuple(torch.randint(0, n, (2,), generator=gen).tolist()) for _ in range(n // 5)]
    pairs = [(a, b) for a, b in pairs if a != b]
    edge_index = torch.tensor(pairs + [(b, a) for a, b in pairs]).t()
    mark = int(torch.randint(0, n, (1,), generator=gen))
    x = torch.zeros(n, 1)
    x[mark] = 1.0
    return Data(x=x, edge_index=edge_index, mark=mark, num_nodes=n)


def batches(graphs: list[Data], size: int, encoding: SpatialEncoding) -> list[Batch]:
    """Batches with their labels and hop distances (the structure, computed once)."""
    out = []
    for start in range(0, len(graphs), size):
        batch = Batch.from_data_list(graphs[start:start + size])
        batch.distances = encoding.distances(batch.edge_index, batch.ptr)
        sizes = batch.ptr.diff()
        marks = batch.ptr[:-1] + torch.tensor([g.mark for g in graphs[start:start + size]])
        offsets = torch.cat([sizes.new_zeros(1), (sizes * sizes).cumsum(0)[:-1]])
        node = torch.arange(batch.num_nodes)
        graph = batch.batch
        # Row i * n + j of a graph's block is the distance from j to i: take j = the mark.
        rows = offsets[graph] + (node - batch.ptr[graph]) * sizes[graph] + (
            marks[graph] - batch.ptr[graph])
        batch.y = batch.distances[rows].clamp(max=CLASSES - 1)
        out.append(batch)
    return out


class Transformer(nn.Module):
    """LAYERS pre-norm SelfAttentionConv blocks on the complete graph (``edges=False``) or on
    the edges, optionally with a spatial encoding per layer."""

    def __init__(self, spatial: bool, edges: bool):
        super().__init__()
        width = HEADS * CHANNELS
        self.edges = edges
        self.embed = nn.Linear(1, width)
        self.convs = nn.ModuleList(SelfAttentionConv(width, CHANNELS, heads=HEADS)
                                   for _ in range(LAYERS))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(LAYERS))
        self.spatial = nn.ModuleList(SpatialEncoding(MAX_DISTANCE, HEADS)
                                     for _ in range(LAYERS)) if spatial else None
        self.head = nn.Linear(width, CLASSES)

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.embed(batch.x)
        # Once per batch, for every layer: the graph's edges, or each graph's complete graph.
        graph = (gatattn.build_graph(edge_index=batch.edge_index, num_nodes=batch.num_nodes)
                 if self.edges else gatattn.build_graph(ptr=batch.ptr))
        for layer, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            bias = None if self.spatial is None else self.spatial[layer](
                batch.edge_index, batch.ptr, distances=batch.distances)
            h = h + conv(norm(h), graph=graph, attn_bias=bias)
        return self.head(h)


def accuracy(model: nn.Module, data: list[Batch]) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(b).argmax(1) == b.y).sum()) for b in data)
    return correct / sum(b.num_nodes for b in data)


def train(name: str, model: nn.Module, train_set, test_set, epochs: int):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    curve, start = [], time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in train_set:
            opt.zero_grad()
            F.cross_entropy(model(batch), batch.y).backward()
            opt.step()
        curve.append(accuracy(model, test_set))
    seconds = time.perf_counter() - start
    print(f"| {name} | {curve[-1]:.3f} | {max(curve):.3f} | {seconds / epochs:.2f} |",
          flush=True)
    return curve


def plot(curves: dict[str, list[float]], table: torch.Tensor, chance: float, path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        left.plot(range(1, len(curve) + 1), curve, label=name)
    left.axhline(chance, color="grey", ls=":", label="most frequent class")
    left.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02),
             title="Classify each node by its hop distance to the mark")
    left.legend(fontsize=8)
    for h in range(table.size(1)):
        right.plot(range(table.size(0)), table[:, h], marker="o", label=f"head {h}")
    labels = [str(d) for d in range(table.size(0) - 1)] + ["far"]
    right.set_xticks(range(table.size(0)), labels)
    right.set(xlabel="shortest-path distance", ylabel="learned logit bias",
              title="Spatial encoding of the first layer")
    right.legend(fontsize=8)
    fig.tight_layout()
    _smoke.savefig(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few graphs, two epochs")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    num_train, num_test, epochs = (32, 16, 2) if args.smoke else (512, 128, 20)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    encoding = SpatialEncoding(MAX_DISTANCE, HEADS)
    graphs = [random_graph(gen) for _ in range(num_train + num_test)]
    train_set = batches(graphs[:num_train], 64, encoding)
    test_set = batches(graphs[num_train:], 64, encoding)
    labels = torch.cat([b.y for b in test_set])
    chance = float(torch.bincount(labels).max()) / labels.numel()

    print(f"\n{num_train} training / {num_test} test graphs of 10-30 nodes, {epochs} epochs, "
          f"{LAYERS} layers of {HEADS} heads x {CHANNELS}")
    print("| model | final test accuracy | best | s / epoch |\n|---|---|---|---|")
    models = {
        "complete graph, no bias": Transformer(spatial=False, edges=False),
        "complete graph + spatial encoding": Transformer(spatial=True, edges=False),
        "graph edges (message passing)": Transformer(spatial=False, edges=True),
    }
    curves = {name: train(name, model, train_set, test_set, epochs)
              for name, model in models.items()}
    print(f"| most frequent class | {chance:.3f} | | |")
    table = models["complete graph + spatial encoding"].spatial[0].table.weight.detach()
    path = _smoke.output_path("graphormer.png", args.smoke)
    plot(curves, table, chance, path)
    print(f"\nplot: {path.resolve()}")


if __name__ == "__main__":
    main()
