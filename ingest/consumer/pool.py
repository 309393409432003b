"""The process pool that runs the pure decode layer (decrypt, gunzip, parse, normalize, COPY).

KMS calls stay in the event loop behind the data-key cache; the pool gets records with their
plaintext data keys and returns one BatchOutput (COPY-ready bytes) per batch. A pool whose worker
died (OOM killer, segfault) is rebuilt and the batch retried: that is a transient fault.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ingest.consumer.budget import WorkBudget
from ingest.decode.batch import BatchInput, BatchOutput, decode_batch

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """Pool processes must not outlive a SIGKILLed worker: ask Linux to kill them with it."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class DecodePool:
    def __init__(self, processes: int, budget: WorkBudget) -> None:
        self.processes = processes
        self.budget = budget
        self._executor: Executor | None = None

    def _ensure(self) -> Executor | None:
        if self.processes <= 0:
            return None
        if self._executor is None:
            # spawn: children never inherit the event loop, its threads or sockets, and they are
            # our direct children, so PR_SET_PDEATHSIG ties their life to ours (a forkserver
            # would outlive a SIGKILLed worker, and keep its children alive with it).
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                max_workers=self.processes, mp_context=context, initializer=_die_with_parent
            )
        return self._executor

    def start(self) -> None:
        self._ensure()

    async def decode(self, batch: BatchInput, size: int) -> BatchOutput:
        async with self.budget.hold(size):
            while True:
                executor = self._ensure()
                if executor is None:
                    return decode_batch(batch)
                try:
                    return await asyncio.get_running_loop().run_in_executor(
                        executor, decode_batch, batch
                    )
                except BrokenProcessPool:
                    log.warning("decode pool broke (a worker process died); rebuilding it")
                    self._executor = None
                    executor.shutdown(wait=False, cancel_futures=True)
                    await asyncio.sleep(0.5)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
