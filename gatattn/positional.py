"""Positional encodings: the labels that break self-attention's permutation equivariance."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gatattn.graph import local_positions


def sinusoidal_encoding(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """``(N,)`` integer positions -> ``(N, dim)`` sinusoidal encodings (Vaswani et al.):
    ``sin(p / base^(2i/dim))`` in even and ``cos`` in odd columns."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    half = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    frequencies = torch.exp(-math.log(base) * half / dim)
    angles = positions.to(torch.float32).unsqueeze(1) * frequencies  # (N, ceil(dim / 2))
    encoding = torch.zeros(positions.numel(), dim, device=positions.device)
    encoding[:, 0::2] = torch.sin(angles)
    encoding[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return encoding


def graph_positional_encoding(num_nodes: int, dim: int, batch: Tensor | None = None) -> Tensor:
    """Sinusoidal encodings of each node's position inside its graph (order of appearance)."""
    device = batch.device if batch is not None else None
    return sinusoidal_encoding(local_positions(batch, num_nodes, device), dim)
