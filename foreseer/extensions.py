"""C++ extensions for the CPU, compiled on first use with the machine's compiler (torch.utils.cpp_extension)."""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)


@functools.cache
def load_cpu_extension(name: str, source: str, extra_cflags: tuple[str, ...] = ()):
    """The compiled extension `name` from one C++ file, or None (with a warning) where it cannot be built: a
    missing compiler must not stop the engine, whose PyTorch paths still work."""
    try:
        import ninja
        from torch.utils.cpp_extension import load

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return load(name=name, sources=[source], extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags],
                    extra_ldflags=["-fopenmp"])
    except Exception as error:
        logger.warning("C++ extension %s unavailable (%s); using PyTorch instead", name, error)
        return None
