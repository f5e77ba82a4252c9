"""Hand freed tensor memory back to the operating system at once (glibc's malloc, Linux).

Torch allocates CPU tensors with malloc. glibc serves a large request with its own mmap, and returns it to the
system on free, but only above its mmap threshold, and that threshold moves: each time an mmapped block is
freed, the threshold rises to that block's size (up to 32 MiB). After the first few UNet steps, most of a
step's activations therefore come from the heap instead, and the heap keeps freed pages as long as anything
above them is still in use. At SD size that is about 0.25 GiB of resident memory that no tensor holds, and it is
still held when the VAE decode starts (benchmarks/sd_sampling_memory.py: 4.60 GiB resident after the UNet steps
with 4.32 in use before them).

`return_freed_memory_to_os` fixes the threshold (which also stops it moving) and trims what the heap holds now.
It changes the whole process's allocator, so it is a switch (`Pipeline.enable_low_cpu_memory`,
`ldmkit sample --low-cpu-memory`), not a default of the library. It changes no result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's <malloc.h>


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # musl and macOS have no mallopt / malloc_trim: there is nothing to switch
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Serve every allocation of at least `threshold_bytes` with its own mmap, so that freeing it returns it
    to the system, and trim the heap's free pages now. Returns False where the C library is not glibc (nothing
    was changed)."""
    if not isinstance(threshold_bytes, int) or not 4096 <= threshold_bytes <= 32 * 2**20:
        raise ValueError(f"threshold_bytes must be an int from 4096 to 32 MiB (glibc's range), got {threshold_bytes!r}")
    libc = _libc()
    if libc is None:
        return False
    if libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold_bytes)) != 1:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True
