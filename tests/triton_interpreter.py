"""A faster Triton interpreter for the tests (and the GPU scripts' CPU dry runs they start).

Triton's interpreter patches the `triton.language` modules a kernel's globals name at each
launch (and undoes it after), and again at each call of a `@triton.jit` helper inside the
kernel, where they are patched already. Those repeats, an `inspect.getmembers` over the
language each, are a third of an interpreter test's time. `install` makes a launch patch each
module once (a helper from `triton.language.standard` names `core` where kernels name `tl`,
so it is patched at the helper's first call). The same interpreted code runs.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable


def install() -> Callable[[], None] | None:
    """Wrap the interpreter's language patching; returns the undo, or None where Triton does
    not run interpreted or lacks the internals this wraps (Triton 3.x's `_patch_lang` and
    `_LangPatchScope`): then nothing changes."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import triton.language as tl
    from triton.runtime import interpreter as ti

    real = getattr(ti, "_patch_lang", None)
    scope_cls = getattr(ti, "_LangPatchScope", None)
    if real is None or scope_cls is None or not hasattr(scope_cls, "restore"):
        return None
    patched: list[frozenset[int]] = []  # per open launch: the language modules patched in it

    @functools.cache
    def langs(fn) -> frozenset[int]:  # noqa: ANN001 — what Triton's _patch_lang patches for fn
        return frozenset(id(v) for v in fn.__globals__.values()
                         if inspect.ismodule(v) and (v is tl or v is tl.core))  # fmt: skip

    def patch_lang(fn):  # noqa: ANN001, ANN202
        if patched and langs(fn) <= patched[-1]:
            return scope_cls()  # a helper inside a launch whose modules are patched already
        scope = real(fn)
        if patched:  # a helper naming another module: patched for the rest of the launch
            patched[-1] |= langs(fn)
            return scope
        patched.append(langs(fn))
        restore = scope.restore

        def restore_and_close() -> None:
            patched.pop()
            restore()

        scope.restore = restore_and_close
        return scope

    ti._patch_lang = patch_lang

    def undo() -> None:
        ti._patch_lang = real

    return undo
