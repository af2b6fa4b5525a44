import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import s3server, storage


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
def test_write_atomically_publishes_nothing_on_failure(where, tmp_path, s3_prefix):
    root = str(tmp_path) if where == "local" else s3_prefix
    storage.ensure_bucket(root)
    target = storage.join(root, "out.parquet")

    class SimulatedCrash(BaseException):  # like a killed process: not an error to retry
        pass

    def half_then_crash(fs, path):
        with fs.open_output_stream(path) as stream:
            stream.write(b"PAR1 half a file")
            raise SimulatedCrash("worker died")

    with pytest.raises(SimulatedCrash, match="worker died"):
        storage.write_atomically(target, half_then_crash)
    assert not storage.exists(target)
    assert storage.list_files(root) == []

    storage.write_atomically(target, lambda fs, path: pq.write_table(pa.table({"x": [1]}), path, filesystem=fs))
    assert [f.uri for f in storage.list_files(root)] == [target]


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
