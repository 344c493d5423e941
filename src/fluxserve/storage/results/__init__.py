"""Where finished async jobs' images live: :func:`open_result_store` picks the store FLUX_RESULT_STORE
names (``local`` needs nothing extra; ``s3`` needs ``fluxserve[s3]``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from fluxserve.storage.results.protocol import ResultMissing, ResultRef, ResultStore, ResultStoreUnavailable

if TYPE_CHECKING:
    from fluxserve.settings import Settings

__all__ = ["ResultMissing", "ResultRef", "ResultStore", "ResultStoreConfig", "ResultStoreUnavailable",
           "open_result_store"]


@dataclass(frozen=True)
class ResultStoreConfig:
    """The settings a result store needs (FLUX_RESULT_STORE and the FLUX_S3_* settings)."""

    kind: str = "local"
    root: Path = Path("results")
    """The local store's directory (FLUX_STATE_DIR/results)."""
    bucket: str | None = None
    prefix: str = "fluxserve/"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    path_style: bool = False
    presign_expiry: int = 3600

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultStoreConfig:
        def secret(value: SecretStr | None) -> str | None:
            return None if value is None else value.get_secret_value()

        return cls(kind=settings.result_store, root=settings.state_dir / "results", bucket=settings.s3_bucket,
                   prefix=settings.s3_prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                   access_key_id=secret(settings.s3_access_key_id),
                   secret_access_key=secret(settings.s3_secret_access_key), path_style=settings.s3_path_style,
                   presign_expiry=settings.s3_presign_expiry)


def open_result_store(config: ResultStoreConfig) -> ResultStore:
    if config.kind == "local":
        from fluxserve.storage.results.local import LocalResultStore

        return LocalResultStore(config.root)
    if config.kind != "s3" or not config.bucket:
        raise ValueError(f"FLUX_RESULT_STORE must be local, or s3 with FLUX_S3_BUCKET; got {config.kind!r}")
    try:
        from fluxserve.storage.results.s3 import S3ResultStore
    except ImportError:
        raise ValueError("FLUX_RESULT_STORE=s3 needs boto3: pip install 'fluxserve[s3]'") from None
    return S3ResultStore(bucket=config.bucket, prefix=config.prefix, endpoint_url=config.endpoint_url,
                         region=config.region, access_key_id=config.access_key_id,
                         secret_access_key=config.secret_access_key, path_style=config.path_style,
                         presign_expiry=config.presign_expiry)
