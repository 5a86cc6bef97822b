"""Background work yields the CPU to training.

The writer's threads (and the writer process) compress and write while the user's training
thread computes. On a machine with few cores they compete for the same cores: measured on a
2-core VM (``benchmarks/writer_contention.py``), a plain MLP step took 1.89x as long beside a
writer thread flushing without pause with two encoding threads, and 1.09-1.13x with one encoding
thread at nice +10. So the encoding pool keeps one core for training, and background threads
run at a lower priority, so that the scheduler runs the training thread first whenever both are
ready; a writer that falls behind still slows training only through its bounded queue (and
then gets one more encoding thread while training waits, :mod:`trajlab.store.encode_pool`).
"""

from __future__ import annotations

import os
import sys
import threading

#: How much lower (nice) background threads run than the thread that started them.
BACKGROUND_NICE = 10


def background_thread() -> None:
    """Run the calling thread :data:`BACKGROUND_NICE` nice levels below the process's main
    thread (never raising its priority; Linux, where nice values are per thread and inherited by
    the threads it starts; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + BACKGROUND_NICE)
        if target > current:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except (OSError, AttributeError):  # not permitted, or no per-thread priorities
        pass


def spare_cpus(cap: int = 2) -> int:
    """CPUs this process may run on, less one for the training thread: at least 1, at most
    ``cap``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(cap, n - 1))
