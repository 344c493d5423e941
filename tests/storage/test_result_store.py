"""The result stores: a local directory, and S3 through boto3 against a real S3-speaking server on
loopback (moto's standalone server stands in for AWS S3, MinIO and R2: none of those installs here)."""

from __future__ import annotations

import secrets
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxserve.storage.results import ResultMissing, ResultStoreConfig, open_result_store
from fluxserve.storage.results.protocol import ResultStore

PNG = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(2000)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    import boto3

    bucket = "results-" + secrets.token_hex(4)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=bucket)
    return bucket


def s3_config(endpoint: str, bucket: str, **changes: Any) -> ResultStoreConfig:
    values: dict[str, Any] = {"kind": "s3", "bucket": bucket, "prefix": "fluxserve/", "endpoint_url": endpoint,
                              "region": "us-east-1", "access_key_id": "test", "secret_access_key": "test",
                              "path_style": True, "presign_expiry": 600}
    values.update(changes)
    return ResultStoreConfig(**values)


@pytest.fixture(params=["local", "s3"])
def result_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    if request.param == "local":
        yield open_result_store(ResultStoreConfig(kind="local", root=tmp_path / "results"))
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        yield open_result_store(s3_config(endpoint, request.getfixturevalue("s3_bucket")))


def test_a_stored_result_reads_back_and_is_deleted_with_its_job(result_store: ResultStore) -> None:
    ref = result_store.put("img_a", "0-1.png", PNG, "image/png")
    assert (ref.key, ref.media_type, ref.size) == ("img_a/0-1.png", "image/png", len(PNG))
    result_store.put("img_a", "1-1.png", b"second", "image/png")
    result_store.put("img_b", "0-1.png", b"other job", "image/png")
    assert result_store.get(ref.key) == PNG
    result_store.delete_job("img_a")
    with pytest.raises(ResultMissing):
        result_store.get(ref.key)
    with pytest.raises(ResultMissing):
        result_store.get("img_a/1-1.png")
    assert result_store.get("img_b/0-1.png") == b"other job"
    result_store.delete_job("img_a")  # deleting again is no error
    assert result_store.problem() is None


@pytest.mark.parametrize("job_id, name", [("../etc", "passwd"), ("img_a", "../../x"), ("img_a", "a/b"),
                                          ("img a", "0.png"), ("img_a", ".hidden")])
def test_keys_a_request_could_steer_are_refused(result_store: ResultStore, job_id: str, name: str) -> None:
    with pytest.raises(ValueError):
        result_store.put(job_id, name, b"x", "image/png")


def test_the_local_store_writes_under_its_root_and_has_no_urls(tmp_path: Path) -> None:
    store = open_result_store(ResultStoreConfig(kind="local", root=tmp_path / "results"))
    ref = store.put("img_a", "0.webp", b"RIFF", "image/webp")
    assert (tmp_path / "results" / "img_a" / "0.webp").read_bytes() == b"RIFF"
    assert store.url(ref.key) is None  # the server serves local results itself
    assert not list((tmp_path / "results").rglob(".tmp-*"))


def test_s3_hands_out_presigned_urls_that_fetch_the_object(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_result_store(s3_config(s3_endpoint, s3_bucket, presign_expiry=600))
    ref = store.put("img_a", "0.png", PNG, "image/png")
    url = store.url(ref.key)
    assert url is not None and url.startswith(f"{s3_endpoint}/{s3_bucket}/fluxserve/img_a/0.png?")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["600"] and "X-Amz-Signature" in query
    answer = httpx.get(url)  # no credentials: the signature is the permission
    assert answer.status_code == 200 and answer.content == PNG
    assert answer.headers["content-type"] == "image/png"
    short = store.url(ref.key, expires_in=30)
    assert short is not None and urllib.parse.parse_qs(urllib.parse.urlsplit(short).query)["X-Amz-Expires"] == ["30"]
    unsigned = httpx.get(url.split("?")[0])
    assert unsigned.status_code == 403  # the bucket itself is not public


def test_an_unreachable_object_store_is_reported_without_credentials(s3_bucket: str) -> None:
    store = open_result_store(s3_config("http://127.0.0.1:9", s3_bucket, secret_access_key="s3cr3t-value"))
    problem = store.problem()
    assert problem is not None and problem.startswith("the object store bucket is not reachable")
    assert "s3cr3t" not in problem


def test_config_comes_from_the_settings(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    local = ResultStoreConfig.from_settings(make_settings(state_dir=tmp_path).storage)
    assert local.kind == "local" and local.root == tmp_path / "results"
    s3 = ResultStoreConfig.from_settings(make_settings(result_store="s3", s3_bucket="b", s3_access_key_id="id",
                                                       s3_secret_access_key="key", s3_presign_expiry=60).storage)
    assert (s3.kind, s3.bucket, s3.access_key_id, s3.secret_access_key, s3.presign_expiry) == ("s3", "b", "id",
                                                                                                "key", 60)


def test_s3_lists_and_deletes_the_url_files_of_synchronous_requests(s3_endpoint: str, s3_bucket: str) -> None:
    from fluxserve.storage.budgets import files_over_budget

    store: Any = open_result_store(s3_config(s3_endpoint, s3_bucket))
    for index, owner in enumerate(("keyA", "keyA", "keyB", "keyA")):
        store.put("files", f"{owner}.f{index}.png", PNG, "image/png")
    store.put("img_other", "0.png", PNG, "image/png")  # a job's result is never listed with the files
    listed = store.objects("files")
    assert sorted(obj.key for obj in listed) == sorted(f"files/{o}.f{i}.png" for i, o in
                                                        enumerate(("keyA", "keyA", "keyB", "keyA")))
    assert all(obj.size == len(PNG) for obj in listed)
    newest = max(obj.modified for obj in listed)
    # keyA holds 3 files over a per-key cap of 2: one of its own goes, keyB's stays
    doomed = files_over_budget(listed, now=newest, ttl=3600, max_bytes=10 * len(PNG),
                               max_bytes_per_owner=2 * len(PNG))
    assert len(doomed) == 1 and doomed[0].startswith("files/keyA.")
    store.delete(doomed)
    assert doomed[0] not in {obj.key for obj in store.objects("files")}
    assert len(store.objects("files")) == 3 and store.get("img_other/0.png") == PNG
