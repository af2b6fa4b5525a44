"""Connecting to Ray: an existing cluster through RAY_ADDRESS, else a local Ray in-process.

On a 2-core machine Ray's default of one logical CPU per core lets 1-CPU actors and
train workers starve the tasks that list, read and write files: the job hangs with no
error. Local Ray therefore advertises at least 4 logical CPUs, and resflow's actors and
train workers ask for fractions; torch threads are set explicitly so that the
oversubscription stays logical, not physical.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid

LOCAL_MIN_LOGICAL_CPUS = 4
# Environment for Ray's processes (local Ray inherits it from this process; cluster images
# set it too). Arrow's default jemalloc pool keeps what read and repartition tasks freed:
# the three task workers of a 10x benchmark restore held ~200 MB more than with the system
# allocator, which returns it (no throughput change measured).
WORKER_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


# Whether a local Ray started by `connect` runs its dashboard when the caller does not say:
# training needs it; a `resflow restore` process, which may start Ray only once its plan
# turns out large, turns it off for itself (pipeline/cli.py).
LOCAL_DASHBOARD = True


def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool | None = None) -> dict:
    """Attach to RAY_ADDRESS (or `address`), or start local Ray; returns cluster resources.
    `dashboard=False` starts local Ray without its dashboard (a cluster keeps its own);
    None: LOCAL_DASHBOARD."""
    dashboard = LOCAL_DASHBOARD if dashboard is None else dashboard
    import ray  # here, so that the cluster launcher can read WORKER_ENV without importing Ray

    if ray.is_initialized():
        return _tune_parquet_reads(ray.cluster_resources())
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": True, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **quiet)
    else:
        for key, value in WORKER_ENV.items():
            os.environ.setdefault(key, value)  # the user's value wins
        logical = num_cpus or max(LOCAL_MIN_LOGICAL_CPUS, os.cpu_count() or 1)
        # The dashboard binds to 127.0.0.1. Training needs it (Ray Train's cleanup polls its
        # state API and logs an error every second without it); `resflow restore` does not:
        # without it Ray keeps 1 of the dashboard's 11 processes (75 MB instead of 286 MB,
        # 0.9 instead of ~4 core-s over a 10x benchmark run on 2 cores).
        with _reaped_when_this_process_dies():
            ray.init(num_cpus=logical, include_dashboard=dashboard, dashboard_host="127.0.0.1", **quiet)
    return _tune_parquet_reads(ray.cluster_resources())


# Marks every process of a local Ray in its environment (the value: this process's token).
LOCAL_RAY_MARK = "RESFLOW_LOCAL_RAY"


@contextlib.contextmanager
def _reaped_when_this_process_dies():
    """Local Ray's processes die with this one, however it dies (SIGKILL included).

    Ray's own fate-sharing does not cover it: the raylet and GCS get PR_SET_PDEATHSIG from
    this process, but the workers the raylet starts only poll for the raylet's death, and a
    replica (`ray::MapWorker(MapBatches(UnitRestorer))`) of a `resflow restore` killed with
    SIGKILL was still alive two hours later, orphaned to init. So every process started
    while Ray starts carries a mark in its environment (workers inherit the raylet's, and
    renaming a process's cmdline leaves it alone), and a watchdog in a session of its own
    (a SIGKILL to this process group spares it) holds the read end of a pipe whose write
    end only this process holds: when this process dies the kernel closes it, the watchdog
    reads EOF and SIGKILLs every process with the mark. Linux only (/proc); elsewhere Ray's
    own fate-sharing is all there is."""
    if not os.path.isdir("/proc/self"):
        yield
        return
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, LOCAL_RAY_MARK, token], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    _watchdogs.append(watchdog)  # its pipe stays open for this process's lifetime
    previous = os.environ.get(LOCAL_RAY_MARK)
    os.environ[LOCAL_RAY_MARK] = token
    try:
        yield
    finally:  # processes this one starts later are not Ray's: they go unmarked
        if previous is None:
            os.environ.pop(LOCAL_RAY_MARK, None)
        else:
            os.environ[LOCAL_RAY_MARK] = previous


_watchdogs: list = []
# Blocks until its stdin closes, then kills the marked processes, thrice over 2 s for any
# started meanwhile. Standard library only, so that it starts in milliseconds.
_WATCHDOG = r"""
import os, signal, sys, time
sys.stdin.buffer.read()
mark = b"\0" + ("%s=%s" % (sys.argv[1], sys.argv[2])).encode() + b"\0"
for _ in range(3):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/environ" % pid, "rb") as environ:
                marked = mark in b"\0" + environ.read()
            if marked and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    time.sleep(1)
"""


def physical_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpus_per_gpu() -> int:
    """Logical CPUs per GPU on the live GPU node that has the fewest; 0 while none is up."""
    import ray

    shares = [node["Resources"].get("CPU", 0) / node["Resources"]["GPU"] for node in ray.nodes()
              if node.get("Alive") and node["Resources"].get("GPU")]
    return int(min(shares)) if shares else 0


def footer_readers(resources: dict) -> int:
    """Ray Data's footer-reading actors per Parquet read: one per 16 CPUs (its default is 32)."""
    return max(1, min(32, int(resources.get("CPU", 1)) // 16))


def _tune_parquet_reads(resources: dict) -> dict:
    """Ray Data (2.60) defaults that suit big analytic scans, not image restoration:

    * footers are read by a pool of 32 actors per read: 32 processes that each import Ray
      Data. On 2 cores that storm delayed the first model call of an 85-file restore from
      ~7 s to 12-14 s after the start. One reader per 16 CPUs keeps listing fast on a
      cluster (each reader runs 128 concurrent reads).
    * files are packed into read units of up to 128 MiB: a larger dataset is then read by
      more and larger units at once, each read worker holding ~500 MB. Restoring a row costs
      far more than reading it, so 8 MiB units lose nothing and keep the read side small
      (peak memory 10x/1x 1.35 -> 1.20 here, together with reads tied to the replicas).

    Ray Data reads both variables when a read is planned, in this process; values the user
    set win."""
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(footer_readers(resources)))
    os.environ.setdefault("RAY_DATA_PARQUET_BIN_PACKING_BYTES", str(8 * 2**20))
    return resources
