"""Container health check of das-ingest (the Dockerfile's HEALTHCHECK): GET /healthz.

The port is the ``--metrics-port`` of the ``das-ingest run`` process, read from its command line
(``/proc/1/cmdline``: the container's main process, or ``$DAS_HEALTHCHECK_PID``), else
``$DAS_METRICS_PORT``. Other commands (migrate, emulate, status) and a ``run`` without a metrics
port serve no health endpoint: the check passes, as it would without a HEALTHCHECK.

Exit status 0 means healthy, 1 unhealthy (what Docker expects). Standard library only: it runs
with ``python3 -I`` in the image, in a few tens of milliseconds.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

TIMEOUT_SECONDS = 4.0


def metrics_port(argv: Sequence[str], env: Mapping[str, str]) -> int | None:
    """The port ``das-ingest run`` serves /healthz on, from its argv and environment."""
    if "run" not in argv:
        return None
    for index, arg in enumerate(argv):
        if arg == "--metrics-port" and index + 1 < len(argv):
            return int(argv[index + 1])
        if arg.startswith("--metrics-port="):
            return int(arg.partition("=")[2])
    value = env.get("DAS_METRICS_PORT", "")
    return int(value) if value else None


def command_line(pid: str) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return file.read().decode(errors="replace").split("\0")


def main() -> int:
    pid = os.environ.get("DAS_HEALTHCHECK_PID", "1")
    try:
        port = metrics_port(command_line(pid), os.environ)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: cannot tell the metrics port of process {pid}: {exc}")
        return 1
    if port is None:
        return 0
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:  # 503: the coordinator loop stopped turning
        print(f"unhealthy: {url} answered {exc.code}")
        return 1
    except OSError as exc:  # refused, timed out
        print(f"unhealthy: {url}: {exc}")
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
