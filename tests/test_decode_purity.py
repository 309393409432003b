"""The decode layer is pure: importing it and decoding with it pulls in no asyncio, no AWS SDK
and no database driver (it is what the process pool runs, and what must stay testable alone).

Checked in a fresh interpreter, since this test process has imported everything already. The
Encryption SDK decryptor (ingest/decode/esdk.py, --decryptor esdk) is left out on purpose: the
aws-encryption-sdk package imports boto3 (and so botocore and asyncio) at import time; the
default lean decryptor, the package's ``__init__`` and every other module are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.sealing import seal
from tests.warehouse_helpers import inner

FORBIDDEN = ("asyncio", "aiobotocore", "botocore", "boto3", "asyncpg", "aiohttp", "s3transfer")

CHILD = """
import importlib, json, pkgutil, sys
import ingest.decode
for info in pkgutil.iter_modules(ingest.decode.__path__):
    if info.name != "esdk":
        importlib.import_module("ingest.decode." + info.name)
from ingest.decode.batch import BatchInput, DecoderConfig, decode_batch
raw = open(sys.argv[1], "rb").read()
key = open(sys.argv[2], "rb").read()
config = DecoderConfig(decryptor="lean")
out = decode_batch(BatchInput("s", [(0, "1", raw, key)], config, stream_name="x"))
assert not out.failures, out.failures
forbidden = set(sys.argv[3].split(","))
print(json.dumps({
    "events": out.event_count,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in forbidden),
    "decode": sorted(m for m in sys.modules if m.startswith("ingest.decode")),
}))
"""


def test_importing_and_running_the_decode_layer_pulls_in_no_io_library(tmp_path: Path) -> None:
    key = os.urandom(32)
    doc = inner({"type": "record", "command": "SELECT"}, {"type": "record", "command": "QUERY"})
    (tmp_path / "record").write_bytes(seal(doc, key, "1.2"))
    (tmp_path / "key").write_bytes(key)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "record"),
            str(tmp_path / "key"),
            ",".join(FORBIDDEN),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["events"] == 2  # it really decoded, with the lean decryptor
    assert report["modules"] == []
    # Every module of the package but the SDK adapter was imported and checked.
    assert "ingest.decode.lean" in report["decode"]
    assert "ingest.decode.batch" in report["decode"]
    assert "ingest.decode.esdk" not in report["decode"]
