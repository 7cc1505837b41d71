"""The result store's settings and the folder store (worker/result_store.py); the S3 store
against a real S3-compatible server is tests/integration/test_result_store_s3.py."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.config import ConfigError, S3Location, Settings
from worker.result_store import FolderStore, S3Store, open_store
from worker.runtime import current

Configure = Callable[..., Settings]


@pytest.mark.parametrize(
    ("value", "bucket", "prefix"),
    [
        ("s3://results", "results", ""),
        ("s3://results/", "results", ""),
        ("S3://my.bucket-1/variflow/prod/", "my.bucket-1", "variflow/prod"),
    ],
)
def test_an_s3_url_names_the_bucket_and_prefix(
    configure: Configure, value: str, bucket: str, prefix: str
) -> None:
    settings = configure(result_store=value)
    assert settings.results_bucket == S3Location(bucket, prefix)
    assert settings.archive_results
    store = current().results
    assert isinstance(store, S3Store) and store.location == S3Location(bucket, prefix)
    job = uuid.UUID(int=7)
    expected = f"{prefix}/{job}/1.png" if prefix else f"{job}/1.png"
    assert store.key(job, "1.png") == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("s3://", "s3:// needs a bucket"),
        ("s3:///prefix", "s3:// needs a bucket"),
        ("s3://Bad_Bucket/x", "not an S3 bucket name"),
        ("s3://key:secret@bucket/x", "not an S3 bucket name"),
        ("s3://bucket/a/../b", "plain path"),
        ("s3://bucket/a?versionId=1", "plain path"),
        ("gs://bucket/x", "expected a folder, s3://bucket/prefix or off"),
    ],
)
def test_a_bad_result_store_stops_start_up_naming_the_variable(
    configure: Configure, value: str, says: str
) -> None:
    with pytest.raises(ConfigError) as error:
        configure(result_store=value)
    assert "VARIFLOW_RESULT_STORE: " in str(error.value)
    assert says in str(error.value)
    assert "secret" not in str(error.value)  # the value is never echoed


@pytest.mark.parametrize(
    ("variable", "value"),
    [("result_serve", "proxy"), ("result_url_ttl", "0"), ("result_public_endpoint", "s3:9000")],
)
def test_bad_serving_settings_stop_start_up_naming_the_variable(
    configure: Configure, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"VARIFLOW_{variable.upper()}: "):
        configure(**{variable: value})


def test_the_folder_store_stays_the_default_and_off_still_disables(
    configure: Configure, tmp_path: Path
) -> None:
    settings = configure()
    assert settings.result_serve == "redirect" and settings.result_url_ttl == 300
    assert open_store(settings) == FolderStore(settings.home.resolve() / "results")
    settings = configure(result_store=str(tmp_path / "store"))
    assert open_store(settings) == FolderStore((tmp_path / "store").resolve())
    assert settings.results_bucket is None
    assert not configure(result_store="off").archive_results


def test_the_folder_store_writes_whole_files_and_rewrites_them_in_place(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    job = uuid.uuid4()
    store.put(job, "1.png", b"first", "image/png")
    store.put(job, "1.png", b"second", "image/png")  # a task run twice
    folder = tmp_path / str(job)
    assert [p.name for p in folder.iterdir()] == ["1.png"]  # no temporary file left
    assert (folder / "1.png").read_bytes() == b"second"
