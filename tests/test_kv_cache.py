"""Incremental decoding with gatattn.kv_cache: a prefill and one-row or chunked steps over a
cache equal causal attention over the whole sequences (gatattn.reference, and SelfAttentionConv
run on the full sequences), forward and backward, with sequences growing at their own
lengths."""

import pytest
import torch

import gatattn
from gatattn import SelfAttentionConv
from gatattn.kv_cache import KVCache, cached_self_attention
from gatattn.reference import block_mask
from tests.test_host_syncs import count_host_reads

# Prompt and final lengths per sequence: an empty prompt, a sequence that never grows, and
# sequences that stop at different steps.
PROMPTS = [3, 0, 5, 2, 1]
FINALS = [7, 3, 5, 9, 2]


def offsets(lengths):
    return torch.tensor([0, *lengths]).cumsum(0)


def schedule(prompts, finals):
    """Per step, ``(active, rows)``: the active mask (None for the prefill) and the rows of the
    packed full sequences that the step adds, in sequence order."""
    ptr = offsets(finals).tolist()
    yield None, torch.cat([torch.arange(ptr[b], ptr[b] + n) for b, n in enumerate(prompts)])
    lengths = list(prompts)
    while any(n < f for n, f in zip(lengths, finals, strict=True)):
        active = [n < f for n, f in zip(lengths, finals, strict=True)]
        yield active, torch.tensor([ptr[b] + lengths[b] for b in range(len(finals)) if active[b]])
        lengths = [n + a for n, a in zip(lengths, active, strict=True)]


def chunked_schedule(prompts, finals, chunks):
    """As :func:`schedule`, but step ``s`` adds up to ``chunks[s % len(chunks)]`` rows per
    sequence (a prompt fed in chunks; 0 skips a step); yields ``(rows_per_sequence, rows)``."""
    ptr = offsets(finals).tolist()
    yield None, torch.cat([torch.arange(ptr[b], ptr[b] + n) for b, n in enumerate(prompts)])
    lengths, step = list(prompts), 0
    while any(n < f for n, f in zip(lengths, finals, strict=True)):
        counts = [min(chunks[step % len(chunks)], f - n)
                  for n, f in zip(lengths, finals, strict=True)]
        yield counts, torch.cat([torch.arange(ptr[b] + n, ptr[b] + n + c)
                                 for b, (n, c) in enumerate(zip(lengths, counts, strict=True))])
        lengths = [n + c for n, c in zip(lengths, counts, strict=True)]
        step += 1


def start(cache, active, prompts, chunked=False):
    if active is None:
        cache.start_prefill(prompts)
    elif chunked:
        cache.start_step(rows=active)
    else:
        cache.start_step(active)


def random_lengths(seed, batch=6):
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 7, (batch,), generator=gen)
    return prompts.tolist(), (prompts + torch.randint(0, 7, (batch,), generator=gen)).tolist()


CASES = [("auto", PROMPTS, FINALS), ("sdpa", PROMPTS, FINALS), ("sparse", PROMPTS, FINALS),
         ("auto", *random_lengths(0)), ("auto", *random_lengths(1))]


@pytest.mark.parametrize("backend,prompts,finals", CASES)
def test_cached_attention_equals_causal_attention(backend, prompts, finals):
    torch.manual_seed(0)
    H, C = 2, 5
    n = sum(finals)
    q, k, v = (torch.randn(n, H, C, dtype=torch.float64) for _ in range(3))
    ref = gatattn.reference.attention(q, k, v, block_mask(finals, causal=True))
    cache, ptr = KVCache(num_layers=1), offsets(finals).tolist()
    checked = 0
    for active, rows in schedule(prompts, finals):
        start(cache, active, prompts)
        positions = cache.new_positions
        kv = cache.append(0, k[rows], v[rows])
        lengths = cache.lengths
        cached_rows = torch.cat([torch.arange(ptr[b], ptr[b] + m) for b, m in enumerate(lengths)])
        assert torch.equal(kv.key, k[cached_rows]) and torch.equal(kv.value, v[cached_rows])
        sequence = torch.bucketize(rows, torch.tensor(ptr[1:]), right=True)
        assert torch.equal(positions, rows - torch.tensor(ptr)[sequence])
        out = gatattn.attention(q[rows], kv.key, kv.value, ptr=kv.ptr, causal=kv.causal,
                                backend=backend)
        err = (out - ref[rows]).abs().max().item() if rows.numel() else 0.0
        print(f"step rows {rows.tolist()}: max error {err:.2e}")
        torch.testing.assert_close(out, ref[rows], rtol=0, atol=1e-10)
        checked += rows.numel()
    assert checked == n and cache.lengths == finals


@pytest.mark.parametrize("backend", ["auto", "sdpa", "sparse", "triton"])
def test_chunked_steps_equal_causal_attention(backend):
    """Steps of several rows per sequence (3, then 0, 1 and 4: chunks cross sequences' ends)
    see the cache and their own earlier rows: bottom-right causal graphs."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    n = sum(FINALS)
    q, k, v = (torch.randn(n, 2, 5, dtype=dtype) for _ in range(3))
    ref = gatattn.reference.attention(q, k, v, block_mask(FINALS, causal=True))
    cache = KVCache(num_layers=1)
    for counts, rows in chunked_schedule([1, 0, 2, 0, 1], FINALS, [3, 0, 1, 4]):
        start(cache, counts, [1, 0, 2, 0, 1], chunked=True)
        kv = cache.append(0, k[rows], v[rows])
        out = gatattn.attention(q[rows], kv.key, kv.value, ptr=kv.ptr, causal=kv.causal,
                                backend=backend)
        torch.testing.assert_close(out, ref[rows].to(dtype), rtol=0,
                                   atol=1e-10 if dtype == torch.float64 else 1e-5)
    assert cache.lengths == FINALS


@pytest.mark.parametrize("backend", ["auto", "sparse"])
@pytest.mark.parametrize("chunks", [None, [3, 0, 1, 4]], ids=["one-row", "chunked"])
def test_step_graph_equals_its_keywords(backend, chunks):
    """``kv.graph``, built once per step, is the graph ``kv.ptr`` / ``kv.causal`` state:
    the same output and q, k, v gradients at every step."""
    torch.manual_seed(0)
    n = sum(FINALS)
    q, k, v = (torch.randn(n, 2, 5, dtype=torch.float64) for _ in range(3))
    cache = KVCache(num_layers=1)
    steps = (schedule(PROMPTS, FINALS) if chunks is None
             else chunked_schedule(PROMPTS, FINALS, chunks))
    for active, rows in steps:
        start(cache, active, PROMPTS, chunked=chunks is not None)
        kv = cache.append(0, k[rows], v[rows])
        runs = []
        for keywords in (dict(graph=kv.graph), dict(ptr=kv.ptr, causal=kv.causal)):
            inputs = [t.detach().requires_grad_() for t in (q[rows], kv.key, kv.value)]
            out = gatattn.attention(*inputs, **keywords, backend=backend)
            runs.append([out, *torch.autograd.grad(out.sum(), inputs, allow_unused=True)])
        for by_graph, by_keywords in zip(*runs, strict=True):
            torch.testing.assert_close(by_graph, by_keywords, rtol=0, atol=0)


@pytest.mark.parametrize("chunks", [None, [2, 3]], ids=["one-row", "chunked"])
def test_decoding_reads_the_host_once_per_step(monkeypatch, chunks):
    """The first layer of a step builds the step's graph (one host read); every later layer
    attends with it and reads nothing."""
    convs = stacked(CONFIGS["mean+beta"] * 2)  # four layers
    x = torch.randn(sum(FINALS), 6, dtype=torch.float64)
    cache = KVCache(num_layers=len(convs))
    steps = (schedule(PROMPTS, FINALS) if chunks is None
             else chunked_schedule(PROMPTS, FINALS, chunks))
    with torch.no_grad():
        for active, rows in steps:
            start(cache, active, PROMPTS, chunked=chunks is not None)
            h = x[rows]
            for layer, conv in enumerate(convs):
                with count_host_reads(monkeypatch) as reads:
                    h = cached_self_attention(conv, h, cache, layer)
                assert reads.count == (1 if layer == 0 else 0), (
                    f"layer {layer} of a step read the host {reads.count} times")


def stacked(configs, dim=6):
    torch.manual_seed(1)
    return [SelfAttentionConv(dim, dim // c["heads"] if c.get("concat", True) else dim,
                              **c).double().eval() for c in configs]


def full_model(convs, x, ptr):
    h = x
    for conv in convs:
        h = torch.tanh(conv(h, ptr=ptr, causal=True)) + h
    return h


def decoded_model(convs, x, prompts, finals, chunks=None):
    """Runs ``full_model``'s layers step by step over a cache (one row per step, or
    ``chunks`` as :func:`chunked_schedule`); returns the outputs of every step's rows, in the
    order of the packed full sequences."""
    cache = KVCache(num_layers=len(convs))
    out = torch.empty(x.size(0), x.size(1), dtype=x.dtype)
    steps = schedule(prompts, finals) if chunks is None else chunked_schedule(prompts, finals,
                                                                               chunks)
    for active, rows in steps:
        start(cache, active, prompts, chunked=chunks is not None)
        h = x[rows]
        for layer, conv in enumerate(convs):
            h = torch.tanh(cached_self_attention(conv, h, cache, layer)) + h
        out = out.index_copy(0, rows, h)
    return out


CONFIGS = {
    "concat+out_proj": [dict(heads=2, root_weight=False, out_proj=True)] * 2,
    "mean+beta": [dict(heads=3, concat=False, beta=True), dict(heads=2, temperature=0.5)],
    "no-bias+skip": [dict(heads=1, bias=False), dict(heads=3, out_proj=True, beta=True)],
}


@pytest.mark.parametrize("configs", CONFIGS.values(), ids=CONFIGS.keys())
def test_decoding_equals_full_conv(configs):
    convs = stacked(configs)
    x = torch.randn(sum(FINALS), 6, dtype=torch.float64)
    with torch.no_grad():
        expected = full_model(convs, x, offsets(FINALS))
        out = decoded_model(convs, x, PROMPTS, FINALS)
    print(f"max error {(out - expected).abs().max().item():.2e}")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunks", [None, [2, 3]], ids=["one-row", "chunked"])
def test_gradient_through_decode_steps(chunks):
    convs = stacked(CONFIGS["mean+beta"])
    x = torch.randn(sum(FINALS), 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(FINALS), 6, dtype=torch.float64)
    params = [x, *(p for conv in convs for p in conv.parameters())]
    full = torch.autograd.grad((full_model(convs, x, offsets(FINALS)) * weight).sum(), params)
    decoded = torch.autograd.grad(
        (decoded_model(convs, x, PROMPTS, FINALS, chunks) * weight).sum(), params)
    for g_full, g_dec in zip(full, decoded, strict=True):
        torch.testing.assert_close(g_dec, g_full, rtol=0, atol=1e-10)


def test_cache_layout_and_lengths():
    cache = KVCache(num_layers=2)
    cache.start_prefill(torch.tensor([2, 0, 1]))
    assert cache.new_positions.tolist() == [0, 1, 0]
    for layer in range(2):
        kv = cache.append(layer, torch.full((3, 1, 1), 1.0), torch.zeros(3, 1, 2))
        assert kv.causal and kv.ptr.tolist() == [0, 2, 2, 3]
    assert cache.lengths == [2, 0, 1]
    cache.start_step([False, True, True])
    assert cache.new_positions.tolist() == [0, 1]
    kv = cache.append(0, torch.tensor([[[2.0]], [[3.0]]]), torch.zeros(2, 1, 2))
    assert kv.causal == "bottom_right"
    assert [p.tolist() for p in kv.ptr] == [[0, 0, 1, 2], [0, 2, 3, 5]]
    assert kv.key.flatten().tolist() == [1.0, 1.0, 2.0, 1.0, 3.0]
    assert cache.lengths == [2, 0, 1], "lengths advance after the last layer"
    cache.append(1, torch.zeros(2, 1, 1), torch.zeros(2, 1, 2))
    assert cache.lengths == [2, 1, 2]


def prefilled(num_layers=2, rows=3):
    cache = KVCache(num_layers=num_layers)
    cache.start_prefill([rows])
    for layer in range(num_layers):
        cache.append(layer, torch.zeros(rows, 2, 4), torch.zeros(rows, 2, 4))
    cache.start_step()
    return cache


BAD_APPENDS = {
    "rows": (lambda c: c.append(0, torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)), "with 1 rows"),
    "value rows": (lambda c: c.append(0, torch.zeros(1, 2, 4), torch.zeros(3, 2, 4)),
                   "value must be"),
    "heads": (lambda c: c.append(0, torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)), "must match"),
    "key vs value heads": (lambda c: c.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 1, 4)),
                           "disagree"),
    "dtype": (lambda c: c.append(0, torch.zeros(1, 2, 4, dtype=torch.float64),
                                 torch.zeros(1, 2, 4, dtype=torch.float64)), "float64"),
    "device": (lambda c: c.append(0, torch.zeros(1, 2, 4, device="meta"),
                                  torch.zeros(1, 2, 4, device="meta")), "meta"),
    "layer order": (lambda c: c.append(1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                    "out of order: layer 0 is next"),
    "step open": (lambda c: c.start_step(), "still waits for layers 0..1"),
    "active length": (lambda c: (c.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                                 c.append(1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                                 c.start_step([True, False])), "1 booleans"),
    "prefill twice": (lambda c: c.start_prefill([1]), "already holds a prefill"),
    "rows length": (lambda c: (c.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                               c.append(1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                               c.start_step(rows=[2, 1])), "1 counts"),
    "rows negative": (lambda c: (c.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                                 c.append(1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                                 c.start_step(rows=[-1])), ">= 0"),
    "active and rows": (lambda c: (c.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                                   c.append(1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                                   c.start_step([True], rows=[1])), "not both"),
    "chunk rows": (lambda c: (c.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                              c.append(1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                              c.start_step(rows=[3]),
                              c.append(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
                   "with 3 rows"),
}


@pytest.mark.parametrize("case", BAD_APPENDS.values(), ids=BAD_APPENDS.keys())
def test_bad_cache_use_is_refused(case):
    action, message = case
    with pytest.raises((ValueError, RuntimeError), match=message):
        action(prefilled())


def test_step_before_prefill_and_append_without_step_are_refused():
    with pytest.raises(RuntimeError, match="start_prefill must come first"):
        KVCache(1).start_step()
    with pytest.raises(RuntimeError, match="no open step"):
        KVCache(1).append(0, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        KVCache(0)


def test_layers_of_a_step_share_a_device():
    cache = KVCache(num_layers=2)
    cache.start_prefill([1])
    cache.append(0, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="on one device"):
        cache.append(1, torch.zeros(1, 1, 1, device="meta"), torch.zeros(1, 1, 1, device="meta"))


BAD_CONVS = {
    "edge_dim": (lambda: SelfAttentionConv(4, 4, edge_dim=2), "edge_dim=2"),
    "dropout in training": (lambda: SelfAttentionConv(4, 4, dropout=0.5).train(),
                            "attention dropout 0.5"),
    "cross-attention": (lambda: SelfAttentionConv((4, 4), 4), "cross-attention"),
    "aggr": (lambda: SelfAttentionConv(4, 4, aggr="mean"), "aggr='mean'"),
    "flow": (lambda: SelfAttentionConv(4, 4, flow="target_to_source"), "target_to_source"),
    "hook": (lambda: _hooked(SelfAttentionConv(4, 4)), "hooks"),
}


def _hooked(conv):
    conv.register_message_forward_hook(lambda module, inputs, output: output)
    return conv


@pytest.mark.parametrize("case", BAD_CONVS.values(), ids=BAD_CONVS.keys())
def test_unsupported_convs_are_refused(case):
    make, message = case
    cache = KVCache(1)
    cache.start_prefill([2])
    with pytest.raises(ValueError, match=message):
        cached_self_attention(make(), torch.randn(2, 4), cache, 0)
    with pytest.raises(ValueError, match="5 features"):
        cached_self_attention(SelfAttentionConv(4, 4), torch.randn(2, 5), cache, 0)


# --- sliding windows: the cache keeps the last `window` rows of each sequence ---

LONG_PROMPTS, LONG_FINALS = [3, 0, 6, 1], [12, 4, 9, 15]  # longer than the windows tested


def steps_of(prompts, finals, chunks):
    return (schedule(prompts, finals) if chunks is None
            else chunked_schedule(prompts, finals, chunks))


def windowed_decode(q, k, v, window, chunks, backend="auto"):
    """Decodes LONG_FINALS with a sliding-window cache (eviction on); returns the outputs of
    every step's rows in the order of the packed full sequences, checking at each step that the
    cache holds exactly the last rows the step can see."""
    cache, ptr = KVCache(num_layers=1, window=window), offsets(LONG_FINALS).tolist()
    out = q.new_zeros(q.size(0), q.size(1), v.size(2))
    for active, rows in steps_of(LONG_PROMPTS, LONG_FINALS, chunks):
        start(cache, active, LONG_PROMPTS, chunked=chunks is not None)
        before = cache.lengths or [0] * len(LONG_FINALS)
        kv = cache.append(0, k[rows], v[rows])
        kept = [min(n, window) if active is not None else 0 for n in before]
        held = [m - n + c for n, m, c in zip(before, cache.lengths, kept, strict=True)]
        assert cache.cached_rows == held and max(held) <= window + max(chunks or [1]) + (
            max(LONG_PROMPTS) if active is None else 0)
        held_rows = torch.cat([torch.arange(ptr[b] + m - h, ptr[b] + m)
                               for b, (m, h) in enumerate(zip(cache.lengths, held, strict=True))])
        assert torch.equal(kv.key.detach(), k[held_rows].detach())
        assert torch.equal(kv.value.detach(), v[held_rows].detach())
        step_out = gatattn.attention(q[rows], kv.key, kv.value, graph=kv.graph, backend=backend)
        out = out.index_copy(0, rows, step_out)
    assert cache.lengths == LONG_FINALS
    return out


@pytest.mark.parametrize("chunks", [None, [3, 0, 1, 4]], ids=["one-row", "chunked"])
@pytest.mark.parametrize("window, backend", [(0, "auto"), (2, "auto"), (2, "sparse"),
                                             (5, "sparse")])
def test_windowed_decoding_equals_windowed_causal_attention(window, backend, chunks):
    """Decoding with eviction equals one causal windowed attention over the whole sequences:
    outputs, and q, k, v gradients through every step (the evicted rows get theirs from the
    steps that saw them)."""
    torch.manual_seed(0)
    n = sum(LONG_FINALS)
    q, k, v = (torch.randn(n, 2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weight = torch.randn(n, 2, 5, dtype=torch.float64)
    mask = block_mask(LONG_FINALS, causal=True, window=(window, 0))
    ref = gatattn.reference.attention(q, k, v, mask)
    out = windowed_decode(q, k, v, window, chunks, backend)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for got, expected in zip(torch.autograd.grad((out * weight).sum(), (q, k, v)),
                             torch.autograd.grad((ref * weight).sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_windowed_step_keywords_equal_its_graph():
    """``kv.ptr``, ``kv.causal`` and ``kv.window`` state ``kv.graph``."""
    torch.manual_seed(0)
    cache = KVCache(num_layers=1, window=2)
    x = [torch.randn(r, 1, 3, dtype=torch.float64) for r in (7, 2)]
    cache.start_prefill([4, 3])
    kv = cache.append(0, x[0], x[0])
    assert kv.window == (2, 0) and kv.causal is True
    cache.start_step()
    kv = cache.append(0, x[1], x[1])
    assert kv.window == (2, 0) and kv.causal == "bottom_right" and cache.cached_rows == [3, 3]
    q = torch.randn(2, 1, 3, dtype=torch.float64)
    by_graph = gatattn.attention(q, kv.key, kv.value, graph=kv.graph)
    by_keywords = gatattn.attention(q, kv.key, kv.value, ptr=kv.ptr, causal=kv.causal,
                                    window=kv.window)
    torch.testing.assert_close(by_graph, by_keywords, rtol=0, atol=0)


def windowed_full_model(convs, x, ptr, window):
    h = x
    for conv in convs:
        h = torch.tanh(conv(h, ptr=ptr, causal=True, window=(window, 0))) + h
    return h


def windowed_decoded_model(convs, x, window, chunks):
    cache = KVCache(num_layers=len(convs), window=window)
    out = torch.zeros_like(x)
    for active, rows in steps_of(LONG_PROMPTS, LONG_FINALS, chunks):
        start(cache, active, LONG_PROMPTS, chunked=chunks is not None)
        h = x[rows]
        for layer, conv in enumerate(convs):
            h = torch.tanh(cached_self_attention(conv, h, cache, layer)) + h
        out = out.index_copy(0, rows, h)
    return out


@pytest.mark.parametrize("chunks", [None, [2, 3]], ids=["one-row", "chunked"])
def test_windowed_layers_decode_as_the_full_windowed_conv(chunks):
    """cached_self_attention over a sliding-window cache equals SelfAttentionConv(window=) on
    the whole sequences: outputs, and gradients of the input and every parameter."""
    convs = stacked(CONFIGS["mean+beta"])
    x = torch.randn(sum(LONG_FINALS), 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(LONG_FINALS), 6, dtype=torch.float64)
    params = [x, *(p for conv in convs for p in conv.parameters())]
    full = windowed_full_model(convs, x, offsets(LONG_FINALS), 3)
    decoded = windowed_decoded_model(convs, x, 3, chunks)
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-10)
    for g_full, g_dec in zip(torch.autograd.grad((full * weight).sum(), params),
                             torch.autograd.grad((decoded * weight).sum(), params), strict=True):
        torch.testing.assert_close(g_dec, g_full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("window", [-1, True, 2.0, (2, 0)])
def test_bad_windows_are_refused(window):
    with pytest.raises(ValueError, match="window must be None or an int >= 0"):
        KVCache(1, window=window)
