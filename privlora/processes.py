"""Worker processes for CPU work that splits into independent pieces (audit parts, sampling per model).

On a CPU, one torch thread per process on each core beats one process with many threads for this project's
small models (docs/benchmarks.md), and a process started with N threads computes exactly what a serial run
with N threads computes, so the split changes the wall time, not the numbers.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Iterator

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def on_cpu(device: str | None = None) -> bool:
    """Whether work for ``device`` (default: cuda when available) runs on the CPU, where worker processes help."""
    import torch

    return (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"


def threads_for(jobs: int, threads_per_job: int | None) -> int:
    """The given thread count, else an equal share of the cores."""
    return threads_per_job or max(1, (os.cpu_count() or 1) // jobs)


@contextlib.contextmanager
def worker_pool(jobs: int, threads: int) -> Iterator[ProcessPoolExecutor]:
    """``jobs`` fresh (spawned) Python processes whose torch uses ``threads`` threads; their progress bars are
    off (the parent reports progress). Torch reads the thread variables when it is imported, so they are set
    in the environment the workers start with and restored afterwards."""
    saved = {k: os.environ.get(k) for k in (*THREAD_VARIABLES, "TQDM_DISABLE")}
    os.environ.update({**{k: str(threads) for k in THREAD_VARIABLES}, "TQDM_DISABLE": "1"})
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=(threads,)) as pool:
            yield pool
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_worker(threads: int) -> None:
    import torch

    from privlora.quiet import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()
