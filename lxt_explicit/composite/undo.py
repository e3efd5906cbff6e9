"""An undo stack: every registration step pushes the callback that reverses it."""

from __future__ import annotations

from typing import Callable

__all__ = ["UndoStack"]


class UndoStack:
    """Callbacks that undo changes, run in reverse order by :meth:`close`.

    Like :class:`contextlib.ExitStack`, but :meth:`close` runs *every* callback even when some
    raise, and then raises the *first* error (the later ones are attached to it as notes).
    """

    def __init__(self):
        self._callbacks: list[tuple[Callable, tuple, dict]] = []

    def push(self, callback: Callable, *args, **kwargs) -> None:
        """Remember ``callback(*args, **kwargs)`` as the undo of the step just done."""
        self._callbacks.append((callback, args, kwargs))

    def __len__(self) -> int:
        return len(self._callbacks)

    def close(self) -> None:
        """Run every callback, the last pushed first; raise the first error afterwards."""
        callbacks, self._callbacks = self._callbacks, []
        errors: list[BaseException] = []
        for callback, args, kwargs in reversed(callbacks):
            try:
                callback(*args, **kwargs)
            except Exception as error:  # every undo step runs; the first error is raised afterwards
                errors.append(error)
        if errors:
            first = errors[0]
            for later in errors[1:]:
                first.add_note(f"lxt_explicit: another undo step failed as well: {type(later).__name__}: {later}")
            raise first
