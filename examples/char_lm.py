"""A character-level language model on causal complete graphs, against a GRU of similar size.

The text comes from a small English grammar (generated here, so nothing is downloaded and no
licence applies). Its one hard rule is agreement across a relative clause: in "the dog that
the cats see runs", "runs" agrees with "dog", words away. Each training window of characters is
one causal graph (node i attends to nodes j <= i); a batch of windows is a batch of graphs
given by ``ptr``, built once per batch (``gatattn.build_graph``) and passed to every layer as
``graph=``. A third model attends only to the last 8 characters (a sliding window,
``window=(8, 0)``, as Mistral-style models do over longer spans): too short for the agreement,
which spans more than 8 characters. All models see the same windows for the same number of
steps.

Generation then continues a batch of prompts of different lengths, greedily, each sequence
stopping at its own length: once rerunning the model on every whole prefix at each step, once
with a key/value cache (``gatattn.kv_cache``) so each step attends one new token per sequence to
the cached keys and values. Both must give the same text; the script reports tokens/s of each.

Run: python examples/char_lm.py [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
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
from tqdm import tqdm  # noqa: E402

import gatattn  # noqa: E402
from gatattn import SelfAttentionConv  # noqa: E402
from gatattn.kv_cache import KVCache, cached_self_attention  # noqa: E402

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
    """Pre-norm blocks of causal self-attention (SelfAttentionConv) and a feed-forward;
    ``window``: each position attends to that many earlier ones and itself only."""

    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 context: int = 64, window: int | None = None):
        super().__init__()
        self.window = window
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
        lengths = [tokens.size(1)] * tokens.size(0)
        return self.forward_packed(tokens.flatten(), lengths).view(*tokens.shape, -1)

    def forward_packed(self, tokens, lengths):  # (sum L_b,) -> (sum L_b, vocab)
        """Sequences of their own lengths, packed: one causal graph each, no padding."""
        ptr = torch.tensor([0, *lengths]).cumsum(0)
        window = None if self.window is None else (self.window, 0)
        graph = gatattn.build_graph(ptr=ptr, causal=True, window=window)  # once, every layer
        h = self.embed_tokens(tokens, torch.cat([torch.arange(n) for n in lengths]))
        for i, (attn, ff) in enumerate(zip(self.attn, self.ff, strict=True)):
            h = h + attn(self.norms[2 * i](h), graph=graph)
            h = h + ff(self.norms[2 * i + 1](h))
        return self.out(self.norms[-1](h))

    def forward_cached(self, tokens, cache: KVCache):  # (new rows,) -> (new rows, vocab)
        """The open step's new tokens (rows ordered by sequence), attending to ``cache`` (whose
        step graph, built by the first layer, serves every layer)."""
        h = self.embed_tokens(tokens, cache.new_positions)
        for i, (attn, ff) in enumerate(zip(self.attn, self.ff, strict=True)):
            h = h + cached_self_attention(attn, self.norms[2 * i](h), cache, i)
            h = h + ff(self.norms[2 * i + 1](h))
        return self.out(self.norms[-1](h))

    def embed_tokens(self, tokens, positions):  # (N,), (N,) -> (N, D)
        if positions.numel() and int(positions.max()) >= len(self.positions):
            raise ValueError(f"position {int(positions.max())} is beyond the context of "
                             f"{len(self.positions)} the model was built for")
        return self.embed(tokens) + self.positions[positions]


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


def generate(model, stoi, itos, prompts, length: int, full_stops: int | None, use_cache: bool):
    """Greedy continuations of ``prompts``, each stopping at ``length`` characters or at its
    ``full_stops``-th full stop, so sequences grow to their own lengths. Returns the texts, the
    seconds spent and the number of tokens generated."""
    sequences = [[stoi[c] for c in prompt] for prompt in prompts]
    active = list(range(len(prompts)))

    def finished(b):
        new = sequences[b][len(prompts[b]):]
        return len(sequences[b]) >= length or (full_stops and new.count(stoi["."]) >= full_stops)

    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        cache = KVCache(len(model.attn)) if use_cache else None
        logits = next_token_logits(model, sequences, active, cache)
        while active:
            for row, b in enumerate(active):
                sequences[b].append(int(logits[row].argmax()))
            active = [b for b in active if not finished(b)]
            if active:
                logits = next_token_logits(model, sequences, active, cache)
        seconds = time.perf_counter() - start
    new_tokens = sum(len(s) - len(p) for s, p in zip(sequences, prompts, strict=True))
    return ["".join(itos[t] for t in s) for s in sequences], seconds, new_tokens


def next_token_logits(model, sequences, active, cache):
    """Logits of the next token of each active sequence: from the cache (prefill first), or by
    rerunning the model on each whole active sequence."""
    if cache is None:
        lengths = [len(sequences[b]) for b in active]
        tokens = torch.tensor([t for b in active for t in sequences[b]])
        return model.forward_packed(tokens, lengths)[torch.tensor(lengths).cumsum(0) - 1]
    if not cache.lengths:
        lengths = [len(s) for s in sequences]
        cache.start_prefill(lengths)
        tokens = torch.tensor([t for s in sequences for t in s])
        return model.forward_cached(tokens, cache)[torch.tensor(lengths).cumsum(0) - 1]
    is_active = set(active)
    cache.start_step([b in is_active for b in range(len(sequences))])
    return model.forward_cached(torch.tensor([sequences[b][-1] for b in active]), cache)


PROMPTS = ["the ", "the dog ", "the cats that ", "the robots that the ", "t", "the bird that ",
           "the cat sleeps. the ", "the children "]  # shorter than the smoke run's context


def compare_generation(model, stoi, itos, length: int, full_stops: int | None, reps: int):
    """Cached and uncached generation of :data:`PROMPTS`: the same texts in every run (asserted)
    and the median tokens/s of each over ``reps`` alternating runs."""
    texts, speeds = {}, {False: [], True: []}
    for _ in range(reps):
        for use_cache in (False, True):
            texts[use_cache], seconds, new_tokens = generate(model, stoi, itos, PROMPTS, length,
                                                             full_stops, use_cache)
            speeds[use_cache].append(new_tokens / seconds)
        assert texts[True] == texts[False], (
            f"cached generation differs from rerunning the model:\n{texts[True]}\n"
            f"{texts[False]}")
    return texts[True], new_tokens, [statistics.median(speeds[c]) for c in (False, True)]


def with_context(model: CausalTransformer, context: int) -> CausalTransformer:
    """``model`` with sinusoidal positions up to ``context``: past its training context its text
    means nothing, but each token costs what it costs the model."""
    longer = copy.deepcopy(model)
    longer.positions = gatattn.sinusoidal_encoding(torch.arange(context), model.positions.size(1))
    return longer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps")
    _threads.add_option(parser)
    args = parser.parse_args()
    _smoke.announce(args.smoke)
    _threads.apply(args.threads)
    steps, context, batch = (20, 32, 16) if args.smoke else (800, 64, 32)
    text = corpus(200_000, seed=0)
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text])
    train, valid = data[: int(0.9 * len(data))], data[int(0.9 * len(data)):]

    models = {"causal attention (gatattn)": CausalTransformer(len(itos), context=context),
              "GRU": GRUModel(len(itos)),
              "sliding window of 8 (gatattn)": CausalTransformer(len(itos), context=context,
                                                                 window=8)}
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

    model = models["causal attention (gatattn)"]
    long_context = 4 * context
    texts, _, speed = compare_generation(model, stoi, itos, context, 1, 1 if args.smoke else 5)
    _, long_tokens, long_speed = compare_generation(with_context(model, long_context), stoi, itos,
                                                    long_context, None, 1 if args.smoke else 3)
    print(f"\nGreedy generation from {len(PROMPTS)} prompts, each until its first full stop or "
          f"{context} characters (the same text with and without the KV cache, checked):")
    for text in texts:
        print(f"  {len(text):2d} chars: {text!r}")
    print("| generation | tokens | tokens/s, rerunning the model | tokens/s, KV cache | ratio |")
    print("|---|---|---|---|---|")
    rows = [(f"to a full stop, context {context}", sum(map(len, texts)) - sum(map(len, PROMPTS)),
             speed),
            (f"to {long_context} chars (past the training context)", long_tokens, long_speed)]
    for name, tokens, (plain, cached) in rows:
        print(f"| {name} | {tokens} | {plain:,.0f} | {cached:,.0f} | {cached / plain:.1f}x |")

    fig, (ax, ax_speed) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=(3, 2))
    for name, curve in curves.items():
        smooth = torch.tensor(curve).unfold(0, min(20, steps), 1).mean(1)
        ax.plot(range(len(smooth)), smooth, label=name)
    ax.set(xlabel="step", ylabel="training bits / char (running mean)",
           title="Character LM on grammar text")
    ax.legend()
    ax.grid(alpha=0.3)
    for offset, (label, column) in enumerate((("rerunning the model", 0), ("KV cache", 1))):
        ax_speed.bar([i + 0.4 * offset for i in range(len(rows))], [r[2][column] for r in rows],
                     width=0.4, label=label)
    ax_speed.set_xticks([i + 0.2 for i in range(len(rows))],
                        [f"context {context}", f"context {long_context}\n(4x training)"])
    ax_speed.set(ylabel="generated tokens / s (median)",
                 title=f"Greedy generation, {len(PROMPTS)} prompts")
    ax_speed.set_ylim(0, 1.3 * max(max(r[2]) for r in rows))  # room for the legend
    ax_speed.legend(loc="upper left")
    fig.tight_layout()
    path = _smoke.output_path("char_lm.png", args.smoke)
    _smoke.savefig(fig, path)
    print(f"\nplot: {path.resolve()}")


if __name__ == "__main__":
    main()
