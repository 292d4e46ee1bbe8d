"""numba's on-disk cache, made to follow the kernel files a compiled function calls into."""

import glob
import os

from numba.core.caching import NullCache

from . import target

KERNEL_SOURCES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "*.py")))


def follows(dispatcher, source_files) -> None:
    """Make a cached compiled function stale whenever one of source_files changes, or the kernel choice
    (LLAMALORA_KERNELS, and the host's way of streaming rows; the compile target's name and features already key
    numba's cache).

    numba checks a cached function against its own file only, and the machine code of the functions it calls is
    saved with it: a compiled caller of kernels in other files would go on running their old code after they
    change (with other prepared arrays, wrong results). Its cache stamp gets the files' stamps added; where
    numba's cache does not look as expected, the function is simply not cached."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is None or not hasattr(cache_file, "_source_stamp"):
        dispatcher._cache = NullCache()
        return
    stamps = tuple((st.st_mtime, st.st_size) for st in map(os.stat, source_files))
    stamps += (("LLAMALORA_KERNELS", os.environ.get("LLAMALORA_KERNELS", "auto")),
               ("one row", target.host_spreads_rows()))
    cache_file._source_stamp = (cache_file._source_stamp, stamps)
