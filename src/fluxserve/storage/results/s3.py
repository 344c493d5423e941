"""Results in S3-compatible object storage through boto3 (``fluxserve[s3]``): AWS S3, MinIO,
Cloudflare R2, Google Cloud Storage's XML API and others that speak the S3 API.

Objects are ``<prefix><job id>/<name>`` in one bucket (which must exist), with their media type, and
clients fetch them through presigned GET URLs that expire after ``presign_expiry`` seconds. Why boto3:
it is the reference S3 client, signs URLs for every S3-compatible store (path-style addressing for
MinIO, custom endpoints for R2 and GCS), and its blocking calls fit the encoder threads that store
results; the objects are a few megabytes, so a faster async client would buy nothing here.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fluxserve.storage.jobstore.protocol import ResultRef, check_job_id
from fluxserve.storage.results.protocol import (
    ResultMissing,
    ResultStoreUnavailable,
    StoredObject,
    result_key,
    split_key,
)


def _why(exc: BaseException) -> str:
    """What went wrong, without credentials: the S3 error code, or the kind of connection failure."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')} ({exc.operation_name})"
    return type(exc).__name__


class S3ResultStore:
    def __init__(self, *, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None, path_style: bool = False,
                 presign_expiry: int = 3600, timeout: float = 10.0) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.presign_expiry = presign_expiry
        session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                                        region_name=region)
        config = Config(signature_version="s3v4", connect_timeout=timeout, read_timeout=timeout,
                        retries={"max_attempts": 3, "mode": "standard"},
                        s3={"addressing_style": "path" if path_style else "auto"})
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._lock = threading.Lock()  # boto3 clients are thread-safe; the lock only guards listing + deleting

    def _object(self, key: str) -> str:
        split_key(key)
        return self.prefix + key

    def put(self, job_id: str, name: str, data: bytes, media_type: str) -> ResultRef:
        key = result_key(job_id, name)
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=media_type)
        except (BotoCoreError, ClientError) as exc:
            raise ResultStoreUnavailable(f"the object store refused the result: {_why(exc)}") from None
        return ResultRef(key, media_type, len(data))

    def get(self, key: str) -> bytes:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._object(key))
            return bytes(answer["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise ResultMissing(key) from None
            raise ResultStoreUnavailable(f"the object store failed: {_why(exc)}") from None
        except BotoCoreError as exc:
            raise ResultStoreUnavailable(f"the object store failed: {_why(exc)}") from None

    def url(self, key: str, *, expires_in: int | None = None) -> str | None:
        return str(self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)},
            ExpiresIn=expires_in if expires_in is not None else self.presign_expiry))

    def delete_job(self, job_id: str) -> None:
        prefix = f"{self.prefix}{check_job_id(job_id)}/"
        try:
            with self._lock:
                pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
                for page in pages:
                    keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                    if keys:
                        self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        except (BotoCoreError, ClientError) as exc:
            raise ResultStoreUnavailable(f"the object store did not delete results: {_why(exc)}") from None

    def objects(self, job_id: str) -> list[StoredObject]:
        """The objects under ``<job id>/``, oldest first (for sweeping the ``files`` of synchronous requests)."""
        prefix = f"{self.prefix}{check_job_id(job_id)}/"
        found: list[StoredObject] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found.append(StoredObject(item["Key"].removeprefix(self.prefix), int(item["Size"]),
                                              item["LastModified"].timestamp()))
        except (BotoCoreError, ClientError) as exc:
            raise ResultStoreUnavailable(f"the object store did not list objects: {_why(exc)}") from None
        return sorted(found, key=lambda obj: (obj.modified, obj.key))

    def delete(self, keys: list[str]) -> None:
        try:
            for start in range(0, len(keys), 1000):
                batch = [{"Key": self._object(key)} for key in keys[start:start + 1000]]
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except (BotoCoreError, ClientError) as exc:
            raise ResultStoreUnavailable(f"the object store did not delete objects: {_why(exc)}") from None

    def problem(self) -> str | None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            return f"the object store bucket is not reachable: {_why(exc)}"
        return None
