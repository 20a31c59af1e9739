"""Which route serves ``backend="auto"`` on a GPU: verified first, raced against torch, remembered.

The Triton kernels pass their tests in Triton's interpreter and build for sm_80 / sm_90, but a
given GPU, driver and Triton version can still run them wrong or slow, and nobody would know.
So where they could serve ``auto`` (CUDA, see :mod:`gatattn.backends.routing`), the first
call with a new :class:`RouteKey` (graph kind, bucketed sizes, query and kv heads, head dims,
dtype, whether gradients are needed, the GPU and the versions) decides between the candidate
routes on that call's inputs (grouped-query calls race too: SDPA runs them natively, the
others expand ``k`` and ``v``):

1. each candidate runs: the fused kernels; torch's SDPA per size group and, where it applies,
   torch's ``varlen_attn`` (implicit graphs); the message-passing route (edge sets);
2. each is compared, output and the gradients of ``q, k, v`` when the call needs them, with the
   torch route computed in float32, under the project's tolerance rule
   (:mod:`gatattn.tolerance`; the torch route in the call's own dtype is the low-precision
   reference). A candidate that disagrees or raises is never served for that key, and a
   :class:`RouteRejectedWarning` names ``python -m gatattn.check``;
3. the verified ones are timed (forward, or forward and backward) and the fastest serves.

Choices last for the process, and across processes when the environment variable
``GATATTN_ROUTE_CACHE`` names a JSON file. :func:`route_choices` reports them. With
``GATATTN_AUTOTUNE=0`` nothing is timed: a verified fused kernel serves. Timing, the tuning
switch and the size buckets are the tile tuner's too (:mod:`gatattn.kernels.race`). The
first call of a key thus costs several forward (and backward) passes; later calls none.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gatattn.backends.fused import triton_attention
from gatattn.backends.sdpa import sdpa_attention
from gatattn.backends.sparse import sparse_attention
from gatattn.backends.varlen import varlen_attention, varlen_unavailable_reason
from gatattn.graph import AttentionGraph
from gatattn.kernels.race import (
    Timer,
    autotune_enabled,
    do_bench_ms,
    fastest,
    length_bucket,
    power_of_two_bucket,
)
from gatattn.tolerance import LOW_PRECISION, compare

ROUTE_CACHE_ENV = "GATATTN_ROUTE_CACHE"
_FORMAT = 1  # of the route cache file
Route = Callable[[Tensor, Tensor, Tensor], Tensor]


class RouteRejectedWarning(RuntimeWarning):
    """A fused kernel disagreed with torch (or failed) on this machine and will not serve."""


@dataclass(frozen=True)
class RouteKey:
    """What the fastest route depends on. Lengths are bucketed as the kernels' tuner does."""

    graph: str  # "segments", "causal segments", "window 16/16 segments", ... or "edges"
    lengths: tuple[int, int]  # mean targets and sources per graph (degree for edges), bucketed
    rows: int  # all targets, bucketed: few long graphs and many short ones may race apart
    heads: int
    kv_heads: int  # fewer than heads: grouped-query attention (SDPA native, others expand)
    head_dims: tuple[int, int]
    dtype: str
    grad: bool
    device: str
    versions: str

    def __str__(self) -> str:
        return (f"{self.graph}, lengths ~{self.lengths[0]}/~{self.lengths[1]}, "
                f"~{self.rows} rows, H={self.heads}, H_kv={self.kv_heads}, "
                f"C={self.head_dims[0]}/{self.head_dims[1]}, {self.dtype}, "
                f"{'fwd+bwd' if self.grad else 'fwd'}, {self.device}, {self.versions}")


@dataclass(frozen=True)
class RouteChoice:
    """The route serving ``key``, the verified candidates' times and the rejected ones'
    reasons; ``source`` is ``"measured"`` in this process or ``"disk"``."""

    key: RouteKey
    route: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    source: str = "measured"

    def __str__(self) -> str:
        times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in self.timings_ms.items())
        rejected = "; ".join(f"{name} rejected: {why}" for name, why in self.rejected.items())
        return f"{self.key}: {self.route} ({'; '.join(filter(None, [times, rejected]))})"


class Router:
    """Verifies, races and remembers routes per :class:`RouteKey`."""

    def __init__(self, bench: Timer = do_bench_ms):
        self._bench = bench  # (route name, what to time) -> milliseconds
        self._choices: dict[RouteKey, RouteChoice] = {}
        self._warned: set[str] = set()
        self._disk_path: Path | None = None
        self._disk: dict[str, dict] = {}

    @property
    def choices(self) -> list[RouteChoice]:
        return list(self._choices.values())

    def route(self, q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph,
              scale: float) -> str:
        """The name of the route that serves this call: "triton", "sdpa", "varlen" or
        "sparse"."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        key = route_key(q, v, graph, needs_grad)
        choice = self._choices.get(key)
        if choice is None:
            if not _representative(q, k, v):  # nothing to verify on: decide on a later call
                return "sdpa" if graph.is_implicit else "sparse"
            candidates = candidate_routes(q, v, graph, scale)
            choice = self._from_disk(key, candidates) or self._decide(
                key, candidates, graph, scale, (q, k, v), needs_grad)
            self._choices[key] = choice
        return choice.route

    def _decide(self, key: RouteKey, candidates: dict[str, Route], graph: AttentionGraph,
                scale: float, inputs: tuple[Tensor, Tensor, Tensor],
                needs_grad: bool) -> RouteChoice:
        torch_route = "sdpa" if graph.is_implicit else "sparse"
        rejected = _verify(candidates, torch_route, graph, scale, inputs, needs_grad)
        verified = [name for name in candidates if name not in rejected]
        if autotune_enabled():
            route, timings = fastest({name: _runner(candidates[name], inputs, needs_grad)
                                   for name in verified}, self._bench)
        else:
            timings, route = {}, verified[0]  # the fused kernel first, if verified
        choice = RouteChoice(key, route, timings, rejected)
        self._warn(choice)
        self._to_disk(choice)
        return choice

    def _warn(self, choice: RouteChoice) -> None:
        for name, why in choice.rejected.items():
            if name in self._warned:
                continue
            self._warned.add(name)
            warnings.warn(
                f"gatattn: the {name!r} route disagreed with torch on this machine and will not "
                f"serve backend='auto' for {choice.key} ({why}); {choice.route!r} serves "
                "instead. Run `python -m gatattn.check` to see every route's errors, and "
                "report them.", RouteRejectedWarning, stacklevel=6)

    def _from_disk(self, key: RouteKey, candidates: dict[str, Route]) -> RouteChoice | None:
        entry = self._load_disk().get(str(key))
        if entry is None or entry.get("route") not in candidates:
            return None
        return RouteChoice(key, entry["route"], dict(entry.get("timings_ms", {})),
                           dict(entry.get("rejected", {})), source="disk")

    def _load_disk(self) -> dict[str, dict]:
        path = _disk_path()
        if path != self._disk_path:
            self._disk_path, self._disk = path, _read_cache(path) if path else {}
        return self._disk

    def _to_disk(self, choice: RouteChoice) -> None:
        path = _disk_path()
        if path is None:
            return
        entries = {**_read_cache(path), str(choice.key): {
            "route": choice.route, "timings_ms": choice.timings_ms,
            "rejected": choice.rejected, "key": asdict(choice.key)}}
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps({"format": _FORMAT, "choices": entries}, indent=1))
            os.replace(temporary, path)  # atomic: a reader never sees half a file
        except OSError as error:
            warnings.warn(f"gatattn: could not save route choices to {path}: {error}",
                          RuntimeWarning, stacklevel=4)
        self._disk_path, self._disk = path, entries


def route_key(q: Tensor, v: Tensor, graph: AttentionGraph, needs_grad: bool) -> RouteKey:
    """The key of this call, from sizes the host knows (no device sync)."""
    if graph.is_implicit:
        kind = " ".join(filter(None, [_window_kind(graph),
                                      "causal" if graph.causal else "",
                                      "bottom-right" if graph.bottom_right else "",
                                      "bipartite" if graph.bipartite else "", "segments"]))
        lengths = (length_bucket(graph.num_dst, graph.num_graphs),
                   length_bucket(graph.num_src, graph.num_graphs))
    else:
        kind = "edges"
        lengths = (length_bucket(graph.edge_index.size(1), graph.num_dst),
                   length_bucket(graph.num_src, 1))
    return RouteKey(kind, lengths, power_of_two_bucket(graph.num_dst), q.size(1), v.size(1),
                    (q.size(-1), v.size(-1)), str(q.dtype).removeprefix("torch."), needs_grad,
                    _device_name(q.device), _versions())


def _window_kind(graph: AttentionGraph) -> str:
    """``"window L/R"``, the sides rounded up to powers of two from 16 (``none`` for a side
    without bound), or ``""`` without a window: the band's width decides the race."""
    if graph.window is None:
        return ""
    left, right = (power_of_two_bucket(side, 16, 16384) if side is not None else "none"
                   for side in graph.window_sides())
    return f"window {left}/{right}"


def candidate_routes(q: Tensor, v: Tensor, graph: AttentionGraph,
                     scale: float) -> dict[str, Route]:
    """The routes that can serve this call, the fused kernel first, the torch route second."""
    routes: dict[str, Route] = {
        "triton": lambda q, k, v: triton_attention(q, k, v, graph, scale=scale)}
    if not graph.is_implicit:
        routes["sparse"] = lambda q, k, v: sparse_attention(
            q, k, v, graph.edge_index, scale=scale)[0]
        return routes
    routes["sdpa"] = lambda q, k, v: sdpa_attention(q, k, v, graph, scale=scale)
    if varlen_unavailable_reason(q, v, graph) is None:
        routes["varlen"] = lambda q, k, v: varlen_attention(q, k, v, graph, scale=scale)
    return routes


def _verify(candidates: dict[str, Route], torch_route: str, graph: AttentionGraph,
            scale: float, inputs: tuple[Tensor, Tensor, Tensor],
            needs_grad: bool) -> dict[str, str]:
    """Why each candidate that disagrees with the float32 torch route was rejected."""
    dtype = inputs[0].dtype
    generator = torch.Generator(inputs[0].device).manual_seed(0)
    results = {torch_route: _outputs(candidates[torch_route], inputs, needs_grad, generator)}
    ref_lo = results[torch_route] if dtype in LOW_PRECISION else None
    high = tuple(t.detach().float() for t in inputs)
    ref_hi = _outputs(candidates[torch_route], high, needs_grad,
                      torch.Generator(inputs[0].device).manual_seed(0))
    rejected = {}
    for name, route in candidates.items():
        if name == torch_route:
            continue
        try:
            got = _outputs(route, inputs, needs_grad,
                           torch.Generator(inputs[0].device).manual_seed(0))
        except Exception as error:  # a kernel that cannot run here must not serve
            rejected[name] = f"raised {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        disagreement = _disagreement(got, ref_hi, ref_lo, dtype)
        if disagreement:
            rejected[name] = disagreement
    return rejected


def _disagreement(got: list[Tensor], ref_hi: list[Tensor], ref_lo: list[Tensor] | None,
                  dtype: torch.dtype) -> str | None:
    """The first quantity outside the tolerance rule, described; ``None`` if all agree."""
    for index, quantity in enumerate(("out", "dq", "dk", "dv")[:len(got)]):
        verdict = compare(got[index], ref_hi[index],
                          None if ref_lo is None else ref_lo[index], dtype)
        if not verdict.passed:
            note = f", {verdict.note}" if verdict.note else ""
            return (f"{quantity} max error {verdict.error:.2e} > bound {verdict.bound:.2e}"
                    f"{note}")
    return None


def _outputs(route: Route, inputs, needs_grad: bool, generator) -> list[Tensor]:
    """``[out]``, or ``[out, dq, dk, dv]`` for one upstream gradient drawn from ``generator``."""
    if not needs_grad:
        with torch.no_grad():
            return [route(*inputs)]
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        out = route(*leaves)
    grad_out = torch.randn(out.shape, generator=generator, device=out.device).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return [out.detach(), *(torch.zeros_like(t) if g is None else g
                            for t, g in zip(leaves, grads, strict=True))]


def _runner(route: Route, inputs, needs_grad: bool) -> Callable[[], object]:
    """What is timed: the forward, or the forward and the backward."""
    if not needs_grad:
        def forward():
            with torch.no_grad():
                return route(*inputs)
        return forward
    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward_backward():
        out = route(*leaves)
        return torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    return forward_backward


def _representative(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a call can decide its key: not empty (nothing would be compared) and finite (the
    comparison would see only the non-finite repair). Read on a key's first call only."""
    if not (q.numel() and k.numel() and v.numel()):
        return False
    return bool(torch.stack([torch.isfinite(t).all() for t in (q, k, v)]).all())


@functools.cache  # asked on every auto call on a GPU: the name and versions do not change
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return device.type + (" (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1"
                          else "")


@functools.cache
def _versions() -> str:
    import triton

    from gatattn import __version__

    return f"gatattn {__version__}, torch {torch.__version__}, triton {triton.__version__}"


def _disk_path() -> Path | None:
    value = os.environ.get(ROUTE_CACHE_ENV)
    return Path(value).expanduser() if value else None


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"gatattn: ignoring the unreadable route cache {path}: {error}",
                      RuntimeWarning, stacklevel=5)
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        warnings.warn(f"gatattn: ignoring the route cache {path}: not format {_FORMAT}",
                      RuntimeWarning, stacklevel=5)
        return {}
    return dict(data.get("choices", {}))


_ROUTER = Router()


def route_choices() -> list[RouteChoice]:
    """Which route ``backend="auto"`` chose for each key in this process (or read from the
    ``GATATTN_ROUTE_CACHE`` file), with the verified routes' times and the rejected ones'
    reasons. Empty where the fused kernels never compete (no GPU)."""
    return _ROUTER.choices


def race(q: Tensor, k: Tensor, v: Tensor, graph: AttentionGraph, scale: float) -> str:
    """The route serving this call's key: verified and raced on the key's first call."""
    return _ROUTER.route(q, k, v, graph, scale)
