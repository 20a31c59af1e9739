"""``ShardedSelfAttention``: a :class:`gatattn.SelfAttentionConv` whose nodes are sharded over
the ranks of a process group, its attention computed by
:func:`gatattn.distributed.ring_attention` (also importable as
``gatattn.distributed.ShardedSelfAttention``)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from gatattn.conv import SelfAttentionConv
from gatattn.distributed import ring_attention
from gatattn.graph import AttentionGraph


class ShardedSelfAttention(nn.Module):
    r"""A :class:`gatattn.SelfAttentionConv` run on complete graphs (one, or a batch) whose nodes
    are sharded over the ranks of ``group`` (contiguous shards in rank order, as
    :func:`~gatattn.distributed.ring_attention`).

    ``forward(x_shard)`` computes the conv's query, key, value projections on this rank's
    nodes, attends over all nodes of all ranks with
    :func:`~gatattn.distributed.ring_attention`, then merges the heads (concatenated or
    averaged), applies the output projection and the root term (with
    its ``beta`` gate) as the conv does: the result equals ``conv(x_full)`` restricted to this
    rank's rows. The conv's parameters are shared, not copied.

    Each rank's parameter gradients are its share of the full gradient: sum them over the ranks
    (``dist.all_reduce``) before the optimiser step. ``DistributedDataParallel`` averages
    instead, so under it use a loss multiplied by the world size, or all-reduce yourself.

    Args:
        conv (SelfAttentionConv): the layer; its weights must be initialised (not lazy) and the
            same on every rank.
        group (ProcessGroup, optional): the process group; ``None`` is the default group.
            (default: :obj:`None`)

    Not supported (refused with a ``ValueError`` naming the option): edge features
    (``edge_dim``), attention dropout in training, bipartite inputs, a ``backend`` other than
    ``"auto"`` (each block takes the route ``auto`` picks), and whatever makes the conv run PyG's
    ``propagate`` (explain mode, hooks, ``aggr`` other than ``"add"``, ``flow``).
    """

    def __init__(self, conv: SelfAttentionConv, group: dist.ProcessGroup | None = None):
        super().__init__()
        if not isinstance(conv, SelfAttentionConv):
            raise TypeError(f"conv must be a gatattn.SelfAttentionConv, got "
                            f"{type(conv).__name__}")
        self.conv = conv
        self.group = group

    def forward(self, x: Tensor, *, causal: bool = False, graph: AttentionGraph | None = None,
                ptr: Tensor | None = None, batch: Tensor | None = None,
                window: tuple[int | None, int | None] | None = None) -> Tensor:
        """``x``: ``(n_r, F_in)`` features of this rank's nodes; returns ``(n_r, H * C)``, or
        ``(n_r, C)`` if the conv averages its heads. ``causal``: node ``i`` attends to nodes
        ``j <= i`` of its graph only. ``window``: ``(left, right)``, node ``i`` attends to nodes
        ``i - left <= j <= i + right`` of its graph only (a sliding window). ``graph``,
        ``ptr``, ``batch``: the graphs of the nodes of all ranks, as
        :func:`~gatattn.distributed.ring_attention` takes them (default: one complete
        graph)."""
        conv = self.conv
        self._check_supported(x)
        query, key, value = conv.project(x, x)
        out = ring_attention(query, key, value, graph=graph, ptr=ptr, batch=batch,
                             group=self.group, causal=causal, window=window,
                             temperature=conv.temperature)
        return conv.finish(out, x)

    def _check_supported(self, x) -> None:
        conv = self.conv
        if not isinstance(x, Tensor):
            raise ValueError("ShardedSelfAttention takes one tensor of node features (one "
                             "complete graph); bipartite (x_src, x_dst) inputs are not supported")
        if conv.lin_edge is not None:
            raise ValueError(f"conv has edge_dim={conv.edge_dim}: edge features need explicit "
                             "edges, which a sharded complete graph has not; use edge_dim=None")
        if conv.training and conv.dropout > 0:
            raise ValueError(f"conv has dropout={conv.dropout}: ring_attention has no attention "
                             "dropout; set dropout=0.0 (or call .eval())")
        if conv.backend != "auto":
            raise ValueError(f"conv has backend={conv.backend!r}: the ring's local calls take "
                             "the route auto picks for each block and cannot honour it; use "
                             "backend='auto'")
        if conv.runs_propagate():
            raise ValueError("conv must run PyG's propagate here (explain mode, an edge mask, "
                             "hooks, aggr other than 'add' or flow='target_to_source'): per-edge "
                             "messages do not exist on a sharded complete graph")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in conv.parameters()):
            raise ValueError("conv has lazy (uninitialised) weights, which ranks would "
                             "initialise differently: give in_channels or run one forward first")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.conv})"
