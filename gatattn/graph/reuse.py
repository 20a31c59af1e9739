"""Keyword descriptions reused across layers: every layer of a model that is given the same
``batch`` or ``ptr`` tensor gets the same :class:`~gatattn.graph.AttentionGraph`, derived once
per batch, as if the model had built it with :func:`~gatattn.graph.build_graph`.

An entry holds a weak reference to each tensor it describes (a new tensor that Python places
at a freed one's address is not taken for it), a private copy of its values, and the graph
(which keeps a ``ptr`` as given: the fused kernels' ``cu_seqlens``). It serves only while the
tensor still holds the copied values: the comparison runs on the device and is read in the
call's one host read, so an entry never answers for other contents, also after writes that
bump no version counter (through numpy, ``.data`` or DLPack).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gatattn.graph.attention_graph import AttentionGraph
from gatattn.graph.plan import CACHE_SIZE

#: What a call reads with the graph: a 0-dim bool tensor (whether its inputs are finite) or
#: ``None`` (it has no use for it), asked with the graph where that is known before the read.
FlagFor = Callable[[AttentionGraph | None], Tensor | None]


@dataclass(frozen=True)
class _Entry:
    described: tuple[weakref.ref, ...]
    copies: tuple[Tensor, ...]
    graph: AttentionGraph

    def candidate_for(self, tensors: tuple[Tensor, ...]) -> bool:
        return len(tensors) == len(self.copies) and all(
            ref() is t and t.shape == c.shape and t.device == c.device
            for ref, t, c in zip(self.described, tensors, self.copies, strict=True))

    def still_equal(self, tensors: tuple[Tensor, ...]) -> list[Tensor]:
        """One 0-dim device flag per tensor: it still holds the values the graph was built
        from."""
        return [torch.eq(t, c).all() for t, c in zip(tensors, self.copies, strict=True)]


_cache: dict[tuple, _Entry] = {}


def reused_graph(key: tuple, tensors: tuple[Tensor, ...],
                 flag_for: FlagFor | None) -> tuple[AttentionGraph | None, bool | None]:
    """The graph kept for ``key`` if ``tensors`` are the ones it describes and still hold
    their values (``None`` otherwise), and the value of ``flag_for(graph)`` read with the
    check (``None``: not asked for). One host read where an entry exists for these very
    tensors; on a miss after one (a tensor written in place) the caller reads again."""
    entry = _cache.get(_full_key(key, tensors))
    if entry is None or not entry.candidate_for(tensors):
        return None, None
    flag = flag_for(entry.graph) if flag_for is not None else None
    if flag is None and len(tensors) == 1:  # (the common case: one op reads the answer)
        same = torch.equal(tensors[0], entry.copies[0])
        return (entry.graph, None) if same else (None, None)
    flags = entry.still_equal(tensors) + ([] if flag is None else [flag])
    values = torch.stack(flags).tolist()  # the one host read
    if not all(values[:len(tensors)]):
        return None, None  # written in place since: derived again
    return entry.graph, None if flag is None else bool(values[-1])


def unchanged_graph(key: tuple, tensor: Tensor) -> AttentionGraph | None:
    """The graph kept for ``key`` if it describes this very ``tensor`` and the tensor still
    holds the values it was built from (one host read: the comparison), else ``None``."""
    entry = _cache.get(_full_key(key, (tensor,)))
    if entry is None or not entry.candidate_for((tensor,)):
        return None
    return entry.graph if torch.equal(tensor, entry.copies[0]) else None


def keep_graph(key: tuple, tensors: tuple[Tensor, ...], copies: tuple[Tensor, ...],
               graph: AttentionGraph) -> None:
    """Keeps ``graph``, built from ``tensors`` while they held ``copies``' values, for the next
    call given them."""
    full_key = _full_key(key, tensors)
    if len(_cache) >= CACHE_SIZE and full_key not in _cache:
        _cache.pop(next(iter(_cache)))
    _cache[full_key] = _Entry(tuple(weakref.ref(t) for t in tensors), copies, graph)


def _full_key(key: tuple, tensors: tuple[Tensor, ...]) -> tuple:
    # Inference mode: a graph derived there holds inference tensors, which a training call
    # cannot save for its backward.
    return (*key, tuple(id(t) for t in tensors), torch.is_inference_mode_enabled())
