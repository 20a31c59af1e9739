"""``gatattn.distributed`` on 1, 2 and 3 gloo processes against the single-process reference.

Each world size is spawned once (process start-up is the cost): every rank runs every case on
its shard of the same full inputs and saves its output rows and gradients; the parent computes
the reference on the full tensors and compares the concatenated shards, forward and backward,
to 1e-9 in float64 (the tolerance rule in bfloat16).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatattn import SelfAttentionConv, build_graph, reference
from gatattn.distributed import ring_attention
from gatattn.sharded_conv import ShardedSelfAttention
from gatattn.tolerance import compare

HEADS, CHANNELS, VALUE_CHANNELS, FEATURES = 2, 3, 5, 6
LONG = torch.long
F64_TOL = 1e-9
# Shard sizes per world size: uneven, empty, and (1, 0, 1) fewer nodes than the 2P chunks of
# the causal zig-zag layout (some ranks compute on nothing).
SHARDS = {1: [(9,)], 2: [(5, 11), (0, 9)], 3: [(7, 0, 13), (1, 4, 2), (1, 0, 1)]}
SPAWN_TIMEOUT_S = 1800  # a hang guard, far above any loaded machine's run time
# A group of ranks 1..P-1 (group rank = global rank - 1): peers are addressed by global rank.
SUBGROUP_CASE = dict(causal=True, scale=None, temperature=1.0, dtype=torch.float64, ptr=None,
                     form=None, load_balance=True, window=None)
SUBGROUP_SIZES = {2: (6,), 3: (4, 6)}
# The relay ring, and the windowed ring's direct transfers (peers named by global rank too).
SUBGROUP_VARIANTS = {"ring": {}, "window": {"window": (2, 0), "load_balance": False}}
CONVS = {  # name: (constructor kwargs, causal)
    "concat-root-out_proj": (dict(out_channels=4, heads=2, out_proj=True, temperature=0.8), False),
    "concat-root-out_proj-causal": (dict(out_channels=4, heads=2, out_proj=True), True),
    "mean-beta": (dict(out_channels=5, heads=3, concat=False, beta=True), False),
    "grouped-query-causal": (dict(out_channels=4, heads=4, kv_heads=2, out_proj=True), True),
    "grouped-query-causal-batch": (dict(out_channels=4, heads=4, kv_heads=2), True),
    "concat-root-batch": (dict(out_channels=4, heads=2, out_proj=True), False),
    "concat-root-out_proj-causal-window": (dict(out_channels=4, heads=2, out_proj=True), True),
    "grouped-query-batch-window": (dict(out_channels=4, heads=4, kv_heads=2), False),
}
# Layer cases on a PyG batch (BATCHES), whose graphs straddle ranks.
BATCHED_CONVS = {"grouped-query-causal-batch", "concat-root-batch", "grouped-query-batch-window"}
# Layer cases with a sliding window.
CONV_WINDOWS = {"concat-root-out_proj-causal-window": (3, 0), "grouped-query-batch-window": (2, 1)}


def conv_ptr(name: str, sizes) -> torch.Tensor | None:
    return torch.tensor(BATCHES[tuple(sizes)]) if name in BATCHED_CONVS else None


# Graph offsets of a PyG batch over the nodes of all ranks, per shard sizes: graphs straddle
# shard boundaries (one spans three ranks), and one graph is empty.
BATCHES = {(9,): [0, 4, 4, 9], (5, 11): [0, 3, 3, 10, 16], (0, 9): [0, 2, 9],
           (7, 0, 13): [0, 2, 9, 9, 15, 20], (1, 4, 2): [0, 3, 7], (1, 0, 1): [0, 1, 2]}
# How a batch reaches ring_attention: ptr=, batch= (the graph id of every node), graph=.
BATCH_FORMS = ("ptr", "batch", "graph")


def ring_cases(world: int) -> list[dict]:
    base = dict(scale=None, temperature=1.0, dtype=torch.float64, ptr=None, form=None,
                load_balance=True, window=None)
    cases = [{**base, "sizes": sizes, "causal": causal}
             for sizes in SHARDS[world] for causal in (False, True)]
    first = SHARDS[world][0]
    cases.append({**base, "sizes": first, "causal": True, "load_balance": False})
    cases += [{**base, "sizes": sizes, "causal": causal, "ptr": BATCHES[sizes], "form": form}
              for sizes in SHARDS[world] for causal in (False, True)
              for form in (BATCH_FORMS if sizes == first else ("ptr",))]
    cases.append({**base, "sizes": first, "causal": True, "scale": 0.7, "temperature": 1.3})
    cases.append({**base, "sizes": first, "causal": False, "dtype": torch.bfloat16})
    cases.append({**base, "sizes": first, "causal": True, "dtype": torch.bfloat16})
    return cases + window_cases(world, base)


def window_cases(world: int, base: dict) -> list[dict]:
    """Sliding windows narrower than a shard (far blocks make no call) and wider than one
    (a window reaches past the next rank), zig-zag and plain, on one graph and on a batch
    whose graphs straddle ranks, the window by keyword and from graph=."""
    first, last = SHARDS[world][0], SHARDS[world][-1]
    windowed = {**base, "sizes": first}
    batch = {**windowed, "ptr": BATCHES[first], "form": "ptr"}
    return [{**windowed, "causal": True, "window": (2, 0)},
            {**windowed, "causal": True, "window": (6, 0), "load_balance": False},
            {**windowed, "causal": False, "window": (1, 3), "form": "graph"},
            {**windowed, "causal": False, "window": (None, 2), "sizes": last},
            {**batch, "causal": True, "window": (3, 0), "form": "graph"},
            {**batch, "causal": False, "window": (4, 1)},
            {**windowed, "causal": True, "window": (3, 0), "dtype": torch.bfloat16}]


def case_id(world: int, index: int) -> str:
    case = ring_cases(world)[index]
    flags = "causal" if case["causal"] else "full"
    flags += "" if case["load_balance"] else "-plain_ring"
    flags += "" if case["ptr"] is None else f"-batch_by_{case['form']}"
    flags += "" if case["window"] is None else f"-window{case['window'][0]}_{case['window'][1]}"
    flags += "-by_graph" if case["ptr"] is None and case["form"] == "graph" else ""
    extra = "" if case["scale"] is None else f"-scale{case['scale']}-tau{case['temperature']}"
    dtype = str(case["dtype"]).removeprefix("torch.")
    return f"P{world}-{'+'.join(map(str, case['sizes']))}-{flags}{extra}-{dtype}"


def graph_keywords(case: dict) -> dict:
    """How the case gives its graph to ring_attention."""
    keywords = dict(causal=case["causal"], window=case["window"])
    if case["ptr"] is None:
        if case["form"] == "graph":
            return dict(graph=build_graph(num_nodes=sum(case["sizes"]), **keywords))
        return keywords
    ptr = torch.tensor(case["ptr"])
    if case["form"] == "ptr":
        return dict(ptr=ptr, **keywords)
    batch = torch.repeat_interleave(torch.arange(len(ptr) - 1), ptr.diff())
    if case["form"] == "batch":
        return dict(batch=batch, **keywords)
    return dict(graph=build_graph(batch=batch, **keywords))


def graph_sizes(case: dict) -> list[int]:
    if case["ptr"] is None:
        return [sum(case["sizes"])]
    return torch.tensor(case["ptr"]).diff().tolist()


def full_inputs(case: dict, seed: int):
    """q, k, v and the upstream gradient over all N nodes, float64."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(case["sizes"])
    shapes = ((n, HEADS, CHANNELS), (n, HEADS, CHANNELS), (n, HEADS, VALUE_CHANNELS),
              (n, HEADS, VALUE_CHANNELS))
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]


def shard(t: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    return t.narrow(0, sum(sizes[:rank]), sizes[rank]).clone()


def make_conv(kwargs: dict) -> SelfAttentionConv:
    torch.manual_seed(3)
    return SelfAttentionConv(FEATURES, **kwargs).double()


def conv_inputs(sizes, out_channels: int):
    gen = torch.Generator().manual_seed(5)
    n = sum(sizes)
    return (torch.randn(n, FEATURES, generator=gen, dtype=torch.float64),
            torch.randn(n, out_channels, generator=gen, dtype=torch.float64))


# --- what every rank runs ---


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    try:
        ring = [_ring_case(case, rank, i) for i, case in enumerate(ring_cases(world))]
        results = {"ring": ring,
                   "conv": {name: _conv_case(kwargs, causal, SHARDS[world][0], rank,
                                             conv_ptr(name, SHARDS[world][0]),
                                             CONV_WINDOWS.get(name))
                            for name, (kwargs, causal) in CONVS.items()},
                   "refusals": _refusals(rank, world),
                   "subgroup": _subgroup_case(rank, world)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ring_case(case: dict, rank: int, seed: int, group=None) -> dict:
    q, k, v, grad = (shard(t, case["sizes"], rank) for t in full_inputs(case, seed))
    q, k, v = (t.to(case["dtype"]).requires_grad_() for t in (q, k, v))
    with counting_sends() as sent:
        out = ring_attention(q, k, v, group=group, scale=case["scale"],
                             temperature=case["temperature"], load_balance=case["load_balance"],
                             **graph_keywords(case))
        out.backward(grad.to(case["dtype"]))
    return {"out": out.detach(), "grads": [q.grad, k.grad, v.grad], "sent": sent[0]}


@contextlib.contextmanager
def counting_sends():
    """Counts the elements this rank sends point to point (``[count]``)."""
    sent, post = [0], dist.batch_isend_irecv

    def counted(ops):
        sent[0] += sum(op.tensor.numel() for op in ops if op.op is dist.isend)
        return post(ops)

    dist.batch_isend_irecv = counted
    try:
        yield sent
    finally:
        dist.batch_isend_irecv = post


def _subgroup_case(rank: int, world: int) -> dict | None:
    if world == 1:
        return None
    group = dist.new_group(list(range(1, world)))  # every rank must call new_group
    if rank == 0:
        return None
    return {name: _ring_case({**SUBGROUP_CASE, "sizes": SUBGROUP_SIZES[world], **case},
                             rank - 1, 0, group)
            for name, case in SUBGROUP_VARIANTS.items()}


def _conv_case(kwargs: dict, causal: bool, sizes, rank: int, ptr, window) -> dict:
    """The sharded layer's output and gradients, with ``causal=`` (and ``ptr=``, ``window=``)
    and with the same graph as an object (``"by graph"``)."""
    runs = {}
    for form in ("by keywords", "by graph"):
        conv = make_conv(kwargs)
        x, grad = conv_inputs(sizes, _out_width(kwargs))
        x = shard(x, sizes, rank).requires_grad_()
        layer = ShardedSelfAttention(conv)
        if form == "by graph":
            graph = (build_graph(num_nodes=sum(sizes), causal=causal, window=window)
                     if ptr is None else build_graph(ptr=ptr, causal=causal, window=window))
            out = layer(x, graph=graph)
        else:
            out = layer(x, causal=causal, ptr=ptr, window=window)
        out.backward(shard(grad, sizes, rank))
        for p in conv.parameters():  # each rank holds its share of every parameter's gradient
            dist.all_reduce(p.grad)
        runs[form] = {"out": out.detach(), "x_grad": x.grad,
                      "param_grads": {name: p.grad for name, p in conv.named_parameters()}}
    return {**runs["by keywords"], "by graph": runs["by graph"]}


def _out_width(kwargs: dict) -> int:
    return kwargs["out_channels"] * (kwargs["heads"] if kwargs.get("concat", True) else 1)


def _refusals(rank: int, world: int) -> dict:
    """Errors each rank got for inputs that some rank must refuse: ``(type, message)``."""
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(3, HEADS, CHANNELS, generator=gen, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    checks = {
        "causal differs": lambda: ring_attention(q, k, v, causal=rank == 0),
        "window differs": lambda: ring_attention(q, k, v, window=(rank, 1)),
        "bad shape on the last rank": lambda: ring_attention(
            q[:, 0] if rank == world - 1 else q, k, v),
        "heads differ": lambda: ring_attention(*(t[:, :1] if rank == 0 else t
                                                 for t in (q, k, v))),
        "needs grad differs": lambda: ring_attention(q.detach() if rank == 0 else q,
                                                     k.detach() if rank == 0 else k,
                                                     v.detach() if rank == 0 else v),
        "second derivatives": lambda: torch.autograd.grad(
            ring_attention(q, k, v).pow(2).sum(), q, create_graph=True),
        # Every rank holds 3 nodes: a graph of another size is refused by all of them.
        "graph of another size": lambda: ring_attention(
            q, k, v, graph=build_graph(num_nodes=3 * world + 1)),
        "graph on rank 0 only": lambda: ring_attention(
            q, k, v, graph=build_graph(num_nodes=3 * world) if rank == 0 else None),
    }
    errors = {}
    for name, check in checks.items():
        try:
            check()
            errors[name] = None
        except (ValueError, RuntimeError) as error:
            errors[name] = (type(error).__name__, str(error))
    return errors


# --- the parent: spawn once per world size, compare with the reference ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def rank_results(world: int) -> list[dict]:
    """Every rank's saved results, after spawning ``world`` gloo processes once."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_rank_main, args=(world, free_port(), out_dir),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world} ranks did not finish in {SPAWN_TIMEOUT_S} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def reference_ring(case: dict, seed: int, dtype: torch.dtype | None):
    """Output and q, k, v gradients of the reference on the full inputs; ``dtype`` None computes
    in float64, else in ``dtype`` (the low-precision reference of the tolerance rule)."""
    q, k, v, grad = full_inputs(case, seed)
    cast = case["dtype"]
    q, k, v = (t.to(cast).requires_grad_() for t in (q, k, v))
    mask = reference.block_mask(graph_sizes(case), causal=case["causal"],
                                window=case.get("window"))
    out = reference.attention(q, k, v, mask, scale=case["scale"],
                              temperature=case["temperature"],
                              compute_dtype=torch.float64 if dtype is None else dtype)
    return [out, *torch.autograd.grad(out, (q, k, v), grad.to(cast))]


def gathered(per_rank: list, key) -> torch.Tensor:
    return torch.cat([key(r) for r in per_rank])


RING_PARAMS = [pytest.param(world, i, id=case_id(world, i))
               for world in (1, 2, 3) for i in range(len(ring_cases(world)))]


@pytest.mark.parametrize("world, index", RING_PARAMS)
@pytest.mark.heavy  # spawns gloo ranks (once per world size): ~60 s in all
def test_ring_attention_equals_single_process(world, index):
    case = ring_cases(world)[index]
    runs = [r["ring"][index] for r in rank_results(world)]
    got = [gathered(runs, lambda r: r["out"]),
           *(gathered(runs, lambda r, i=i: r["grads"][i]) for i in range(3))]
    ref_hi = reference_ring(case, index, None)
    low = case["dtype"] in (torch.float16, torch.bfloat16)
    ref_lo = reference_ring(case, index, case["dtype"]) if low else [None] * 4
    for name, g, hi, lo in zip(("out", "dq", "dk", "dv"), got, ref_hi, ref_lo, strict=True):
        assert g.shape == hi.shape and g.dtype == case["dtype"]
        if low:
            result = compare(g, hi, lo, case["dtype"])
            print(f"{name}: max error {result.error:.3e}, bound {result.bound:.3e}")
            assert result.passed, f"{name}: {result}"
        else:
            error = (g - hi).abs().max().item() if g.numel() else 0.0
            print(f"{name}: max error {error:.3e}")
            assert error <= F64_TOL, f"{name}: max error {error:.3e} > {F64_TOL}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.heavy  # spawns gloo ranks (once per world size): ~60 s in all
def test_sharded_layer_equals_conv(world, name):
    kwargs, causal = CONVS[name]
    sizes = SHARDS[world][0]
    conv = make_conv(kwargs)
    x, grad = conv_inputs(sizes, _out_width(kwargs))
    x.requires_grad_()
    out = conv(x, causal=causal, ptr=conv_ptr(name, sizes), window=CONV_WINDOWS.get(name))
    out.backward(grad)
    runs = [r["conv"][name] for r in rank_results(world)]
    checks = {"out": (gathered(runs, lambda r: r["out"]), out),
              "x.grad": (gathered(runs, lambda r: r["x_grad"]), x.grad)}
    for pname, p in conv.named_parameters():
        for rank, run in enumerate(runs):  # every rank holds the all-reduced full gradient
            checks[f"{pname}.grad on rank {rank}"] = (run["param_grads"][pname], p.grad)
    for what, (got, expected) in checks.items():
        error = (got - expected).abs().max().item()
        print(f"{what}: max error {error:.3e}")
        assert error <= F64_TOL, f"{what}: max error {error:.3e} > {F64_TOL}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.heavy  # spawns gloo ranks (once per world size): ~60 s in all
def test_sharded_layer_graph_equals_keywords(world, name):
    """``layer(x, graph=build_graph(num_nodes=N, causal=c))`` is ``layer(x, causal=c)`` (with
    ``ptr``: ``build_graph(ptr=ptr, causal=c)`` is ``ptr=ptr, causal=c``): the same output and
    gradients, bit for bit, on every rank."""
    for rank, run in enumerate(rank_results(world)):
        keywords, by_graph = run["conv"][name], run["conv"][name]["by graph"]
        for what in ("out", "x_grad"):
            torch.testing.assert_close(by_graph[what], keywords[what], rtol=0, atol=0,
                                       msg=lambda m, w=what, r=rank: f"{w} on rank {r}: {m}")
        for pname, grad in keywords["param_grads"].items():
            torch.testing.assert_close(by_graph["param_grads"][pname], grad, rtol=0, atol=0,
                                       msg=lambda m, p=pname, r=rank: f"{p} on rank {r}: {m}")


# Causal window (6, 0) on the plain ring: the last rank's queries reach back into the first
# rank's block only (rank 1 of three is empty): its rows 0-4 of 5 on two ranks, 1-6 of 7 on
# three. Those rows go straight to it in the forward and again in the backward, and their
# gradient straight back: 3 x rows x (HEADS x CHANNELS + HEADS x VALUE_CHANNELS) elements.
NARROW_RING_SENDS = {1: 0, 2: 3 * 5 * HEADS * (CHANNELS + VALUE_CHANNELS),
                     3: 3 * 6 * HEADS * (CHANNELS + VALUE_CHANNELS)}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.heavy  # spawns gloo ranks (once per world size): ~60 s in all
def test_windowed_ring_sends_only_the_blocks_a_window_reaches(world):
    """A block no rank's window reaches is never sent, nor the rows of a block that no window
    reaches (the unwindowed ring sends every block round the ring, and its gradient)."""
    cases = ring_cases(world)
    index = next(i for i, c in enumerate(cases) if c["window"] == (6, 0))
    full = next(i for i, c in enumerate(cases) if c["window"] is None and c["causal"]
                and not c["load_balance"])
    sent = [sum(r["ring"][i]["sent"] for r in rank_results(world)) for i in (index, full)]
    print(f"elements sent: {sent[0]} windowed, {sent[1]} without a window")
    assert sent[0] == NARROW_RING_SENDS[world]
    assert world == 1 or sent[1] > sent[0]


@pytest.mark.parametrize("variant", list(SUBGROUP_VARIANTS))
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.heavy  # spawns gloo ranks (once per world size): ~60 s in all
def test_ring_attention_on_a_subgroup(world, variant):
    case = {**SUBGROUP_CASE, "sizes": SUBGROUP_SIZES[world], **SUBGROUP_VARIANTS[variant]}
    runs = [r["subgroup"] for r in rank_results(world)]
    assert runs[0] is None
    runs = [runs[0], *(r[variant] for r in runs[1:])]
    got = [gathered(runs[1:], lambda r: r["out"]),
           *(gathered(runs[1:], lambda r, i=i: r["grads"][i]) for i in range(3))]
    for name, g, expected in zip(("out", "dq", "dk", "dv"), got, reference_ring(case, 0, None),
                                 strict=True):
        error = (g - expected).abs().max().item()
        print(f"{name}: max error {error:.3e}")
        assert error <= F64_TOL, f"{name}: max error {error:.3e} > {F64_TOL}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.heavy  # spawns gloo ranks (once per world size): ~60 s in all
def test_refusals_raise_on_every_rank(world):
    per_rank = [r["refusals"] for r in rank_results(world)]
    for rank, errors in enumerate(per_rank):
        assert errors["causal differs"][0] == "ValueError"
        assert "same causal" in errors["causal differs"][1]
        assert errors["window differs"][0] == "ValueError"
        assert "same window left" in errors["window differs"][1]
        assert errors["heads differ"][0] == "ValueError"
        assert "same heads" in errors["heads differ"][1]
        assert errors["needs grad differs"][0] == "ValueError"
        assert "same needs grad" in errors["needs grad differs"][1]
        shape_error = errors["bad shape on the last rank"]
        assert shape_error[0] == "ValueError"
        if rank == world - 1:
            assert "must be (num_nodes, heads, channels)" in shape_error[1]
        else:
            assert f"rank(s) [{world - 1}] were refused" in shape_error[1]
        assert errors["second derivatives"][0] == "RuntimeError"
        assert "second derivatives are not available" in errors["second derivatives"][1]
        assert errors["graph of another size"] == (
            "ValueError", f"ring_attention: the graph has {3 * world + 1} nodes but the shards "
            f"hold {3 * world} ({[3] * world} by rank); describe the nodes of all ranks "
            f"(gatattn.build_graph(num_nodes={3 * world}, ...) or the whole batch's ptr)")
        assert errors["graph on rank 0 only"][0] == "ValueError"
        assert "same graph node count" in errors["graph on rank 0 only"][1]


def test_single_rank_equals_reference():
    """World size 1 in this process: the ring has one block, no transfer."""
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for causal in (False, True):
            case = {**SUBGROUP_CASE, "sizes": (9,), "causal": causal}
            q, k, v, grad = full_inputs(case, 0)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out = ring_attention(q, k, v, causal=causal)
            got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
            for g, expected in zip(got, reference_ring(case, 0, None), strict=True):
                assert (g - expected).abs().max().item() <= F64_TOL
    finally:
        dist.destroy_process_group()


def test_single_rank_graph_equals_keywords_and_bad_graphs_are_refused():
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        case = {**SUBGROUP_CASE, "sizes": (9,)}
        q, k, v, grad = full_inputs(case, 0)
        runs = []
        for keywords in (dict(causal=True), dict(graph=build_graph(num_nodes=9, causal=True))):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = ring_attention(*inputs, **keywords)
            runs.append([out, *torch.autograd.grad(out, inputs, grad)])
        for by_keywords, by_graph in zip(*runs, strict=True):
            torch.testing.assert_close(by_graph, by_keywords, rtol=0, atol=0)
        not_complete_graphs = [build_graph(edge_index=torch.tensor([[0], [1]]), num_nodes=9),
                               build_graph(num_nodes=(9, 9)),  # bipartite
                               build_graph(ptr=(torch.tensor([0, 9]), torch.tensor([0, 9])))]
        for graph in not_complete_graphs:
            with pytest.raises(ValueError, match="runs complete graphs .one, or a batch of them."):
                ring_attention(q, k, v, graph=graph)
        unsorted = torch.tensor([0] * 4 + [1] * 4 + [0])
        with pytest.raises(ValueError, match="each graph of the batch must be a contiguous run"):
            ring_attention(q, k, v, graph=build_graph(batch=unsorted))
        with pytest.raises(ValueError, match="batch must be sorted"):
            ring_attention(q, k, v, batch=unsorted)
        with pytest.raises(ValueError, match="self-attention: no .ptr_dst, ptr_src. pair"):
            ring_attention(q, k, v, ptr=(torch.tensor([0, 9]), torch.tensor([0, 9])))
        with pytest.raises(ValueError, match="ptr must start at 0 and never decrease"):
            ring_attention(q, k, v, ptr=torch.tensor([0, 5, 4, 9]))
        with pytest.raises(ValueError, match="the graph has 10 nodes but the shards hold 9"):
            ring_attention(q, k, v, ptr=torch.tensor([0, 5, 10]))
        with pytest.raises(ValueError, match="give the batch as ptr or as batch, not both"):
            ring_attention(q, k, v, ptr=torch.tensor([0, 9]), batch=torch.zeros(9, dtype=LONG))
        with pytest.raises(ValueError, match="graph= already describes the graph; got ptr"):
            ring_attention(q, k, v, graph=build_graph(num_nodes=9), ptr=torch.tensor([0, 9]))
        with pytest.raises(ValueError, match="graph= already describes the graph; got causal"):
            ring_attention(q, k, v, graph=build_graph(num_nodes=9), causal=True)
        with pytest.raises(ValueError, match="graph= already describes the graph; got window"):
            ring_attention(q, k, v, graph=build_graph(num_nodes=9), window=(2, 0))
        with pytest.raises(ValueError, match="window must be None or a .left, right. pair"):
            ring_attention(q, k, v, window=(-1, 0))
        with pytest.raises(ValueError, match="causal attention already keeps j <= i"):
            ring_attention(q, k, v, causal=True, window=(2, 1))
        with pytest.raises(TypeError, match="graph must be a gatattn.AttentionGraph"):
            ring_attention(q, k, v, graph={"causal": True})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("option, kwargs, message", [
    ("edge_dim", dict(edge_dim=3), "edge_dim=3"),
    ("dropout", dict(dropout=0.1), "dropout=0.1"),
    ("backend", dict(backend="sparse"), "backend='sparse'"),
    ("aggr", dict(aggr="mean"), "aggr other than 'add'"),
    ("lazy", dict(in_channels=-1), "lazy"),
])
def test_sharded_layer_refuses_unsupported_options(option, kwargs, message):
    """Refused on the local rank before any communication, so no process group is needed."""
    in_channels = kwargs.pop("in_channels", FEATURES)
    wrapped = ShardedSelfAttention(SelfAttentionConv(in_channels, 4, heads=2, **kwargs))
    with pytest.raises(ValueError, match=message):
        wrapped(torch.randn(3, FEATURES))


def test_sharded_layer_refuses_bipartite_input_and_other_modules():
    wrapped = ShardedSelfAttention(SelfAttentionConv(FEATURES, 4))
    with pytest.raises(ValueError, match="bipartite"):
        wrapped((torch.randn(3, FEATURES), torch.randn(2, FEATURES)))
    with pytest.raises(TypeError, match="SelfAttentionConv"):
        ShardedSelfAttention(torch.nn.Linear(3, 3))
    assert repr(wrapped) == "ShardedSelfAttention(SelfAttentionConv(6, 4, heads=1))"
