"""Running the das-ingest command line from tests, without blocking the event loop."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def das_ingest(
    *args: str, env: dict[str, str] | None = None, deadline: float = 120, stdin: bytes = b""
) -> Result:
    """Run ``das-ingest *args`` with ``stdin`` piped in (empty by default)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), deadline)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())
