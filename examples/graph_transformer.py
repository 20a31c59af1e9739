"""GraphGPS-style blocks on batched graphs: local message passing plus global attention.

Each graph is a path. Its first node is a query holding a key; somewhere at least 6 hops away
one node holds the same key and a value; every other node holds a different key and a random
value. The graph's label is that value, read out at the query node (as in the NeighborsMatch
problem, so that a global pooling cannot shortcut the question). Three rounds of local message
passing see 3 hops and stay at chance; one round of global attention, over each graph's
complete graph in a batch (no edges built), can match keys across the graph. That graph is built
once per batch (``gatattn.build_graph``) and every block's attention takes it as ``graph=``.

Run: python examples/graph_transformer.py [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import _smoke  # noqa: E402  (examples/_smoke.py, beside this script)
import _threads  # noqa: E402  (examples/_threads.py)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch_geometric.data import Data  # noqa: E402
from torch_geometric.loader import DataLoader  # noqa: E402
from torch_geometric.nn import GINConv  # noqa: E402
from tqdm import tqdm  # noqa: E402

import gatattn  # noqa: E402
from gatattn import SelfAttentionConv  # noqa: E402

KEYS, VALUES, MIN_HOPS = 4, 4, 6


def key_value_path(n: int, gen: torch.Generator) -> Data:
    """A path of ``n`` nodes: features [is query, key one-hot, value one-hot]."""
    query_key = int(torch.randint(KEYS, (1,), generator=gen))
    keys = (query_key + torch.randint(1, KEYS, (n,), generator=gen)) % KEYS  # never query_key
    values = torch.randint(VALUES, (n,), generator=gen)
    answer = int(torch.randint(MIN_HOPS, n, (1,), generator=gen))
    keys[0] = keys[answer] = query_key
    x = torch.cat([torch.zeros(n, 1), F.one_hot(keys, KEYS), F.one_hot(values, VALUES)], 1)
    x[0, 0], x[0, 1 + KEYS:] = 1.0, 0.0  # the query holds no value
    src = torch.arange(n - 1)
    edge_index = torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], 1)
    return Data(x=x.float(), edge_index=edge_index, y=values[answer].view(1))


def dataset(count: int, seed: int) -> list[Data]:
    gen = torch.Generator().manual_seed(seed)
    return [key_value_path(int(torch.randint(MIN_HOPS + 4, 25, (1,), generator=gen)), gen)
            for _ in range(count)]


class GPSBlock(nn.Module):
    """``h + local(h) + global(h)``, then a feed-forward; ``global`` attends over every node of
    the same graph (optional, to compare)."""

    def __init__(self, dim: int, heads: int, global_attention: bool):
        super().__init__()
        mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.local = GINConv(mlp)
        self.attn = SelfAttentionConv(dim, dim // heads, heads=heads, root_weight=False,
                                      out_proj=True) if global_attention else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, h, edge_index, graph):
        update = self.local(h, edge_index)
        if self.attn is not None:
            update = update + self.attn(h, graph=graph)  # complete graph per graph, no edges
        h = self.norm1(h + update)
        return self.norm2(h + self.ff(h))


class GPS(nn.Module):
    def __init__(self, features: int, dim: int, layers: int, global_attention: bool):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.ModuleList(GPSBlock(dim, 4, global_attention) for _ in range(layers))
        self.head = nn.Linear(dim, VALUES)

    def forward(self, data):
        h = self.embed(data.x)
        graph = gatattn.build_graph(ptr=data.ptr)  # once per batch, for every block
        for block in self.blocks:
            h = block(h, data.edge_index, graph)
        return self.head(h[data.ptr[:-1]])  # read out at each graph's query node


def accuracy(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = [(model(b).argmax(1) == b.y).float() for b in loader]
    return float(torch.cat(hits).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="few graphs, two epochs")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    n_train, n_test, epochs = (256, 128, 2) if args.smoke else (2000, 500, 20)
    train = DataLoader(dataset(n_train, 0), batch_size=64, shuffle=True)
    test = DataLoader(dataset(n_test, 1), batch_size=256)

    curves = {}
    for name, use_attention in (("local + global attention", True), ("local only", False)):
        torch.manual_seed(0)
        model = GPS(1 + KEYS + VALUES, 32, 3, use_attention)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        curves[name] = []
        for _ in tqdm(range(epochs), desc=name, unit="epoch"):
            model.train()
            for batch in train:
                opt.zero_grad()
                F.cross_entropy(model(batch), batch.y).backward()
                opt.step()
            curves[name].append(accuracy(model, test))

    print(f"\nKey-value retrieval on paths of {MIN_HOPS + 4}-24 nodes (answer >= {MIN_HOPS} hops "
          f"away), 3 GPS blocks, {n_train} training graphs; chance = {1 / VALUES:.2f}")
    print("| model | final test accuracy | best test accuracy |\n|---|---|---|")
    for name, curve in curves.items():
        print(f"| {name} | {curve[-1]:.3f} | {max(curve):.3f} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(range(1, epochs + 1), curve, "o-", label=name)
    ax.axhline(1 / VALUES, color="grey", ls="--", label="chance")
    ax.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02),
           title="GPS blocks: long-range key-value retrieval")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = _smoke.output_path("graph_transformer.png", args.smoke)
    _smoke.savefig(fig, path)
    print(f"\nplot: {path.resolve()}")


if __name__ == "__main__":
    main()
