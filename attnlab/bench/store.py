"""The results store: every measurement appended to a local SQLite database.

A result is keyed by (suite, hash of its configuration). `done` tells whether a
configuration has a result, so an interrupted run resumes where it stopped; each
result is written in its own transaction, so a killed run loses at most the
configuration it was measuring. WAL journaling and a busy timeout let two runs write
the same database at once; the unique key keeps the first result of a configuration.
A rerun replaces a result in one transaction with its new measurement (`record(...,
replace=True)`), so that a rerun stopped mid-measurement leaves the old one.

A writer checks the database writable when it opens it; a reader (`readonly=True`,
the report) opens it with SQLite's `mode=ro` and never writes, so a read-only or a
foreign file is left as it was. A file that is not a readable results database is a
`StoreError` (one line: the file and what to do); a row that cannot be decoded is
skipped, and counted in `skipped_rows`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ParameterError

DEFAULT_DB = Path("attnlab-results") / "results.sqlite"
STATUSES = ("ok", "over_time", "over_memory", "error", "disagree", "unsupported")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS envs (
    id INTEGER PRIMARY KEY,
    env_hash TEXT NOT NULL UNIQUE,
    env TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    suite TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    metrics TEXT NOT NULL,
    env_id INTEGER NOT NULL REFERENCES envs(id),
    created REAL NOT NULL,
    UNIQUE (suite, config_hash)
);
"""


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a configuration (key order does not matter)."""
    return hashlib.sha256(canonical(config).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Result:
    suite: str
    config: dict[str, Any]
    status: str
    metrics: dict[str, Any]
    env: dict[str, Any]
    created: float
    config_hash: str


class StoreError(ParameterError):
    """A results database that cannot be opened, read or written (the message names the file and the remedy)."""


class ResultStore:
    """Append-only store of benchmark results in SQLite (`path`, created with its folder unless `readonly`).

    `readonly=True` opens an existing database for reading only (StoreError when it is missing).
    """

    def __init__(self, path: str | Path = DEFAULT_DB, *, timeout: float = 60.0, readonly: bool = False) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.readonly = readonly
        self.skipped_rows = 0  # undecodable rows skipped by the last `results()`
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"{self.path}: no results database here; run `attnlab bench` first or pass --db")
            with self._connect() as con:
                tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"results", "envs"} <= tables:
                raise StoreError(f"{self.path}: not an attnlab results database (no results table); pass another --db")
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"{self.path}: cannot create its folder ({err.strerror}); pass another --db") from None
        self.check_writable()
        with self._connect() as con:
            con.executescript(_SCHEMA)

    def check_writable(self) -> None:
        """StoreError unless results can be written to the database (checked before a run)."""
        folder = self.path.parent
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(f"{self.path}: the results database is read-only; make it writable or pass another --db")
        if not os.access(folder, os.W_OK):  # SQLite writes its journal beside the database
            raise StoreError(f"{self.path}: its folder {folder} is not writable; make it writable or pass another --db")
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("ROLLBACK")
            except sqlite3.OperationalError as err:
                raise StoreError(f"{self.path}: cannot write the results database ({err}); pass another --db") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            if self.readonly:
                con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=self.timeout,
                                      isolation_level=None)
            else:
                con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as err:
            raise StoreError(f"{self.path}: cannot open the results database ({err}); pass another --db") from None
        try:
            try:
                if not self.readonly:
                    con.execute("PRAGMA journal_mode=WAL")
                    con.execute("PRAGMA synchronous=NORMAL")
                con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
                yield con
            except sqlite3.DatabaseError as err:
                if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                    raise
                raise StoreError(
                    f"{self.path}: not a readable results database ({err}); move it aside or pass another --db"
                ) from None
        finally:
            con.close()

    def done(self, suite: str, config: dict[str, Any]) -> bool:
        """Whether `config` of `suite` has a result already."""
        with self._connect() as con:
            row = con.execute(
                "SELECT 1 FROM results WHERE suite = ? AND config_hash = ?", (suite, config_hash(config))
            ).fetchone()
        return row is not None

    def record(
        self,
        suite: str,
        config: dict[str, Any],
        status: str,
        metrics: dict[str, Any],
        env: dict[str, Any],
        *,
        replace: bool = False,
    ) -> bool:
        """Append one result; False (and nothing written) when the configuration has one already.

        With `replace`, a stored result of the configuration is replaced in the same
        transaction that writes the new one (a rerun: until then the old one stays).
        """
        if status not in STATUSES:
            raise ValueError(f"status: expected one of {STATUSES}, got {status!r}")
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only; cannot record results")
        env_text = canonical(env)
        env_key = hashlib.sha256(env_text.encode()).hexdigest()[:20]
        key = config_hash(config)
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("INSERT OR IGNORE INTO envs (env_hash, env) VALUES (?, ?)", (env_key, env_text))
                (env_id,) = con.execute("SELECT id FROM envs WHERE env_hash = ?", (env_key,)).fetchone()
                if replace:
                    con.execute("DELETE FROM results WHERE suite = ? AND config_hash = ?", (suite, key))
                cur = con.execute(
                    "INSERT OR IGNORE INTO results (suite, config_hash, config, status, metrics, env_id, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (suite, key, canonical(config), status, canonical(metrics), env_id, time.time()),
                )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return cur.rowcount == 1

    def forget(self, suite: str, config: dict[str, Any]) -> None:
        """Drop the result of one configuration."""
        with self._connect() as con:
            con.execute("DELETE FROM results WHERE suite = ? AND config_hash = ?", (suite, config_hash(config)))

    def results(self, suite: str | None = None) -> list[Result]:
        """Every result (of one suite), oldest first; rows that cannot be decoded are skipped (`skipped_rows`)."""
        query = (
            "SELECT r.suite, r.config, r.status, r.metrics, e.env, r.created, r.config_hash "
            "FROM results r LEFT JOIN envs e ON e.id = r.env_id"
        )
        args: tuple[Any, ...] = ()
        if suite is not None:
            query += " WHERE r.suite = ?"
            args = (suite,)
        with self._connect() as con:
            rows = con.execute(query + " ORDER BY r.id", args).fetchall()
        out, bad = [], 0
        for s, c, st, m, e, created, h in rows:
            try:
                result = Result(s, json.loads(c), st, json.loads(m), json.loads(e), float(created), h)
            except (TypeError, ValueError):
                bad += 1
                continue
            if not all(isinstance(x, dict) for x in (result.config, result.metrics, result.env)):
                bad += 1
                continue
            out.append(result)
        if bad and bad != self.skipped_rows:
            print(f"{self.path}: skipped {bad} unreadable result rows", file=sys.stderr, flush=True)
        self.skipped_rows = bad
        return out

    def count(self, suite: str | None = None) -> int:
        with self._connect() as con:
            if suite is None:
                return int(con.execute("SELECT COUNT(*) FROM results").fetchone()[0])
            return int(con.execute("SELECT COUNT(*) FROM results WHERE suite = ?", (suite,)).fetchone()[0])
