"""Time limits and exception summaries for the support matrix."""

from __future__ import annotations

import signal
import threading
import traceback
from contextlib import contextmanager
from typing import Iterator

__all__ = ["FamilyTimeout", "time_limit", "describe"]


class FamilyTimeout(BaseException):
    """A family took longer than its time limit.

    A ``BaseException``, so that model code's ``except Exception`` lets it pass.
    """


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`FamilyTimeout` in the ``with`` block after ``seconds``.

    Uses ``SIGALRM`` and is a no-op without a limit, off the main thread or where the platform has
    no ``SIGALRM``; the previous handler and timer are restored afterwards.
    """
    usable = seconds and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise FamilyTimeout(f"over the time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe(error: BaseException, limit: int = 240, *, locate: bool = False) -> str:
    """``"Type: first line"`` of an exception (with the next line where the first only introduces it).

    With ``locate``, the innermost line of a transformers model file the exception passed through is
    appended (``[modeling_xlm.py:829 forward: tensor *= mask...]``): where an in-place operation
    or a shape the rules do not expect is in the model's code.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    if len(text) > limit // 2 and ". " in text[:limit]:  # long explanations: their first sentence
        text = text[: text.index(". ") + 1]
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    described = f"{type(error).__name__}: {text}" if text else type(error).__name__
    where = _model_line(error) if locate else None
    return f"{described} [{where}]" if where else described


def _model_line(error: BaseException) -> str | None:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/transformers/models/" in f.filename]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}: {(frame.line or '').strip()}"
