"""One writer per output: a lease object at `<output>/_resflow/lease.json`.

A run takes the lease before it plans and holds it until it ends. Taking it is a
conditional create (S3 `If-None-Match: *`; locally an exclusive create under a file
lock), so of two runs that start together exactly one wins. The holder renews it every
quarter of its time-to-live with a conditional replace (`If-Match` on its own ETag); a
run that crashed stops renewing, and once the lease is older than its time-to-live (on
the storage's own clock) the next run takes it over, again conditionally. A run that
finds a live lease waits up to `wait_s`, then stops with a message naming the holder.

A holder that cannot renew (storage down longer than the time-to-live, or another run
took an expired lease over) marks the lease lost; the restore stops recording results
as soon as it sees that (`check`). Before it commits records, the restore `confirm`s the
lease with the store's own conditional write (a renewal If-Match its ETag), not the
local clock alone: a run frozen past its lease (SIGSTOP, a long pause) and then resumed
finds on its first commit that another run took over, and writes nothing. Orchestrators keep their own guard on top (the
Prefect flows' concurrency limit per input).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid

from pipeline import storage

LEASE_FILE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease."""


class UnguardedStorage(storage.StorageError, ValueError):
    """The store ignores conditional writes: a setup to change (exit 2), not a failure to retry."""


class LeaseLost(RuntimeError):
    """This run's lease expired or was taken over while it ran."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def holder_identity() -> dict:
    """Who is writing: host, PID, the Ray job submission id when run as a Ray job."""
    ray_job = None
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        try:
            ray_job = json.loads(config).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            ray_job = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "ray_job": ray_job, "started": _now(),
            "run": uuid.uuid4().hex[:12]}


def describe(holder: dict) -> str:
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("ray_job"):
        parts.append(f"Ray job {holder['ray_job']}")
    return f"{', '.join(parts)}, started {holder.get('started', '?')}"


class OutputLease:
    """`with OutputLease(output): ...` holds the output's lease for the block."""

    def __init__(self, output_uri: str, ttl_s: float = 120.0, wait_s: float = 0.0, poll_s: float = 2.0,
                 log=print):
        if ttl_s <= 0 or wait_s < 0:
            raise ValueError("lease ttl_s must be positive and wait_s not negative")
        self.uri = lease_uri(output_uri)
        self.output = output_uri
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.log = log
        self.holder = holder_identity()
        self.info: storage.FileInfo | None = None
        self.lost = threading.Event()
        self.took_over = False  # from a run that stopped renewing it: most likely one that crashed
        self.last_renewed = 0.0  # monotonic
        self._renewing = threading.Lock()  # one conditional renewal at a time: the renewer's or confirm's
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "ttl_s": self.ttl_s, "renewed": _now()}, sort_keys=True).encode()

    def acquire(self) -> "OutputLease":
        storage.ensure_bucket(self.output)
        deadline = time.monotonic() + self.wait_s
        announced = False
        while True:
            body = self._body()
            created = storage.create_exclusive(self.uri, body)
            if created:
                self._check_read_back(body)
                self._probe_conditions(body, created)
                return self._held(created)
            current = storage.read_with_age(self.uri)
            if current is None:
                continue  # released between our two calls: try again at once
            body, info, age = current
            try:
                record = json.loads(body)
                holder, ttl = record["holder"], float(record["ttl_s"])
            except (ValueError, KeyError, TypeError):
                holder, ttl = {}, self.ttl_s  # unreadable: treat like a lease of ours, by age
            if age > ttl:
                replaced = storage.replace_if_match(self.uri, self._body(), info.etag)
                if replaced:
                    self.took_over = True
                    self.log(f"took over the lease on {self.output} from a run that stopped renewing it "
                             f"{age:.0f} s ago ({describe(holder)})")
                    return self._held(replaced)
                continue  # someone else took it over first: look again
            left = deadline - time.monotonic()
            message = (f"another run is writing to {self.output}: {describe(holder)}; it renewed its lease "
                       f"{age:.0f} s ago (lease {self.uri}, expires {ttl:.0f} s after the last renewal if "
                       f"that run died)")
            if left <= 0:
                raise LeaseHeld(message + ". Wait for it to finish, or rerun later: finished files are skipped")
            if not announced:
                self.log(f"{message}; waiting up to {self.wait_s:.0f} s")
                announced = True
            time.sleep(min(self.poll_s, left))

    def _check_read_back(self, body: bytes) -> None:
        """Read a new lease back. On a store that honours If-None-Match nobody can replace a
        lease seconds old, so another body here means the store ignored the condition and
        cannot keep two runs apart (docs/architecture.md, "One writer per output")."""
        current = storage.read_with_age(self.uri)
        if current is None or current[0] != body:
            raise storage.StorageError(f"{self.uri} changed right after this run created it: the storage does not "
                                       f"honour conditional writes (If-None-Match), so resflow cannot guarantee one "
                                       f"writer per output there; run one restore per output at a time (the Prefect "
                                       f"flows' concurrency limit does)")

    def _probe_conditions(self, body: bytes, created: storage.FileInfo) -> None:
        """Ask the store to create the lease again, If-None-Match, and to replace it If-Match
        an ETag it never had: both must fail. A store that ignores either cannot keep two
        runs apart, and the run stops unless told to go on without a lease (--no-lease)."""
        ignored = []
        if storage.create_exclusive(self.uri, body) is not None:
            ignored.append("If-None-Match")
        if storage.replace_if_match(self.uri, body, "0" * 32) is not None:
            ignored.append("If-Match")
        if ignored:
            storage.delete(self.uri)  # ours: left behind, it would turn the next run away as "another run"
            raise UnguardedStorage(f"the storage under {self.output} ignores {' and '.join(ignored)} (a conditional "
                                       f"write that must fail succeeded): resflow cannot guarantee one writer per "
                                       f"output there. Run one restore per output at a time and pass --no-lease")

    def _held(self, info: storage.FileInfo) -> "OutputLease":
        self.info, self.last_renewed = info, time.monotonic()
        self._renewer = threading.Thread(target=self._renew, name="resflow-lease", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                with self._renewing:
                    renewed = storage.replace_if_match(self.uri, self._body(), self.info.etag)
            except Exception as error:  # storage down: keep trying until the lease would have expired
                if time.monotonic() - self.last_renewed > self.ttl_s:
                    self.log(f"lost the lease on {self.output}: could not renew it for {self.ttl_s:.0f} s ({error})")
                    self.lost.set()
                    return
                continue
            if renewed is None:
                self.log(f"lost the lease on {self.output}: another run took it over")
                self.lost.set()
                return
            self.info, self.last_renewed = renewed, time.monotonic()

    def confirm(self) -> None:
        """Prove the lease is still ours now, with the store's conditional write rather than
        the local clock: renew it If-Match its ETag. Raise LeaseLost when another run took
        it over (or it cannot be told): call it right before committing anything."""
        self.check()
        with self._renewing:
            try:
                renewed = storage.replace_if_match(self.uri, self._body(), self.info.etag)
            except Exception as error:
                raise LeaseLost(f"could not confirm this run's lease on {self.output} before committing ({error}); "
                                f"it stopped recording results. Rerun to finish: finished files are skipped") from error
            if renewed is None:
                self.lost.set()
                raise LeaseLost(f"this run lost its lease on {self.output}: another run took it over while this one "
                                f"was stopped; it recorded nothing more. Rerun to finish: finished files are skipped")
            self.info, self.last_renewed = renewed, time.monotonic()

    def check(self) -> None:
        """Raise LeaseLost when the lease is no longer ours, or may not be (unrenewed for most
        of its time-to-live, so another run could take it over): stop before recording more."""
        if self.lost.is_set() or time.monotonic() - self.last_renewed > 0.9 * self.ttl_s:
            raise LeaseLost(f"this run lost its lease on {self.output} (see the log); it stopped recording results. "
                            f"Rerun to finish: finished files are skipped")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.info is not None and not self.lost.is_set():
            try:
                storage.delete_if_match(self.uri, self.info.etag)
            except Exception as error:  # it expires by itself
                self.log(f"could not release the lease on {self.output} ({error}); it expires in {self.ttl_s:.0f} s")
        self.info = None

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lease_uri(output_uri: str) -> str:
    return storage.join(output_uri, storage.RESFLOW_DIR, LEASE_FILE)


def fence(output_uri: str, run: str) -> None:
    """For a writer in another process than the lease's holder (a replica committing a unit
    it restored): raise LeaseLost unless the output's lease, read from the store right now,
    still names run `run`. A replica of a run that was frozen past its lease finds the new
    holder there and commits nothing; the driver's own commits use `OutputLease.confirm`."""
    try:  # one GET per unit committed
        holder = json.loads(storage.read_bytes(lease_uri(output_uri)))["holder"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # no lease, or not one resflow wrote
        holder = {}
    if holder.get("run") != run:
        raise LeaseLost(f"the lease on {output_uri} is no longer held by run {run} "
                        f"({'now ' + describe(holder) if holder else 'no lease there'}): this replica of the old "
                        f"run commits nothing")


class NoLease:
    """What a run holds with --no-lease: nothing. For a store that ignores conditional
    writes, where the caller keeps one run per output by other means."""

    holder = {"run": None}  # no run to fence: replicas commit unchecked
    took_over = False

    def __init__(self, output_uri: str, log=print):
        log(f"warning: no lease on {output_uri}: nothing stops a second run from writing there at the same time")

    def check(self) -> None:
        pass

    def confirm(self) -> None:
        pass

    def __enter__(self) -> "NoLease":
        return self

    def __exit__(self, *exc) -> None:
        pass
