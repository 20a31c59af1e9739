"""The seed text's claims about self-attention, each turned into a measurement with this library.

Every function measures one claim and returns plain numbers; ``examples/seed_claims.py`` prints
them as a table and ``tests/test_claims.py`` asserts that each claim holds. Nothing here is
timed in a test: only :func:`scaling` reads a clock, and its memory figures count bytes.
"""

from __future__ import annotations

import functools
import math
import time
import weakref

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gatattn.conv import SelfAttentionConv
from gatattn.convert import mask_to_edge_index
from gatattn.functional import attention
from gatattn.positional import sinusoidal_encoding


def permutation_equivariance(n: int = 16, features: int = 8, heads: int = 2,
                             seed: int = 0) -> dict[str, float]:
    """``max |f(P x) - P f(x)|`` for a random permutation ``P``, without and with sinusoidal
    positional encodings added to the input (a position belongs to a slot, not to a node, so
    it does not move with the node)."""
    torch.manual_seed(seed)
    conv = SelfAttentionConv(features, features // heads, heads=heads, root_weight=False).eval()
    x = torch.randn(n, features)
    perm = torch.randperm(n)
    while n > 1 and bool((perm == torch.arange(n)).all()):
        perm = torch.randperm(n)
    pe = sinusoidal_encoding(torch.arange(n), features)
    with torch.no_grad():
        plain = (conv(x[perm]) - conv(x)[perm]).abs().max()
        encoded = (conv(x[perm] + pe) - conv(x + pe)[perm]).abs().max()
    return {"plain": float(plain), "with_positions": float(encoded)}


def complete_graph_equivalence(n: int = 64, heads: int = 4, channels: int = 16,
                               seed: int = 0) -> float:
    """Max abs difference between fused dense attention (no edges at all) and message passing
    over the ``n * n`` explicit edges of the complete graph, in float32."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(n, heads, channels) for _ in range(3))
    edge_index = mask_to_edge_index(torch.ones(n, n, dtype=torch.bool))
    dense = attention(q, k, v, backend="sdpa")
    messages = attention(q, k, v, edge_index=edge_index, backend="sparse")
    return float((dense - messages).abs().max())


class _PeakTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage created by ATen ops while active, and their peak.

    Storages that alias an input (views) are not new memory and are skipped; a storage leaves
    the count when the last tensor using it dies. Scratch buffers inside one fused kernel are
    not tensors and are not seen: that is the point of a fused kernel.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._users: dict[int, list[int]] = {}  # data_ptr -> [tensors alive, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _strided(tree_flatten((args, kwargs)))}
        for t in _strided(tree_flatten(out)):
            self._track(t, inputs)
        return out

    def _track(self, t: Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or (ptr in inputs and ptr not in self._users):  # empty, or a view of input
            return
        if ptr not in self._users:
            self._users[ptr] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._users[ptr][0] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._users[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._users[ptr]


def _strided(flat) -> list[Tensor]:
    # A sparse tensor owns no storage of its own: its index and value tensors are counted
    # when the ops that make them run.
    return [t for t in flat[0] if isinstance(t, Tensor) and t.layout == torch.strided]


def peak_tensor_bytes(fn) -> int:
    """Peak bytes of tensors that ``fn()`` creates and holds at once (its result included)."""
    with _PeakTensorBytes() as meter:
        result = fn()
    del result
    return meter.peak


def naive_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Textbook attention: forms the ``(H, n, n)`` score and weight matrices in memory."""
    scores = torch.einsum("ihc,jhc->hij", q, k) * q.size(-1) ** -0.5  # (H, n, n)
    return torch.einsum("hij,jhc->ihc", scores.softmax(dim=-1), v)  # (n, H, C)


def fit_exponent(sizes, values) -> float:
    """Slope of ``log(values)`` against ``log(sizes)``: ``values ~ sizes ** slope``."""
    logs = torch.tensor([[math.log(s), math.log(v)] for s, v in zip(sizes, values, strict=True)],
                        dtype=torch.float64)
    x, y = logs[:, 0] - logs[:, 0].mean(), logs[:, 1] - logs[:, 1].mean()
    return float((x * y).sum() / (x * x).sum())


def scaling(sizes, heads: int = 2, channels: int = 32, reps: int = 3,
            timed: bool = True) -> dict[str, dict[str, list[float]]]:
    """Median wall time (s) and peak tensor bytes of naive dense attention and of the library's
    fused route (``backend="sdpa"``, no edges) for each ``n`` in ``sizes``."""
    routes = {"naive": naive_attention,
              "fused": lambda q, k, v: attention(q, k, v, backend="sdpa")}
    result = {name: {"seconds": [], "bytes": []} for name in routes}
    for n in sizes:
        q, k, v = (torch.randn(n, heads, channels) for _ in range(3))
        for name, route in routes.items():
            call = functools.partial(route, q, k, v)
            with torch.no_grad():
                result[name]["bytes"].append(peak_tensor_bytes(call))
                result[name]["seconds"].append(_median_seconds(call, reps) if timed
                                               else float("nan"))
    return result


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: first calls pay for allocation and dispatch caches
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def head_average_variance(heads_list=(1, 2, 4, 8), n: int = 8, features: int = 16,
                          channels: int = 8, trials: int = 400, seed: int = 0) -> list[float]:
    """Variance, over ``trials`` random weight draws, of the mean over ``h`` heads of a
    ``SelfAttentionConv`` (what ``concat=False`` returns) on one fixed input, for each ``h``.
    Heads have independent weights, so the claim is ``var(h) = var(1) / h``.

    All draws come from one wide layer of ``h * trials`` heads: the default initialisation
    depends on the input size only, so each group of ``h`` heads is one fresh draw."""
    torch.manual_seed(seed)
    x = torch.randn(n, features)
    variances = []
    for h in heads_list:
        torch.manual_seed(seed + h)
        conv = SelfAttentionConv(features, channels, heads=h * trials, root_weight=False).eval()
        with torch.no_grad():
            out = conv(x).view(n, trials, h, channels).mean(dim=2)  # each trial: h heads averaged
        variances.append(float(out.var(dim=1).mean()))
    return variances


def score_gradient(n: int, *, causal: bool = False, temperature: float = 1.0,
                   seed: int = 0) -> Tensor:
    """``dL/dS`` for the raw score matrix ``S`` (``n x n``) of one attention call through the
    library's fused route, with ``L`` a random linear function of the output.

    ``S`` is made a leaf: with one-hot queries ``q_i = e_i`` and keys ``k_j = S[:, j]`` the
    logits ``<q_i, k_j>`` are exactly ``S[i, j]`` (scale 1).
    """
    torch.manual_seed(seed)
    scores = torch.randn(n, n, dtype=torch.float64, requires_grad=True)
    q = torch.eye(n, dtype=torch.float64).unsqueeze(1)  # (n, 1, n)
    k = scores.t().unsqueeze(1)  # (n, 1, n)
    v = torch.randn(n, 1, 4, dtype=torch.float64)
    out = attention(q, k, v, causal=causal, scale=1.0, temperature=temperature, backend="sdpa")
    (out * torch.randn_like(out)).sum().backward()
    return scores.grad


def attention_entropy(n: int, temperature: float, seed: int = 0) -> float:
    """Mean entropy (nats) of the attention rows for random ``N(0, 1)`` scores at temperature
    ``tau``. The weights are read off the output: with one-hot values ``v_j = e_j`` the output
    row ``o_i`` is the weight row ``a_i``."""
    torch.manual_seed(seed)
    scores = torch.randn(n, n, dtype=torch.float64)
    q = torch.eye(n, dtype=torch.float64).unsqueeze(1)
    weights = attention(q, scores.t().unsqueeze(1), q, scale=1.0, temperature=temperature,
                        backend="sdpa").squeeze(1)  # (n, n) = softmax(S / tau)
    return float(-(weights * weights.clamp_min(1e-300).log()).sum(dim=1).mean())


def temperature_sweep(temperatures, n: int = 16, seed: int = 0) -> dict[str, list[float]]:
    """Entropy of the attention rows and ``||dL/dS||`` across temperatures."""
    return {
        "entropy": [attention_entropy(n, t, seed) for t in temperatures],
        "grad_norm": [float(score_gradient(n, temperature=t, seed=seed).norm())
                      for t in temperatures],
    }


def gradient_by_distance(length: int = 64, features: int = 16, cnn_layers: int = 3,
                         kernel_size: int = 3, seed: int = 0) -> dict[str, list[float]]:
    """``||d y_T / d x_{T-L}||`` for ``L = 0 .. length-1`` (``T`` the last step, ``y_T`` taken
    along a random direction) for one causal attention layer, a tanh RNN and a stack of causal
    convolutions, all at their default initialisation. Float64, so that the RNN's decay is
    seen far before it underflows."""
    torch.manual_seed(seed)
    conv = SelfAttentionConv(features, features, root_weight=False).double()
    rnn = nn.RNN(features, features, batch_first=True).double()
    cnn = nn.Sequential(*[nn.Conv1d(features, features, kernel_size)
                          for _ in range(cnn_layers)]).double()
    pad = (kernel_size - 1) * cnn_layers  # left padding only: y_t sees x_{<= t}

    models = {
        "attention": lambda x: conv(x, ptr=torch.tensor([0, length]), causal=True),
        "rnn": lambda x: rnn(x.unsqueeze(0))[0][0],
        "cnn": lambda x: cnn(nn.functional.pad(x.t(), (pad, 0)).unsqueeze(0))[0].t(),
    }
    x = torch.randn(length, features, dtype=torch.float64)
    direction = torch.randn(features, dtype=torch.float64)
    norms = {}
    for name, model in models.items():
        xg = x.clone().requires_grad_(True)
        (model(xg)[-1] @ direction).backward()
        norms[name] = xg.grad.norm(dim=1).flip(0).tolist()  # index L: distance from the end
    return norms
