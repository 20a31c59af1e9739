"""Checks of a graph description as the caller gives it: node counts, ``batch`` / ``ptr`` pairs,
shapes and dtypes, ``ptr``'s values (on the host or as a device-side assertion) and devices.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def check_graph_devices(device: torch.device | None, **tensors) -> None:
    """The graph's tensors (``edge_index``, ``batch``, ``ptr``, pairs included) on ``device``,
    the inputs' (``None``: on one device), and none on ``meta``: the graph is built from their
    values, which a meta tensor does not hold (reading one raises NotImplementedError)."""
    given = [(name if not isinstance(value, (tuple, list)) else f"{name}[{i}]", t)
             for name, value in tensors.items() if value is not None
             for i, t in enumerate(value if isinstance(value, (tuple, list)) else [value])
             if isinstance(t, Tensor)]
    for name, t in given:
        if t.device.type == "meta" and (device is None or device.type != "meta"):
            # (.to() cannot help: a meta tensor has nothing to copy.)
            where = "the inputs' device" if device is None else f"{device}, where q, k, v are"
            raise ValueError(
                f"{name} is on the meta device, which holds no values, but the graph is built "
                f"from its values; create {name} with its values on {where}")
        expected, source = (device, "q, k, v are") if device is not None else (
            given[0][1].device, f"{given[0][0]} is")
        if t.device != expected:
            raise ValueError(f"{name} is on {t.device} but {source} on {expected}; move it with "
                             f"{name}.to({str(expected)!r})")


def differences(offsets: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(offsets)]


def check_node_counts(num_dst: int, num_src: int, bipartite: bool) -> None:
    if not bipartite and num_dst != num_src:
        raise ValueError(
            f"self-attention needs as many queries as keys, got {num_dst} and {num_src}; "
            "pass bipartite=True (or a pair (x_src, x_dst) to the layer) for cross-attention"
        )


def split_pair(name: str, value, bipartite: bool):
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                f"{name} must be a tensor or a (dst, src) pair, got {len(value)} items")
        if not bipartite:
            raise ValueError(f"{name} is a pair but the graph is not bipartite; pass one tensor")
        return value[0], value[1]
    if bipartite:
        raise ValueError(
            f"cross-attention has two node sets: give {name} as a pair, one for the queries and "
            "one for the keys"
        )
    return value, value


def ptr_tensor(name: str, ptr: Tensor) -> Tensor:
    if ptr.dim() != 1 or ptr.numel() < 1 or ptr.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D integer tensor [0, n_0, n_0 + n_1, ...], got shape "
            f"{tuple(ptr.shape)} and dtype {ptr.dtype}"
        )
    return ptr.long()


def checked_sizes(name: str, ptr: list[int], num_nodes: int) -> list[int]:
    """Graph sizes from ``ptr``'s host values, which must run from 0 to ``num_nodes``."""
    if ptr[0] != 0 or ptr[-1] != num_nodes:
        raise ValueError(
            f"{name} must start at 0 and end at the number of nodes ({num_nodes}), "
            f"got {ptr[0]} ... {ptr[-1]}")
    sizes = differences(ptr)
    if min(sizes, default=0) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {ptr[:10]}...")
    return sizes


def assert_ptr_on_device(name: str, ptr: Tensor, num_nodes: int) -> None:
    """The checks of :func:`_checked_sizes` as a device-side assertion (no host read; on a GPU
    it fails asynchronously)."""
    if torch.onnx.is_in_onnx_export():
        # torch.onnx strips assertions from what it exports, and has no function for cummax,
        # which would stay behind and stop the export.
        return
    non_decreasing = (ptr.cummax(0).values == ptr).all()  # slices would specialise sizes
    valid = (ptr[0] == 0) & (ptr[-1] == num_nodes) & non_decreasing
    # (The message must not format num_nodes: a traced size would be specialised.)
    torch._assert_async(valid, f"{name} must be non-decreasing, start at 0 and end at the "
                        "number of nodes")


def check_batch(name: str, batch: Tensor | None, num_nodes: int, what: str) -> Tensor | None:
    if batch is None:
        return None
    if batch.dim() != 1 or batch.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D integer tensor of graph ids, got shape {tuple(batch.shape)} "
            f"and dtype {batch.dtype}"
        )
    if batch.numel() != num_nodes:
        raise ValueError(
            f"{name} has {batch.numel()} entries but there are {num_nodes} {what}; give one "
            "graph id per node"
        )
    return batch.long()
