"""``python -m lxt_explicit.support``: see :mod:`lxt_explicit.support.command`."""

from .command import main

if __name__ == "__main__":
    raise SystemExit(main())
