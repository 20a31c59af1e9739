"""A small Vision Transformer on scikit-learn's digits: an image is a complete graph of patches.

Each 8x8 digit is cut into sixteen 2x2 patches; the patches and a class token are the nodes of
one complete graph (a batch of images is a batch of graphs, given by ``ptr``). Attention alone
cannot tell where a patch sits, so learned positional embeddings are added. The plot shows, for
test digits, how the class token attends to the patches in the last layer.

Run: python examples/vit_digits.py [--smoke] [--threads N]
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
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gatattn import SelfAttentionConv  # noqa: E402

PATCH, SIDE = 2, 8
TOKENS = (SIDE // PATCH) ** 2 + 1  # 16 patches and the class token


def patches(images):  # (B, 8, 8) -> (B, 16, 4), row-major patch order
    p = images.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # (B, 4, 4, 2, 2)
    return p.reshape(images.size(0), -1, PATCH * PATCH)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = SelfAttentionConv(dim, dim // heads, heads=heads, root_weight=False,
                                      out_proj=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, h, ptr, weights: bool = False):
        out = self.attn(self.norm1(h), ptr=ptr, return_attention_weights=True if weights else None)
        out, alpha = out if weights else (out, None)
        h = h + out
        return h + self.mlp(self.norm2(h)), alpha


class ViT(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 3, heads: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(PATCH * PATCH, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, TOKENS, dim))  # breaks the symmetry
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images, return_attention: bool = False):
        B = images.size(0)
        h = torch.cat([self.cls.expand(B, -1, -1), self.embed(patches(images))], 1) + self.pos
        h = h.reshape(B * TOKENS, -1)  # (B * 17, D): one complete graph per image
        ptr = torch.arange(0, B * TOKENS + 1, TOKENS)
        alpha = None
        for i, block in enumerate(self.blocks):
            h, alpha = block(h, ptr, weights=return_attention and i == len(self.blocks) - 1)
        logits = self.head(self.norm(h[ptr[:-1]]))  # the class tokens
        return (logits, alpha) if return_attention else logits


def cls_attention(model, images):  # (B, 8, 8) -> (B, 4, 4) class-token attention, mean of heads
    with torch.no_grad():
        _, (edge_index, alpha) = model(images, return_attention=True)
    src, dst = edge_index
    from_cls = (dst % TOKENS == 0) & (src % TOKENS != 0)
    weights = alpha[from_cls].mean(1).view(images.size(0), TOKENS - 1)
    return weights.view(-1, SIDE // PATCH, SIDE // PATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two epochs")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    epochs = 2 if args.smoke else 40
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=0,
                                           stratify=digits.target)
    x_train, y_train, x_test, y_test = x[idx_train], y[idx_train], x[idx_test], y[idx_test]

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ViT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * -(-len(y_train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc="ViT", unit="epoch"):
        model.train()
        for batch in torch.randperm(len(y_train), generator=gen).split(64):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_acc = float((model(x_train).argmax(1) == y_train).float().mean())
        test_acc = float((model(x_test).argmax(1) == y_test).float().mean())

    params = sum(p.numel() for p in model.parameters())
    print(f"\nViT on sklearn digits: {len(y_train)} train / {len(y_test)} test images, 16 patches "
          f"of 2x2 + class token, {params:,} parameters, {epochs} epochs in {seconds:.0f} s")
    print("| split | accuracy |\n|---|---|")
    print(f"| train | {train_acc:.3f} |\n| test | {test_acc:.3f} |")

    shown = x_test[:8]
    maps = cls_attention(model, shown)
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
    for i in range(8):
        axes[0, i].imshow(shown[i], cmap="gray_r")
        axes[0, i].set_title(f"label {int(y_test[i])}")
        axes[1, i].imshow(shown[i], cmap="gray_r")
        axes[1, i].imshow(maps[i].repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1),
                          cmap="magma", alpha=0.6)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"ViT on digits (test accuracy {test_acc:.3f}): class-token attention over "
                 "patches, last layer (bottom)")
    fig.tight_layout()
    path = _smoke.output_path("vit_digits.png", args.smoke)
    _smoke.savefig(fig, path)
    print(f"\nplot: {path.resolve()}")


if __name__ == "__main__":
    main()
