"""Attention over one complete graph whose nodes are spread across the ranks of a process group.

When one graph's global attention is too slow or too large for one device (a point cloud, a long
sequence, a full-graph transformer), its nodes are cut into contiguous shards, one per rank, in
rank order. :func:`ring_attention` computes exact attention over the whole graph (every node
attends to every node, or to earlier ones with ``causal``) while each rank holds only its own
shard and one travelling block of keys and values: memory per rank is O(N/P * H * C), plus one
(two in the backward) tile of (H, 1024, N/P) logits at a time (below).

How it works (ring attention, Liu et al., https://arxiv.org/abs/2310.01889):

* Shard sizes (and heads, channels, dtype, flags) are exchanged once per call with one
  ``all_gather``; shards may be uneven, and empty. Every receive is sized from them, so nothing
  is padded.
* Forward: P steps. At step s rank r attends with its queries to the key/value block of rank
  ``(r - s) mod P`` while that block travels on to rank r + 1 (``torch.distributed`` point to
  point ops, ``batch_isend_irecv``, posted before the step's compute so that transfer and
  compute overlap). The partial outputs are merged by their log-sum-exp, so the result is exact.
* Backward: the key/value blocks go round the ring again, and with each travel its gradient
  accumulators dK, dV; after P steps each accumulator arrives home. dQ stays local.
* Causal: rank r's queries see key blocks of ranks <= r only; blocks wholly in the future are
  not computed (they still travel, as later ranks need them); the diagonal block is masked by
  global positions. There is no load balancing: rank r computes r + 1 of the P blocks, so the
  last rank sets the pace and a causal call takes about as long as a full one (a zig-zag
  re-layout, which balances this, is not done).

Local blocks are computed with plain torch math (logits, ``logsumexp``, softmax), not the
library's SDPA or Triton routes, because neither returns the log-sum-exp that merging needs;
they run on tiles of up to 1024 query rows against the whole key block, so a block of n_k keys
holds one (H, 1024, n_k) tile of logits at a time (weights in place) in the forward, two in the
backward. Half precision inputs compute in float32 and travel in their own dtype (gradient
accumulators in float32).

:class:`ShardedSelfAttention` runs a :class:`gatattn.SelfAttentionConv` this way, on the shard of
node features a rank holds.

Not supported: cross-attention (a query shard and a key shard of different sizes), attention
dropout, attention weights, ``batch`` / ``ptr`` graphs (for many graphs, use data parallelism:
``examples/ddp_graph_transformer.py``), second derivatives (a backward with
``create_graph=True`` raises). Non-finite inputs are not held to the library's edges-only rule
(README, Numerics): a NaN value of a later node can reach earlier rows of a causal diagonal block.
Not tested under ``torch.compile`` (its point-to-point calls and host loop are eager code).

Every rank of the group must call, with the same ``causal``, ``scale`` and ``temperature``, and
must backpropagate through the output when any does (the backward is collective, as DDP's).
Tensors live on the process group's device: CPU with gloo, one GPU per rank with NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gatattn.backends.sdpa import repeat_kv_heads
from gatattn.backends.second_order import recording_backward
from gatattn.conv import SelfAttentionConv
from gatattn.functional import _validate_qkv, _validate_scalars, logit_multiplier
from gatattn.graph import AttentionGraph

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Query rows per tile of a block: its logits take H * _QUERY_TILE * n_k values, so memory stays
# linear in the shard size.
_QUERY_TILE = 1024
# What each rank states in the one all_gather: its own node count, then values all must share
# (a graph='s node count is -1 without one).
_FIELDS = ("nodes", "heads", "channels", "value channels", "dtype", "needs grad", "causal",
           "logit multiplier", "graph= node count", "refused")


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, graph: AttentionGraph | None = None,
                   group: dist.ProcessGroup | None = None, causal: bool = False,
                   scale: float | None = None, temperature: float = 1.0) -> Tensor:
    r"""Exact multi-head attention over one complete graph whose nodes are sharded over the
    ranks of ``group``: this rank holds the contiguous shard of nodes that follows the shards of
    lower ranks.

    .. math::
        o_i = \sum_{j} \operatorname{softmax}_j\left(\langle q_i, k_j \rangle \cdot
        \frac{\text{scale}}{\tau}\right) v_j, \qquad j \text{ over all } N \text{ nodes (or }
        j \le i \text{ with causal)}

    Args:
        q: ``(n_r, H, C)`` queries of this rank's nodes.
        k: ``(n_r, H_kv, C)`` keys of the same nodes (``H_kv`` divides ``H``: grouped-query
            heads, query head ``h`` reads kv head ``h // (H // H_kv)``).
        v: ``(n_r, H_kv, C_v)`` values of the same nodes.
        graph: the whole graph as one object, instead of ``causal``: one complete graph over
            the nodes of all ranks, ``gatattn.build_graph(num_nodes=N, causal=...)`` with
            ``N`` the sum of the shard sizes (checked), the same on every rank.
            (default: :obj:`None`)
        group: the process group; ``None`` is the default group. (default: :obj:`None`)
        causal: node ``i`` attends to global positions ``j <= i`` only. (default: :obj:`False`)
        scale: logit scale; default ``1 / sqrt(C)``. (default: :obj:`None`)
        temperature: logits are divided by it. (default: :obj:`1.0`)

    Returns:
        ``(n_r, H, C_v)``: this rank's rows of the output, as :func:`gatattn.attention` would
        give them for the concatenated shards.

    Shards may differ in size, and a shard may be empty. Inputs that any rank refuses (shapes,
    dtypes, flags that differ between ranks) raise on every rank.
    """
    ring = _Ring.agree(q, k, v, graph=graph, group=group, causal=causal, scale=scale,
                       temperature=temperature)
    # Grouped-query heads travel expanded (the expansion's backward sums each group).
    k, v = repeat_kv_heads(k, q.size(1)), repeat_kv_heads(v, q.size(1))
    return _RingAttention.apply(q, k, v, ring)


@dataclass(frozen=True)
class _Ring:
    """This rank's place in the ring and what every rank agreed on."""

    group: dist.ProcessGroup | None
    rank: int  # in the group
    sizes: tuple[int, ...]  # node count of each rank's shard, in rank order
    multiplier: float  # scale / temperature
    causal: bool

    @property
    def world(self) -> int:
        return len(self.sizes)

    def origin(self, step: int) -> int:
        """The rank whose key/value block this rank holds at ``step``."""
        return (self.rank - step) % self.world

    def computes(self, origin: int) -> bool:
        """Whether this rank's queries see any key of ``origin``'s block."""
        return (self.sizes[self.rank] > 0 and self.sizes[origin] > 0
                and not (self.causal and origin > self.rank))

    @classmethod
    def agree(cls, q, k, v, *, graph, group, causal, scale, temperature) -> _Ring:
        """Validates locally, then exchanges every rank's statement in one ``all_gather``, so
        that a refusal on any rank raises on all of them instead of leaving them waiting."""
        if group is not None and not isinstance(group, dist.ProcessGroup):
            # (Raised here on its own: without a group there is no one to tell.)
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None (the "
                            f"default group), got {group!r}; pass dist.new_group(...) or None")
        problem, multiplier, graph_nodes = None, 0.0, -1
        try:
            _validate_qkv(q, k, v)
            _validate_scalars(scale, dropout=0.0)  # before the multiplier blames temperature
            if graph is not None:
                causal, graph_nodes = _ring_graph(graph, causal)
            _validate_local(q, k, causal)
            multiplier = logit_multiplier(q.size(-1) ** -0.5 if scale is None else scale,
                                          temperature)
        except (TypeError, ValueError) as error:
            problem = error
        device = q.device if isinstance(q, Tensor) else torch.device("cpu")
        statement = (_statement(q, k, v, causal, multiplier, graph_nodes) if problem is None
                     else None)
        mine = torch.tensor(statement or [0.0] * (len(_FIELDS) - 1) + [1.0],
                            dtype=torch.float64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        table = torch.stack(gathered).cpu()
        rank = dist.get_rank(group)
        if problem is not None:
            raise problem
        _check_agreement(table)
        sizes = tuple(int(n) for n in table[:, 0])
        if graph_nodes >= 0 and graph_nodes != sum(sizes):  # the same verdict on every rank
            raise ValueError(f"ring_attention: the graph has {graph_nodes} nodes but the shards "
                             f"hold {sum(sizes)} ({list(sizes)} by rank); build it with "
                             f"gatattn.build_graph(num_nodes={sum(sizes)}, causal=...)")
        return cls(group, rank, sizes, multiplier, causal)

    def exchange(self, tensors: list[Tensor], origin: int) -> _Transfer:
        """Sends ``tensors`` (the block of ``origin``) to the next rank and receives the block
        of the rank before ``origin`` from the previous rank, shaped from the agreed sizes.
        Empty blocks are not sent."""
        incoming = (origin - 1) % self.world
        received = [t.new_empty((self.sizes[incoming], *t.shape[1:])) for t in tensors]
        ops = []
        if self.sizes[origin] > 0:
            ops += [dist.P2POp(dist.isend, t.contiguous(), self._neighbour(+1), self.group)
                    for t in tensors]
        if self.sizes[incoming] > 0:
            ops += [dist.P2POp(dist.irecv, t, self._neighbour(-1), self.group) for t in received]
        return _Transfer(dist.batch_isend_irecv(ops) if ops else [], received)

    def _neighbour(self, direction: int) -> int:
        """The global rank (what P2POp's ``peer`` takes on every torch >= 2.4) of the next
        (+1) or previous (-1) rank of the group."""
        group_rank = (self.rank + direction) % self.world
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


@dataclass
class _Transfer:
    works: list
    received: list[Tensor]

    def wait(self) -> list[Tensor]:
        for work in self.works:
            work.wait()
        return self.received


def _validate_local(q: Tensor, k: Tensor, causal) -> None:
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False (self-attention: both alignments are "
                         f"the same), got {causal!r}")
    if q.size(0) != k.size(0):
        raise ValueError(
            f"ring_attention shards one graph's nodes: q and k must have one row per node of "
            f"this rank's shard, got {q.size(0)} and {k.size(0)} rows (cross-attention is not "
            "supported)")
    if q.dtype not in _DTYPES:
        raise ValueError(f"ring_attention computes in {_DTYPES}, got {q.dtype}")


def _ring_graph(graph: AttentionGraph, causal) -> tuple[bool, int]:
    """``(causal, node count)`` of a ``graph=`` the ring can run: one complete graph over the
    nodes of all ranks (causal or not), given without a second description."""
    if not isinstance(graph, AttentionGraph):
        raise TypeError(f"graph must be a gatattn.AttentionGraph (gatattn.build_graph(...)), "
                        f"got {type(graph).__name__}")
    if causal is not False:
        raise ValueError("graph= already describes the graph; got causal as well: give it to "
                         "gatattn.build_graph(...) instead, or drop graph=")
    if not graph.is_implicit or graph.membership is not None or graph.bipartite:
        raise ValueError(f"ring_attention runs one complete graph over the nodes of all ranks, "
                         f"got {graph!r}; build it with gatattn.build_graph(num_nodes=N, "
                         "causal=...), N the nodes of all ranks")
    return graph.causal, graph.num_dst


def _statement(q: Tensor, k: Tensor, v: Tensor, causal: bool, multiplier: float,
               graph_nodes: int) -> list[float]:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return [q.size(0), q.size(1), q.size(2), v.size(2), _DTYPES.index(q.dtype), needs_grad,
            causal, multiplier, graph_nodes, 0.0]


def _check_agreement(table: Tensor) -> None:
    refused = table[:, -1].nonzero().flatten().tolist()
    if refused:
        raise ValueError(f"ring_attention: the inputs of rank(s) {refused} were refused there "
                         "(see their error); every rank stops")
    for column, name in enumerate(_FIELDS[1:-1], start=1):
        values = table[:, column]
        if not bool((values == values[0]).all()):
            shown = [_DTYPES[int(x)] for x in values] if name == "dtype" else values.tolist()
            raise ValueError(
                f"ring_attention: every rank must give the same {name}, got {shown} by rank; "
                "pass the same shapes, dtype, causal, scale and temperature on every rank, and "
                "inputs that require grad on all ranks or none")


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring):
        out, lse = _ring_forward(q, k, v, ring)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if recording_backward():
            raise RuntimeError(
                "second derivatives are not available for ring_attention: its backward passes "
                "blocks round the ring and is not itself differentiable; use backward() "
                "without create_graph=True")
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, grad_out, ctx.ring)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> tuple[Tensor, Tensor]:
    """This rank's output (compute dtype) and its log-sum-exp ``(n, H)``."""
    dtype = _compute_dtype(q)
    out = q.new_zeros((*q.shape[:2], v.size(-1)), dtype=dtype)
    lse = q.new_full(q.shape[:2], float("-inf"), dtype=dtype)
    block = [k, v]
    for step in range(ring.world):
        origin = ring.origin(step)
        transfer = ring.exchange(block, origin) if step < ring.world - 1 else None
        if ring.computes(origin):
            block_out, block_lse = _block_forward(q, *block, ring, origin)
            out, lse = _merge(out, lse, block_out, block_lse)
        if transfer is not None:
            block = transfer.wait()
    return out, lse


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor):
    """Two softmax-weighted averages over disjoint key sets, merged by their log-sum-exps. The
    first block ever merged meets lse = -inf, whose weight exp(-inf) is 0."""
    merged = torch.logaddexp(lse, block_lse)
    out = (out * (lse - merged).exp().unsqueeze(-1)
           + block_out * (block_lse - merged).exp().unsqueeze(-1))
    return out, merged


def _tiles(rows: int):
    """``(start, stop)`` of each tile of at most ``_QUERY_TILE`` query rows."""
    return ((start, min(start + _QUERY_TILE, rows)) for start in range(0, rows, _QUERY_TILE))


def _block_logits(q: Tensor, k: Tensor, ring: _Ring, origin: int, first_row: int) -> Tensor:
    """``(H, t, n_k)`` scaled logits of a tile of this rank's queries (rows ``first_row`` on)
    against ``origin``'s keys, the future masked to -inf on a causal diagonal block (the only
    block that holds both; there query row ``i`` and key ``j`` share the shard's offset)."""
    logits = torch.einsum("ihc,jhc->hij", q.to(k.dtype), k).mul_(ring.multiplier)
    if ring.causal and origin == ring.rank:
        rows = torch.arange(first_row, first_row + q.size(0), device=q.device).unsqueeze(1)
        future = torch.arange(k.size(0), device=q.device) > rows
        logits.masked_fill_(future, float("-inf"))
    return logits


def _block_forward(q, k, v, ring, origin) -> tuple[Tensor, Tensor]:
    """This rank's output over ``origin``'s block ``(n_q, H, C_v)`` and its log-sum-exp
    ``(n_q, H)``, a tile of query rows at a time."""
    dtype = _compute_dtype(q)
    k, v = k.to(dtype), v.to(dtype)
    outs, lses = [], []
    for start, stop in _tiles(q.size(0)):
        logits = _block_logits(q[start:stop], k, ring, origin, start)
        # logsumexp by hand, in place: torch's would allocate a second tile.
        row_max = logits.amax(dim=-1, keepdim=True)  # finite: every row sees a key here
        weights = logits.sub_(row_max).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        weights.div_(total)
        outs.append(torch.einsum("hij,jhc->ihc", weights, v))
        lses.append((row_max + total.log()).squeeze(-1).transpose(0, 1))
        del logits, weights  # before the next tile is allocated
    return torch.cat(outs), torch.cat(lses)


def _ring_backward(q, k, v, out, lse, grad_out, ring: _Ring) -> tuple[Tensor, Tensor, Tensor]:
    dtype = out.dtype
    grad_out = grad_out.to(dtype)
    delta = (grad_out * out).sum(-1)  # (n, H): sum_j p_ij dp_ij, softmax's backward term
    dq = torch.zeros_like(q, dtype=dtype)
    block = [k, v]
    grads = [torch.zeros_like(k, dtype=dtype), torch.zeros_like(v, dtype=dtype)]
    for step in range(ring.world):
        origin = ring.origin(step)
        transfer = ring.exchange(block, origin) if step < ring.world - 1 else None
        if ring.computes(origin):
            _block_backward(q, *block, *grads, dq, grad_out, lse, delta, ring, origin)
        if ring.world > 1:  # the accumulators follow their block; the last hop takes them home
            grads = ring.exchange(grads, origin).wait()
        if transfer is not None:
            block = transfer.wait()
    return dq, grads[0], grads[1]


def _block_backward(q, k, v, dk, dv, dq, grad_out, lse, delta, ring, origin) -> None:
    """Adds this rank's queries' share of the gradients for ``origin``'s block: into ``dq``
    (local) and into the travelling ``dk``, ``dv``; a tile of query rows at a time."""
    dtype = dq.dtype
    k, v = k.to(dtype), v.to(dtype)
    for start, stop in _tiles(q.size(0)):
        rows = slice(start, stop)
        # In place where a tile is last read, so at most two (H, t, n_k) tiles are alive.
        weights = _block_logits(q[rows], k, ring, origin, start)
        weights.sub_(lse[rows].transpose(0, 1).unsqueeze(-1)).exp_()
        dv += torch.einsum("hij,ihc->jhc", weights, grad_out[rows])
        dlogits = torch.einsum("ihc,jhc->hij", grad_out[rows], v)
        dlogits.sub_(delta[rows].transpose(0, 1).unsqueeze(-1)).mul_(weights)
        dlogits.mul_(ring.multiplier)
        del weights
        dq[rows] += torch.einsum("hij,jhc->ihc", dlogits, k)
        dk += torch.einsum("hij,ihc->jhc", dlogits, q[rows].to(dtype))
        del dlogits  # before the next tile is allocated


class ShardedSelfAttention(nn.Module):
    r"""A :class:`gatattn.SelfAttentionConv` run on one complete graph whose nodes are sharded
    over the ranks of ``group`` (contiguous shards in rank order, as :func:`ring_attention`).

    ``forward(x_shard)`` computes the conv's query, key, value projections on this rank's
    nodes, attends over all nodes of all ranks with :func:`ring_attention`, then merges the
    heads (concatenated or averaged), applies the output projection and the root term (with
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
    ``"auto"`` (the ring computes its own blocks), and whatever makes the conv run PyG's
    ``propagate`` (explain mode, hooks, ``aggr`` other than ``"add"``, ``flow``).
    """

    def __init__(self, conv: SelfAttentionConv, group: dist.ProcessGroup | None = None):
        super().__init__()
        if not isinstance(conv, SelfAttentionConv):
            raise TypeError(f"conv must be a gatattn.SelfAttentionConv, got "
                            f"{type(conv).__name__}")
        self.conv = conv
        self.group = group

    def forward(self, x: Tensor, *, causal: bool = False,
                graph: AttentionGraph | None = None) -> Tensor:
        """``x``: ``(n_r, F_in)`` features of this rank's nodes; returns ``(n_r, H * C)``, or
        ``(n_r, C)`` if the conv averages its heads. ``causal``: node ``i`` attends to global
        positions ``j <= i`` only. ``graph``: instead of ``causal``, the whole graph as
        :func:`ring_attention` takes it (one complete graph over the nodes of all ranks)."""
        conv = self.conv
        self._check_supported(x)
        query, key, value = conv.project(x, x)
        out = ring_attention(query, key, value, graph=graph, group=self.group, causal=causal,
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
            raise ValueError(f"conv has backend={conv.backend!r}: the ring computes its own "
                             "blocks and cannot honour it; use backend='auto'")
        if conv._pyg_sees_messages():
            raise ValueError("conv must run PyG's propagate here (explain mode, an edge mask, "
                             "hooks, aggr other than 'add' or flow='target_to_source'): per-edge "
                             "messages do not exist on a sharded complete graph")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in conv.parameters()):
            raise ValueError("conv has lazy (uninitialised) weights, which ranks would "
                             "initialise differently: give in_channels or run one forward first")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.conv})"
