"""The package as users install it: a wheel with the console script and the migrations."""

from __future__ import annotations

import asyncio
import sys
import zipfile
from pathlib import Path

from ingest.warehouse.migrate import load_migrations

ROOT = Path(__file__).resolve().parents[1]


async def test_the_wheel_carries_the_migrations_and_the_entry_point(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "-w",
        str(tmp_path),
        str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, out.decode()
    wheels = await asyncio.to_thread(lambda: list(tmp_path.glob("das_ingest-*.whl")))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    shipped = sorted(n.rsplit("/", 1)[-1] for n in names if "/share/das-ingest/migrations/" in n)
    assert shipped == sorted(f"{m.version:04d}_{m.name}.sql" for m in load_migrations())
    assert "ingest/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "das-ingest = ingest.cli:main" in zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert not [n for n in names if n.startswith("tests/")]
