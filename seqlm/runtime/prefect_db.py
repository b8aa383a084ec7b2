"""A new Prefect home's SQLite database, copied from a template instead of built again.

Prefect creates its database by running every one of its Alembic migrations (115 for SQLite, 140
table rebuilds among them) and registering its block types: ~8 s of one core here, more than
the rest of a run's start-up, paid by the first `seqlm run`, `seqlm schedule` or `seqlm ui`
of every clone, test workspace or fresh `.prefect` folder. What it builds depends on Prefect's
version alone, so the first one built on a machine is kept in the user's cache, and a new home
gets a copy of it; Prefect then finds its schema up to date, as after any earlier run.

`python -m seqlm.runtime.prefect_db --port N` is the temporary server of `seqlm run`: the copy,
then Prefect's server app under uvicorn, as Prefect runs it (`uvicorn --factory
prefect.server.api.server:create_app`); without --port, the copy alone (before `prefect server
start`, for `seqlm schedule` and `seqlm ui`).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path


def template_path() -> Path:
    """Where this machine keeps the database a new home starts from, for this Prefect."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "seqlm" / f"prefect-{version('prefect')}.db"


def home_database() -> Path | None:
    """The SQLite file of the Prefect server these settings describe; None for another
    database (PostgreSQL, in memory)."""
    from prefect.settings import get_current_settings
    from sqlalchemy.engine import make_url
    url = make_url(get_current_settings().server.database.connection_url.get_secret_value())
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def provide(meanwhile: Callable[[], object] = lambda: None) -> None:
    """Give a Prefect home that has no database yet a copy of the template (built first if
    there is none, or it is unreadable, while this process runs `meanwhile`); a home with a
    database keeps it."""
    database = home_database()
    if database is None or database.exists():
        return
    template = template_path()
    if not usable(template):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            build(template, meanwhile)   # failed (a read-only cache): Prefect builds in place
    if usable(template):
        with contextlib.suppress(OSError, sqlite3.Error):    # failed: Prefect builds it in place
            database.parent.mkdir(parents=True, exist_ok=True)
            copy(template, database)


def usable(path: Path) -> bool:
    """A whole SQLite database that Prefect's migrations have run on."""
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return (db.execute("PRAGMA quick_check").fetchone() == ("ok",) and
                    db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1)
    except sqlite3.Error:
        return False


def build(template: Path, meanwhile: Callable[[], object] = lambda: None) -> None:
    """Prefect's own database creation (migrations, block types) in a new file, in a process
    of its own (Prefect's settings are fixed per process), which becomes `template` when
    complete; this process runs `meanwhile` while it waits."""
    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=template.parent, prefix=".build-") as folder:
        scratch = Path(folder) / "prefect.db"
        env = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL":
               f"sqlite+aiosqlite:///{scratch}"}
        builder = subprocess.Popen([sys.executable, "-m", "seqlm.runtime.prefect_db", "--build"],
                                   env=env, stdout=subprocess.DEVNULL)
        try:
            meanwhile()
        finally:
            if builder.wait():
                raise subprocess.CalledProcessError(builder.returncode, builder.args)
        copy(scratch, template)


async def _create() -> None:
    """What Prefect's server does on its first start: migrations, then its block types."""
    from prefect.plugins import load_prefect_collections
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration
    db = provide_database_interface()
    await db.create_db()
    load_prefect_collections()           # the block types of installed collections too
    async with await db.session() as session:
        await run_block_auto_registration(session=session)
    await (await db.engine()).dispose()


def copy(source: Path, target: Path) -> None:
    """A consistent copy of SQLite database `source` (SQLite's backup, whatever its journal
    holds) written beside `target` and renamed onto it."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.",
                                     delete=False) as part:
        partial = Path(part.name)
    try:
        with contextlib.closing(sqlite3.connect(source)) as src, \
                contextlib.closing(sqlite3.connect(partial)) as dst:
            src.backup(dst)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="seqlm run's temporary Prefect server")
    parser.add_argument("--port", type=int, help="serve on this port (none: the copy alone)")
    parser.add_argument("--build", action="store_true", help="create the database of the "
                        "settings' connection URL (what a template is built by)")
    args = parser.parse_args()
    if args.build:
        asyncio.run(_create())
        return
    # A first template is built in a process of its own: Prefect's app is imported meanwhile.
    if args.port is None:
        provide()
        return
    provide(meanwhile=lambda: importlib.import_module("prefect.server.api.server"))
    import uvicorn
    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                port=args.port, log_level="error", lifespan="on")


if __name__ == "__main__":
    main()
