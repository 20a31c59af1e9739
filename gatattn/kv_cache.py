"""A key/value cache for incremental decoding of causal graphs (a batch of growing sequences).

A batch of ``B`` sequences is a batch of causal graphs. The prompts (prefill) are ordinary causal
self-attention over each prompt. After that, each step adds ``r_b >= 0`` nodes to sequence ``b``
(one per decoded token; several for a prompt fed in chunks, or tokens to verify), and they
attend to every cached node of their sequence and to the step's nodes up to themselves: per
sequence a bipartite causal graph from the ``n_b + r_b`` cached keys to the ``r_b`` new queries,
aligned bottom-right (the last query sees every key): a ``(ptr_dst, ptr_src)`` pair with
``causal="bottom_right"``, built once per step as one :class:`gatattn.AttentionGraph` that every
layer's :func:`gatattn.attention` call takes as ``graph=``. Sequences grow at their own
lengths: a step names the sequences that are active (or the rows of each), and the others keep
their cache and get no query.

Layout: each layer's keys and values stay packed as PyG packs nodes, ``(total, H_kv, C)`` with
``ptr = [0, n_0, n_0 + n_1, ...]``, so the attention reads them with no padding. A step writes
them out of place into a new buffer of ``total + active`` rows (the new rows inserted at the end
of their sequences by ``index_copy``, at positions computed once per step from the lengths).
That costs ``O(total * H * C)`` per layer and step, the same order as the attention's own read
of the cache, which every step needs anyway; preallocating capacity per sequence would save the
copy but leave gaps that every attention call would have to skip, and in-place writes would
break autograd through earlier steps. Out of place, gradients flow through a decode step
(training through cached decoding works and is tested).

Sliding windows: ``KVCache(num_layers, window=left)`` decodes sequences whose every row attends
to itself and the ``left`` rows before it only (``window=(left, 0)`` with ``causal``: the prefill
graph is ``build_graph(ptr=..., causal=True, window=(left, 0))``, a step's
``build_graph(ptr=(ptr_dst, ptr_src), causal="bottom_right", window=(left, 0))``). The band is
relative to the bottom-right diagonal, so a sequence's keys need not start at its first
position: a step keeps only the last ``left`` cached rows of each sequence (no query of this
step or a later one can see an older row) and appends its new rows after them. Between steps a
sequence holds at most ``left + r`` rows (``r``: the previous step's rows), and a step's buffer
at most ``left + r_b``, however long the sequences grow: the memory is bounded, and a step's
copy and attention cost ``O((left + r_b) * H * C)`` per sequence. :attr:`KVCache.lengths` stays
the sequences' lengths (positions); :attr:`KVCache.cached_rows` counts the rows held.

Not supported: removing rows (rolling back rejected speculative tokens); start a new cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gatattn.conv import SelfAttentionConv
from gatattn.functional import attention
from gatattn.graph import AttentionGraph, build_graph


class CachedKV(NamedTuple):
    """What a layer attends with after :meth:`KVCache.append`:
    ``gatattn.attention(q_new, key, value, graph=graph)``, or in keywords
    ``gatattn.attention(q_new, key, value, ptr=ptr, causal=causal, window=window)``."""

    key: Tensor  # (total, H_kv, C): every cached key, new rows included, packed by sequence
    value: Tensor  # (total, H_kv, C_v)
    ptr: Tensor | tuple[Tensor, Tensor]  # prefill: ptr; decoding: (ptr_dst, ptr_src)
    causal: bool | str  # True for the prefill, "bottom_right" for the steps after it
    # ptr, causal and window as one object, built once per step and shared by its layers: a
    # call given it reads nothing on the host.
    graph: AttentionGraph
    window: tuple[int, int] | None = None  # (left, 0) of a sliding-window cache


class _Step:
    """Where one step's rows go, shared by every layer of the step (host ints and, once the
    first layer shows the device, index tensors and the step's graph there)."""

    def __init__(self, old_lengths: list[int], held: list[int], new_rows: list[int],
                 prefill: bool, window: int | None):
        self.old_lengths = old_lengths
        self.new_rows = new_rows
        self.lengths = [n + r for n, r in zip(old_lengths, new_rows, strict=True)]
        self.held = held  # rows of each sequence in the layers' buffers before the step
        # The rows kept: with a window, the last `window` (no later query sees an older one).
        self.kept = held if window is None else [min(n, window) for n in held]
        self.held_after = [n + r for n, r in zip(self.kept, new_rows, strict=True)]
        self.window = None if window is None else (window, 0)
        self.prefill = prefill
        self.tensors: dict[str, Tensor] | None = None
        self.graph: AttentionGraph | None = None

    def index_tensors(self, device: torch.device) -> dict[str, Tensor]:
        """``ptr_dst``, ``ptr_src`` and the buffer rows that old and new rows go to."""
        if self.tensors is None:
            self.tensors = {name: t.to(device) for name, t in self._host_tensors().items()}
        if self.tensors["ptr_src"].device != device:
            raise ValueError(f"this step's first layer was on {self.tensors['ptr_src'].device}, "
                             f"this one is on {device}: keep every layer's cache on one device")
        if self.graph is None:  # validated once (one host read), then read by every layer
            ptr_dst, ptr_src = self.tensors["ptr_dst"], self.tensors["ptr_src"]
            self.graph = (build_graph(ptr=ptr_src, causal=True, window=self.window)
                          if self.prefill else
                          build_graph(ptr=(ptr_dst, ptr_src), causal="bottom_right",
                                      window=self.window))
        return self.tensors

    def _host_tensors(self) -> dict[str, Tensor]:
        kept = torch.tensor(self.kept, dtype=torch.long)
        rows = torch.tensor(self.new_rows, dtype=torch.long)
        ptr_dst, ptr_src = _offsets(rows), _offsets(kept + rows)
        # Kept old rows of sequence b move down by the new rows of the sequences before it;
        # the new rows of b follow b's kept rows.
        old_to = torch.arange(sum(self.kept)) + ptr_dst[:-1].repeat_interleave(kept)
        rank_in_sequence = (torch.arange(sum(self.new_rows))
                            - ptr_dst[:-1].repeat_interleave(rows))
        new_to = (ptr_src[:-1] + kept).repeat_interleave(rows) + rank_in_sequence
        tensors = {"ptr_dst": ptr_dst, "ptr_src": ptr_src, "old_to": old_to, "new_to": new_to}
        if self.kept != self.held:  # the buffer rows kept: the last ones of each sequence
            held = torch.tensor(self.held, dtype=torch.long)
            ends = _offsets(held)[1:]
            tensors["keep"] = ((ends - kept).repeat_interleave(kept) + torch.arange(sum(self.kept))
                               - _offsets(kept)[:-1].repeat_interleave(kept))
        return tensors


class KVCache:
    """Packed keys and values of ``num_layers`` attention layers over a batch of sequences.

    One step: :meth:`start_prefill` (the prompts, once) or :meth:`start_step` (one new row per
    active sequence, or given row counts), then :meth:`append` for layers ``0, 1, ...,
    num_layers - 1`` in order, each with that layer's keys and values of the step's new rows
    (rows ordered by sequence).
    The lengths advance when the last layer has appended.

    Args:
        num_layers (int): Attention layers that share the cache.
        window (int, optional): A sliding window: each row attends to itself and the
            ``window`` rows before it in its sequence only; the cache keeps no older rows
            than the next step can see (module docstring). :obj:`None`: every earlier row.
            (default: :obj:`None`)

    Example::

        cache = KVCache(num_layers=2)
        cache.start_prefill([5, 3])              # two prompts, packed: 8 rows
        kv = cache.append(0, k, v)               # k: (8, H, C)
        out = gatattn.attention(q, kv.key, kv.value, graph=kv.graph)
        ...
        cache.start_step(active=[True, False])   # sequence 1 has finished
        kv = cache.append(0, k_new, v_new)       # k_new: (1, H, C)

        cache = KVCache(num_layers=2, window=128)  # each row sees the 128 before it: the
                                                   # cache holds at most 128 + 1 per sequence
    """

    def __init__(self, num_layers: int, *, window: int | None = None):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                                   or window < 0):
            raise ValueError(f"window must be None or an int >= 0 (the rows before each row "
                             f"that it attends to), got {window!r}")
        self.num_layers = num_layers
        self.window = window
        self._lengths: list[int] | None = None  # per sequence, after the last complete step
        self._held: list[int] | None = None  # rows in the buffers per sequence, likewise
        self._keys: list[Tensor | None] = [None] * num_layers
        self._values: list[Tensor | None] = [None] * num_layers
        self._step: _Step | None = None
        self._next_layer = 0

    @property
    def lengths(self) -> list[int]:
        """Rows per sequence so far (after the last complete step): the cached rows without a
        window, the sequence's length (the next row's position) with one."""
        return list(self._lengths or [])

    @property
    def cached_rows(self) -> list[int]:
        """Rows held per sequence (after the last complete step): :attr:`lengths` without a
        window, at most ``window`` plus the last step's rows with one."""
        return list(self._held or [])

    @property
    def batch_size(self) -> int:
        return len(self._lengths or [])

    @property
    def new_positions(self) -> Tensor:
        """Position inside its sequence of each row of the open step, ``(rows,)`` long, on the
        CPU: what a positional encoding of the new rows needs."""
        step = self._open_step()
        return torch.cat([torch.arange(n, n + r) for n, r in
                          zip(step.old_lengths, step.new_rows, strict=True)]
                         or [torch.zeros(0, dtype=torch.long)])

    def start_prefill(self, lengths: Sequence[int] | Tensor) -> None:
        """Opens the first step: the prompts, ``lengths[b]`` rows for sequence ``b`` (``0``
        allowed), packed in sequence order. It fixes the batch size."""
        if self._lengths is not None:
            raise RuntimeError("the cache already holds a prefill; use start_step for the next "
                               "rows, or a new KVCache for new prompts")
        lengths = _host_ints(lengths, "lengths")
        if not lengths:
            raise ValueError("lengths is empty: give one prompt length per sequence")
        self._lengths, self._held = [0] * len(lengths), [0] * len(lengths)
        self._open(lengths, prefill=True)

    def start_step(self, active: Sequence[bool] | Tensor | None = None, *,
                   rows: Sequence[int] | Tensor | None = None) -> None:
        """Opens a decoding step: one new row for each sequence with ``active[b]`` true (all
        when both are :obj:`None`), or ``rows[b] >= 0`` new rows for sequence ``b`` (a prompt
        fed in chunks, several tokens at once); each new row sees the cache and the step's
        earlier rows of its sequence. Sequences without rows keep their cache."""
        if self._lengths is None:
            raise RuntimeError("start_prefill must come first: it gives the batch its prompts")
        if active is not None and rows is not None:
            raise ValueError("give active (one row per active sequence) or rows (row counts), "
                             "not both")
        if rows is not None:
            counts = _host_ints(rows, "rows")
            if len(counts) != self.batch_size:
                raise ValueError(f"rows must hold {self.batch_size} counts (one per sequence), "
                                 f"got {counts}")
        elif active is None:
            counts = [1] * self.batch_size
        else:
            counts = _host_ints(active, "active")
            if len(counts) != self.batch_size or any(f not in (0, 1) for f in counts):
                raise ValueError(f"active must hold {self.batch_size} booleans (one per "
                                 f"sequence), got {counts}")
        self._open(counts, prefill=False)

    def append(self, layer: int, key: Tensor, value: Tensor) -> CachedKV:
        """Adds layer ``layer``'s keys and values of the open step's new rows; returns the whole
        cache of the layer and the graph to attend with (:class:`CachedKV`)."""
        step = self._open_step()
        if layer != self._next_layer:
            raise ValueError(f"append to layer {layer} out of order: layer {self._next_layer} is "
                             f"next in this step (layers 0..{self.num_layers - 1}, once each)")
        self._check_rows(layer, key, value, sum(step.new_rows))
        index = step.index_tensors(key.device)
        key = self._insert(self._keys[layer], key, step, index)
        value = self._insert(self._values[layer], value, step, index)
        self._keys[layer], self._values[layer] = key, value
        self._next_layer += 1
        if self._next_layer == self.num_layers:
            self._lengths, self._held = step.lengths, step.held_after
            self._step, self._next_layer = None, 0
        if step.prefill:
            return CachedKV(key, value, index["ptr_src"], True, step.graph, step.window)
        return CachedKV(key, value, (index["ptr_dst"], index["ptr_src"]), "bottom_right",
                        step.graph, step.window)

    def _open(self, rows: list[int], prefill: bool) -> None:
        if self._step is not None:
            raise RuntimeError(f"the open step still waits for layers {self._next_layer}.."
                               f"{self.num_layers - 1}; append them before starting a new step")
        if any(r < 0 for r in rows):
            raise ValueError(f"row counts must be >= 0, got {rows}")
        self._step = _Step(self._lengths, self._held, rows, prefill, self.window)

    def _open_step(self) -> _Step:
        if self._step is None:
            raise RuntimeError("no open step: call start_prefill or start_step first")
        return self._step

    def _check_rows(self, layer: int, key: Tensor, value: Tensor, rows: int) -> None:
        for name, t in (("key", key), ("value", value)):
            if t.dim() != 3 or t.size(0) != rows:
                raise ValueError(f"{name} must be (rows, heads, channels) with {rows} rows (the "
                                 f"new rows of this step), got {tuple(t.shape)}")
        if key.size(1) != value.size(1) or key.dtype != value.dtype or key.device != value.device:
            raise ValueError(f"key and value disagree: heads {key.size(1)} vs {value.size(1)}, "
                             f"{key.dtype} vs {value.dtype}, {key.device} vs {value.device}")
        cached = self._keys[layer], self._values[layer]
        for name, new, old in (("key", key, cached[0]), ("value", value, cached[1])):
            if old is not None and (new.shape[1:] != old.shape[1:] or new.dtype != old.dtype
                                    or new.device != old.device):
                raise ValueError(
                    f"layer {layer}'s new {name} rows are {tuple(new.shape[1:])} {new.dtype} on "
                    f"{new.device} but its cache is {tuple(old.shape[1:])} {old.dtype} on "
                    f"{old.device}; every step of a layer must match")

    @staticmethod
    def _insert(cached: Tensor | None, new: Tensor, step: _Step,
                index: dict[str, Tensor]) -> Tensor:
        """``cached`` (its kept rows) with ``new``'s rows at the end of their sequences, in a new
        buffer."""
        if step.prefill:  # the prompts are the whole cache
            return new
        if "keep" in index:
            cached = cached.index_select(0, index["keep"])
        out = new.new_empty((cached.size(0) + new.size(0), *new.shape[1:]))
        out = out.index_copy(0, index["old_to"], cached)
        return out.index_copy(0, index["new_to"], new)


def cached_self_attention(conv: SelfAttentionConv, x: Tensor, cache: KVCache,
                          layer: int) -> Tensor:
    """``conv``'s causal self-attention output at the open step's new rows ``x``, attending to
    ``cache`` (layer ``layer``) instead of recomputing earlier rows.

    Over a prefill and the decoding steps that follow, the outputs equal
    ``conv(x_all, ptr=ptr, causal=True)`` on the whole sequences at the same rows
    (``window=(cache.window, 0)`` as well with a sliding-window cache). The step's
    graph is built (one host read) by its first layer; later layers read nothing on the host.

    Args:
        conv (SelfAttentionConv): A self-attention layer (one ``in_channels``).
        x (torch.Tensor): ``(rows, in_channels)``, the step's new rows ordered by sequence.
        cache (KVCache): The cache, with a step open.
        layer (int): ``conv``'s layer index in the cache.

    Refused (:class:`ValueError`): edge features (``edge_dim``), attention dropout in training,
    cross-attention layers (a pair ``in_channels``), and layers whose PyG machinery must see
    messages (explain mode, message hooks, ``aggr`` other than ``"add"``, ``flow``
    ``"target_to_source"``), since the cache computes only plain attention.
    """
    _check_conv(conv, x)
    query, key, value = conv.project(x, x)
    kv = cache.append(layer, key, value)  # a grouped-query layer caches H_kv heads
    out = attention(query, kv.key, kv.value, graph=kv.graph, temperature=conv.temperature,
                    backend=conv.backend)  # (rows, H, C)
    return conv.finish(out, x)


def _check_conv(conv: SelfAttentionConv, x: Tensor) -> None:
    if not isinstance(conv.in_channels, int):
        raise ValueError(f"conv has in_channels={conv.in_channels} (cross-attention); the cache "
                         "serves self-attention layers only")
    if conv.in_channels != -1 and x.size(-1) != conv.in_channels:
        raise ValueError(f"x has {x.size(-1)} features but conv has in_channels="
                         f"{conv.in_channels}")
    if conv.lin_edge is not None:
        raise ValueError(f"conv has edge_dim={conv.edge_dim}: edge features need explicit edges, "
                         "which a cached causal graph does not have")
    if conv.training and conv.dropout > 0:
        raise ValueError(f"conv is in training mode with attention dropout {conv.dropout}, which "
                         "cached decoding does not apply; call conv.eval() or set dropout=0")
    if conv.runs_propagate():
        raise ValueError("conv is set up for PyG to see its messages (explain mode, hooks, "
                         f"aggr={conv.aggr!r} or flow={conv.flow!r}); cached decoding computes "
                         "plain attention only: use conv(x, ptr=ptr, causal=True) instead")


def _offsets(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _host_ints(values: Sequence[int] | Tensor, name: str) -> list[int]:
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {tuple(values.shape)}")
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]
