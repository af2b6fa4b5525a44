"""One storage abstraction: a URI (local path, file://, s3://bucket/prefix) becomes a
filesystem that pyarrow, fsspec/s3fs and Ray Data all accept.

Endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), so the same code talks to AWS,
MinIO, Ceph or the local SeaweedFS server. RESFLOW_S3_* variables override them for
resflow alone, for when the shell's AWS profile must stay untouched.

Retries have one budget per layer (docs/architecture.md, "Retries"): the S3 clients retry
a single request a few times (throttling, 5xx); `retry` here retries a whole operation
with jittered backoff for up to about a minute and a half (a storage restart); Ray and
Prefect retry whole files and steps above that.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import functools
import io
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
import tenacity

# Files under this folder of a dataset belong to resflow (manifests, leases, staged
# parts); pyarrow and Ray Data skip "_"-prefixed paths when they discover files.
RESFLOW_DIR = "_resflow"


class StorageError(RuntimeError):
    """A storage location that cannot be used, with what to do about it."""


class OverlapError(ValueError):
    """An output location that would write into the input (or contain it)."""


class StorageUnreachable(ValueError):
    """Storage that cannot be used as configured: no endpoint answers, or no credentials."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None  # None: AWS itself; set for MinIO, Ceph, SeaweedFS
    access_key: str | None = None  # None: the default AWS credential chain
    secret_key: str | None = None
    region: str = "us-east-1"  # SeaweedFS and MinIO accept any region
    request_timeout_s: float = 60.0  # one request; a hung server is retried, not waited on forever

    @classmethod
    def from_env(cls) -> "S3Settings":
        def pick(*names: str) -> str | None:
            for name in names:
                value = os.environ.get(name)
                if value:
                    return value
            return None

        return cls(
            endpoint_url=pick("RESFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            access_key=pick("RESFLOW_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            secret_key=pick("RESFLOW_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
            region=pick("RESFLOW_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
            request_timeout_s=float(pick("RESFLOW_S3_REQUEST_TIMEOUT_S") or 60.0),
        )

    def __repr__(self) -> str:  # credentials never end up in logs or artifacts
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r})"


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` is "s3" or "file"; `path` is what the filesystem takes
    (bucket/key for S3, an absolute path locally), with `.`, `..` and repeated or
    trailing slashes resolved."""

    scheme: str
    path: str

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    def join(self, *parts: str) -> "Location":
        return Location(self.scheme, posixpath.join(self.path, *parts))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))


def parse(uri: str | os.PathLike) -> Location:
    uri = os.fspath(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
        key = posixpath.normpath("/" + parsed.path).lstrip("/")  # ".." cannot climb out of the bucket
        return Location("s3", f"{parsed.netloc}/{key}" if key else parsed.netloc)
    if parsed.scheme == "file":
        return Location("file", os.path.abspath(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise StorageError(f"{uri!r}: unsupported scheme {parsed.scheme!r}; use a local path, file:// or s3://")
    return Location("file", os.path.abspath(os.path.expanduser(uri)))


def join(uri: str, *parts: str) -> str:
    return parse(uri).join(*parts).uri


def _resolved(location: Location) -> Location:
    """Local paths with symbolic links resolved: a link must not hide that two places are one."""
    return Location("file", os.path.realpath(location.path)) if location.scheme == "file" else location


def contains(outer: str, inner: str) -> bool:
    """True when `inner` is `outer` or lies inside it (after normalising both)."""
    a, b = _resolved(parse(outer)), _resolved(parse(inner))
    return a.scheme == b.scheme and (b.path == a.path or b.path.startswith(a.path.rstrip("/") + "/"))


def check_disjoint(input_uri: str, output_uri: str) -> None:
    """Refuse an output that equals, contains or lies inside the input: the job would
    overwrite or re-read its own originals."""
    if contains(input_uri, output_uri) or contains(output_uri, input_uri):
        relation = ("is the input" if contains(input_uri, output_uri) and contains(output_uri, input_uri) else
                    "lies inside the input" if contains(input_uri, output_uri) else "contains the input")
        raise OverlapError(f"the output {output_uri} {relation} {input_uri}: resflow never writes where it reads. "
                           f"Choose an output prefix outside the input, e.g. a sibling folder")


def relative_path(root_uri: str, file_uri: str) -> str:
    """`file_uri`'s path below `root_uri` ("a/b/part-0.parquet"); a root that is the file
    itself gives its name. The key of outputs and manifest entries."""
    root, path = parse(root_uri).path, parse(file_uri).path
    if path == root:
        return posixpath.basename(path)
    relative = posixpath.relpath(path, root)
    if relative.startswith(".."):
        raise StorageError(f"{file_uri} is not under {root_uri}")
    return relative


def pyarrow_filesystem(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for `uri` (also what Ray Data takes)."""
    location = parse(uri)
    if location.scheme == "file":
        return pafs.LocalFileSystem(), location.path
    settings = settings or S3Settings.from_env()
    kwargs: dict = {"region": settings.region}
    if settings.endpoint_url:
        endpoint = urlparse(settings.endpoint_url)
        kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
        kwargs["scheme"] = endpoint.scheme or "https"
    if settings.access_key and settings.secret_key:
        kwargs["access_key"] = settings.access_key
        kwargs["secret_key"] = settings.secret_key
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=CLIENT_ATTEMPTS)
    kwargs["connect_timeout"] = min(10.0, settings.request_timeout_s)
    kwargs["request_timeout"] = settings.request_timeout_s
    return pafs.S3FileSystem(**kwargs), location.path


def fsspec_filesystem(uri: str, settings: S3Settings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path for `uri`: listing, ETags, small reads and writes."""
    location = parse(uri)
    if location.scheme == "file":
        return fsspec.filesystem("file"), location.path
    return _s3fs(settings or S3Settings.from_env()), location.path


# Attempts per HTTP request inside the S3 clients (botocore's standard mode, pyarrow's
# retry strategy): throttling and 5xx answers. Whole operations are retried by `retry`.
CLIENT_ATTEMPTS = 3


@functools.lru_cache(maxsize=8)
def _s3fs(settings: S3Settings) -> fsspec.AbstractFileSystem:
    """One S3 client per set of settings: building one costs a session and a connection
    pool (bench/README.md, "S3 clients"). The listing cache is off, so a listing right
    after a write sees the new object."""
    kwargs: dict = {
        "client_kwargs": {"region_name": settings.region},
        "config_kwargs": {"retries": {"max_attempts": CLIENT_ATTEMPTS, "mode": "standard"},
                          "connect_timeout": min(10.0, settings.request_timeout_s),
                          "read_timeout": settings.request_timeout_s},
    }
    if settings.endpoint_url:
        kwargs["client_kwargs"]["endpoint_url"] = settings.endpoint_url
    if settings.access_key and settings.secret_key:
        kwargs["key"] = settings.access_key
        kwargs["secret"] = settings.secret_key
    filesystem = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **kwargs)
    filesystem.retries = 1  # s3fs's own retry loop (5 by default) would multiply the attempts above
    return filesystem


# --- small operations every stage needs -------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int
    etag: str  # S3 ETag; locally inode, ctime, mtime and size: what changes whenever content does


# Errors that say the request itself is wrong: raised at once, never retried.
DETERMINISTIC_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
                        ValueError, TypeError, KeyError, StorageError)
# A path no retry can open: too long for the OS, a symbolic link loop, a bad argument.
DETERMINISTIC_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL}


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, DETERMINISTIC_ERRORS):
        return False
    return not (isinstance(error, OSError) and error.errno in DETERMINISTIC_ERRNOS)
# One storage operation: jittered exponential backoff from 0.5 s, capped at 16 s per wait,
# for at most 90 s in all: long enough to ride out a storage server restart.
OPERATION_BUDGET_S = 90.0


def retry(operation: Callable, *, what: str = "storage call", budget_s: float | None = None):
    """Run `operation`, retrying transient errors (connection refused, timeouts, 5xx) within
    the operation budget; then raise StorageError naming `what`, with the last error as cause."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_is_transient),
        wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=16.0),
        stop=tenacity.stop_after_delay(OPERATION_BUDGET_S if budget_s is None else budget_s),
        reraise=False,
    )
    try:
        return retrying(operation)
    except tenacity.RetryError as failed:
        error = failed.last_attempt.exception()
        attempts = failed.last_attempt.attempt_number
        raise StorageError(f"{what} failed after {attempts} attempts: {error}") from error


def list_files(uri: str, suffixes: tuple[str, ...] = (".parquet",)) -> list[FileInfo]:
    """Files under `uri` (recursively) ending in one of `suffixes`, sorted by path,
    skipping resflow's own `_resflow/` folder and hidden or `_`-prefixed names."""
    location = parse(uri)
    fs, path = fsspec_filesystem(uri)

    def find() -> dict:
        if location.scheme == "s3":
            fs.invalidate_cache()
        if fs.isfile(path):
            return {path: fs.info(path)}
        return fs.find(path, detail=True)

    found = retry(find, what=f"listing {uri}")
    files = []
    for name, info in sorted(found.items()):
        relative = posixpath.relpath(name, path) if name != path else posixpath.basename(name)
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        if suffixes and not name.lower().endswith(suffixes):
            continue
        files.append(_file_info(location, name, info))
    return files


def _local_etag(path: str) -> str:
    # ctime moves on every write and cannot be set back (unlike mtime), so a rewrite that
    # keeps size and mtime is still seen; a replaced file also has a new inode.
    status = os.stat(path)
    return f"{status.st_ino}-{status.st_ctime_ns}-{status.st_mtime_ns}-{status.st_size}"


def _file_info(location: Location, name: str, info: dict) -> FileInfo:
    uri = f"s3://{name}" if location.scheme == "s3" else name
    if location.scheme == "s3":
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    else:
        etag = _local_etag(name)
    return FileInfo(uri=uri, size=int(info["size"]), etag=etag)


def file_info(uri: str) -> FileInfo:
    fs, path = fsspec_filesystem(uri)
    return _file_info(parse(uri), path, retry(lambda: fs.info(path), what=f"stat {uri}"))


def exists(uri: str) -> bool:
    fs, path = fsspec_filesystem(uri)
    return bool(retry(lambda: fs.exists(path), what=f"checking {uri}"))


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object; with `max_bytes`, refuse (ValueError) anything larger, reading
    at most `max_bytes + 1` bytes of it."""
    fs, path = fsspec_filesystem(uri)
    if max_bytes is None:
        return retry(lambda: fs.cat_file(path), what=f"reading {uri}")
    data = retry(lambda: fs.cat_file(path, start=0, end=max_bytes + 1), what=f"reading {uri}")
    if len(data) > max_bytes:
        raise ValueError(f"{uri} is larger than {max_bytes} bytes")
    return data


def write_bytes(uri: str, data: bytes) -> FileInfo:
    """Write a whole object; returns what was stored. On S3 a PUT is atomic; locally
    write-then-rename, so a reader never sees half a file."""
    location = parse(uri)
    fs, path = fsspec_filesystem(uri)
    if location.scheme == "s3":
        response = retry(lambda: fs.pipe_file(path, data), what=f"writing {uri}")
        etag = (response or {}).get("ETag") if isinstance(response, dict) else None
        return FileInfo(uri, len(data), etag.strip('"')) if etag else file_info(uri)
    with _local_temporary(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    return file_info(uri)


def local_temporary_name(path: str) -> str:
    """A temporary name beside `path` (same filesystem, so the rename is atomic), hidden:
    readers that list a folder (pyarrow's datasets, list_files) skip names starting with a
    dot, so a killed writer's leftover is never taken for data."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}")


TEMPORARY_SUFFIX = ".tmp"


def clear_temporaries(uri: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete the temporaries killed local writers left under `uri` (none on S3, where an
    unfinished upload is never visible); names in `keep` stay. The caller is the only
    writer there (it holds the lease). Returns what it deleted."""
    location = parse(uri)
    if location.scheme == "s3" or not os.path.isdir(location.path):
        return []
    cleared = []
    for folder, _, names in os.walk(location.path):
        for name in names:
            if name.startswith(".") and name.endswith(TEMPORARY_SUFFIX) and not name.startswith(keep):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    cleared.append(os.path.join(folder, name))
    return cleared


@contextlib.contextmanager
def _local_temporary(path: str) -> Iterator[str]:
    """A hidden temporary beside `path` (`local_temporary_name`), removed if the block fails."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = local_temporary_name(path)
    try:
        yield temporary
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


# Streamed writes go up in parts of this size (S3's minimum is 5 MiB): what a writer holds.
PART_BYTES = 8 * 2**20


class _SmallFirst(io.RawIOBase):
    """What an S3 AtomicWriter hands out: bytes held in memory until they pass PART_BYTES,
    then an s3fs file that streams them as a multipart upload. An object that stays small
    is one PUT whose answer carries its ETag, with no HEAD after it."""

    def __init__(self, fs, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path, uri
        self.held: io.BytesIO | None = io.BytesIO()
        self.stream = None
        self.written = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.written

    def write(self, data) -> int:
        self.written += len(data)
        if self.stream is not None:
            return self.stream.write(data)
        self.held.write(data)
        if self.held.tell() >= PART_BYTES:  # large: stream from here on
            self.stream = retry(lambda: self.fs.open(self.path, "wb", block_size=PART_BYTES), what=f"opening {self.uri}")
            self.stream.write(self.held.getbuffer())
            self.held = None
        return len(data)

    def commit(self) -> FileInfo:
        if self.stream is not None:
            try:
                self.stream.close()  # the last part and the multipart completion
            except BaseException:
                with contextlib.suppress(Exception):
                    self.discard()
                raise
            return file_info(self.uri)
        return write_bytes(self.uri, self.held.getvalue())

    def discard(self) -> None:
        """Abort the multipart upload, if one started. Whether or not the abort gets through,
        the s3fs file is marked closed: collected, it would otherwise complete the upload."""
        if self.stream is not None:
            try:
                self.stream.discard()
            finally:
                self.stream.closed = True
        self.held = None


class AtomicWriter:
    """A binary file to stream a whole object into; readers see it only once the block
    ends without an error, and never part of it. On S3 an object smaller than PART_BYTES
    is stored with one PUT at the end; a larger one goes up as a multipart upload in
    PART_BYTES parts, completed at the end and aborted on failure (no parts linger).
    Locally a temporary file renamed into place. Afterwards `stored` is its FileInfo.

        writer = AtomicWriter(uri)
        with writer as sink:
            sink.write(...)
        writer.stored.etag
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.stored: FileInfo | None = None
        self._temporary = None

    def __enter__(self):
        location = parse(self.uri)
        fs, path = fsspec_filesystem(self.uri)
        if location.scheme == "s3":
            self._handle = _SmallFirst(fs, path, self.uri)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._temporary = local_temporary_name(path)
            self._handle = open(self._temporary, "wb")  # noqa: SIM115 - closed in __exit__
        return self._handle

    def __exit__(self, kind, error, traceback) -> None:
        if self._temporary is None:  # S3
            if kind is None:
                self.stored = self._handle.commit()
            else:
                with contextlib.suppress(Exception):  # the upload expires with the bucket's lifecycle rules
                    self._handle.discard()
            return
        self._handle.close()
        if kind is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temporary)
            return
        with open(self._temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._temporary, parse(self.uri).path)
        self.stored = file_info(self.uri)


def delete(uri: str) -> None:
    fs, path = fsspec_filesystem(uri)
    if retry(lambda: fs.exists(path), what=f"checking {uri}"):
        retry(lambda: fs.rm(path, recursive=True), what=f"deleting {uri}")


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI when it is missing (a no-op for local paths)."""
    location = parse(uri)
    if location.scheme != "s3":
        os.makedirs(location.path, exist_ok=True)
        return
    fs, _ = fsspec_filesystem(uri)
    bucket = location.path.split("/", 1)[0]
    if not retry(lambda: fs.exists(bucket), what=f"checking bucket {bucket}"):
        try:
            fs.mkdir(bucket)
        except FileExistsError:
            pass


# --- conditional writes: compare-and-swap on one object ---------------------------------------
#
# On S3, `If-None-Match: *` (create only if absent) and `If-Match: <etag>` (replace or
# delete only if unchanged) on PutObject/DeleteObject: AWS S3, MinIO, R2 and SeaweedFS
# (checked with concurrent PUTs: tests/test_storage.py). Locally the same operations run
# under an exclusive flock on a sidecar file, which serialises them on one machine.


def _precondition_failed(error: BaseException) -> bool:
    cause = getattr(error, "__cause__", None) or error
    response = getattr(cause, "response", None) or {}
    return (response.get("Error", {}).get("Code") == "PreconditionFailed"
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412)


def _conditional_s3(uri: str, method: str, **kwargs) -> dict | None:
    """Call `method` on the object; None when its precondition failed."""
    fs, path = fsspec_filesystem(uri)
    bucket, _, key = path.partition("/")

    def call():
        try:
            return fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except Exception as error:
            if _precondition_failed(error):
                return None
            raise

    return retry(call, what=f"{method} {uri}")


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_exclusive(uri: str, data: bytes) -> FileInfo | None:
    """Store `data` only if nothing is at `uri` yet; None when something is."""
    location = parse(uri)
    if location.scheme == "s3":
        response = _conditional_s3(uri, "put_object", Body=data, IfNoneMatch="*")
        return None if response is None else FileInfo(uri, len(data), response["ETag"].strip('"'))
    with _local_lock(location.path):
        if os.path.exists(location.path):
            return None
        return write_bytes(uri, data)


def replace_if_match(uri: str, data: bytes, etag: str) -> FileInfo | None:
    """Replace the object only if it still has `etag`; None when it changed or vanished."""
    location = parse(uri)
    if location.scheme == "s3":
        response = _conditional_s3(uri, "put_object", Body=data, IfMatch=f'"{etag}"')
        return None if response is None else FileInfo(uri, len(data), response["ETag"].strip('"'))
    with _local_lock(location.path):
        try:
            if _local_etag(location.path) != etag:
                return None
        except FileNotFoundError:
            return None
        return write_bytes(uri, data)


def delete_if_match(uri: str, etag: str) -> bool:
    """Delete the object only if it still has `etag`."""
    location = parse(uri)
    if location.scheme == "s3":
        return _conditional_s3(uri, "delete_object", IfMatch=f'"{etag}"') is not None
    with _local_lock(location.path):
        try:
            if _local_etag(location.path) != etag:
                return False
            os.unlink(location.path)
            return True
        except FileNotFoundError:
            return False


def read_with_age(uri: str) -> tuple[bytes, FileInfo, float] | None:
    """An object's bytes, identity, and seconds since it was last written, measured on the
    storage's own clock (S3: the response's Date against LastModified), so hosts with
    skewed clocks agree on the age; None when it does not exist."""
    location = parse(uri)
    if location.scheme == "s3":
        fs, path = fsspec_filesystem(uri)
        bucket, _, key = path.partition("/")

        def get():
            try:  # the identity first: if the body changes in between, a swap against this ETag fails safely
                head = fs.call_s3("head_object", Bucket=bucket, Key=key)
                return head, fs.cat_file(path)
            except FileNotFoundError:
                return None

        got = retry(get, what=f"reading {uri}")
        if got is None:
            return None
        head, body = got
        server_now = _http_date(head["ResponseMetadata"]["HTTPHeaders"].get("date"))
        age = (server_now - head["LastModified"]).total_seconds() if server_now else 0.0
        return body, FileInfo(uri, len(body), head["ETag"].strip('"')), age
    try:
        with open(location.path, "rb") as handle:
            body = handle.read()
        status = os.stat(location.path)
    except FileNotFoundError:
        return None
    age = dt.datetime.now().timestamp() - status.st_mtime
    return body, FileInfo(uri, len(body), _local_etag(location.path)), age


def _http_date(value: str | None) -> dt.datetime | None:
    from email.utils import parsedate_to_datetime

    return parsedate_to_datetime(value) if value else None


def check_reachable(uri: str) -> None:
    """One quick request, no retries: raise StorageUnreachable when the endpoint does not
    answer or the credentials are missing or refused. For a person at a terminal, who
    should not wait through the retry budget to learn that AWS_ENDPOINT_URL is wrong."""
    location = parse(uri)
    if location.scheme != "s3":
        return
    settings = S3Settings.from_env()
    where = settings.endpoint_url or "AWS S3"
    bucket = location.path.split("/", 1)[0]
    quick = fsspec.filesystem(
        "s3", skip_instance_cache=True, use_listings_cache=False,
        client_kwargs={"region_name": settings.region, **({"endpoint_url": settings.endpoint_url}
                                                            if settings.endpoint_url else {})},
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 10},
        **({"key": settings.access_key, "secret": settings.secret_key} if settings.access_key else {}))
    quick.retries = 1
    try:
        quick.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return  # reachable; a missing bucket is created where resflow writes
    except PermissionError as error:
        raise StorageUnreachable(f"{where} refused the credentials for s3://{bucket} ({error}); check "
                                 f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
    except Exception as error:
        cause = error.__cause__ or error
        if type(cause).__name__ == "NoCredentialsError":
            raise StorageUnreachable(f"no credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and "
                                     f"AWS_SECRET_ACCESS_KEY (for the local server: eval \"$(resflow storage env)\")") from None
        raise StorageUnreachable(f"cannot reach {where} for s3://{bucket}: {type(cause).__name__}: {cause}; "
                                 f"check AWS_ENDPOINT_URL (for the local server: `resflow storage up`)") from None


def iter_chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
