"""PyG's explainers on a layer that ran over an implicit graph (no ``edge_index``).

An explainer pairs a layer's messages with the ``edge_index`` it was given, by position. A
layer that attends over the complete graph of its input never saw that tensor, so the pairing
is checked here and refused when it would explain edges the layer never used.
"""

from __future__ import annotations

import sys

from torch import Tensor
from torch_geometric.nn import MessagePassing


def check_explained_edges(conv: MessagePassing, edges: Tensor) -> None:
    """Refuses to explain an implicit complete graph unless the explainer's edges are the
    layer's own ``edges``, in the same order.

    An explainer pairs the layer's messages with its own ``edge_index`` by position: an edge
    mask is applied message by message, AttentionExplainer keeps the first ``E`` attention
    weights. The layer never sees that ``edge_index``, and neither a mask of the right size
    nor its self-loop pattern pins down the order (a source-major complete graph has both), so
    it is read from the explainer itself: the ``edge_index`` argument or variable of the
    innermost caller running code of ``torch_geometric.explain``. Explaining goes ahead when
    that tensor equals ``edges`` and an edge mask, if set, has one entry per edge; it is refused
    when they differ, and when a mask or explain mode is set with no such explainer running
    (set by hand: nothing to check it against). Message hooks with no explainer running see
    the complete graph's messages, as documented."""
    masked = bool(conv.explain) or conv._edge_mask is not None
    running, explained = _explainer_edge_index()
    if not (masked or running):
        return
    if not running:
        problem = ("an edge mask or explain mode is set with no PyG explainer running, so "
                   "nothing says which edges the mask is over")
    elif not isinstance(explained, Tensor):
        problem = "the running explainer's edge_index could not be read as one tensor"
    elif explained.shape != edges.shape or not bool((explained.to(edges.device) == edges).all()):
        problem = (f"the explainer's edge_index ({explained.size(-1)} edges) is not that graph "
                   "in the layer's order")
    elif conv._edge_mask is not None and conv._edge_mask.size(0) != edges.size(1):
        problem = f"the edge mask has {conv._edge_mask.size(0)} entries"
    else:
        return
    raise ValueError(
        f"{type(conv).__name__} ran without an edge_index, over the implicit graph of its "
        f"input ({edges.size(1)} edges), but {problem}: the explanation would pair the layer's "
        "messages with edges it never used. Explain it over the layer's edges, which "
        "`_, (edges, _) = conv(x, batch=batch, return_attention_weights=True)` returns in its "
        "order (with the batch, ptr and causal the model passes): `explainer(x, edges, ...)`; "
        "or give the layer the graph to explain: `conv(x, edge_index)`.")


def _explainer_edge_index() -> tuple[bool, object]:
    """``(running, edge_index)``: whether a caller is running code of PyG's explain package,
    and the ``edge_index`` variable of the innermost such caller that has one (``None`` if
    none has)."""
    frame, running = sys._getframe(1), False
    try:
        while frame is not None:
            if frame.f_globals.get("__name__", "").startswith("torch_geometric.explain"):
                running = True
                names = frame.f_locals  # only a bound edge_index counts
                if "edge_index" in names:
                    return running, names["edge_index"]
            frame = frame.f_back
        return running, None
    finally:
        del frame  # frames hold their locals: no reference cycle through this one
