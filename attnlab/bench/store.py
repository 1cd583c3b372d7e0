"""The results store: every measurement appended to a local SQLite database.

A result is keyed by (suite, hash of its configuration). `done` tells whether a
configuration has a result, so an interrupted run resumes where it stopped; each
result is written in its own transaction, so a killed run loses at most the
configuration it was measuring. WAL journaling and a busy timeout let two runs write
the same database at once; the unique key keeps the first result of a configuration.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class ResultStore:
    """Append-only store of benchmark results in SQLite (`path`, created with its folder)."""

    def __init__(self, path: str | Path = DEFAULT_DB, *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self._connect() as con:
            con.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            yield con
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
        self, suite: str, config: dict[str, Any], status: str, metrics: dict[str, Any], env: dict[str, Any]
    ) -> bool:
        """Append one result; False (and nothing written) when the configuration has one already."""
        if status not in STATUSES:
            raise ValueError(f"status: expected one of {STATUSES}, got {status!r}")
        env_text = canonical(env)
        env_key = hashlib.sha256(env_text.encode()).hexdigest()[:20]
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("INSERT OR IGNORE INTO envs (env_hash, env) VALUES (?, ?)", (env_key, env_text))
                (env_id,) = con.execute("SELECT id FROM envs WHERE env_hash = ?", (env_key,)).fetchone()
                cur = con.execute(
                    "INSERT OR IGNORE INTO results (suite, config_hash, config, status, metrics, env_id, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (suite, config_hash(config), canonical(config), status, canonical(metrics), env_id, time.time()),
                )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return cur.rowcount == 1

    def forget(self, suite: str, config: dict[str, Any]) -> None:
        """Drop the result of one configuration (to measure it again)."""
        with self._connect() as con:
            con.execute("DELETE FROM results WHERE suite = ? AND config_hash = ?", (suite, config_hash(config)))

    def results(self, suite: str | None = None) -> list[Result]:
        """Every result (of one suite), oldest first."""
        query = (
            "SELECT r.suite, r.config, r.status, r.metrics, e.env, r.created, r.config_hash "
            "FROM results r JOIN envs e ON e.id = r.env_id"
        )
        args: tuple[Any, ...] = ()
        if suite is not None:
            query += " WHERE r.suite = ?"
            args = (suite,)
        with self._connect() as con:
            rows = con.execute(query + " ORDER BY r.id", args).fetchall()
        return [
            Result(s, json.loads(c), st, json.loads(m), json.loads(e), created, h)
            for s, c, st, m, e, created, h in rows
        ]

    def count(self, suite: str | None = None) -> int:
        with self._connect() as con:
            if suite is None:
                return int(con.execute("SELECT COUNT(*) FROM results").fetchone()[0])
            return int(con.execute("SELECT COUNT(*) FROM results WHERE suite = ?", (suite,)).fetchone()[0])
