"""Host memory: make glibc's malloc reuse freed tensor memory instead of asking the kernel again.

Why this matters for CPU training. PyTorch's CPU allocator is plain `posix_memalign`/`free`, so
every activation, gradient and logits tensor of a step is a fresh malloc. With glibc's defaults,
blocks above the mmap threshold (at most 32 MiB) are mmapped and unmapped each time, and smaller
ones fragment the heap (an aligned request needs a little more than the hole its predecessor
left) so the heap keeps growing into untouched pages. Either way the kernel hands out new zeroed
pages: on the CPU reference configuration (6 layers, d_model 384, batch 16 × 256) that was
0.2–0.9 GB of page faults per training step, 0.1–1.2 s of kernel time in a 2.4–3.7 s step
(benchmarks/RESULTS.md, "Host memory").

Three `mallopt` settings make freed memory come back to the next request of similar size, so a
step in steady state touches no new pages:

- M_MMAP_THRESHOLD high: large blocks come from the heap, not from a fresh mmap each time;
- M_TRIM_THRESHOLD high: freed memory at the top of the heap is not returned to the kernel
  between steps (the process keeps its high-water mark, which a training process reaches on its
  first step anyway);
- M_MXFAST 0: no fastbins, so the small fragments an aligned allocation splits off are merged
  back at once and the hole a freed tensor leaves is whole again for the next one.

Only glibc (Linux) has `mallopt`; elsewhere this does nothing and says so. The settings are
process-wide and apply to allocations made after the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MXFAST = 1
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest value mallopt takes (an int): effectively "never" for both thresholds.
_NEVER = 2**31 - 1
SETTINGS = ((M_MXFAST, 0), (M_TRIM_THRESHOLD, _NEVER), (M_MMAP_THRESHOLD, _NEVER))
DESCRIPTION = "glibc malloc keeps freed memory for reuse (mmap/trim thresholds 2 GiB, no fastbins)"

_applied: str | None = None


def reuse_freed_memory() -> str:
    """Apply the settings (once per process); returns `host_allocator()`."""
    global _applied
    if _applied is None:
        libc = _glibc()
        if libc is None:
            _applied = "system default (not glibc: no mallopt)"
        elif all(libc.mallopt(option, value) == 1 for option, value in SETTINGS):
            _applied = DESCRIPTION
        else:
            _applied = "partly changed (glibc refused some of the mallopt settings)"
    return host_allocator()


def host_allocator() -> str:
    """What this process's host allocator does now, for the run record. The settings cannot be taken
    back, so a run that did not ask for them still reports them if an earlier one in this process did."""
    return _applied or "system default"


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # glibc only: musl has neither this nor these options
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None
