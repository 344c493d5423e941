"""Typed sections of the settings: each layer gets the part of the configuration it reads, and nothing else.

:class:`~fluxserve.settings.Settings` stays the only reader of the environment (its flat ``FLUX_*`` fields are what
users set and what docs/settings.md lists). It hands each layer one frozen section built from those fields —
``settings.http``, ``settings.scheduler``, ``settings.engine``, ``settings.storage``, ``settings.webhooks``,
``settings.observability``, ``settings.distributed`` — the way vLLM's top-level config holds its model, scheduler,
parallel and observability configs. A section's field has the name, type and meaning of the setting it copies
(see its docstring in settings.py); lists become tuples. Only the composition roots (runtime.py, api/app.py,
server.py, cli.py, the Ray Serve builders) hold the whole settings.

This module imports neither torch nor pydantic-settings: worker processes receive an :class:`EngineConfig`
across their pipe, and the HTTP layer imports its section without the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import SecretStr


def read_api_keys(api_keys: tuple[str, ...] | list[str], api_keys_file: Path | None,
                  admin_keys: tuple[str, ...] | list[str]) -> list[str]:
    """Keys from FLUX_API_KEYS, FLUX_API_KEYS_FILE and FLUX_ADMIN_KEYS together (reads the file each call)."""
    keys = list(api_keys)
    if api_keys_file is not None:
        text = api_keys_file.read_text(encoding="utf-8")
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return keys + [key for key in admin_keys if key not in keys]


def lora_library_dir(lora_dir: Path | None, cache_dir: Path) -> Path:
    """Where the LoRA library lives (FLUX_LORA_DIR, default ``FLUX_CACHE_DIR/loras``)."""
    return lora_dir if lora_dir is not None else cache_dir / "loras"


@dataclass(frozen=True)
class HttpConfig:
    """What the HTTP layer (api/) and the server's connection guard read: keys, CORS, connection and body
    budgets, request limits, and the defaults of a response."""

    # keys and roles
    api_keys: tuple[str, ...] = field(repr=False)
    api_keys_file: Path | None
    admin_keys: tuple[str, ...] = field(repr=False)
    metrics_require_auth: bool
    cors_origins: tuple[str, ...]
    web_ui: bool
    # connections and bodies
    max_body_bytes: int
    max_edit_body_bytes: int
    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    keep_alive_timeout: float
    max_connections: int
    max_connections_per_client: int
    max_streams_per_client: int
    body_timeout: float
    body_min_rate: float
    json_parse_threads: int
    body_memory_bytes: int
    rate_limit_per_minute: float
    rate_limit_burst: int
    # request limits
    max_images_per_request: int
    max_prompt_chars: int
    min_size: int
    max_size: int
    max_pixels: int
    max_steps: int
    max_guidance: float
    max_megapixel_steps: float
    vae_megapixel_cost: float
    max_input_bytes: int
    max_input_pixels: int
    allow_fallback: bool
    allow_any_model: bool
    # LoRA requests (the library is scanned here; its limits are shown by GET /v1/loras)
    lora_dir: Path | None
    cache_dir: Path
    max_loras_per_request: int
    lora_max_scale: float
    lora_cache: int
    lora_max_rank: int
    compile: Literal["off", "regional", "full"]
    quantize: Literal["none", "fp8"]
    # answers
    default_response_format: Literal["b64_json", "url"]
    store_local: bool
    public_url: str | None
    png_compress_level: int
    log_prompts: bool

    def all_api_keys(self) -> list[str]:
        """Keys from FLUX_API_KEYS, FLUX_API_KEYS_FILE and FLUX_ADMIN_KEYS together."""
        return read_api_keys(self.api_keys, self.api_keys_file, self.admin_keys)

    @property
    def lora_library_dir(self) -> Path:
        return lora_library_dir(self.lora_dir, self.cache_dir)


@dataclass(frozen=True)
class SchedulerConfig:
    """What the job queue (scheduler/) reads: queue bounds, batching, timeouts and the results' budget."""

    max_queue: int
    queue_timeout: float
    max_concurrent: int
    max_batch: int
    batch_wait_ms: float
    job_ttl: float
    max_jobs: int
    results_max_bytes: int
    results_max_bytes_per_key: int
    max_queued_per_key: int
    max_stored_per_key: int
    stall_timeout: float


@dataclass(frozen=True)
class EngineConfig:
    """What the engine (engine/) reads: device and precision, where weights come from, memory modes and the
    out-of-memory ladder, optimizations, LoRA slots, and what a worker process needs to start (its logging,
    test-only faults). Sent as it is to worker processes."""

    # device and precision (the runtime resolves these into device plans)
    device: str
    devices: tuple[str, ...]
    worker_processes: bool
    parallel: str
    dtype: Literal["auto", "bfloat16", "float16", "float32"]
    generator_device: Literal["auto", "cpu", "device"]
    # weights
    cache_dir: Path
    revision: str | None
    variant: str | None
    hub_downloads: Literal["auto", "on", "off"]
    hf_token: SecretStr | None
    trust_remote_code: bool
    model_lock_timeout: float
    max_concurrent: int
    # memory and recovery
    offload: Literal["none", "model", "sequential"]
    attention_slicing: str
    vae_slicing: bool
    vae_tiling: bool
    vae_tile_size: int | None
    oom_policy: tuple[str, ...]
    min_size: int
    # optimizations
    compile: Literal["off", "regional", "full"]
    quantize: Literal["none", "fp8"]
    fuse_qkv: bool
    channels_last: bool
    attention_backend: str | None
    step_cache: str
    prompt_cache_size: int
    # LoRA adapters
    lora_dir: Path | None
    lora_cache: int
    max_loras_per_request: int
    lora_max_rank: int
    # worker processes
    worker_heartbeat_timeout: float
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    structured_logs: bool
    fault_injection: bool
    faults: str

    @property
    def lora_library_dir(self) -> Path:
        return lora_library_dir(self.lora_dir, self.cache_dir)

    def hf_token_value(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None


@dataclass(frozen=True)
class StorageConfig:
    """What storage/ reads: saved outputs, url files, and the durable job and result stores."""

    output_dir: Path
    output_max_bytes: int
    file_ttl: float
    files_max_bytes: int
    files_max_bytes_per_key: int
    state_dir: Path
    job_store: str = field(repr=False)  # a PostgreSQL URL may carry a password
    job_store_schema: str
    job_store_timeout: float
    job_store_pool_size: int
    job_max_attempts: int
    job_lease: float
    job_poll_interval: float
    job_ttl: float
    results_max_bytes: int
    results_max_bytes_per_key: int
    max_stored_per_key: int
    result_store: Literal["local", "s3"]
    s3_bucket: str | None
    s3_prefix: str
    s3_endpoint_url: str | None
    s3_region: str | None
    s3_access_key_id: SecretStr | None
    s3_secret_access_key: SecretStr | None
    s3_path_style: bool
    s3_presign_expiry: int


@dataclass(frozen=True)
class WebhooksConfig:
    """The FLUX_WEBHOOK_* settings, as webhooks/ reads them."""

    webhook_secret: SecretStr | None
    webhook_allowed_hosts: tuple[str, ...]
    webhook_max_attempts: int
    webhook_retry_base: float
    webhook_retry_max: float
    webhook_timeout: float
    webhook_concurrency: int


@dataclass(frozen=True)
class ObservabilityConfig:
    """What logging and metrics (observability/) read."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    structured_logs: bool
    log_prompts: bool
    metrics_window: int


@dataclass(frozen=True)
class DistributedConfig:
    """What the Ray Serve layer (distributed/) reads: replica resources, autoscaling and the queue bound."""

    ray_num_gpus: float
    ray_num_cpus: float
    ray_min_replicas: int
    ray_max_replicas: int
    ray_target_ongoing_requests: float
    ray_max_queued_requests: int


SECTIONS: dict[str, type] = {
    "http": HttpConfig, "scheduler": SchedulerConfig, "engine": EngineConfig, "storage": StorageConfig,
    "webhooks": WebhooksConfig, "observability": ObservabilityConfig, "distributed": DistributedConfig,
}
"""Each section by the name under which :class:`~fluxserve.settings.Settings` hands it out."""
