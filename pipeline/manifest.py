"""What a job has finished, kept beside its output: `<root>/_resflow/<kind>/`.

    entries/<relative path>.json   one small object per finished file (ingest, degrade)
    batches/<time>-<id>.json       many records at once, and removals (restore's driver
                                   flushes what finished every few seconds)
    snapshot.json                  every entry as of the end of the last run

Entries are keyed by the input file's path relative to the dataset root (folders, Hive
partitions and Hugging Face shard names kept), so same-named files in two folders are two
entries. A batch records many finished files with one PUT, so the driver's storage calls
do not grow with the files per second (docs/scaling.md); at the end of a run `compact`
folds entries and batches into the snapshot and deletes them, so planning the next run
reads one object plus the few written since, not one object per file.

An entry is evidence, not truth: the restore trusts it only while the output it names
still exists with the recorded ETag and size (pipeline/restore/records.py, `FileEntry.vouches_for`).
An object that is not the JSON it should be (truncated, overwritten by hand) vouches for
nothing: `all` leaves it out, names it in `damaged`, and the next `compact` replaces it.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import dataclass, field

from pipeline import storage

ENTRIES = "entries"
BATCHES = "batches"
SNAPSHOT = "snapshot.json"


@dataclass
class Manifest:
    root: str
    kind: str = "manifest"
    damaged: list[str] = field(default_factory=list)  # objects the last `all` could not read, with why

    @property
    def folder(self) -> str:
        return storage.join(self.root, storage.RESFLOW_DIR, self.kind)

    def _entry_uri(self, key: str) -> str:
        return storage.join(self.folder, ENTRIES, key + ".json")

    def _read_object(self, uri: str) -> dict | None:
        """A JSON object of this manifest; None when it is gone or damaged (then noted in `damaged`)."""
        try:
            data = json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            return None
        except ValueError as error:  # truncated or not JSON (UnicodeDecodeError is one too)
            self.damaged.append(f"{uri}: not JSON ({error})")
            return None
        if not isinstance(data, dict):
            self.damaged.append(f"{uri}: a JSON {type(data).__name__}, not an object")
            return None
        return data

    def _read_entry(self, key: str) -> dict | None:
        return self._read_object(self._entry_uri(key))

    def get(self, key: str) -> dict | None:
        return self.all().get(key)

    def put(self, key: str, record: dict) -> None:
        storage.write_bytes(self._entry_uri(key), json.dumps(record, sort_keys=True).encode())

    def _snapshot(self) -> dict[str, dict]:
        return self._read_object(storage.join(self.folder, SNAPSHOT)) or {}

    def put_many(self, records: dict[str, dict | None]) -> None:
        """Record many keys with one PUT; a None record removes its key."""
        if records:
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
            storage.write_bytes(storage.join(self.folder, BATCHES, name), json.dumps(records, sort_keys=True).encode())

    def _listed(self, folder: str) -> list[str]:
        """The objects under one of this manifest's folders, by name."""
        uri = storage.join(self.folder, folder)
        fs, path = storage.fsspec_filesystem(uri)
        if not storage.exists(uri):
            return []
        found = storage.retry(lambda: fs.find(path), what=f"listing {uri}")
        return sorted(posixpath.relpath(name, path) for name in found if name.endswith(".json"))

    def all(self) -> dict[str, dict]:
        """Every entry: the snapshot, overridden by the entries and then the batches written
        since (in the order they were written)."""
        self.damaged = []
        entries = self._snapshot()
        for name in self._listed(ENTRIES):
            record = self._read_entry(name[: -len(".json")])
            if record is not None:
                entries[name[: -len(".json")]] = record
        for name in self._listed(BATCHES):
            batch = self._read_object(storage.join(self.folder, BATCHES, name)) or {}
            for key, record in batch.items():
                if record is None:
                    entries.pop(key, None)
                else:
                    entries[key] = record
        return entries

    def remove(self, key: str) -> None:
        storage.delete(self._entry_uri(key))
        self.put_many({key: None})

    def compact(self) -> int:
        """Fold the entries and batches into the snapshot and delete them (one writer at a
        time: the caller holds the output's lease), replacing a damaged snapshot. Returns how
        many objects were folded."""
        folded = [storage.parse(storage.join(self.folder, folder, name)).path
                  for folder in (ENTRIES, BATCHES) for name in self._listed(folder)]
        merged = self.all()
        if not folded and not self.damaged:
            return 0
        storage.write_bytes(storage.join(self.folder, SNAPSHOT), json.dumps(merged, sort_keys=True).encode())
        fs, _ = storage.fsspec_filesystem(self.folder)
        for chunk in storage.iter_chunks(folded, 1000):  # one DeleteObjects request per 1,000 on S3
            storage.retry(lambda chunk=chunk: fs.rm(chunk), what=f"compacting {self.folder}")
        return len(folded)
