"""Independent training runs on several CPU cores: ``run_all(fn, items, workers, ...)`` calls
``fn(item)`` for every item, in ``workers`` processes (spawned, each with an equal share of the
cores as its torch threads) when ``workers`` > 1, and yields ``(index, result)`` as runs end.
``fn`` must be a module-level function (it is pickled by name)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

__all__ = ["default_workers", "run_all"]


def default_workers(device: str) -> int:
    """Runs trained at once: one per core on the CPU (at most 4; each run then has one thread
    of its own, which suits these small models better than sharing the cores), one on a GPU."""
    return 1 if device != "cpu" else max(1, min(4, os.cpu_count() or 1))


def _start_worker(threads: int, initializer: Callable[..., None] | None, args: tuple) -> None:
    torch.set_num_threads(threads)
    if initializer is not None:
        initializer(*args)


def run_all(fn: Callable[[Any], Any], items: Sequence[Any], workers: int = 1,
            initializer: Callable[..., None] | None = None,
            initargs: tuple = ()) -> Iterator[tuple[int, Any]]:  # fmt: skip
    """``(index, fn(items[index]))`` for every item, in the order the runs end; with one worker
    (or one item) in this process, in order, after ``initializer(*initargs)``."""
    if workers <= 1 or len(items) <= 1:
        if initializer is not None:
            initializer(*initargs)
        for index, item in enumerate(items):
            yield index, fn(item)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(threads, initializer, initargs)) as pool:  # fmt: skip
        futures = {pool.submit(fn, item): index for index, item in enumerate(items)}
        for future in as_completed(futures):
            yield futures[future], future.result()
