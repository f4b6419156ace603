"""C++ extensions for the CPU, compiled on first use with the machine's compiler (torch.utils.cpp_extension).

Each build lives in a directory named by what determines it (the source's text and that of the package headers it
includes, the flags, torch's version and directory, the CPU's features, as -march=native compiles for this CPU),
where the source and its headers are staged: checkouts at different paths then share one build instead of
rebuilding in turn, and a changed source never races an older one's build. Sources include the kernels they share
as `#include "layers/csrc/x.h"`, relative to the package root.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))
_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _included_headers(text: bytes, seen: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The package headers a source includes, directly or through other headers: path -> text."""
    seen = {} if seen is None else seen
    for match in _LOCAL_INCLUDE.finditer(text):
        name = match.group(1).decode()
        path = os.path.join(_PACKAGE_ROOT, name)
        if name in seen or not os.path.exists(path):
            continue
        with open(path, "rb") as header:
            seen[name] = header.read()
        _included_headers(seen[name], seen)
    return seen


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        import platform

        return platform.processor()


def extensions_root() -> str:
    """Where builds go: $FORESEER_EXTENSIONS_DIR, else ~/.cache/foreseer/extensions."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FORESEER_EXTENSIONS_DIR") or os.path.join(cache, "foreseer", "extensions")


def build_directory(name: str, source_text: bytes, extra_cflags: tuple[str, ...] = ()) -> str:
    """The directory of the build of `name` from this source text with these flags, for this torch and CPU."""
    import torch

    flags = " ".join((*_CFLAGS, *extra_cflags)).encode()
    headers = _included_headers(source_text)
    # torch's directory too: the build's commands name its headers, so two environments would rebuild in turn.
    parts = [source_text, *(name.encode() + b"\0" + headers[name] for name in sorted(headers)), flags,
             torch.__version__.encode(), os.path.dirname(torch.__file__).encode(), _cpu_features().encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return os.path.join(extensions_root(), f"{name}-{digest}")


@contextlib.contextmanager
def _exclusive(directory: str) -> Iterator[None]:
    """Holds an flock on the build directory: the kernel drops it when its process dies, where torch's own lock
    file stays behind after a process killed mid-build and makes every later load wait for it forever."""
    with open(os.path.join(directory, ".foreseer-build.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def load_cpu_extension(name: str, source: str, extra_cflags: tuple[str, ...] = ()):
    """The compiled extension `name` from one C++ file, or None (with a warning) where it cannot be built: a
    missing compiler must not stop the engine, whose PyTorch paths still work."""
    try:
        import ninja
        from torch.utils.cpp_extension import load

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        with open(source, "rb") as file:
            text = file.read()
        directory = build_directory(name, text, extra_cflags)
        os.makedirs(directory, exist_ok=True)
        with _exclusive(directory):
            # Every build here holds the flock, so a torch lock file found now was left by a killed build.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, "lock"))
            # The source and its headers are staged in the build directory, which is the include path: the build's
            # commands then name no checkout, and checkouts at different paths do not rebuild it in turn.
            staged = os.path.join(directory, os.path.basename(source))
            for path, content in [(staged, text), *((os.path.join(directory, "include", header), content)
                                                    for header, content in _included_headers(text).items())]:
                if not os.path.exists(path):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path + ".tmp", "wb") as file:
                        file.write(content)
                    os.replace(path + ".tmp", path)
            return load(name=name, sources=[staged], extra_cflags=[*_CFLAGS, *extra_cflags],
                        extra_ldflags=list(_LDFLAGS), extra_include_paths=[os.path.join(directory, "include")],
                        build_directory=directory)
    except Exception as error:
        logger.warning("C++ extension %s unavailable (%s); using PyTorch instead", name, error)
        return None
