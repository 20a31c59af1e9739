"""The switches a caller sets: ``causal`` (which alignment), ``window`` (a band around the
diagonal) and value validation (on or off).
"""

from __future__ import annotations

#: The values ``causal`` takes, and what each means.
CAUSAL_ALIGNMENTS = {
    False: "not causal",
    True: "top-left: target i sees sources 0..i (SDPA's is_causal)",
    "top_left": "the same as True",
    "bottom_right": "each graph's last target sees its last source, target i sees sources "
                    "0..i + n_src - n_dst (FlashAttention's and varlen_attn's convention)",
}

_validating = True


def causal_mode(causal) -> tuple[bool, bool]:
    """``(causal, bottom_right)`` for a ``causal`` argument (:data:`CAUSAL_ALIGNMENTS`).

    Causal graphs keep the pairs ``pos(j) <= pos(i) + d`` of each graph, with the diagonal
    ``d = 0`` (top-left) or ``d = n_src - n_dst`` (bottom-right); the two alignments differ
    only where a graph has unequal target and source counts (bipartite graphs). Bottom-right
    targets with ``pos(i) < n_dst - n_src`` see no source and get zeros."""
    if isinstance(causal, bool):
        return causal, False
    if isinstance(causal, str) and causal in CAUSAL_ALIGNMENTS:
        return True, causal == "bottom_right"
    raise ValueError(
        f"causal must be one of {', '.join(map(repr, CAUSAL_ALIGNMENTS))}, got {causal!r}")


Window = tuple[int | None, int | None]


def window_mode(window, causal: bool) -> Window | None:
    """A ``window`` argument as ``(left, right)``, or ``None`` where it keeps every pair.

    A window keeps, inside each graph, the sources ``pos(i) + d - left <= pos(j) <= pos(i) + d +
    right`` of target ``i``, with the graph's causal diagonal ``d`` (0 unless ``causal`` is
    ``"bottom_right"`` on a bipartite graph): FlashAttention's ``window_size``, with ``None``
    (not -1) for a side without bound. ``causal`` already bounds the right side at the
    diagonal, so it takes ``right`` 0 or ``None`` only, and the window's ``right`` is then 0."""
    if window is None:
        return None
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0)
                    for w in window)):
        raise ValueError(
            f"window must be None or a (left, right) pair of ints >= 0, None for a side without "
            f"bound (FlashAttention's -1), got {window!r}")
    left, right = window
    if causal:
        if right not in (None, 0):
            raise ValueError(
                f"causal attention already keeps j <= i (right = 0), got window={window!r}; "
                "pass window=(left, 0) with causal, or a (left, right) window without it")
        right = 0
    if left is None and (right is None or causal):
        return None  # every pair, or exactly the causal graph
    return left, right


def validation_enabled() -> bool:
    """Whether gatattn checks input values on the host (see :class:`validation`)."""
    return _validating


def set_validation(enabled: bool) -> None:
    """Switch value checks on or off for the whole process (see :class:`validation`)."""
    global _validating
    _validating = _as_flag(enabled)


class validation:  # noqa: N801 (used as a function: ``with gatattn.validation(False):``)
    """Value checks on or off inside a ``with`` block, restored on exit::

        with gatattn.validation(False):
            out = model(data.x, ptr=data.ptr)

    On (the default), gatattn reads input values on the host to refuse invalid graph
    descriptions with a clear error (``ptr`` not starting at 0, ending elsewhere than the node
    count or decreasing; negative graph ids; out-of-range ``edge_index`` ids) and to learn
    whether ``q``, ``k``, ``v`` are all finite (non-finite ones are then contained exactly):
    one host read per call with ``ptr``; a ``graph=`` call reads nothing and guards instead
    (a non-finite input makes its whole output NaN). Off, nothing is read for checks: an
    invalid ``ptr`` fails only a device-side assertion (``torch._assert_async``), other
    invalid values give errors elsewhere or wrong results, and inputs are assumed finite
    (no repair, no guard). Results on valid, finite inputs are the same. A ``ptr`` graph on
    the fused route then reads nothing on the host; the SDPA route still reads the graph
    sizes, which grouping by size needs, and a ``batch`` is still read (its graph count and
    sizes, or an equality check against the cached structure). Under ``torch.compile`` checks
    are off regardless.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = _as_flag(enabled)
        self._outer: bool | None = None

    def __enter__(self) -> validation:
        self._outer = validation_enabled()
        set_validation(self.enabled)
        return self

    def __exit__(self, *exc) -> None:
        set_validation(self._outer)


def _as_flag(enabled) -> bool:
    if not isinstance(enabled, bool):
        raise TypeError(f"validation takes True or False, got {enabled!r}")
    return enabled
