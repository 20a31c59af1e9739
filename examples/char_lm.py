"""A character-level language model on causal complete graphs, against a GRU of similar size.

The text comes from a small English grammar (generated here, so nothing is downloaded and no
licence applies). Its one hard rule is agreement across a relative clause: in "the dog that
the cats see runs", "runs" agrees with "dog", words away. Each training window of characters is
one causal graph (node i attends to nodes j <= i); a batch of windows is a batch of graphs
given by ``ptr``. Both models see the same windows for the same number of steps.

Run: python examples/char_lm.py [--smoke]
"""

from __future__ import annotations

import argparse
import math
import random

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import _smoke  # noqa: E402  (examples/_smoke.py, beside this script)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import gatattn  # noqa: E402
from gatattn import SelfAttentionConv  # noqa: E402

NOUNS = {"sg": ["dog", "cat", "bird", "child", "robot"],
         "pl": ["dogs", "cats", "birds", "children", "robots"]}
VERBS = {"sg": ["runs", "sleeps", "sings", "waits"], "pl": ["run", "sleep", "sing", "wait"]}
TRANSITIVE = {"sg": ["sees", "likes", "follows"], "pl": ["see", "like", "follow"]}


def sentence(rng: random.Random) -> str:
    """``the N [that the N' V'] V.``: the last verb agrees with the first noun."""
    number = rng.choice(["sg", "pl"])
    words = ["the", rng.choice(NOUNS[number])]
    if rng.random() < 0.6:
        inner = rng.choice(["sg", "pl"])
        words += ["that", "the", rng.choice(NOUNS[inner]), rng.choice(TRANSITIVE[inner])]
    words.append(rng.choice(VERBS[number]))
    return " ".join(words) + ". "


def corpus(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    text = ""
    while len(text) < chars:
        text += sentence(rng)
    return text


class CausalTransformer(nn.Module):
    """Pre-norm blocks of causal self-attention (SelfAttentionConv) and a feed-forward."""

    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.register_buffer("positions", gatattn.sinusoidal_encoding(torch.arange(context), dim))
        self.attn = nn.ModuleList(
            SelfAttentionConv(dim, dim // heads, heads=heads, root_weight=False, out_proj=True)
            for _ in range(layers))
        self.ff = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                              nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers + 1))
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):  # (B, L) -> (B, L, vocab)
        h = self.embed(tokens) + self.positions[: tokens.size(1)]  # (B, L, D)
        h, ptr = gatattn.sequences_to_graph(h)  # (B * L, D): one causal graph per window
        for i, (attn, ff) in enumerate(zip(self.attn, self.ff, strict=True)):
            h = h + attn(self.norms[2 * i](h), ptr=ptr, causal=True)
            h = h + ff(self.norms[2 * i + 1](h))
        return self.out(self.norms[-1](h)).view(*tokens.shape, -1)


class GRUModel(nn.Module):
    def __init__(self, vocab: int, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.out(self.gru(self.embed(tokens))[0])


def windows(data: torch.Tensor, batch: int, context: int, gen: torch.Generator):
    start = torch.randint(len(data) - context - 1, (batch, 1), generator=gen)
    idx = start + torch.arange(context + 1)
    return data[idx[:, :-1]], data[idx[:, 1:]]


def bits_per_char(model, data, context: int) -> float:
    model.eval()
    usable = (len(data) - 1) // context * context
    x = data[:usable].view(-1, context)
    y = data[1:usable + 1].view(-1, context)
    with torch.no_grad():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    return float(loss) / math.log(2)


def agreement_accuracy(model, stoi, context: int, trials: int, seed: int) -> float:
    """Share of fresh sentences with a relative clause in which the model gives the main verb
    the number of the first noun: fed "the N that the N' V' run", does it rank "s" (making
    "runs", singular) above "." (leaving "run", plural) exactly when N is singular?"""
    rng = random.Random(seed)
    hits = 0
    for _ in range(trials):
        number, inner = rng.choice(["sg", "pl"]), rng.choice(["sg", "pl"])
        verb = rng.choice(range(len(VERBS["sg"])))
        prefix = (f"the {rng.choice(NOUNS[number])} that the {rng.choice(NOUNS[inner])} "
                  f"{rng.choice(TRANSITIVE[inner])} {VERBS['pl'][verb]}")
        tokens = torch.tensor([[stoi[c] for c in prefix[-context:]]])
        with torch.no_grad():
            probs = model(tokens)[0, -1].softmax(-1)
        says_singular = probs[stoi["s"]] > probs[stoi["."]]
        hits += int(says_singular == (number == "sg"))
    return hits / trials


def sample(model, stoi, itos, prompt: str, length: int, context: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    tokens = [stoi[c] for c in prompt]
    model.eval()
    with torch.no_grad():
        for _ in range(length):
            logits = model(torch.tensor([tokens[-context:]]))[0, -1]
            tokens.append(int(torch.multinomial((logits / 0.8).softmax(-1), 1, generator=gen)))
    return "".join(itos[t] for t in tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps")
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    steps, context, batch = (20, 32, 16) if args.smoke else (800, 64, 32)
    text = corpus(200_000, seed=0)
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text])
    train, valid = data[: int(0.9 * len(data))], data[int(0.9 * len(data)):]

    models = {"causal attention (gatattn)": CausalTransformer(len(itos), context=context),
              "GRU": GRUModel(len(itos))}
    curves, rows = {}, []
    for name, model in models.items():
        torch.manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        curves[name] = []
        for _ in tqdm(range(steps), desc=name, unit="step"):
            model.train()
            x, y = windows(train, batch, context, gen)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            curves[name].append(loss.item() / math.log(2))
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, params, bits_per_char(model, valid, context),
                     agreement_accuracy(model, stoi, context, 20 if args.smoke else 200, 1)))

    print(f"\nGrammar text, {len(text):,} characters, vocabulary {len(itos)}, context {context}, "
          f"{steps} steps of {batch} windows")
    print("| model | parameters | validation bits/char | agreement across clause |")
    print("|---|---|---|---|")
    for name, params, bpc, agree in rows:
        print(f"| {name} | {params:,} | {bpc:.3f} | {agree:.2f} |")
    for name, model in models.items():
        print(f"\n{name} sample: {sample(model, stoi, itos, 'the ', 120, context, 0)!r}")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        smooth = torch.tensor(curve).unfold(0, min(20, steps), 1).mean(1)
        ax.plot(range(len(smooth)), smooth, label=name)
    ax.set(xlabel="step", ylabel="training bits / char (running mean)",
           title="Character LM on grammar text")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = _smoke.output_path("char_lm.png", args.smoke)
    _smoke.savefig(fig, path)
    print(f"\nplot: {path.resolve()}")


if __name__ == "__main__":
    main()
