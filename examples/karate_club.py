"""Node classification on Zachary's karate club: attention over the graph's own edges.

The club (34 members, 78 friendships, shipped with networkx) split into two factions. Given the
faction of four members on each side, predict everyone else's. SelfAttentionConv runs on the
friendship edges (message passing, not the complete graph) and is compared with PyG's GATConv
and TransformerConv of the same size. The plot draws the club with each friendship as wide as
the attention the trained layer puts on it.

Run: python examples/karate_club.py [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import _smoke  # noqa: E402  (examples/_smoke.py, beside this script)
import _threads  # noqa: E402  (examples/_threads.py)
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch_geometric.nn import GATConv, TransformerConv  # noqa: E402
from tqdm import tqdm  # noqa: E402

import gatattn  # noqa: E402
from gatattn import SelfAttentionConv  # noqa: E402

LAYERS = {
    "SelfAttentionConv": lambda i, o, h: SelfAttentionConv(i, o, heads=h, root_weight=True),
    "GATConv": lambda i, o, h: GATConv(i, o, heads=h),
    "TransformerConv": lambda i, o, h: TransformerConv(i, o, heads=h),
}


class TwoLayer(nn.Module):
    """Two attention layers: 4 heads of 8 channels, then one head per class."""

    def __init__(self, layer, features: int, classes: int):
        super().__init__()
        self.conv1 = layer(features, 8, 4)
        self.conv2 = layer(32, classes, 1)

    def forward(self, x, edge_index):
        x = F.elu(self.conv1(F.dropout(x, 0.5, self.training), edge_index))
        return self.conv2(F.dropout(x, 0.5, self.training), edge_index)


def karate_data():
    """One-hot node features (members have no attributes), faction labels, edges."""
    graph = nx.karate_club_graph()
    edge_index, n = gatattn.networkx_to_edge_index(graph)
    labels = torch.tensor([graph.nodes[v]["club"] != "Mr. Hi" for v in graph.nodes]).long()
    return graph, torch.eye(n), edge_index, labels


def split(labels, per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    train = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        train[members[torch.randperm(members.numel(), generator=g)[:per_class]]] = True
    return train


def train(name, x, edge_index, labels, train_mask, epochs, seed):
    torch.manual_seed(seed)
    model = TwoLayer(LAYERS[name], x.size(1), 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x, edge_index)[train_mask], labels[train_mask]).backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = model(x, edge_index).argmax(1) == labels
    return model, float(correct[~train_mask].float().mean()), seconds / epochs


def draw(graph, model, x, edge_index, labels, path: Path) -> None:
    with torch.no_grad():
        pred = model(x, edge_index).argmax(1)
        _, (edges, alpha) = model.conv1(x, edge_index, return_attention_weights=True)
    weight = {}
    for (j, i), a in zip(edges.t().tolist(), alpha.mean(1).tolist(), strict=True):
        weight[frozenset((i, j))] = weight.get(frozenset((i, j)), 0.0) + a  # both directions
    widths = [0.5 + 6 * weight[frozenset(e)] for e in graph.edges]
    pos = nx.spring_layout(graph, seed=3)
    fig, ax = plt.subplots(figsize=(7, 6))
    nx.draw_networkx_edges(graph, pos, width=widths, alpha=0.6, ax=ax)
    nx.draw_networkx_nodes(graph, pos, node_color=pred.tolist(), cmap="coolwarm", ax=ax,
                           edgecolors=["black" if p == t else "gold"
                                       for p, t in zip(pred, labels, strict=True)],
                           linewidths=2)
    nx.draw_networkx_labels(graph, pos, font_size=8, ax=ax)
    ax.set_title("Karate club: predicted faction (colour; gold ring = wrong),\n"
                 "edge width = SelfAttentionConv layer-1 attention (mean over heads)")
    ax.axis("off")
    fig.tight_layout()
    _smoke.savefig(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one split, few epochs")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    seeds, epochs = (range(1), 20) if args.smoke else (range(20), 200)
    graph, x, edge_index, labels = karate_data()

    results = {name: [] for name in LAYERS}
    runs = tqdm([(s, n) for s in seeds for n in LAYERS], desc="training", unit="run")
    for seed, name in runs:
        model, acc, sec = train(name, x, edge_index, labels, split(labels, 4, seed), epochs, seed)
        results[name].append((acc, sec))
        if name == "SelfAttentionConv" and seed == 0:
            shown = model

    print(f"\nKarate club, 4 labelled members per faction, {len(seeds)} random splits, "
          f"{epochs} epochs")
    print("| layer | test accuracy (mean +- std) | ms / epoch |\n|---|---|---|")
    for name, runs_ in results.items():
        acc = torch.tensor([a for a, _ in runs_])
        ms = 1e3 * torch.tensor([s for _, s in runs_]).median()
        std = float(acc.std()) if acc.numel() > 1 else 0.0
        print(f"| {name} | {acc.mean():.3f} +- {std:.3f} | {ms:.1f} |")
    path = _smoke.output_path("karate_club.png", args.smoke)
    draw(graph, shown, x, edge_index, labels, path)
    print(f"\nplot: {path.resolve()}")


if __name__ == "__main__":
    main()
