"""GraphGPS with gatattn.GPSConv: PyG's GPSConv model, its class name swapped, no padding.

Each graph is a cycle of 16-48 nodes. Node 0 is a query holding a key; one node at least 8 hops
away around the cycle holds the same key and a value; every other node holds another key and a
random value. The graph's label is that value, read out at the query node (so that a global
pooling cannot shortcut the question). Three GINConv layers see 3 hops and stay at chance; a
GraphGPS model (GINConv locally plus global attention in each layer) matches keys across the
graph.

The same GraphGPS model is trained twice from the same weights: with PyG's ``GPSConv`` (which
pads the batch to its largest graph with ``to_dense_batch``) and with ``gatattn.GPSConv``
(attention per graph, unpadded). They compute the same function, so their curves coincide up to
float rounding; the table gives the time per epoch of each. The gatattn model also builds the
attention graph once per batch (``gatattn.build_graph``) and passes it to every layer as
``graph=`` (PyG's layer has no such argument).

Run: python examples/graphgps.py [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

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
from torch_geometric.nn import GPSConv as PyGGPSConv  # noqa: E402
from tqdm import tqdm  # noqa: E402

import gatattn  # noqa: E402
from gatattn.gps import GPSConv  # noqa: E402

KEYS, VALUES, MIN_HOPS, SIZES = 4, 4, 8, (16, 48)
DIM, HEADS, LAYERS = 32, 4, 3


def key_value_cycle(n: int, gen: torch.Generator) -> Data:
    """A cycle of ``n`` nodes: features [is query, key one-hot, value one-hot]."""
    query_key = int(torch.randint(KEYS, (1,), generator=gen))
    keys = (query_key + torch.randint(1, KEYS, (n,), generator=gen)) % KEYS  # never query_key
    values = torch.randint(VALUES, (n,), generator=gen)
    answer = int(torch.randint(MIN_HOPS, n - MIN_HOPS + 1, (1,), generator=gen))
    keys[0] = keys[answer] = query_key
    x = torch.cat([torch.zeros(n, 1), F.one_hot(keys, KEYS), F.one_hot(values, VALUES)], 1)
    x[0, 0], x[0, 1 + KEYS:] = 1.0, 0.0  # the query holds no value
    nodes = torch.arange(n)
    ring = torch.stack([nodes, nodes.roll(-1)])
    return Data(x=x.float(), edge_index=torch.cat([ring, ring.flip(0)], 1),
                y=values[answer].view(1))


def dataset(count: int, seed: int) -> list[Data]:
    gen = torch.Generator().manual_seed(seed)
    return [key_value_cycle(int(torch.randint(*SIZES, (1,), generator=gen)), gen)
            for _ in range(count)]


def gin(dim: int) -> GINConv:
    return GINConv(nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)))


class LocalBlock(nn.Module):
    """GPSConv without its attention: ``norm(h + GIN(h))``, then the same MLP and norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = gin(dim)
        self.norm1, self.norm2 = nn.BatchNorm1d(dim), nn.BatchNorm1d(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, h, edge_index, batch):
        h = self.norm1(h + self.conv(h, edge_index))
        return self.norm2(h + self.mlp(h))


class GraphGPS(nn.Module):
    """Embedding, ``LAYERS`` blocks, a classifier read at each graph's query node. With
    ``shared_graph`` the blocks (gatattn.GPSConv) also take the attention graph, built once per
    batch."""

    def __init__(self, make_block, shared_graph: bool = False):
        super().__init__()
        self.shared_graph = shared_graph
        self.embed = nn.Linear(1 + KEYS + VALUES, DIM)
        self.blocks = nn.ModuleList(make_block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VALUES)

    def forward(self, data):
        h = self.embed(data.x)
        extra = {"graph": gatattn.build_graph(ptr=data.ptr)} if self.shared_graph else {}
        for block in self.blocks:
            h = block(h, data.edge_index, data.batch, **extra)
        return self.head(h[data.ptr[:-1]])  # read out at each graph's query node


def models() -> dict[str, GraphGPS]:
    """Three models; the two GraphGPS ones hold the same weights."""
    torch.manual_seed(0)
    pyg = GraphGPS(lambda: PyGGPSConv(DIM, gin(DIM), heads=HEADS))
    ours = GraphGPS(lambda: GPSConv(DIM, gin(DIM), heads=HEADS), shared_graph=True)
    ours.load_state_dict(pyg.state_dict())
    return {"GraphGPS, gatattn.GPSConv": ours, "GraphGPS, PyG GPSConv": pyg,
            "GINConv only (3 hops)": GraphGPS(lambda: LocalBlock(DIM))}


def accuracy(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = [(model(b).argmax(1) == b.y).float() for b in loader]
    return float(torch.cat(hits).mean())


def train(model, train_set, test_loader, epochs: int, name: str) -> tuple[list[float], float]:
    """Test accuracy after each epoch and the median training time per epoch (seconds)."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    # The same shuffling for every model, so that the two GraphGPS runs see the same batches.
    loader = DataLoader(train_set, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    curve, seconds = [], []
    for _ in tqdm(range(epochs), desc=name, unit="epoch"):
        model.train()
        start = time.perf_counter()
        for batch in loader:
            opt.zero_grad()
            F.cross_entropy(model(batch), batch.y).backward()
            opt.step()
        seconds.append(time.perf_counter() - start)
        curve.append(accuracy(model, test_loader))
    return curve, statistics.median(seconds)


def output_difference(a: GraphGPS, b: GraphGPS, loader) -> float:
    a.eval(), b.eval()
    batch = next(iter(loader))
    with torch.no_grad():
        return float((a(batch) - b(batch)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="few graphs, two epochs")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    n_train, n_test, epochs = (16, 16, 2) if args.smoke else (2000, 500, 10)
    train_set = dataset(n_train, 0)
    test_loader = DataLoader(dataset(n_test, 1), batch_size=256)

    nets = models()
    ours, pyg = nets["GraphGPS, gatattn.GPSConv"], nets["GraphGPS, PyG GPSConv"]
    diff_at_start = output_difference(ours, pyg, test_loader)
    results = {name: train(model, train_set, test_loader, epochs, name)
               for name, model in nets.items()}

    print(f"\nKey-value retrieval on cycles of {SIZES[0]}-{SIZES[1] - 1} nodes (answer >= "
          f"{MIN_HOPS} hops away), {LAYERS} layers of {DIM} channels, {n_train} training graphs, "
          f"{epochs} epochs; chance = {1 / VALUES:.2f}")
    print("| model | final test accuracy | best test accuracy | s / epoch (median) |")
    print("|---|---|---|---|")
    for name, (curve, seconds) in results.items():
        print(f"| {name} | {curve[-1]:.3f} | {max(curve):.3f} | {seconds:.2f} |")
    print(f"\nlargest logit difference between the two GraphGPS models before training: "
          f"{diff_at_start:.1e}; after training: {output_difference(ours, pyg, test_loader):.1e}")
    path = plot(results, epochs, args.smoke)
    print(f"plot: {path.resolve()}")


def plot(results, epochs: int, smoke: bool):
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=(3, 2))
    for (name, (curve, _)), style in zip(results.items(), ("o-", "x--", "s-"), strict=True):
        ax.plot(range(1, epochs + 1), curve, style, label=name)
    ax.axhline(1 / VALUES, color="grey", ls=":", label="chance")
    ax.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02),
           title="long-range key-value retrieval")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = list(results)
    bars.barh(names, [results[n][1] for n in names], color=["C0", "C1", "C2"])
    bars.set(xlabel="seconds per training epoch (median)", title="training time")
    bars.invert_yaxis()
    fig.tight_layout()
    path = _smoke.output_path("graphgps.png", smoke)
    _smoke.savefig(fig, path)
    return path


if __name__ == "__main__":
    main()
