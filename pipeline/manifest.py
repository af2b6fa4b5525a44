"""What a job has finished, kept beside its output: `<root>/_resflow/<kind>/`.

    entries/<relative path>.json   one small object per finished file, written as it finishes
    snapshot.json                  every entry as of the end of the last run

Entries are keyed by the input file's path relative to the dataset root (folders, Hive
partitions and Hugging Face shard names kept), so same-named files in two folders are two
entries. One object per file means a finished file is recorded with one PUT, whatever
else is running; at the end of a run `compact` folds the entries into the snapshot and
deletes them, so planning the next run reads one object plus the few entries written
since, not one object per file (docs/scaling.md).

An entry is evidence, not truth: the restore trusts it only while the output it names
still exists with the recorded ETag and size (pipeline/restore.py, `plan`).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from pipeline import storage

ENTRIES = "entries"
SNAPSHOT = "snapshot.json"


@dataclass
class Manifest:
    root: str
    kind: str = "manifest"

    @property
    def folder(self) -> str:
        return storage.join(self.root, storage.RESFLOW_DIR, self.kind)

    def _entry_uri(self, key: str) -> str:
        return storage.join(self.folder, ENTRIES, key + ".json")

    def _read_entry(self, key: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self._entry_uri(key)))
        except FileNotFoundError:
            return None

    def get(self, key: str) -> dict | None:
        entry = self._read_entry(key)
        return entry if entry is not None else self._snapshot().get(key)

    def put(self, key: str, record: dict) -> None:
        storage.write_bytes(self._entry_uri(key), json.dumps(record, sort_keys=True).encode())

    def _snapshot(self) -> dict[str, dict]:
        try:
            return json.loads(storage.read_bytes(storage.join(self.folder, SNAPSHOT)))
        except FileNotFoundError:
            return {}

    def _entry_keys(self) -> list[str]:
        folder = storage.join(self.folder, ENTRIES)
        fs, path = storage.fsspec_filesystem(folder)
        if not storage.exists(folder):
            return []
        found = storage.retry(lambda: fs.find(path), what=f"listing {folder}")
        return [posixpath.relpath(name, path)[: -len(".json")] for name in found if name.endswith(".json")]

    def all(self) -> dict[str, dict]:
        """Every entry: the snapshot, overridden by the entries written since."""
        entries = self._snapshot()
        for key in self._entry_keys():
            record = self._read_entry(key)
            if record is not None:
                entries[key] = record
        return entries

    def remove(self, key: str) -> None:
        storage.delete(self._entry_uri(key))
        snapshot = self._snapshot()
        if snapshot.pop(key, None) is not None:
            storage.write_bytes(storage.join(self.folder, SNAPSHOT), json.dumps(snapshot, sort_keys=True).encode())

    def compact(self) -> int:
        """Fold the entries into the snapshot and delete them (one writer at a time: the
        caller holds the output's lease). Returns how many entries were folded."""
        keys = self._entry_keys()
        if not keys:
            return 0
        merged = self.all()
        storage.write_bytes(storage.join(self.folder, SNAPSHOT), json.dumps(merged, sort_keys=True).encode())
        fs, _ = storage.fsspec_filesystem(self.folder)
        paths = [storage.parse(self._entry_uri(key)).path for key in keys]
        for chunk in storage.iter_chunks(paths, 1000):  # one DeleteObjects request per 1,000 on S3
            storage.retry(lambda chunk=chunk: fs.rm(chunk), what=f"compacting {self.folder}")
        return len(keys)
