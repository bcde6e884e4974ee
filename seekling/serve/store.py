"""Chat history in SQLite (WAL mode): one row per conversation, owned by an API key's hash.

Every query filters on the owner, so one key can never see, change or delete another's conversations:
to a stranger a conversation simply does not exist (the routes answer 404).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    title TEXT NOT NULL,
    data TEXT NOT NULL,          -- JSON: {"messages": [...], "system": str, "settings": {...}}
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_owner ON conversations (owner, updated_at);
"""


def dumps(data: dict) -> str:
    """JSON text of a conversation; ValueError for what JSON cannot hold, so that it is never stored (a stored
    Infinity would make every later read of the conversation fail)."""
    return json.dumps(data, allow_nan=False)


class Store:
    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "history.sqlite3")
        # One connection shared by the threadpool's workers, serialised by a lock: the history is small and
        # the lock is held only for one statement, so this never becomes the bottleneck.
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def list(self, owner: str) -> list[dict]:
        with self.lock:
            rows = self.db.execute(
                "SELECT id, title, created_at, updated_at FROM conversations WHERE owner = ? ORDER BY updated_at DESC",
                (owner,),
            ).fetchall()
        return [{"id": r[0], "title": r[1], "created_at": r[2], "updated_at": r[3]} for r in rows]

    def get(self, owner: str, conv_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute(
                "SELECT id, title, data, created_at, updated_at FROM conversations WHERE owner = ? AND id = ?",
                (owner, conv_id),
            ).fetchone()
        if row is None:
            return None
        return {
            "id": row[0],
            "title": row[1],
            **json.loads(row[2]),
            "created_at": row[3],
            "updated_at": row[4],
        }

    def create(self, owner: str, title: str, data: dict) -> dict:
        """A new conversation; ValueError (and nothing written) if `data` is not JSON (NaN, Infinity)."""
        conv_id, now, text = uuid.uuid4().hex, time.time(), dumps(data)
        with self.lock:
            self.db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
                (conv_id, owner, title, text, now, now),
            )
        return self.get(owner, conv_id)

    def update(self, owner: str, conv_id: str, title: str | None, data: dict | None) -> dict | None:
        current = self.get(owner, conv_id)
        if current is None:
            return None
        merged = {k: current[k] for k in ("messages", "system", "settings") if k in current}
        merged.update(data or {})
        text = dumps(merged)
        with self.lock:
            self.db.execute(
                "UPDATE conversations SET title = ?, data = ?, updated_at = ? WHERE owner = ? AND id = ?",
                (
                    title if title is not None else current["title"],
                    text,
                    time.time(),
                    owner,
                    conv_id,
                ),
            )
        return self.get(owner, conv_id)

    def delete(self, owner: str, conv_id: str) -> bool:
        with self.lock:
            cur = self.db.execute("DELETE FROM conversations WHERE owner = ? AND id = ?", (owner, conv_id))
        return cur.rowcount > 0

    def close(self) -> None:
        with self.lock:
            self.db.close()
