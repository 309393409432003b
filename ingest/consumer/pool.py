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
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ingest.consumer.budget import WorkBudget
from ingest.decode.batch import BatchInput, BatchOutput, DecoderConfig
from ingest.errors import IngestError
from ingest.policy.hook import decode_with_policy

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


class DecoderCrashedError(IngestError):
    """A batch broke the decode pool repeatedly: decode its records one by one, apart."""


#: Tries before a batch that keeps breaking the pool is decoded record by record.
CRASH_TRIES = 3


class DecodePool:
    def __init__(
        self,
        processes: int,
        budget: WorkBudget,
        *,
        # decode_batch with the policy rules beside normalize (DecoderConfig.policy)
        decode: Callable[[BatchInput], BatchOutput] = decode_with_policy,
    ) -> None:
        self.processes = processes
        self.budget = budget
        self._decode = decode
        self._executor: Executor | None = None
        self._quarantine: Executor | None = None
        #: the warm-up calls :meth:`prestart` submitted (awaited by :meth:`warm`)
        self._warming: list[Future[BatchOutput]] = []

    @staticmethod
    def _new_executor(processes: int) -> Executor:
        # spawn: children never inherit the event loop, its threads or sockets, and they are
        # our direct children, so PR_SET_PDEATHSIG ties their life to ours (a forkserver
        # would outlive a SIGKILLed worker, and keep its children alive with it).
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(
            max_workers=processes, mp_context=context, initializer=_die_with_parent
        )

    def _ensure(self) -> Executor | None:
        if self.processes <= 0:
            return None
        if self._executor is None:
            self._executor = self._new_executor(self.processes)
        return self._executor

    def start(self) -> None:
        self._ensure()

    def prestart(self, config: DecoderConfig) -> None:
        """Spawn the pool processes and have each load the decode stack now, without waiting
        (no event loop needed): ``das-ingest run`` calls this before it imports the AWS SDK,
        connects and takes leases, so the processes start on the other core meanwhile."""
        executor = self._ensure()
        if executor is None or self._warming:
            return
        empty = BatchInput("warm", [], config, stream_name="warm")
        self._warming = [executor.submit(self._decode, empty) for _ in range(self.processes)]

    async def warm(self, config: DecoderConfig) -> None:
        """Start every pool process and load the decode stack in it now, while the first
        GetRecords calls are in flight, instead of on the first batch (or wait for what
        :meth:`prestart` began)."""
        # An empty batch: imports the decode stack, builds the decryptor and compiles the
        # policy rules, which the first real batch would otherwise wait for.
        self.prestart(config)
        warming, self._warming = self._warming, []
        if warming:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in warming), return_exceptions=True)

    async def decode(self, batch: BatchInput, size: int) -> BatchOutput:
        """Decode in the pool. A dead pool process (OOM killer, a crash) is a transient fault:
        the pool is rebuilt and the batch tried again; a batch that keeps killing it raises
        DecoderCrashedError so its records can be tried apart (see decode_alone)."""
        async with self.budget.hold(size):
            for _ in range(CRASH_TRIES):
                executor = self._ensure()
                if executor is None:
                    return self._decode(batch)
                try:
                    return await asyncio.get_running_loop().run_in_executor(
                        executor, self._decode, batch
                    )
                except BrokenProcessPool:
                    log.warning("decode pool broke (a worker process died); rebuilding it")
                    if self._executor is executor:
                        self._executor = None
                        executor.shutdown(wait=False, cancel_futures=True)
                    await asyncio.sleep(0.5)
            raise DecoderCrashedError(
                f"a batch of {len(batch.records)} records broke the decode pool {CRASH_TRIES} times"
            )

    async def decode_alone(self, batch: BatchInput) -> BatchOutput | None:
        """Decode a one-record batch in a quarantine process of its own; None if the record
        kills it (nothing else ran there, so the record is to blame)."""
        if self.processes <= 0:
            return self._decode(batch)
        if self._quarantine is None:
            self._quarantine = self._new_executor(1)
        quarantine = self._quarantine
        try:
            return await asyncio.get_running_loop().run_in_executor(quarantine, self._decode, batch)
        except BrokenProcessPool:
            self._quarantine = None
            quarantine.shutdown(wait=False, cancel_futures=True)
            return None

    def close(self) -> None:
        for executor in (self._executor, self._quarantine):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        self._executor = self._quarantine = None
