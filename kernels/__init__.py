"""Triton kernels and their launchers, installed as ``gatattn.kernels``.

Kernels know nothing of graphs: they see packed ``(total, H, C)`` tensors, segment offsets
(``cu_seqlens``), flags and strides. Autograd and dispatch live in :mod:`gatattn`.
"""
