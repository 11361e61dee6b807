"""The node's durable queue and its audit log, in one SQLite database in WAL mode (`node.sqlite` in the spool
folder) beside the received files.

Why SQLite and not a folder alone: a received instance must be on disk before the C-STORE is acknowledged, and
the worker needs a state per instance (waiting, next try, done) that survives a SIGKILL at any point. The file is
written to a temporary name, flushed to disk and renamed; then its row is committed with `synchronous=FULL`;
only then does the SCP answer success. A crash between the two leaves a file without a row, never a row without
a file: the sender was not acknowledged and sends it again, and the orphan is removed at the next start.

The audit log is a table the database refuses to UPDATE or DELETE (triggers): one `received` row per instance
when it is queued, one row per outcome (`answered`, `refused`, `skipped`, `failed`) when it is done. It holds
UIDs, hashes, the answer and timings, never pixel data.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY, file TEXT NOT NULL, sha256 TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL, received REAL NOT NULL, next_try REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    done REAL, last_error TEXT, UNIQUE (sop_instance_uid, sha256));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, event TEXT NOT NULL, calling_ae TEXT, study_uid TEXT,
    series_uid TEXT, sop_uid TEXT, pixel_sha256 TEXT, model TEXT, version TEXT, outcome TEXT,
    result_uids TEXT, received REAL, latency_ms REAL, detail TEXT);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
AUDIT_COLUMNS = ("time", "event", "calling_ae", "study_uid", "series_uid", "sop_uid", "pixel_sha256", "model",
                 "version", "outcome", "result_uids", "received", "latency_ms", "detail")


@dataclass(frozen=True)
class Queued:
    id: int
    file: Path
    sha256: str
    sop_instance_uid: str
    calling_ae: str
    received: float
    attempts: int


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    """The queue and the audit log. Thread-safe: the SCP's association threads enqueue, the worker drains."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        (self.folder / "incoming").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._claimed: set[int] = set()
        self._db = sqlite3.connect(self.folder / "node.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Files never committed to the queue (a crash before the acknowledgement): the sender sends them again."""
        known = {row[0] for row in self._db.execute("SELECT file FROM queue WHERE done IS NULL")}
        for path in [*self.folder.glob("incoming/*"), *self.folder.glob("*.dcm")]:
            if path.name not in known:
                path.unlink(missing_ok=True)

    def enqueue(self, source: Path, sop_instance_uid: str, calling_ae: str, audit: dict[str, Any]) -> bool:
        """Make the received file durable and queue it; False when this very instance (same UID, same bytes)
        is already queued or answered (a sender's retry: acknowledged, not answered twice)."""
        name = f"{uuid.uuid4().hex}.dcm"
        temporary = self.folder / "incoming" / name
        digest = hashlib.sha256()
        with open(source, "rb") as reader, open(temporary, "wb") as writer:  # copied and hashed in one pass
            for block in iter(lambda: reader.read(1 << 20), b""):
                digest.update(block)
                writer.write(block)
            writer.flush()
            os.fsync(writer.fileno())
        sha256 = digest.hexdigest()
        with self._lock:
            known = self._db.execute("SELECT 1 FROM queue WHERE sop_instance_uid = ? AND sha256 = ?",
                                     (sop_instance_uid, sha256)).fetchone()
        if known:
            temporary.unlink()
            return False
        os.replace(temporary, self.folder / name)
        _fsync_folder(self.folder)
        now = time.time()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO queue (file, sha256, sop_instance_uid, calling_ae, received, next_try) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (name, sha256, sop_instance_uid, calling_ae, now, now))
                self._append(event="received", calling_ae=calling_ae, sop_uid=sop_instance_uid, received=now, **audit)
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:  # the same instance from two associations at once
                self._db.execute("ROLLBACK")
                (self.folder / name).unlink(missing_ok=True)
                return False
        return True

    def claim(self) -> Queued | None:
        """The oldest waiting instance whose next try is due and that no other worker holds; it is held until
        `finish` or `retry_later` (held in memory only: a restart frees every claim)."""
        with self._lock:
            held = ",".join(str(number) for number in self._claimed) or "-1"
            row = self._db.execute("SELECT id, file, sha256, sop_instance_uid, calling_ae, received, attempts "
                                   f"FROM queue WHERE done IS NULL AND next_try <= ? AND id NOT IN ({held}) "
                                   "ORDER BY id LIMIT 1", (time.time(),)).fetchone()
            if row is not None:
                self._claimed.add(row[0])
        return None if row is None else Queued(row[0], self.folder / row[1], *row[2:])

    def waiting(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM queue WHERE done IS NULL").fetchone()[0]

    def retry_later(self, item: Queued, error: str, delay: float) -> None:
        with self._lock:
            self._db.execute("UPDATE queue SET attempts = attempts + 1, next_try = ?, last_error = ? WHERE id = ?",
                             (time.time() + delay, error, item.id))
            self._claimed.discard(item.id)

    def finish(self, item: Queued, outcomes: list[dict[str, Any]]) -> None:
        """Record each outcome in the audit log and mark the instance done, in one transaction; then drop its
        file (the audit log keeps the pixel data's hash, not the pixels)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for outcome in outcomes:
                self._append(**outcome)
            self._db.execute("UPDATE queue SET done = ? WHERE id = ?", (time.time(), item.id))
            self._db.execute("COMMIT")
            self._claimed.discard(item.id)
        item.file.unlink(missing_ok=True)

    def record(self, **fields: Any) -> None:
        """An audit row for something never queued (a dataset refused at reception)."""
        with self._lock:
            self._append(**fields)

    def _append(self, **fields: Any) -> None:
        values = {"time": time.time(), **fields}
        for key in ("detail", "result_uids"):
            if key in values and not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        unknown = set(values) - set(AUDIT_COLUMNS)
        if unknown:
            raise ValueError(f"not audit columns: {sorted(unknown)}")
        columns = [name for name in AUDIT_COLUMNS if name in values]
        self._db.execute(f"INSERT INTO audit ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                         [values[name] for name in columns])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_audit(folder: str | os.PathLike, *, study: str | None = None, outcome: str | None = None,
               since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
    """Audit rows, oldest first, filtered by study UID, outcome (`pending`: received and not done yet) and
    time; read-only (the node may be running)."""
    database = Path(folder) / "node.sqlite"
    if not database.is_file():
        raise FileNotFoundError(f"no audit log at {database} (has the node run with this spool folder?)")
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        clauses, parameters = [], []
        if outcome == "pending":
            clauses.append("event = 'received' AND sop_uid IN (SELECT sop_instance_uid FROM queue WHERE done IS NULL)")
        elif outcome:
            clauses.append("outcome = ?")
            parameters.append(outcome)
        for clause, value in (("study_uid = ?", study), ("time >= ?", since), ("time <= ?", until)):
            if value is not None:
                clauses.append(clause)
                parameters.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = db.execute(f"SELECT * FROM audit{where} ORDER BY id", parameters).fetchall()
        return [dict(row) for row in rows]
    finally:
        db.close()
