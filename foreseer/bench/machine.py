"""The machine's limits, measured: float32 FMA peak, memory bandwidth, and the memory a fresh process holds after
loading a model. The compute and bandwidth kernels are in csrc/machine_cpu.cpp (AVX2 + FMA, OpenMP), compiled on
first use."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

from foreseer.extensions import load_cpu_extension

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "machine_cpu.cpp")


def _extension():
    extension = load_cpu_extension("foreseer_machine_cpu", _SOURCE)
    if extension is None:
        raise RuntimeError(f"the machine benchmarks need a C++ compiler with OpenMP to build {_SOURCE}")
    return extension


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _best_seconds(work: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed runs of `work`, after one untimed warm-up run."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def fp32_fma_peak_gflops(threads: int, iterations: int = 50_000_000, repeats: int = 5) -> float:
    """The float32 FMA peak in GFLOP/s: each of `threads` OpenMP threads runs 12 independent chains of 256-bit
    FMAs (8 lanes, 2 FLOP each) for `iterations` rounds, with no memory traffic; best of `repeats`. This is the
    most any float32 kernel can reach on these cores (2 FMA ports of 8 lanes: 32 FLOP per cycle per core)."""
    extension = _extension()
    seconds = _best_seconds(lambda: extension.fma_chains(iterations, threads), repeats)
    return threads * iterations * extension.chains * 8 * 2 / seconds / 1e9


def torch_mm_gflops(threads: int, size: int = 2048, reps: int = 10, repeats: int = 3) -> float:
    """A large float32 torch.mm's GFLOP/s (size x size by size x size, 2 * size**3 FLOP each) with `threads`
    threads, best of `repeats` runs of `reps` products: what a well-tuned BLAS reaches of the FMA peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def work() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    with _torch_threads(threads):
        seconds = _best_seconds(work, repeats)
    return 2 * size**3 * reps / seconds / 1e9


def memory_bandwidth_gbs(threads: int, size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """The memory read bandwidth in GB/s (1e9 bytes/s): `threads` OpenMP threads each sum their contiguous share
    of a float32 buffer of `size_bytes` (1 GiB, far above the 32 MiB L3) with 256-bit loads; best of `repeats`.
    Reading the weights and the KV cache is what bounds a batch-1 decode step."""
    extension = _extension()
    floats = size_bytes // 4 // extension.block_floats * extension.block_floats
    buffer = torch.ones(floats)  # written once, so every page is resident before the timing
    seconds = _best_seconds(lambda: extension.read_sum(buffer, threads), repeats)
    return floats * 4 / seconds / 1e9


def copy_bandwidth_gbs(threads: int, size_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """The memory copy bandwidth in GB/s: torch's copy of a `size_bytes` (512 MiB) float32 tensor into another
    with `threads` threads, counting the bytes read and the bytes written (2 * size_bytes); best of `repeats`."""
    source = torch.ones(size_bytes // 4)
    target = torch.zeros_like(source)
    with _torch_threads(threads):
        seconds = _best_seconds(lambda: target.copy_(source), repeats)
    return 2 * source.numel() * 4 / seconds / 1e9


def machine_limits(threads: int) -> dict:
    """All of the above with `threads` threads: FMA peak and torch.mm GFLOP/s, read and copy GB/s."""
    return {"threads": threads, "fp32_fma_peak_gflops": fp32_fma_peak_gflops(threads),
            "torch_mm_gflops": torch_mm_gflops(threads), "read_bandwidth_gbs": memory_bandwidth_gbs(threads),
            "copy_bandwidth_gbs": copy_bandwidth_gbs(threads)}


def rss_after_load(code: str) -> int:
    """The resident set size in bytes of a fresh Python interpreter (this one's executable) at the end of running
    `code`, read with psutil just before it exits: what loading something costs in memory, interpreter included."""
    probe = "\nimport psutil as _psutil\nprint(_psutil.Process().memory_info().rss)\n"
    result = subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"rss_after_load: the snippet failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])
