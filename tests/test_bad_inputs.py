"""Every bad input gets a ValueError or TypeError, raised before any route runs, whose message
names the value received and says what to do instead. One row per bad input."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from torch_geometric.nn import Sequential

import gatattn
from gatattn import SelfAttentionConv
from gatattn.distributed import ring_attention


def qkv(n_dst=5, n_src=5, heads=2, channels=4, value_channels=None, dtype=torch.float32):
    value_channels = value_channels or channels
    return (torch.randn(n_dst, heads, channels, dtype=dtype),
            torch.randn(n_src, heads, channels, dtype=dtype),
            torch.randn(n_src, heads, value_channels, dtype=dtype))


def attend(*, inputs=None, **kwargs):
    return gatattn.attention(*(inputs or qkv()), **kwargs)


def ring(**kwargs):
    """ring_attention on a one-rank group (a refusal is agreed through the group first)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return ring_attention(*qkv(), **kwargs)
    finally:
        dist.destroy_process_group()


EDGES = torch.tensor([[0, 1, 2], [1, 2, 3]])
LONG = torch.long
META_PTR = torch.tensor([0, 2, 5], device="meta")

# (id, call, exception, what the message must name (the value), what it must suggest (the fix))
BAD_INPUTS = [
    # q, k, v
    ("q not a tensor", lambda: gatattn.attention([[1.0]], *qkv()[1:]), TypeError,
     "got list", r"\(num_nodes, heads, channels\) tensor"),
    ("q 2-D", lambda: attend(inputs=(torch.randn(5, 8), *qkv()[1:])), ValueError,
     r"got \(5, 8\)", r"view\(num_nodes, heads, channels\)"),
    ("heads differ", lambda: attend(inputs=(qkv()[0], *qkv(heads=3)[1:])), ValueError,
     "got 2, 3 and 3", "same number of heads"),
    ("channels differ", lambda: attend(inputs=(qkv()[0], *qkv(channels=6)[1:])), ValueError,
     "got 4 and 6", "q and k must have the same channels"),
    ("k, v rows differ", lambda: attend(inputs=(*qkv()[:2], qkv()[2][:3])), ValueError,
     "got 5 and 3", "one row per source node"),
    ("dtypes differ", lambda: attend(inputs=(qkv()[0].double(), *qkv()[1:])), ValueError,
     "torch.float64, torch.float32", "cast them to one dtype"),
    ("integer q", lambda: attend(inputs=tuple(t.long() for t in qkv())), TypeError,
     "torch.int64", "floating point"),
    ("zero heads", lambda: attend(inputs=qkv(heads=0)), ValueError,
     r"\(5, 0, 4\)", "at least one head"),
    ("zero channels", lambda: attend(inputs=qkv(channels=0)), ValueError,
     r"\(5, 2, 0\)", "at least one channel"),
    ("zero value channels", lambda: attend(inputs=qkv(value_channels=1)[:2] + (
        torch.randn(5, 2, 0),)), ValueError, r"\(5, 2, 0\)", "at least one channel"),
    # scalars and flags
    ("scale NaN", lambda: attend(scale=float("nan")), ValueError, "got nan", "finite number"),
    ("scale inf", lambda: attend(scale=float("inf")), ValueError, "got inf", "finite number"),
    ("temperature 0", lambda: attend(temperature=0.0), ValueError, "got 0.0", "> 0"),
    ("temperature NaN", lambda: attend(temperature=float("nan")), ValueError, "got nan", "> 0"),
    ("temperature underflows scale / temperature",
     lambda: attend(inputs=qkv(dtype=torch.float64), temperature=1e-320), ValueError,
     "1e-320 overflows to inf", "larger temperature"),
    ("ring_attention scale NaN", lambda: ring(scale=float("nan")), ValueError,
     "scale must be .*got nan", "finite number"),
    ("ring_attention group a string", lambda: ring_attention(*qkv(), group="x"), TypeError,
     "got 'x'", "ProcessGroup or None"),
    ("dropout 1", lambda: attend(dropout=1.0), ValueError, "got 1.0", r"\[0, 1\)"),
    ("dropout negative", lambda: attend(dropout=-0.1), ValueError, "got -0.1", r"\[0, 1\)"),
    ("causal a string", lambda: attend(causal="yes"), ValueError, "got 'yes'",
     "'top_left', 'bottom_right'"),
    ("causal misspelt", lambda: attend(causal="bottom-right"), ValueError,
     "got 'bottom-right'", "'bottom_right'"),
    ("backend unknown", lambda: attend(backend="flash"), ValueError, "got 'flash'",
     "one of"),
    ("sdpa on edges", lambda: attend(edge_index=EDGES, backend="sdpa"), ValueError,
     "backend='sdpa'", "use backend='sparse'"),
    ("sdpa with weights", lambda: attend(backend="sdpa", return_attention_weights=True),
     ValueError, "backend='sdpa'", "backend='auto' or 'sparse'"),
    ("triton float64", lambda: attend(inputs=qkv(dtype=torch.float64), backend="triton"),
     ValueError, "got torch.float64", "'sparse' compute in float64"),
    ("triton head dim 300", lambda: attend(inputs=qkv(channels=300), backend="triton"),
     ValueError, "got 300", "backend='sdpa' or 'sparse'"),
    ("triton dropout", lambda: attend(dropout=0.1, backend="triton"), ValueError,
     "dropout=0.1", "backend='sdpa' or 'sparse'"),
    # edge_index
    ("edge_index a list", lambda: attend(edge_index=[[0, 1], [1, 0]]), TypeError, "got list",
     "LongTensor"),
    ("edge_index (E, 2)", lambda: attend(edge_index=EDGES.t()), ValueError, r"got \(3, 2\)",
     "transpose"),
    ("batch as edge_index", lambda: attend(edge_index=torch.tensor([0, 0, 1, 1, 1])),
     ValueError, r"1-D integer tensor of shape \(5,\)", "pass it as batch="),
    # PyG's Sequential passes its inputs by position: batch lands in edge_index
    ("batch as edge_index, by PyG's Sequential", lambda: Sequential(
        "x, batch", [(SelfAttentionConv(8, 4), "x, batch -> x")])(
        torch.randn(5, 8), torch.tensor([0, 0, 1, 1, 1])), ValueError,
     r"1-D integer tensor of shape \(5,\)", "pass it as batch="),
    ("edge_index float", lambda: attend(edge_index=EDGES.float()), ValueError,
     "torch.float32", "integer node ids"),
    ("edge_index too large", lambda: attend(edge_index=torch.tensor([[0, 1], [1, 5]])),
     ValueError, "max 5", "< the number of nodes"),
    ("edge_index negative", lambda: attend(edge_index=torch.tensor([[0, -2], [1, 0]])),
     ValueError, "-2", ">= 0"),
    ("3-D sparse adjacency", lambda: attend(edge_index=torch.ones(2, 5, 5).to_sparse()),
     ValueError, r"got shape \(2, 5, 5\)", "targets x sources"),
    ("edge_attr without edges", lambda: attend(edge_attr=torch.randn(3, 2, 4)), ValueError,
     "edge_attr", "explicit edge_index"),
    ("edge_attr shape", lambda: attend(edge_index=EDGES, edge_attr=torch.randn(2, 2, 4)),
     ValueError, r"got \(2, 2, 4\)", r"\(num_edges, heads, channels\) = \(3, 2, 4\)"),
    # batch / ptr
    ("batch and ptr", lambda: attend(batch=torch.zeros(5, dtype=LONG),
                                     ptr=torch.tensor([0, 5])), ValueError,
     "batch and ptr", "either batch or ptr"),
    ("batch length", lambda: attend(batch=torch.zeros(4, dtype=LONG)), ValueError,
     "4 entries", "one graph id per node"),
    ("batch float", lambda: attend(batch=torch.zeros(5)), ValueError, "torch.float32",
     "integer tensor of graph ids"),
    ("batch negative", lambda: attend(batch=torch.tensor([0, 0, -1, 1, 1])), ValueError,
     "min -1", "ids >= 0"),
    ("ptr end", lambda: attend(ptr=torch.tensor([0, 2, 4])), ValueError, r"0 \.\.\. 4",
     "end at the number of nodes"),
    ("ptr start", lambda: attend(ptr=torch.tensor([1, 5])), ValueError, r"1 \.\.\. 5",
     "start at 0"),
    ("ptr decreasing", lambda: attend(ptr=torch.tensor([0, 3, 2, 5])), ValueError,
     r"\[0, 3, 2, 5\]", "non-decreasing"),
    ("ptr 2-D", lambda: attend(ptr=torch.tensor([[0, 5]])), ValueError, r"shape \(1, 2\)",
     "1-D integer tensor"),
    # graph tensors on meta hold no values to build the graph from (.to() cannot copy them)
    ("ptr on meta", lambda: attend(ptr=META_PTR), ValueError, "ptr is on the meta device",
     "create ptr with its values on cpu"),
    ("batch on meta", lambda: attend(batch=torch.zeros(5, dtype=LONG, device="meta")),
     ValueError, "batch is on the meta device", "create batch with its values on cpu"),
    ("edge_index on meta", lambda: attend(edge_index=EDGES.to("meta")), ValueError,
     "edge_index is on the meta device", "create edge_index with its values on cpu"),
    ("build_graph ptr on meta", lambda: gatattn.build_graph(ptr=META_PTR), ValueError,
     "ptr is on the meta device", "create ptr with its values on the inputs' device"),
    ("build_graph batch pair on meta", lambda: gatattn.build_graph(
        batch=(torch.zeros(3, dtype=LONG), torch.zeros(5, dtype=LONG, device="meta"))),
     ValueError, r"batch\[1\] is on the meta device", r"create batch\[1\] with its values"),
    ("layer ptr on meta", lambda: SelfAttentionConv(8, 4)(torch.randn(5, 8), ptr=META_PTR),
     ValueError, "ptr is on the meta device", "create ptr with its values on cpu"),
    ("layer edge_index on meta, by propagate", lambda: SelfAttentionConv(8, 4, aggr="mean")(
        torch.randn(5, 8), EDGES.to("meta")), ValueError, "edge_index is on the meta device",
     "create edge_index with its values on cpu"),
    # padded bias
    ("padded bias size above L", lambda: gatattn.stacked_from_padded(
        torch.randn(2, 2, 3, 3), [4, 2]), ValueError, "sizes_dst .* from 2 to 4",
     r"\[0, 3\] .*pad the bias to the largest graph"),
    ("padded bias source size above S", lambda: gatattn.stacked_from_padded(
        torch.randn(2, 2, 3, 4), [2, 2], torch.tensor([2, 5])), ValueError,
     "sizes_src .* from 2 to 5", r"\[0, 4\] .*pad the bias to the largest graph"),
    ("padded bias size negative", lambda: gatattn.stacked_from_padded(
        torch.randn(2, 2, 3, 3), [2, -1]), ValueError, "from -1 to 2", r"\[0, 3\]"),
    ("one batch for cross-attention", lambda: attend(inputs=qkv(n_dst=3),
                                                     batch=torch.zeros(3, dtype=LONG)),
     ValueError, "batch", "give batch as a pair"),
    ("pair of three", lambda: attend(inputs=qkv(n_dst=3), batch=(torch.zeros(3, dtype=LONG),) * 3),
     ValueError, "got 3 items", r"\(dst, src\) pair"),
    # the layer
    ("layer heads 0", lambda: SelfAttentionConv(8, 4, heads=0), ValueError, "got 0",
     "heads >= 1"),
    ("layer kv_heads float", lambda: SelfAttentionConv(8, 4, heads=2, kv_heads=2.0),
     TypeError, r"kv_heads must be an int, got 2\.0 \(float\)", "pass kv_heads=2"),
    ("layer heads float", lambda: SelfAttentionConv(8, 4, heads=2.5), TypeError,
     r"heads must be an int, got 2\.5", "pass an int heads"),
    ("layer out_channels 0", lambda: SelfAttentionConv(8, 0), ValueError, "got 0",
     "out_channels >= 1"),
    ("layer dropout", lambda: SelfAttentionConv(8, 4, dropout=1.5), ValueError, "got 1.5",
     r"\[0, 1\)"),
    ("layer features", lambda: SelfAttentionConv(8, 4)(torch.randn(5, 6)), ValueError,
     "6 features", "in_channels=8"),
    ("layer edge_attr without edge_dim", lambda: SelfAttentionConv(8, 4)(
        torch.randn(5, 8), EDGES, torch.randn(3, 2)), ValueError, "edge_dim=None",
     "edge_dim"),
    # aggr="mean" makes the layer run PyG's propagate and its own message()
    ("layer temperature 0, by propagate", lambda: SelfAttentionConv(
        8, 4, temperature=0.0, aggr="mean")(torch.randn(5, 8), EDGES), ValueError, "got 0.0",
     "> 0"),
    ("layer temperature overflows, by propagate", lambda: SelfAttentionConv(
        8, 4, temperature=1e-320, aggr="mean").double()(torch.randn(5, 8).double(), EDGES),
     ValueError, "overflows to inf", "larger temperature"),
    ("layer temperature 0, fused", lambda: SelfAttentionConv(8, 4, temperature=0.0)(
        torch.randn(5, 8)), ValueError, "got 0.0", "> 0"),
]


@pytest.mark.parametrize("call,error,value,fix", [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_named_with_its_fix(call, error, value, fix):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    print(f"{error.__name__}: {message}")
    assert re.search(value, message), f"the message does not name the value: {message}"
    assert re.search(fix, message), f"the message does not say the fix: {message}"


@pytest.mark.cuda
def test_graph_on_another_device_than_the_inputs_names_both():
    ptr = torch.tensor([0, 2, 5], device="cuda")
    with pytest.raises(ValueError, match=r"ptr is on cuda:0 but q, k, v are on cpu; move it "
                                         r"with ptr.to\('cpu'\)"):
        attend(ptr=ptr)
    with pytest.raises(ValueError, match=r"batch\[1\] is on cuda:0 but batch\[0\] is on cpu; "
                                         r"move it with batch\[1\].to\('cpu'\)"):
        gatattn.build_graph(batch=(torch.zeros(3, dtype=LONG), ptr.new_zeros(5)))
