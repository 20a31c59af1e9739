"""Attention over complete graphs whose nodes are spread across the ranks of a process group.

When one graph's global attention is too slow or too large for one device (a point cloud, a long
sequence, a full-graph transformer), or a PyG batch holds a few such graphs, its nodes are cut
into contiguous shards, one per rank, in rank order; graphs may straddle ranks.
:func:`ring_attention` computes exact attention (each node attends to every node of its graph,
or to earlier ones with ``causal``, or to those in a sliding ``window``) while each rank holds
only its own shard and one travelling block of keys and values: memory per rank is
O(N/P * H * C), plus what one local call of :func:`gatattn.attention` takes.

How it works (ring attention, Liu et al., https://arxiv.org/abs/2310.01889):

* Shard sizes, settings and a fingerprint of the graph sizes are exchanged in one
  ``all_gather``; shards may be uneven, and empty; nothing is padded.
* Forward: P steps. At step s rank r attends with its queries to the key/value block of rank
  ``(r - s) mod P`` while that block travels on to rank r + 1 (``batch_isend_irecv``, posted
  before the step's compute so that transfer and compute overlap). Each (query shard, key block)
  pair is one or two calls of :func:`gatattn.attention` with ``return_lse=True`` (the library's
  routes: SDPA, message passing or the Triton kernels, whichever ``auto`` picks), whose graph is
  the pair's part of the whole: a ``(ptr_dst, ptr_src)`` pair of the graphs the queries touch,
  causal aligned bottom-right where the keys end with the queries' own rows. The parts are
  merged by :func:`gatattn.merge_attention`, so the result is exact.
* Backward: the key/value blocks go round the ring again, and with each travel its gradient
  accumulators dK, dV; after P steps each accumulator arrives home. Each pair's calls are
  recomputed and differentiated with the merge's gradient: the part ``(out_b, lse_b)`` gets
  ``w * dout`` and ``w * (<dout, out_b> - <dout, out>)``, ``w = exp(lse_b - lse)``. The backward
  therefore keeps only this rank's q, k, v, output and log-sum-exp (not the P blocks), and one
  pair's recomputed calls at a time.
* Causal, load-balanced: with rows in rank order rank r's queries would see r + 1 of P blocks,
  so the last rank would set the pace. Instead the N rows are cut into 2P chunks and rank r
  computes on chunks r and 2P - 1 - r (zig-zag), an early and a late one: every rank then has
  the same number of causal (query, key) pairs, to a chunk's rounding. The caller never sees
  this layout: q, k, v are moved to it and the output back (in the backward, the output's
  gradient there and q, k, v's gradients back) by point-to-point transfers of the rows whose
  rank changes, each sent once: at most about two ring steps of traffic in the forward and
  two in the backward, against the ring's own P - 1 (2(P - 1) with the accumulators).
  ``load_balance=False`` keeps the caller's layout (the plain ring).
* Sliding windows (``window=(left, right)``, as :func:`gatattn.attention` takes it): node ``i``
  sees the nodes ``j`` of its graph with ``-left <= j - i <= right`` (causal: ``right`` 0),
  which in a (query interval, key interval) pair is the window shifted by the distance between
  their first rows. Each such pair is one call with its window (trimmed to the queries that
  see a key and the keys seen), and a pair with no node in the band makes none: blocks farther
  than the window are never computed, nor sent. Every rank can tell which ranks' blocks each
  rank computes on, so a windowed block does not travel round the ring: at step s rank r sends
  the rows of its own block that rank r + s reads straight to it (and in the backward gets
  their gradient straight back), and steps at which no rank computes are skipped. With a
  causal window narrower than a shard (zig-zag: a chunk) a rank receives ``left`` rows from
  its predecessor (zig-zag: from each of the two ranks that hold the chunks before its two),
  instead of every block.

Half precision travels and computes in its own dtype, merged and accumulated in float32.
:class:`gatattn.sharded_conv.ShardedSelfAttention` runs a :class:`gatattn.SelfAttentionConv` on a
rank's shard.

Not supported: cross-attention (a query shard and a key shard of different sizes), attention
dropout, attention weights, explicit edges, second derivatives (a backward with
``create_graph=True`` raises). Not tested under ``torch.compile`` (its point-to-point calls and
host loop are eager code).

Every rank of the group must call, with the same graph, ``causal``, ``window``, ``scale``,
``temperature`` and ``load_balance``, and must backpropagate through the output when any does
(the backward is collective, as DDP's). Tensors live on the process group's device: CPU with
gloo, one GPU per rank with NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from gatattn.backends.second_order import recording_backward
from gatattn.functional import (
    attention,
    default_scale,
    logit_multiplier,
    validate_qkv,
    validate_scalars,
)
from gatattn.graph import AttentionGraph
from gatattn.graph.switches import Window
from gatattn.merge import merge_attention
from gatattn.ring_agreement import FIELDS, check_agreement, rank_statement, validate_local
from gatattn.ring_layout import (
    BlockCall,
    Layout,
    MoveRows,
    block_calls,
    contiguous_layout,
    graph_sizes,
    read_span,
    rebased,
    rows,
    windowed_block_calls,
    zigzag_layout,
)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, graph: AttentionGraph | None = None,
                   ptr: Tensor | None = None, batch: Tensor | None = None,
                   group: dist.ProcessGroup | None = None, causal: bool = False,
                   window: tuple[int | None, int | None] | None = None,
                   scale: float | None = None, temperature: float = 1.0,
                   load_balance: bool = True) -> Tensor:
    r"""Exact multi-head attention over complete graphs whose nodes are sharded over the ranks
    of ``group``: this rank holds the contiguous shard of nodes that follows the shards of
    lower ranks.

    .. math::
        o_i = \sum_{j} \operatorname{softmax}_j\left(\langle q_i, k_j \rangle \cdot
        \frac{\text{scale}}{\tau}\right) v_j, \qquad j \text{ over the nodes of } i
        \text{'s graph (} j \le i \text{ with causal; } i - \text{left} \le j \le i +
        \text{right with a window)}

    Args:
        q: ``(n_r, H, C)`` queries of this rank's nodes.
        k: ``(n_r, H_kv, C)`` keys of the same nodes (``H_kv`` divides ``H``: grouped-query
            heads, query head ``h`` reads kv head ``h // (H // H_kv)``); blocks travel with
            ``H_kv`` heads.
        v: ``(n_r, H_kv, C_v)`` values of the same nodes.
        graph: the whole graph as one object, instead of ``ptr`` / ``batch`` / ``causal``:
            ``gatattn.build_graph(num_nodes=N, causal=...)`` for one graph, or
            ``build_graph(ptr=..., causal=...)`` for a batch, over the nodes of all ranks
            (``N`` the sum of the shard sizes, checked), the same on every rank.
            (default: :obj:`None`)
        ptr: ``(B + 1,)`` offsets of the graphs of the whole batch (PyG's ``Batch.ptr``),
            the same on every rank; graphs may straddle ranks. (default: :obj:`None`)
        batch: ``(N,)`` graph id of every node of the whole batch, sorted (each graph a
            contiguous run of nodes), the same on every rank. (default: :obj:`None`)
        group: the process group; ``None`` is the default group. (default: :obj:`None`)
        causal: node ``i`` attends to nodes ``j <= i`` of its graph only.
            (default: :obj:`False`)
        window: ``(left, right)``: node ``i`` attends only to nodes ``j`` of its graph with
            ``i - left <= j <= i + right`` (``None``: no bound on a side; with ``causal``,
            ``right`` is 0 or ``None``), a sliding window (module docstring); with ``graph=``,
            the graph's own window. (default: :obj:`None`)
        scale: logit scale; default ``1 / sqrt(C)``. (default: :obj:`None`)
        temperature: logits are divided by it. (default: :obj:`1.0`)
        load_balance: with ``causal``, compute in the zig-zag layout (module docstring): rank
            r works on chunks r and 2P - 1 - r of the 2P chunks of all rows, so that every
            rank does the same work (for one graph; in a batch the chunks cut all rows, so
            the balance depends on the graphs' sizes). q, k, v move there and the output
            back by point-to-point transfers, about two ring steps of traffic each way,
            unseen by the caller. ``False`` runs the plain ring, where rank r computes
            r + 1 of P blocks. No effect without ``causal``. (default: :obj:`True`)

    Returns:
        ``(n_r, H, C_v)``: this rank's rows of the output, as :func:`gatattn.attention` would
        give them for the concatenated shards.

    Shards may differ in size, and a shard may be empty. Inputs that any rank refuses (shapes,
    dtypes, flags, graphs that differ between ranks) raise on every rank.
    """
    ring = _Ring.agree(q, k, v, graph=graph, ptr=ptr, batch=batch, group=group, causal=causal,
                       window=window, scale=scale, temperature=temperature,
                       load_balance=load_balance)
    q, k, v = (ring.to_compute_layout(t) for t in (q, k, v))
    return ring.to_caller_layout(_RingAttention.apply(q, k, v, ring))


@dataclass(frozen=True)
class _Ring:
    """This rank's place in the ring and what every rank agreed on."""

    group: dist.ProcessGroup | None
    rank: int  # in the group
    caller: Layout  # the shards as given: contiguous, in rank order
    layout: Layout  # where the ring computes (zig-zag, or the caller's)
    graph_sizes: list[int] | None  # node count of each graph of a batch, None for one graph
    multiplier: float  # scale / temperature
    causal: bool
    window: Window | None  # (left, right), causal: right 0; None keeps every (causal) pair
    calls: dict = field(default_factory=dict, compare=False)  # per (rank, origin), derived once

    @property
    def world(self) -> int:
        return len(self.layout)

    def size(self, rank: int) -> int:
        return rows(self.layout[rank])

    def origin(self, step: int) -> int:
        """The rank whose key/value block this rank holds at ``step``."""
        return (self.rank - step) % self.world

    def block_calls(self, origin: int, rank: int | None = None) -> list[BlockCall]:
        """The attention calls of the queries of ``rank`` (this one by default) against
        ``origin``'s block. Every rank can tell what every other one computes."""
        rank = self.rank if rank is None else rank
        if (rank, origin) not in self.calls:
            mine, theirs = self.layout[rank], self.layout[origin]
            self.calls[rank, origin] = (
                block_calls(mine, theirs, self.causal, self.graph_sizes) if self.window is None
                else windowed_block_calls(mine, theirs, self.window, self.graph_sizes))
        return self.calls[rank, origin]

    def read_rows(self, rank: int, origin: int) -> slice | None:
        """The rows of ``origin``'s block that the windowed calls of ``rank`` read, all of it
        that is sent there (``None``: none; ranks taken modulo P)."""
        return read_span(self.block_calls(origin % self.world, rank % self.world))

    def windowed_blocks(self, own: list[Tensor]):
        """``(step, origin, block, calls)`` for steps 0, 1, ..., P - 1 of a windowed ring,
        ``block`` ``None`` where this rank computes nothing on it. Each rank sends the rows of
        its own block that another reads straight to it, posted a step ahead; the steps at
        which no rank computes are skipped."""
        steps = [s for s in range(self.world)
                 if s == 0 or any(self.read_rows(r, r - s) for r in range(self.world))]
        transfer = None
        for i, step in enumerate(steps):
            block = own if step == 0 else transfer.wait()
            if i + 1 < len(steps):
                to, source = self.rank + steps[i + 1], self.rank - steps[i + 1]
                sent, received = self.read_rows(to, self.rank), self.read_rows(self.rank, source)
                transfer = self.send_receive(sent and [t[sent] for t in own], to, own,
                                             received and source, received)
            origin = (self.rank - step) % self.world
            calls = self.block_calls(origin)
            yield step, origin, block or None, (
                calls if step == 0 else rebased(calls, self.read_rows(self.rank, origin)))

    def send_receive(self, send: list[Tensor] | None, to: int, like: list[Tensor],
                     source: int | None, rows: slice | None) -> _Transfer:
        """Posts ``send`` (if any) to rank ``to``, and the receipt from rank ``source`` (if
        any) of tensors shaped as ``like`` with ``rows``' row count."""
        received = [] if source is None else [
            t.new_empty((rows.stop - rows.start, *t.shape[1:])) for t in like]
        ops = [] if send is None else [dist.P2POp(dist.isend, t.contiguous(), self.peer(to),
                                                  self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.peer(source), self.group) for t in received]
        return _Transfer(dist.batch_isend_irecv(ops) if ops else [], received)

    def to_compute_layout(self, t: Tensor) -> Tensor:
        if self.layout == self.caller:
            return t
        return MoveRows.apply(t, self.caller, self.layout, self.rank, self.group, self.peer)

    def to_caller_layout(self, t: Tensor) -> Tensor:
        if self.layout == self.caller:
            return t
        return MoveRows.apply(t, self.layout, self.caller, self.rank, self.group, self.peer)

    @classmethod
    def agree(cls, q, k, v, *, graph, ptr, batch, group, causal, window, scale, temperature,
              load_balance) -> _Ring:
        """Validates locally, then exchanges every rank's statement in one ``all_gather``: a
        refusal on any rank raises on all of them instead of leaving them waiting."""
        if group is not None and not isinstance(group, dist.ProcessGroup):
            # (Raised here on its own: without a group there is no one to tell.)
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None (the "
                            f"default group), got {group!r}; pass dist.new_group(...) or None")
        problem, statement, sizes = None, None, None
        try:
            validate_qkv(q, k, v)
            validate_scalars(scale, dropout=0.0)  # before the multiplier blames temperature
            causal, window, total, sizes = graph_sizes(graph, ptr, batch, causal, window)
            validate_local(q, k, causal, load_balance)
            multiplier = logit_multiplier(default_scale(q) if scale is None else scale,
                                          temperature)
            statement = rank_statement(q, k, v, causal, load_balance, multiplier, total,
                                       sizes, window)
        except (TypeError, ValueError) as error:
            problem = error
        device = q.device if isinstance(q, Tensor) else torch.device("cpu")
        mine = torch.tensor(statement or [0.0] * (len(FIELDS) - 1) + [1.0],
                            dtype=torch.float64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        table = torch.stack(gathered).cpu()
        rank = dist.get_rank(group)
        if problem is not None:
            raise problem
        check_agreement(table)
        shards = [int(n) for n in table[:, 0]]
        total = int(table[0, FIELDS.index("graph node count")])
        if total >= 0 and total != sum(shards):  # the same verdict on every rank
            raise ValueError(f"ring_attention: the graph has {total} nodes but the shards "
                             f"hold {sum(shards)} ({shards} by rank); describe the nodes of "
                             f"all ranks (gatattn.build_graph(num_nodes={sum(shards)}, ...) or "
                             "the whole batch's ptr)")
        caller = contiguous_layout(shards)
        balanced = causal and load_balance and len(shards) > 1
        layout = zigzag_layout(sum(shards), len(shards)) if balanced else caller
        return cls(group, rank, caller, layout, sizes, multiplier, causal, window)

    def exchange(self, tensors: list[Tensor], origin: int) -> _Transfer:
        """Sends ``tensors`` (the block of ``origin``) to the next rank and receives the block
        of the rank before ``origin`` from the previous rank, shaped from the agreed sizes.
        Empty blocks are not sent."""
        incoming = (origin - 1) % self.world
        transfer = self.send_receive(tensors if self.size(origin) else None, self.rank + 1,
                                     tensors, self.rank - 1 if self.size(incoming) else None,
                                     slice(0, self.size(incoming)))
        transfer.received = transfer.received or [t[:0] for t in tensors]  # an empty block
        return transfer

    def peer(self, group_rank: int) -> int:
        """The global rank (what P2POp's ``peer`` takes on every torch >= 2.4) of a rank of
        the group (taken modulo the world size)."""
        group_rank %= self.world
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


@dataclass
class _Transfer:
    works: list
    received: list[Tensor]

    def wait(self) -> list[Tensor]:
        for work in self.works:
            work.wait()
        return self.received


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


def _attend(call: BlockCall, q: Tensor, k: Tensor, v: Tensor, ring: _Ring):
    """``(out, lse)`` of one call of the library's attention (its routes)."""
    ptr = None if call.ptr is None else tuple(
        torch.tensor(p, device=q.device) for p in call.ptr)
    return attention(q[call.rows], call.key_rows(k), call.key_rows(v), ptr=ptr,
                     causal="bottom_right" if call.diagonal else False, window=call.window,
                     scale=ring.multiplier, return_lse=True)


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> tuple[Tensor, Tensor]:
    """This rank's output (compute dtype) and its log-sum-exp ``(n, H)``."""
    dtype = _compute_dtype(q)
    out = q.new_zeros((*q.shape[:2], v.size(-1)), dtype=dtype)
    lse = q.new_full(q.shape[:2], float("-inf"), dtype=dtype)
    for block, calls in _blocks([k, v], ring):
        for call in calls if block is not None else []:
            part_out, part_lse = _attend(call, q, *block, ring)
            rows_ = call.rows
            out[rows_], lse[rows_] = merge_attention([out[rows_], part_out.to(dtype)],
                                                     [lse[rows_], part_lse.to(dtype)])
    return out, lse


def _blocks(own: list[Tensor], ring: _Ring):
    """``(block, calls)`` at every step (the block ``None`` where a window skips it): the next
    one is received while this one is computed on."""
    if ring.window is not None:
        yield from ((block, calls) for _, _, block, calls in ring.windowed_blocks(own))
        return
    block = own
    for step in range(ring.world):
        origin = ring.origin(step)
        transfer = ring.exchange(block, origin) if step < ring.world - 1 else None
        yield block, ring.block_calls(origin)
        if transfer is not None:
            block = transfer.wait()


def _ring_backward(q, k, v, out, lse, grad_out, ring: _Ring) -> tuple[Tensor, Tensor, Tensor]:
    dtype = out.dtype
    grad_out = grad_out.to(dtype)
    delta = (grad_out * out).sum(-1)  # (n, H): <dout, out>, softmax's backward term
    dq = torch.zeros_like(q, dtype=dtype)
    block = [k, v]
    grads = [torch.zeros_like(k, dtype=dtype), torch.zeros_like(v, dtype=dtype)]
    if ring.window is not None:
        return dq, *_windowed_backward(q, k, v, dq, grads, grad_out, lse, delta, ring)
    for step in range(ring.world):
        origin = ring.origin(step)
        transfer = ring.exchange(block, origin) if step < ring.world - 1 else None
        calls = ring.block_calls(origin)
        if calls:
            _block_backward(calls, q, block, dq, grads, grad_out, lse, delta, ring)
        if ring.world > 1:  # the accumulators follow their block; the last hop takes them home
            grads = ring.exchange(grads, origin).wait()
        if transfer is not None:
            block = transfer.wait()
    return dq, grads[0], grads[1]


def _windowed_backward(q, k, v, dq, grads, grad_out, lse, delta, ring) -> list[Tensor]:
    """The windowed backward: the blocks come as in the forward, and the gradient of each
    block goes straight back to its rank, which adds it to its own (the same ranks talk)."""
    for step, origin, block, calls in ring.windowed_blocks([k, v]):
        part = grads if step == 0 or block is None else [
            torch.zeros_like(t, dtype=grads[0].dtype) for t in block]  # the rows received
        if block is not None:
            _block_backward(calls, q, block, dq, part, grad_out, lse, delta, ring)
        if step == 0:
            continue
        user = ring.rank + step  # computed on this rank's block at this step
        read = ring.read_rows(user, ring.rank)
        sent = ring.send_receive(block and part, origin, grads, read and user, read)
        for total, users_part in zip(grads, sent.wait(), strict=False):  # none without a user
            total[read] += users_part
    return grads


def _block_backward(calls, q, block, dq, grads, grad_out, lse, delta, ring) -> None:
    """Adds this rank's queries' share of the gradients for one key block: into ``dq``
    (local) and into the travelling accumulators ``grads``. The block's calls are recomputed
    and differentiated with the merge's gradient (module docstring)."""
    with torch.enable_grad():
        q = q.detach().requires_grad_()
        k, v = (t.detach().requires_grad_() for t in block)
        outputs, upstream = [], []
        for call in calls:
            part_out, part_lse = _attend(call, q, k, v, ring)
            rows_ = call.rows
            whole = lse[rows_]
            # exp(lse_b - lse): the part's share of the softmax (0 where neither sees a key).
            weight = torch.where(whole == float("-inf"), 0.0,
                                 (part_lse.to(whole.dtype) - whole).exp())
            dout = grad_out[rows_]
            part_delta = (dout * part_out.detach().to(dout.dtype)).sum(-1)
            outputs += [part_out, part_lse]
            upstream += [(weight.unsqueeze(-1) * dout).to(part_out.dtype),
                         (weight * (part_delta - delta[rows_])).to(part_lse.dtype)]
        found = torch.autograd.grad(outputs, (q, k, v), upstream, allow_unused=True)
    for total, grad in zip((dq, *grads), found, strict=True):
        if grad is not None:
            total += grad


def __getattr__(name: str):
    # The sharded layer lives in gatattn.sharded_conv (it builds on this module); this keeps
    # gatattn.distributed.ShardedSelfAttention working without a circular import.
    if name == "ShardedSelfAttention":
        from gatattn.sharded_conv import ShardedSelfAttention
        return ShardedSelfAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
