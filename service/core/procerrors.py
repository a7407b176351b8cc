"""The shared /proc reader's exception as the service's D-Bus error.

llmux.common.proctree raises its own ProcessNotFound (the shim reads /proc with it and has
no D-Bus errors); where the core asks for a process that must be there, a D-Bus caller is
answered org.llmux.Error.NoSuchProcess with the same message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from llmux.common import proctree
from llmux.common.errors import NoSuchProcess
from llmux.common.proctree import ProcessNotFound


@contextlib.contextmanager
def no_such_process() -> Iterator[None]:
    """Raise ProcessNotFound from the block as NoSuchProcess (unchained: the same error the
    core raised when it had the reader to itself)."""
    try:
        yield
    except ProcessNotFound as exc:
        raise NoSuchProcess(str(exc)) from None


def tree(root_pid: int) -> list[int]:
    """proctree.tree for the core: a gone root is the caller's NoSuchProcess."""
    with no_such_process():
        return proctree.tree(root_pid)
