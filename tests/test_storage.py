import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from local import s3server
from pipeline import storage


def test_parse_uris(tmp_path):
    assert storage.parse("s3://bucket/a/b/").path == "bucket/a/b"
    assert storage.parse("s3://bucket").scheme == "s3"
    assert storage.parse(f"file://{tmp_path}").path == str(tmp_path)
    assert storage.parse("relative/dir").scheme == "file"
    assert storage.join("s3://b/p", "x.parquet") == "s3://b/p/x.parquet"
    with pytest.raises(storage.StorageError, match="bucket"):
        storage.parse("s3:///nobucket")
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.parse("gs://bucket/x")


def test_settings_never_show_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    settings = storage.S3Settings.from_env()
    assert settings.secret_key == "very-secret"
    assert "very-secret" not in repr(settings) and "AKIDEXAMPLE" not in repr(settings)


def test_resflow_variables_override_aws(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("RESFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:2")
    assert storage.S3Settings.from_env().endpoint_url == "http://127.0.0.1:2"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_same_calls_for_local_and_s3(where, tmp_path, s3_prefix):
    root = str(tmp_path) if where == "local" else s3_prefix
    storage.ensure_bucket(root)
    table = pa.table({"image_id": ["a", "b"], "image": [b"1", b"2"]})
    fs, path = storage.pyarrow_filesystem(storage.join(root, "part-0.parquet"))
    pq.write_table(table, path, filesystem=fs)
    storage.write_bytes(storage.join(root, "_resflow", "x.json"), b"{}")
    storage.write_bytes(storage.join(root, "sub", "part-1.parquet"), b"not really parquet")
    files = storage.list_files(root)
    assert [f.uri.rsplit("/", 2)[-2:] for f in files][0][-1] == "part-0.parquet"
    assert len(files) == 2  # _resflow/ is skipped, sub/ is not
    assert all(f.size > 0 and f.etag for f in files)
    fs2, path2 = storage.fsspec_filesystem(files[0].uri)
    assert pq.read_table(fs2.open(path2)).equals(table)
    assert storage.read_bytes(storage.join(root, "_resflow", "x.json")) == b"{}"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_output_equal_to_inside_or_around_the_input_is_refused(where, tmp_path, s3_prefix):
    root = str(tmp_path / "data") if where == "local" else s3_prefix + "/data"
    refused = [root, root + "/", root + "/./", root + "/sub/..", root + "/out", root + "/a/b/c",
               root.rsplit("/", 1)[0]]
    if where == "local":
        refused += [f"file://{root}", f"file://{root}/out/"]
        (tmp_path / "link").symlink_to(tmp_path / "data", target_is_directory=True)
        (tmp_path / "data").mkdir()
        refused.append(str(tmp_path / "link" / "out"))  # a symbolic link does not hide it
    for output in refused:
        with pytest.raises(storage.OverlapError, match="never writes where it reads"):
            storage.check_disjoint(root, output)
    for output in (root + "-restored", root.rsplit("/", 1)[0] + "/other/data"):
        storage.check_disjoint(root, output)  # a shared name prefix is not containment


def test_local_etag_changes_when_content_changes_with_same_size_and_mtime(tmp_path):
    import os

    path = tmp_path / "part-0.parquet"
    path.write_bytes(b"A" * 100)
    before = storage.file_info(str(path))
    stat = os.stat(path)
    with open(path, "r+b") as handle:  # rewritten in place: same inode, same size
        handle.write(b"B" * 100)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime put back
    after = storage.file_info(str(path))
    assert (after.size, os.stat(path).st_mtime_ns) == (before.size, stat.st_mtime_ns)
    assert after.etag != before.etag


@pytest.mark.parametrize("where", ["local", "s3"])
def test_conditional_writes_let_exactly_one_of_many_concurrent_writers_win(where, tmp_path, s3_prefix):
    """S3 If-None-Match / If-Match (SeaweedFS implements both) and the local flock path:
    the compare-and-swap that the output lease is built on."""
    import threading

    root = str(tmp_path) if where == "local" else s3_prefix
    for trial in range(3):
        uri = storage.join(root, f"lease-{trial}.json")
        barrier, winners = threading.Barrier(8), []

        def create(index: int) -> None:
            barrier.wait()
            if storage.create_exclusive(uri, f"writer {index}".encode()):
                winners.append(index)

        threads = [threading.Thread(target=create, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(winners) == 1
        assert storage.read_bytes(uri) == f"writer {winners[0]}".encode()
    current = storage.file_info(uri)
    assert storage.replace_if_match(uri, b"stale", "0" * 32) is None
    replaced = storage.replace_if_match(uri, b"next", current.etag)
    assert replaced and storage.read_bytes(uri) == b"next"
    assert not storage.delete_if_match(uri, current.etag)  # it changed since
    assert storage.delete_if_match(uri, replaced.etag) and not storage.exists(uri)


def test_server_start_is_idempotent_and_status_reports_it(s3_server):
    running = s3server.read_state(s3_server.data_dir)  # the outage drill in test_restore restarts it
    again = s3server.start(s3_server.data_dir)
    assert again.pid == running.pid
    state = s3server.status(s3_server.data_dir)
    assert state["running"] and state["endpoint_url"] == s3_server.endpoint_url
    assert s3_server.secret_key not in repr(s3_server)


def test_server_refuses_a_taken_port(tmp_path, s3_server):
    taken = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    with pytest.raises(s3server.S3ServerError, match="taken"):
        s3server.start(tmp_path / "other", port=taken)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("size", [12345, storage.PART_BYTES * 2 + 12345])  # one PUT; three parts
def test_a_streamed_write_appears_whole_or_not_at_all(where, size, tmp_path, s3_prefix):
    """Outputs stream to storage (S3 multipart in PART_BYTES parts, one PUT when smaller):
    a failure mid-way leaves no object, no temporary file and no multipart upload behind;
    what the writer says it stored is what a HEAD reads."""
    import os

    root = str(tmp_path / "out") if where == "local" else s3_prefix
    big = os.urandom(size)
    target = storage.join(root, "a/part.bin")

    class SimulatedCrash(Exception):
        pass

    with pytest.raises(SimulatedCrash):
        with storage.AtomicWriter(target) as sink:
            sink.write(big)
            raise SimulatedCrash()
    assert not storage.exists(target)
    if where == "s3":
        fs, path = storage.fsspec_filesystem(root)
        uploads = fs.call_s3("list_multipart_uploads", Bucket=path.split("/")[0]).get("Uploads") or []
        assert [upload for upload in uploads if upload["Key"].startswith(path.split("/", 1)[1])] == []
    else:
        assert [name for name in os.listdir(tmp_path / "out" / "a")] == []
    writer = storage.AtomicWriter(target)
    with writer as sink:
        for start in range(0, size, 3 * 2**20):  # in pieces, as a Parquet writer streams
            sink.write(big[start:start + 3 * 2**20])
    assert storage.read_bytes(target) == big and writer.stored.size == len(big)
    assert writer.stored == storage.file_info(target) and writer.stored.etag


def test_a_streamed_write_whose_abort_fails_is_never_completed_later(s3_prefix, monkeypatch):
    """The store fails the write and then the abort too (one outage): the s3fs file, once
    collected, must not complete the multipart upload it still holds."""
    import gc
    import os

    import s3fs

    target = storage.join(s3_prefix, "abort/part.bin")

    def abort_fails(self):
        raise ConnectionError("the store is down")

    monkeypatch.setattr(s3fs.core.S3File, "discard", abort_fails)
    with pytest.raises(OSError, match="mid-way"):
        with storage.AtomicWriter(target) as sink:
            sink.write(os.urandom(storage.PART_BYTES * 2 + 12345))  # two parts up, an upload open
            raise OSError("the write failed mid-way")
    del sink
    gc.collect()
    assert not storage.exists(target)
    monkeypatch.undo()
    fs, path = storage.fsspec_filesystem(s3_prefix)
    bucket, key = path.split("/", 1)
    for upload in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads") or []:
        if upload["Key"].startswith(key):  # left for the bucket's lifecycle rules; tidy up here
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def test_a_streamed_write_whose_completion_fails_leaves_no_upload_open(s3_prefix, monkeypatch):
    import os

    import s3fs

    target = storage.join(s3_prefix, "complete/part.bin")

    def completion_fails(self):
        raise ConnectionError("the store is down")

    monkeypatch.setattr(s3fs.core.S3File, "commit", completion_fails)
    with pytest.raises(ConnectionError):
        with storage.AtomicWriter(target) as sink:
            sink.write(os.urandom(storage.PART_BYTES * 2 + 12345))
    monkeypatch.undo()
    assert not storage.exists(target)
    fs, path = storage.fsspec_filesystem(s3_prefix)
    bucket, key = path.split("/", 1)
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads") or []
    assert [upload for upload in uploads if upload["Key"].startswith(key)] == []


def test_a_killed_local_writer_leaves_nothing_a_reader_lists_and_the_next_run_clears_it(tmp_path):
    output = tmp_path / "out"
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "whole.parquet")
    storage.write_bytes(str(output / "done.parquet"), (tmp_path / "whole.parquet").read_bytes())
    writer = storage.AtomicWriter(str(output / "half.parquet"))
    sink = writer.__enter__()  # a writer killed mid-file: its block never ends
    sink.write((tmp_path / "whole.parquet").read_bytes()[:20])
    sink.flush()
    assert len(list(output.iterdir())) == 2  # its temporary is there...
    assert pq.read_table(output).num_rows == 2  # ...and no reader of the folder takes it for data
    assert [info.uri.rsplit("/", 1)[1] for info in storage.list_files(str(output))] == ["done.parquet"]
    lease_renewal = output / "_resflow" / ".lease.json.0123.tmp"
    lease_renewal.parent.mkdir()
    lease_renewal.write_bytes(b"{}")
    cleared = storage.clear_temporaries(str(output), keep=(".lease.json.",))
    assert [name.rsplit("/", 1)[1].split(".")[1] for name in cleared] == ["half"]
    assert sorted(path.name for path in output.rglob("*") if path.is_file()) == [".lease.json.0123.tmp", "done.parquet"]
