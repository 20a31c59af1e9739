"""Physics: attention over the complete graph of particles predicts their accelerations.

Eight particles in the plane, each with a stiffness s_i, are joined pairwise by springs of
stiffness s_i * s_j (Hooke's law, rest length 0, unit mass): a_i = sum_j s_i s_j (x_j - x_i).
A two-layer SelfAttentionConv model reads each particle's stiffness and, on every edge of the
complete graph, the relative position x_j - x_i. An MLP on the flattened system is the
baseline. Then the particles are shuffled: the attention model's predictions are shuffled the
same way and nothing else changes; the MLP's change.

Run: python examples/nbody_springs.py [--smoke] [--threads N]
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
from tqdm import tqdm  # noqa: E402

import gatattn  # noqa: E402
from gatattn import SelfAttentionConv  # noqa: E402

N = 8  # particles per system


def systems(count: int, gen: torch.Generator):
    """Positions ``(count, N, 2)``, stiffness ``(count, N, 1)``, accelerations ``(count, N, 2)``."""
    pos = torch.rand(count, N, 2, generator=gen) * 2 - 1
    stiff = torch.rand(count, N, 1, generator=gen) + 0.5
    pull = pos.unsqueeze(1) - pos.unsqueeze(2)  # (count, i, j, 2): x_j - x_i
    acc = stiff * (stiff.transpose(1, 2).unsqueeze(-1) * pull).sum(2)
    return pos, stiff, acc


def complete_edges(count: int) -> torch.Tensor:
    """Every ordered pair j -> i (i != j) inside each system, systems numbered in order."""
    one = gatattn.mask_to_edge_index(~torch.eye(N, dtype=torch.bool))
    return torch.cat([one + N * b for b in range(count)], 1)


class AttentionModel(nn.Module):
    """Sees stiffness per node and relative positions per edge: equivariant by construction."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(1, dim)
        self.convs = nn.ModuleList(
            SelfAttentionConv(dim, dim // heads, heads=heads, edge_dim=2, root_weight=True)
            for _ in range(2))
        self.head = nn.Sequential(nn.Linear(dim + 1, dim), nn.GELU(), nn.Linear(dim, 2))

    def forward(self, pos, stiff):  # (B, N, 2), (B, N, 1) -> (B, N, 2)
        B = pos.size(0)
        edge_index = complete_edges(B)
        flat_pos, s = pos.reshape(-1, 2), stiff.reshape(-1, 1)
        rel = flat_pos[edge_index[0]] - flat_pos[edge_index[1]]  # x_j - x_i per edge
        h = self.embed(s)
        for conv in self.convs:
            h = F.gelu(conv(h, edge_index, rel))
        return self.head(torch.cat([h, s], 1)).view(B, N, 2)


class MLPModel(nn.Module):
    """The whole system flattened in particle order: knows nothing of the symmetry."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * N, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 2 * N))

    def forward(self, pos, stiff):
        return self.net(torch.cat([pos, stiff], 2).flatten(1)).view(-1, N, 2)


def r_squared(pred, target) -> float:
    return float(1 - (pred - target).pow(2).sum() / (target - target.mean((0, 1))).pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="few systems, two epochs")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    n_train, epochs = (256, 2) if args.smoke else (4000, 40)
    gen = torch.Generator().manual_seed(0)
    train, test = systems(n_train, gen), systems(1000, gen)
    scale = train[2].std()  # targets in units of their spread

    rows, preds, moved = [], {}, {}
    for name, model in (("attention (gatattn)", AttentionModel()), ("MLP", MLPModel())):
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in tqdm(range(epochs), desc=name, unit="epoch"):
            model.train()
            for idx in torch.randperm(n_train, generator=gen).split(64):
                loss = F.mse_loss(model(train[0][idx], train[1][idx]), train[2][idx] / scale)
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        model.eval()
        perm = torch.randperm(N, generator=gen)
        pos, stiff, acc = test
        with torch.no_grad():
            pred = model(pos, stiff) * scale
            shuffled = model(pos[:, perm], stiff[:, perm]) * scale  # f(P x)
        preds[name], moved[name] = pred, (pred[:, perm], shuffled)  # P f(x) against f(P x)
        rows.append((name, sum(p.numel() for p in model.parameters()), r_squared(pred, acc),
                     float((shuffled - pred[:, perm]).abs().max())))

    print(f"\nSprings between {N} particles, {n_train} training systems, 1000 test systems")
    print("| model | parameters | test R^2 | max abs change when particles are shuffled, "
          "beyond the shuffle |\n|---|---|---|---|")
    for name, params, r2, change in rows:
        print(f"| {name} | {params:,} | {r2:.3f} | {change:.1e} |")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    pos, _, acc = test
    ax = axes[0]
    arrow = float(acc[0].norm(dim=1).max()) / 0.4  # longest arrow 0.4 units long
    ax.scatter(pos[0, :, 0], pos[0, :, 1], c="black", zorder=3)
    for label, a, color, width in (
            ("true", acc[0], "grey", 0.014),
            ("attention (gatattn)", preds["attention (gatattn)"][0], "tab:blue", 0.005)):
        ax.quiver(pos[0, :, 0], pos[0, :, 1], a[:, 0], a[:, 1], color=color, label=label,
                  angles="xy", scale_units="xy", scale=arrow, width=width)
    ax.set(title="one test system: accelerations", aspect="equal")
    ax.legend()
    ax = axes[1]
    bins = torch.logspace(-9, 1, 41)
    for name, (permuted, shuffled) in moved.items():
        change = (shuffled - permuted).abs().flatten().clamp_min(1e-9)
        ax.hist(change, bins=bins, alpha=0.7, label=name)
    ax.set(xscale="log", xlabel="|f(P x) - P f(x)| per component (exact zeros at 1e-9)",
           ylabel="count", title="shuffled particles: change beyond the shuffle")
    ax.legend()
    fig.tight_layout()
    path = _smoke.output_path("nbody_springs.png", args.smoke)
    _smoke.savefig(fig, path)
    print(f"\nplot: {path.resolve()}")


if __name__ == "__main__":
    main()
