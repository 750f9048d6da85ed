"""One kept chunk at a time, across calls (the `chunked` and `triton` training nodes).

A training forward keeps its last chunk's activations so that the backward, which starts
there, need not recompute it. Several calls summed into one loss would each hold one until
the backward (up to a chunk budget each, and `chunked`'s weight-gradient buffers), so a
call that keeps a chunk lets go of every earlier call's that no backward has taken yet:
their backwards recompute it.
"""

from __future__ import annotations

import weakref

# Autograd contexts (`ctx.kept` is not None) whose kept chunk no backward has taken yet.
# Weak: a graph that is let go of takes its context with it.
_PENDING: weakref.WeakSet = weakref.WeakSet()


def release_pending() -> None:
    """Drop every pending context's kept chunk (`ctx.kept = None`)."""
    for ctx in list(_PENDING):
        ctx.kept = None
    _PENDING.clear()


def mark_pending(ctx) -> None:  # noqa: ANN001
    """`ctx.kept` holds a chunk for its backward; the next call's `release_pending` drops it."""
    _PENDING.add(ctx)


def take_kept(ctx):  # noqa: ANN001, ANN201
    """The backward's kept chunk (None when it was dropped, or on a second backward, which
    recomputes everything), no longer pending."""
    kept, ctx.kept = ctx.kept, None
    _PENDING.discard(ctx)
    return kept
