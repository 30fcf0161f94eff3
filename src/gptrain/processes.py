"""Whether a process recorded by an earlier run, prepare or export (by its pid) is still alive on this host."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True when a process with this pid exists here (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
