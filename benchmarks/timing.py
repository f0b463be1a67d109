"""The timing harness the overhead benchmarks share (benchmarks/overhead.py,
benchmarks/marthe_overhead.py, benchmarks/gpu_check.py): the machine description written into
every report, the CPU load of other processes during a run, a wall-clock timer (CUDA events on
a GPU), the copy bandwidth that GB/s figures are compared with, and the round-robin loop that
times several contenders side by side under the same machine state."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

__all__ = ["OtherLoad", "Timer", "copy_bandwidth", "environment", "round_robin"]

Key = TypeVar("Key")


def environment(device: str) -> dict[str, Any]:
    """Device name, CPU model, thread count, torch and hyperlr_ext versions, date."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                cpu,
            )
    except OSError:
        pass
    try:
        import hyperlr_ext as hx

        hx_version = str(getattr(hx, "__version__", "unknown"))
        extension = bool(getattr(getattr(hx, "_ops", None), "EXTENSION_AVAILABLE", False))
    except ImportError as error:
        hx_version, extension = f"not importable: {error}", False
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "hyperlr_ext_version": hx_version,
        "hyperlr_ext_compiled_extension": extension,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min_at_start": os.getloadavg()[0],
    }


class OtherLoad:
    """CPU used by *other* processes while a benchmark runs: machine busy time minus our own.

    The load average cannot tell, since it counts this process too. ``cores()`` is the average
    number of cores other work kept busy since construction (0 on an idle machine; Linux only).
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as stat:
                user, nice, system, _, _, irq, softirq = map(int, stat.readline().split()[1:8])
            busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            busy = float("nan")
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, own.ru_utime + own.ru_stime

    def cores(self) -> float:
        """Average number of cores busy with other processes so far."""
        (wall0, busy0, own0), (wall1, busy1, own1) = self.start, self._sample()
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))


class Timer:
    """Wall time of one call: perf_counter on CPU, CUDA events and a synchronize on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s


def copy_bandwidth(numel: int, device: torch.device, repeats: int = 5) -> float:
    """Reference bandwidth in GB/s of ``dst.copy_(src)`` (4 bytes read + 4 written per element)."""
    src, dst = torch.rand(numel, device=device), torch.empty(numel, device=device)
    timer = Timer(device)
    dst.copy_(src)
    return (
        8 * numel / statistics.median(timer(lambda: dst.copy_(src)) for _ in range(repeats)) / 1e9
    )


def round_robin(
    run: Callable[[Key], Any],
    keys: Iterable[Key],
    *,
    min_rounds: int,
    max_rounds: int,
    min_time_s: float,
) -> int:
    """Calls ``run(key)`` for every key in turn, round after round: at least ``min_rounds``
    rounds, then more until ``min_time_s`` seconds have passed, at most ``max_rounds``. Each
    contender's turn follows the others', so drift of the machine hits them all. Returns the
    number of rounds."""
    keys = list(keys)
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < min_time_s):
        for key in keys:
            run(key)
        rounds += 1
    return rounds


def steady_loop(
    step: Callable[[], Any], timer: Timer, *, steps: int = 21, warmup: int = 3
) -> float:
    """Median seconds of ``step()`` called ``steps`` times in a row after ``warmup`` calls: one
    optimizer stepped repeatedly, as a training loop runs it (its state stays in whatever cache
    it fits, no other optimizer evicts it)."""
    for _ in range(warmup):
        step()
    return statistics.median(timer(step) for _ in range(steps))
