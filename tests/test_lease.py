"""One writer per output: the lease object, against SeaweedFS and a local folder."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import storage
from pipeline.lease import LeaseHeld, LeaseLost, OutputLease
from tests.conftest import REPO


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path, s3_prefix) -> str:
    return str(tmp_path / "out") if request.param == "local" else s3_prefix + "/out"


def test_a_second_run_stops_with_the_holder_named(output):
    with OutputLease(output, ttl_s=30) as first:
        with pytest.raises(LeaseHeld) as refused:
            OutputLease(output, ttl_s=30, wait_s=0).acquire()
        message = str(refused.value)
        holder = first.holder
        assert f"host {holder['host']}" in message and f"pid {os.getpid()}" in message
        assert holder["started"] in message
    with OutputLease(output, ttl_s=30):  # released: the next run takes it at once
        pass
    assert not storage.exists(storage.join(output, "_resflow", "lease.json"))


def test_a_second_run_waits_for_the_first_to_finish(output):
    order = []
    first = OutputLease(output, ttl_s=30).acquire()

    def finish_later():
        time.sleep(2)
        order.append("first released")
        first.release()

    releaser = threading.Thread(target=finish_later)
    releaser.start()
    with OutputLease(output, ttl_s=30, wait_s=60, poll_s=0.2, log=lambda message: order.append("waiting")):
        order.append("second holds it")
    releaser.join()
    assert order == ["waiting", "first released", "second holds it"]


def test_the_holder_renews_and_a_killed_holders_lease_expires(output):
    # a holder that lives past its time-to-live keeps the lease by renewing it
    with OutputLease(output, ttl_s=2) as holder:
        time.sleep(3)
        holder.check()
        assert not holder.took_over
        with pytest.raises(LeaseHeld):
            OutputLease(output, ttl_s=2).acquire()
    # a holder that is killed stops renewing: its lease is taken over once expired
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from pipeline.lease import OutputLease; "
              f"OutputLease({output!r}, ttl_s=3).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout.readline().strip() == "held"
        record = json.loads(storage.read_bytes(storage.join(output, "_resflow", "lease.json")))
        assert record["holder"]["pid"] == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        logged = []
        started = time.monotonic()
        with OutputLease(output, ttl_s=3, wait_s=60, poll_s=0.5, log=logged.append) as taken:
            waited = time.monotonic() - started
        assert any(f"pid {holder.pid}" in line and "took over" in line for line in logged)
        assert taken.took_over  # the run after a crash: no head start (restore/executors.py)
        assert waited < 30
    finally:
        holder.kill()


def test_a_lease_taken_over_is_lost_and_checked(output):
    lease = OutputLease(output, ttl_s=1.2).acquire()
    lease._stop.set()  # as if this process hung: no more renewals
    lease._renewer.join()
    time.sleep(2.5)  # past the time-to-live by more than S3's one-second clock resolution
    with OutputLease(output, ttl_s=30):  # another run takes the expired lease over
        with pytest.raises(LeaseLost, match="lost its lease"):
            lease.check()
    lease.release()


def test_a_run_frozen_past_its_lease_commits_nothing_after_another_run_took_over(output):
    """As a run stopped with SIGSTOP longer than the time-to-live and then resumed: its own
    clock has not caught up yet, but its first commit asks the store, which says no."""
    from pipeline.jobs import Events, RestoreJob
    from pipeline.manifest import Manifest
    from pipeline.restore.driver import Run

    lease = OutputLease(output, ttl_s=1.2).acquire()
    lease._stop.set()  # frozen: no more renewals
    lease._renewer.join()
    time.sleep(2.5)  # past the time-to-live by more than S3's one-second clock resolution
    with OutputLease(output, ttl_s=30):  # another run takes the expired lease over
        lease.last_renewed = time.monotonic()  # resumed: the local clock alone would let it go on
        lease.check()
        run = Run(RestoreJob(input="unused", output=output, model="unused"), lease, Events())
        run.unrecorded["manifest"]["a.parquet"] = {"written by": "the frozen run"}
        with pytest.raises(LeaseLost, match="another run took it over"):
            run._store_records(now=True)
        assert Manifest(output).all() == {}  # nothing committed
    lease.release()


def test_a_store_that_ignores_conditional_writes_is_refused_unless_told_no_lease(tmp_path, monkeypatch):
    from pipeline.cli import build_parser, restore_job_from
    from pipeline.jobs import failure_kind

    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "create_exclusive", lambda uri, data: real_write(uri, data))  # If-None-Match ignored
    with pytest.raises(storage.StorageError, match="ignores If-None-Match"):
        OutputLease(str(tmp_path / "a")).acquire()
    monkeypatch.undo()
    monkeypatch.setattr(storage, "replace_if_match", lambda uri, data, etag: real_write(uri, data))  # If-Match ignored
    with pytest.raises(storage.StorageError, match="ignores If-Match.*--no-lease") as refused:
        OutputLease(str(tmp_path / "b")).acquire()
    monkeypatch.undo()
    assert failure_kind(refused.value) == "rejected"  # exit 2: change the setup, retrying will not help
    assert not storage.exists(OutputLease(str(tmp_path / "b")).uri)  # no lease left to turn the next run away
    with OutputLease(str(tmp_path / "c")) as honoured:  # the local store honours both
        honoured.confirm()
    arguments = ["restore", "--input", "a", "--output", "b", "--model", "m"]
    assert restore_job_from(build_parser().parse_args(arguments)).lease is True
    assert restore_job_from(build_parser().parse_args(arguments + ["--no-lease"])).lease is False


def test_a_replica_of_a_run_that_lost_its_lease_commits_no_unit(output, trained_model, tmp_path):
    """A replica checks the lease in the store right before its unit's output commits: a
    replica of the frozen run writes nothing; the new holder's replica commits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import RestoreSettings
    from pipeline.restore.planning import Unit
    from pipeline.restore.replica import UnitRestorer
    from tests.conftest import shared_data

    source = tmp_path / "in" / "a.parquet"
    source.parent.mkdir()
    pq.write_table(pa.table({"image_id": ["01", "02"],
                             "image": [(shared_data("Set12") / f"0{n}.png").read_bytes() for n in (1, 2)]}), source)
    unit = Unit("a.parquet", str(source), 0, 0, 2, 0, 1, storage.join(output, "a.parquet"))
    frozen = OutputLease(output, ttl_s=1.2).acquire()
    frozen._stop.set()
    frozen._renewer.join()
    time.sleep(2.5)
    with OutputLease(output, ttl_s=30) as holder:
        stale = UnitRestorer(trained_model, RestoreSettings(), fenced_by=(output, frozen.holder["run"]))
        with pytest.raises(LeaseLost, match="commits nothing"):
            stale.restore_unit(unit)
        assert not storage.exists(unit.target) and storage.clear_temporaries(output, keep=(".lease.json.",)) == []
        current = UnitRestorer(trained_model, RestoreSettings(), fenced_by=(output, holder.holder["run"]))
        assert current.restore_unit(unit).ok == 2 and storage.exists(unit.target)
    frozen.release()
