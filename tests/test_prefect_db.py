"""A new Prefect home's database: a copy of a template that Prefect itself built once."""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME, temporary_settings

from seqlm.runtime import prefect_db


def schema(path: Path) -> tuple[list[tuple], str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    return tables, revision


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache whose template Prefect built (migrations, block types), once for the module."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        prefect_db.build(prefect_db.template_path())
    return folder


def provide_in(home: Path) -> Path:
    """provide() for a Prefect home `home` (its database named outright: the test server of
    other tests names one of its own)."""
    url = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    with temporary_settings(updates={PREFECT_HOME: str(home),
                                     PREFECT_API_DATABASE_CONNECTION_URL: url}):
        prefect_db.provide()
        return prefect_db.home_database()


def test_a_new_home_gets_a_copy_of_the_template(cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    template = prefect_db.template_path()
    assert template.parent == cache / "seqlm" and prefect_db.usable(template)
    tables, revision = schema(template)
    assert {"flow_run", "task_run", "block_type"} <= {name for _, name, _ in tables}
    with contextlib.closing(sqlite3.connect(template)) as db:      # block types registered
        assert db.execute("SELECT count(*) FROM block_type").fetchone()[0] > 0
    built = template.stat().st_mtime_ns
    monkeypatch.setattr(prefect_db, "build", lambda *_: pytest.fail("built again"))
    database = provide_in(tmp_path / "home")
    assert schema(database) == (tables, revision)
    assert template.stat().st_mtime_ns == built
    assert not list(template.parent.glob(".*"))                     # no partial file left


def test_a_home_with_a_database_keeps_it(cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "prefect.db").write_bytes(b"the runs of this workspace")
    database = provide_in(tmp_path / "home")
    assert database.read_bytes() == b"the runs of this workspace"


def test_an_unreadable_template_is_built_again(cache: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "seqlm").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    template = prefect_db.template_path()
    template.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84)    # a cut-off file
    assert not prefect_db.usable(template)
    monkeypatch.setattr(prefect_db, "build",
                        lambda path, meanwhile: prefect_db.copy(cache / "seqlm" / path.name, path))
    database = provide_in(tmp_path / "home")
    assert prefect_db.usable(template) and prefect_db.usable(database)


def test_without_a_writable_cache_prefect_builds_the_database_itself(tmp_path: Path,
                                                                     monkeypatch) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert provide_in(tmp_path / "home") == tmp_path / "home" / "prefect.db"
    assert not (tmp_path / "home" / "prefect.db").exists()    # left to the server's migrations
