"""The one place that reads the environment.

Every knob of fluxserve is a field of :class:`Settings`. Values come from the process environment
(prefix ``FLUX_``) and from a ``.env`` file in the working directory; the earlier server's names
(``FLUX_MODEL_KEY``, ``FLUX_MODEL_ID``, ``IMAGE_SERVER_PORT``, ``HUGGINGFACE_HUB_TOKEN``...) still work
as aliases. ``.env.example`` lists every field with its default; ``tests/test_settings.py`` checks that
the two never drift apart.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fluxserve.config import (
    SECTIONS,
    DistributedConfig,
    EngineConfig,
    HttpConfig,
    ObservabilityConfig,
    SchedulerConfig,
    StorageConfig,
    WebhooksConfig,
    lora_library_dir,
    read_api_keys,
)
from fluxserve.models.aliases import OPENAI_IMAGE_MODELS, parse_model_aliases

ENV_PREFIX = "FLUX_"


def _default_cache_dir() -> Path:
    """Where tiny models and the compile cache go unless ``FLUX_CACHE_DIR`` says otherwise."""
    xdg = os.environ.get("XDG_CACHE_HOME")  # read once here, at import; settings stays the only reader
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fluxserve"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _default_state_dir() -> Path:
    """Where the job store and local results live unless ``FLUX_STATE_DIR`` says otherwise: the XDG state
    directory (``$XDG_STATE_HOME/fluxserve``, by default ``~/.local/state/fluxserve``). State, not cache: deleting
    it loses jobs that clients were promised."""
    xdg = os.environ.get("XDG_STATE_HOME")  # read once here, at import; settings stays the only reader
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "fluxserve"


def redact_dsn(dsn: str) -> str:
    """A database URL with its password replaced by ``***`` (for logs, error messages and /v1/models)."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return dsn
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return dsn
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"


CsvList = Annotated[list[str], NoDecode]
SectionT = TypeVar("SectionT")


class SettingsError(ValueError):
    """A setting has a value fluxserve cannot run with; the message names the variable."""


class Settings(BaseSettings):
    """All runtime configuration. Each field documents itself; the env var is ``FLUX_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
        use_attribute_docstrings=True,
    )

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        "schnell",
        validation_alias=AliasChoices("FLUX_MODEL", "FLUX_MODEL_ID", "FLUX_MODEL_KEY", "model"),
    )
    """Default model: a registry key (schnell, dev, qwen, klein, zimage, tiny-flux, ...: docs/families.md), a hub
    repo id or a local diffusers directory. ``FLUX_MODEL_ID`` and ``FLUX_MODEL_KEY`` are the earlier names."""
    preload_models: CsvList = Field(default_factory=list)
    """Comma-separated extra models loaded at start-up besides the default one."""
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Hub download cache, tiny models and compile caches live under this directory."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub models."""
    variant: str | None = None
    """Weights variant to load (e.g. ``fp16``) where the repo has one."""
    hub_downloads: Literal["auto", "on", "off"] = "auto"
    """Whether models may be downloaded from the hub. ``off``: only tiny models, local directories and models
    already in FLUX_CACHE_DIR load (HF_HUB_OFFLINE=1 means the same); ``auto``: downloads when the hub answers
    (checked at most once a minute); ``on``: assume it does. /v1/models lists only models this server can
    load (docs/compatibility.md)."""
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("HF_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_ACCESS_TOKEN", "hf_token"),
    )
    """Hub token for gated repos (FLUX.1-dev). Read from HF_TOKEN, HUGGINGFACE_HUB_TOKEN or
    HF_ACCESS_TOKEN. Never logged."""
    trust_remote_code: bool = False
    """Allow repos to run their own Python code when loading. Off: only diffusers' own classes load."""
    allow_any_model: bool = False
    """Let requests name hub repos or paths not in the registry (otherwise only registry keys and
    models configured by the operator)."""
    model_aliases: CsvList = Field(default_factory=lambda: list(OPENAI_IMAGE_MODELS))
    """Model names requests may use for another model: ``name=model`` entries (e.g.
    ``gpt-image-1=schnell,dall-e-3=dev``); a bare ``name`` means the active model. Default: every
    OpenAI image model name means the active model. Empty: no aliases."""
    models: CsvList = Field(default_factory=list)
    """Comma-separated models that requests may name, each loaded on first use (registry keys, or repo
    ids and directories chosen by the operator). Always allowed besides: FLUX_MODEL, FLUX_PRELOAD_MODELS
    and models an admin selected. Empty: only those. A request naming a registry model not listed gets
    403 ``model_not_allowed``; a name that is no model at all gets 404 ``model_not_found``.
    FLUX_ALLOW_ANY_MODEL=1 lifts the list (any name may start a download)."""

    # --- device & precision --------------------------------------------------------------------
    device: str = "auto"
    """auto | cuda | cuda:N | mps | cpu."""
    devices: CsvList = Field(default_factory=list)
    """One worker per listed device (e.g. ``cuda:0,cuda:1`` or ``cpu,cpu``); empty: one worker on
    the resolved device."""
    worker_processes: bool = False
    """Run each device's engine in its own spawned process (``FLUX_DEVICES=cuda:0,cuda:1``: two
    processes, so the GPUs never wait on one interpreter). The scheduler and API stay in the server
    process; a worker process that dies is restarted and its in-flight jobs fail. Off: engines run
    as threads of the server process (enough for one GPU, and for CPU)."""
    worker_heartbeat_timeout: float = Field(15.0, gt=0)
    """With FLUX_WORKER_PROCESSES=1: a started worker process that sends nothing for this many seconds,
    not even the heartbeat a thread of its own sends every second (it is stopped, frozen, or a call holds
    its interpreter), is killed and replaced. Its jobs fail with 503 ``worker_unresponsive`` (those
    cancelled meanwhile end cancelled) and queued jobs run on the new worker. A worker busy generating
    keeps beating; a generation stuck inside a live worker is FLUX_STALL_TIMEOUT's matter."""
    parallel: str = "off"
    """Split each request over several GPUs with diffusers' context parallelism: ``ulysses:N`` or
    ``ring:N`` (N CUDA GPUs per request, FLUX_DEVICES cut into groups of N; needs
    FLUX_WORKER_PROCESSES=1; ring needs an attention kernel with log-sum-exp, e.g.
    FLUX_ATTENTION_BACKEND=flash). Refused at start-up where there are not enough CUDA GPUs.
    See docs/parallel.md."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype. auto: bfloat16 on CUDA (float16 on GPUs without bf16), bfloat16 on MPS where a
    bf16 operation really runs there (checked at start-up, else float16), float32 on CPU."""
    generator_device: Literal["auto", "cpu", "device"] = "auto"
    """Where random latents are drawn. auto = cpu: the same seed gives the same image on any
    hardware, and MPS never sees a generator/device mismatch."""

    # --- server --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Bind address. Loopback by default; set 0.0.0.0 deliberately to expose the server."""
    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("FLUX_PORT", "IMAGE_SERVER_PORT", "port"))
    """TCP port (``IMAGE_SERVER_PORT`` is the earlier name)."""
    public_url: str | None = None
    """Base URL used to build ``url`` answers (default: from the request)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    structured_logs: bool = False
    """One JSON object per log line instead of human-readable lines."""
    log_prompts: bool = False
    """Include prompts in logs (off: prompts are never logged)."""
    api_keys: CsvList = Field(default_factory=list, repr=False)
    """Comma-separated API keys; when set, every /v1 route needs ``Authorization: Bearer <key>``."""
    api_keys_file: Path | None = None
    """File with one API key per line (merged with FLUX_API_KEYS)."""
    admin_keys: CsvList = Field(default_factory=list, repr=False)
    """Comma-separated admin API keys (valid everywhere an API key is). When any key is configured,
    model select/unload, memory release, LoRA library changes and the runtime snapshot (paths,
    devices, settings) in /v1/models need an admin key; ordinary keys get 403 ``permission_denied``
    (and /v1/models without the snapshot). Without any key every client is an admin (loopback default)."""
    cors_origins: CsvList = Field(default_factory=list)
    """Origins allowed to call the API from a browser (default: same origin only)."""
    web_ui: bool = True
    """Serve the web studio at / (off: / answers JSON only and /static is not mounted)."""
    metrics_require_auth: bool = False
    """Require the API key for /metrics too."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted (413 above it, and the connection is closed: the server discards at
    most 16 MiB (or this, if larger) more of the body for at most 2 s so that the 413 reaches the
    client, then stops reading)."""
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    """Largest request head (request line and headers) accepted; bigger ones get 431 and the
    connection is closed before the rest is read."""
    max_header_count: int = Field(100, ge=8)
    """Most header lines a request may carry (431 above it)."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds a connection may take to send a complete request head (from connecting, or from the end
    of the previous response); slower ones get 408 and are closed (slow-header floods)."""
    keep_alive_timeout: float = Field(5.0, gt=0)
    """Seconds an idle keep-alive connection stays open waiting for the next request."""
    max_connections: int = Field(256, ge=2)
    """Open client connections at most. At the limit a new connection closes the oldest one that has
    not sent a complete request head yet (idle or slow); when every connection is busy with a request
    the new one gets 503 ``too_many_connections`` with Retry-After and is closed. A few connections past
    the limit are kept for ``GET /health`` and ``GET /ready`` only, so probes are answered even then."""
    max_connections_per_client: int = Field(64, ge=1)
    """Requests one client may have in progress at once (each holds a connection: sending its body, waiting
    for its images or streaming events), per API key, or per client address when no keys are configured.
    Must be below FLUX_MAX_CONNECTIONS, so that one client meets its own limit while the server has room for
    the others. Past it: 429 ``connection_limit_exceeded`` with Retry-After, before the body is read, and the
    connection is closed. /health and /ready are not counted."""
    max_streams_per_client: int = Field(16, ge=1)
    """Event streams (``stream: true`` answers, ``/v1/images/jobs/{id}/events``) one client may hold open at
    once, counted like FLUX_MAX_CONNECTIONS_PER_CLIENT and at most that. Past it: 429 ``stream_limit_exceeded``
    instead of the stream (a generation it would have streamed is cancelled)."""
    body_timeout: float = Field(10.0, gt=0)
    """Grace period, in seconds, of a request body: past it the body must keep arriving at FLUX_BODY_MIN_RATE
    on average (only time spent waiting for body bytes counts). A slower body gets 408 ``body_timeout`` and
    the connection is closed (slow-body floods)."""
    body_min_rate: float = Field(4096.0, gt=0)
    """Bytes per second a request body must average once FLUX_BODY_TIMEOUT has passed: a body of B bytes may
    keep the server waiting FLUX_BODY_TIMEOUT + B / FLUX_BODY_MIN_RATE seconds in all."""
    json_parse_threads: int = Field(2, ge=1, le=64)
    """Threads that parse JSON request bodies over 64 KiB (edits with data URLs), off the event loop: at most
    this many large bodies are parsed at once, the others wait their turn."""
    body_memory_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024)
    """Memory that JSON request bodies over 64 KiB may hold at once, all together: each reserves twice its size
    (its bytes and what parsing makes of them) from its Content-Length, before a byte is read, until it is
    parsed. A body that does not fit gets 503 ``server_busy`` with Retry-After; one client may hold at most
    half (429 ``body_memory_limit_exceeded``). At least 4 × the largest body limit, so that any allowed body
    can be received."""
    shutdown_timeout: float = Field(30.0, ge=0)
    """On SIGTERM/SIGINT, seconds to finish in-flight and queued jobs before cancelling the rest."""
    notify_socket: str | None = Field(None, validation_alias=AliasChoices("NOTIFY_SOCKET", "notify_socket"))
    """systemd's readiness socket (systemd sets it for ``Type=notify`` units; a path, or ``@name`` for the
    abstract namespace). The server sends ``READY=1`` once it listens with its models loaded and warmed up
    (``STATUS=`` says ready, or why not) and ``STOPPING=1`` when a shutdown begins. Unset: nothing is sent."""

    # --- request limits ------------------------------------------------------------------------
    max_images_per_request: int = Field(4, ge=1, le=64)
    """Upper bound for ``n``."""
    max_prompt_chars: int = Field(4000, ge=1)
    """Longest prompt accepted, in characters."""
    min_size: int = Field(64, ge=8)
    """Smallest width/height in pixels."""
    max_size: int = Field(2048, ge=64)
    """Largest width/height in pixels."""
    max_pixels: int = Field(2048 * 2048, ge=64 * 64)
    """Largest width × height per image."""
    max_steps: int = Field(100, ge=1)
    """Most denoising steps a request may ask for."""
    max_guidance: float = Field(30.0, ge=0)
    """Largest guidance scale a request may ask for."""
    max_megapixel_steps: float = Field(110.0, gt=0)
    """Compute budget of one request, in megapixel-steps: one transformer pass over 4096 tokens (a 1024×1024
    image) is 1. A request costs n × (steps × passes × (image tokens + text tokens) / 4096 + FLUX_VAE_MEGAPIXEL_COST
    × output megapixels × (1 + input images)): passes is 2 where the family runs true CFG, image tokens are
    width × height / 256, text tokens the model's ``max_sequence_length``; input images (edits) are encoded at
    the output size. Defaults: 1024² × 28 steps of FLUX.1-dev costs 37.8, the heaviest family default (a
    Qwen-Image-Edit edit, 40 steps with CFG) 102.6, n=4 × 2048² × 1 step 117. Above it the request gets 400
    ``compute_budget_exceeded`` naming the field that weighs most. Calibration: docs/reliability.md."""
    vae_megapixel_cost: float = Field(6.0, ge=0)
    """What the VAE costs per output megapixel (decode, and encode of each input image), in megapixel-steps.
    6 is measured on the CPU (tiny models, 2.7 at 1024² and 6.7 at 2048², where decoding dominates); a GPU's
    full-size VAE costs about 0.6 (0.09 s per decode at 1024² vs 0.17 s per transformer pass on an H100), so a
    GPU server may set 0.6 and raise FLUX_MAX_MEGAPIXEL_STEPS (docs/reliability.md)."""
    rate_limit_per_minute: float = Field(0.0, ge=0)
    """Generation requests (images and jobs) each API key (or, without keys, each client address) may
    start per minute, as a token bucket refilled continuously; 0 disables the limit. Over it: 429
    ``rate_limit_exceeded`` with Retry-After."""
    rate_limit_burst: int = Field(10, ge=1)
    """Size of each rate-limit bucket: how many generation requests may come at once after a pause."""
    max_input_bytes: int = Field(16_000_000, ge=1024)
    """Largest uploaded image file for /v1/images/edits and /variations, in bytes (each image and the mask)."""
    max_input_pixels: int = Field(4096 * 4096, ge=64 * 64)
    """Largest uploaded image in width × height, read from its header before decoding (decompression bombs)."""
    max_edit_body_bytes: int = Field(64_000_000, ge=1024)
    """Largest request body for /v1/images/edits and /variations (which carry images); other routes keep
    FLUX_MAX_BODY_BYTES."""

    # --- outputs -------------------------------------------------------------------------------
    output_dir: Path = Path("outputs")
    """Where ``store_local`` images and metadata sidecars are written. Responses carry ``saved_path``
    relative to it (the log has the full path)."""
    output_max_bytes: int = Field(10 * 1024**3, ge=0)
    """Most bytes the files under FLUX_OUTPUT_DIR may take (0: no cap). When a save would pass it, the
    save is refused (older images are never deleted); the response still carries the image, and /ready
    reports the output directory full."""
    store_local: bool = False
    """Default of the request field ``store_local``: off, so API images are not kept on disk unless a
    request asks (the earlier server saved every image; set 1 for its behaviour)."""
    default_response_format: Literal["b64_json", "url"] = "b64_json"
    """``response_format`` of requests that send none; requests naming a ``dall-e-*`` model (or an
    alias of that name) get ``url``, as OpenAI answers them."""
    file_ttl: float = Field(3600.0, gt=0)
    """Seconds an image served by ``response_format=url`` stays downloadable."""
    files_max_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    """Bytes the images served by ``response_format=url`` may take in memory together (default 512 MiB). When
    a new image would pass it, the key furthest over its budget (FLUX_FILES_MAX_BYTES_PER_KEY, or when that is
    0 its fair share: this cap divided among the keys holding files) loses its oldest file; when no key is
    over its budget, the new request gets 507 ``file_store_full`` instead (docs/reliability.md)."""
    files_max_bytes_per_key: int = Field(0, ge=0)
    """Bytes of ``url`` images one API key (or, without keys, all clients together) may hold; past it that
    key's own oldest files go. 0 (the default): no fixed cap; a key may use the whole store while it is
    alone, and under pressure the key holding the most loses its oldest files first."""
    png_compress_level: int = Field(1, ge=0, le=9)
    """zlib level for PNG output; 1 is fast and still lossless."""
    encode_threads: int = Field(2, ge=1, le=64)
    """Threads that encode, base64 and save images off the GPU's critical path."""

    # --- scheduler -----------------------------------------------------------------------------
    max_queue: int = Field(64, ge=0)
    """Jobs that may wait beyond those the idle workers start at once (0: only what idle workers take);
    past it requests get 429 with Retry-After at once."""
    queue_timeout: float = Field(300.0, gt=0)
    """Seconds a job may wait in the queue before it is dropped with 504."""
    max_concurrent: int = Field(1, ge=1, le=16)
    """Generations in flight per device."""
    max_batch: int = Field(4, ge=1, le=64)
    """Most images merged into one pipeline call by dynamic batching (1 disables batching)."""
    batch_wait_ms: float = Field(0.0, ge=0)
    """How long the first job of a batch waits for company."""
    model_lock_timeout: float = Field(600.0, gt=0)
    """Seconds to wait for another load of the same model before answering 503."""
    job_ttl: float = Field(3600.0, gt=0)
    """Seconds finished async jobs and their results are kept."""
    max_jobs: int = Field(1000, ge=1)
    """Jobs the server remembers at once (queued, running and finished async jobs with results); finished
    jobs without stored results are forgotten at once, leaving only a small status record."""
    results_max_bytes: int = Field(512 * 1024 * 1024, ge=0)
    """Bytes of finished async jobs' encoded images kept for polling (default 512 MiB). When a new result
    would pass it, the key furthest over its budget (FLUX_RESULTS_MAX_BYTES_PER_KEY, or when that is 0 its
    fair share: this cap divided among the keys holding results) loses its oldest result (polling it answers
    410 ``result_expired``); when no key is over its budget, the new result is refused: that job ends failed
    with ``results_store_full`` (docs/reliability.md)."""
    results_max_bytes_per_key: int = Field(0, ge=0)
    """Bytes of finished async results one API key (or, without keys, all clients together) may keep; past it
    that key's own oldest results expire. 0 (the default): no fixed cap; under pressure the key holding the
    most loses its oldest results first."""
    max_queued_per_key: int = Field(0, ge=0)
    """Queued or running jobs one API key may have at once (0: only FLUX_MAX_QUEUE limits)."""
    max_stored_per_key: int = Field(0, ge=0)
    """Finished async results one API key may keep at once; its oldest expire first (0: no per-key cap)."""
    stall_timeout: float = Field(600.0, gt=0)
    """A worker busy this many seconds without finishing a denoising step makes /ready answer 503."""

    # --- durable jobs, results and webhooks ------------------------------------------------------
    state_dir: Path = Field(default_factory=_default_state_dir)
    """Where fluxserve keeps what must outlive the process: the SQLite job store (``jobs.sqlite3``) and, with
    FLUX_RESULT_STORE=local, finished jobs' images (``results/``). Default: ``$XDG_STATE_HOME/fluxserve``, i.e.
    ``~/.local/state/fluxserve``. See docs/durability.md."""
    job_store: str = "sqlite"
    """Where async jobs are kept: ``sqlite`` (one file under FLUX_STATE_DIR, for one server process),
    ``sqlite:///absolute/path.sqlite3``, or a PostgreSQL URL ``postgresql://user:password@host:5432/db`` (several
    processes or ingress replicas share it; needs ``fluxserve[postgres]``). ``memory`` keeps them in the
    process only (lost on restart; nothing written to disk). The password is never logged."""
    job_poll_interval: float = Field(0.5, gt=0, le=60)
    """Seconds between looks at the job store for work queued through another process (and for cancellations
    asked for there). Jobs queued through this process start at once."""
    job_store_schema: str = Field("fluxserve", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """The PostgreSQL schema that holds fluxserve's tables (several deployments may share one database, each
    in its own schema). Not used by SQLite."""
    job_store_timeout: float = Field(5.0, gt=0)
    """Seconds a job store operation waits for the database (connecting, or a pooled connection) before it
    fails with 503 ``job_store_unavailable``."""
    job_store_pool_size: int = Field(4, ge=1, le=64)
    """Most connections each process opens to a PostgreSQL job store."""
    job_max_attempts: int = Field(3, ge=1, le=100)
    """Times a job may start before a crash stops it for good: a job that was running when its process died
    runs again from the start with the same seeds until it has started this many times, then ends ``failed``
    with code ``interrupted``."""
    job_lease: float = Field(60.0, ge=1)
    """Seconds a running job stays claimed by its process without a heartbeat (heartbeats come every third
    of it). With a shared PostgreSQL store, another process re-queues a job whose lease ran out (its process
    died)."""
    result_store: Literal["local", "s3"] = "local"
    """Where finished async jobs' images are kept: ``local`` (FLUX_STATE_DIR/results) or ``s3`` (any
    S3-compatible object store: AWS S3, MinIO, Cloudflare R2, Google Cloud Storage; needs ``fluxserve[s3]``).
    With ``s3``, ``url`` answers are presigned URLs of the object store."""
    s3_bucket: str | None = None
    """Bucket of the S3 result store (must exist; fluxserve does not create buckets)."""
    s3_prefix: str = "fluxserve/"
    """Key prefix of every object fluxserve writes to the bucket."""
    s3_endpoint_url: str | None = None
    """S3 API endpoint for non-AWS stores (e.g. ``http://minio:9000``, ``https://<account>.r2.cloudflarestorage.com``,
    ``https://storage.googleapis.com``); empty: AWS S3."""
    s3_region: str | None = None
    """Region of the bucket (R2: ``auto``); empty: boto3's default chain."""
    s3_access_key_id: SecretStr | None = Field(None, repr=False)
    """Access key id; empty: boto3's default chain (AWS_* variables, instance roles, ~/.aws). Never logged."""
    s3_secret_access_key: SecretStr | None = Field(None, repr=False)
    """Secret access key that goes with FLUX_S3_ACCESS_KEY_ID. Never logged."""
    s3_path_style: bool = False
    """Address buckets as ``endpoint/bucket/key`` instead of ``bucket.endpoint/key`` (MinIO and most
    self-hosted stores need it)."""
    s3_presign_expiry: int = Field(3600, ge=1, le=7 * 24 * 3600)
    """Seconds a presigned URL handed out for an image stays valid (S3 allows at most 7 days)."""
    webhook_secret: SecretStr | None = Field(None, repr=False)
    """Signing secret of webhooks (Standard Webhooks: ``whsec_`` followed by base64 of 24 to 64 random bytes).
    Without it, requests naming ``webhook_url`` are refused. Never logged."""
    webhook_allowed_hosts: CsvList = Field(default_factory=list)
    """Hosts that ``webhook_url`` may name: host names (``hooks.example.com``), ``*.example.com`` for its
    subdomains, IP addresses or networks (``10.1.2.0/24``). Empty: webhooks are off. Every address a host resolves
    to must be public unless an IP address or network entry here names it (loopback, private and link-local
    addresses are otherwise refused: no server-side request forgery)."""
    webhook_max_attempts: int = Field(8, ge=1, le=100)
    """Delivery attempts per webhook before it is given up (recorded on the job as ``webhook.state=failed``)."""
    webhook_retry_base: float = Field(2.0, gt=0)
    """Seconds before the first retry of a failed delivery; each later retry waits twice as long (up to
    FLUX_WEBHOOK_RETRY_MAX), with up to 10% random jitter."""
    webhook_retry_max: float = Field(600.0, gt=0)
    """Longest wait between two delivery attempts, in seconds."""
    webhook_timeout: float = Field(10.0, gt=0)
    """Seconds one delivery attempt may take (connect, send, answer) before it counts as failed."""
    webhook_concurrency: int = Field(4, ge=1, le=64)
    """Deliveries sent at once (threads apart from generation: a slow receiver never delays images)."""

    # --- memory --------------------------------------------------------------------------------
    offload: Literal["none", "model", "sequential"] = "none"
    """CPU offload: model = enable_model_cpu_offload, sequential = enable_sequential_cpu_offload."""
    attention_slicing: str = "off"
    """off | auto | max | <int> slice size."""
    vae_slicing: bool = False
    """Decode a batch one image at a time."""
    vae_tiling: bool = False
    """Decode in tiles (large images on small cards)."""
    vae_tile_size: int | None = Field(None, ge=64)
    """Tile size in pixels for VAE tiling (default: the VAE's own)."""
    oom_policy: CsvList = Field(default_factory=lambda: ["clear_cache", "slicing", "offload", "downscale"])
    """Recovery ladder after out-of-memory, in order: clear_cache, slicing, offload, downscale."""
    allow_fallback: bool = True
    """Default of the request field ``allow_fallback`` (lets the ladder lower resolution)."""
    oom_max_consecutive: int = Field(3, ge=1)
    """After this many failed requests in a row for OOM, /ready answers 503."""
    fault_injection: bool = False
    """Test only: enable FLUX_FAULTS."""
    faults: str = ""
    """Test only: e.g. ``oom@denoise:2,nan@decode:1`` (needs FLUX_FAULT_INJECTION=1)."""

    # --- performance ---------------------------------------------------------------------------
    compile: Literal["off", "regional", "full"] = "off"
    """torch.compile the transformer's repeated blocks (regional) or the whole model."""
    quantize: Literal["none", "fp8"] = "none"
    """fp8 row-wise dynamic quantization of the transformer's linears (CUDA, compute capability ≥ 8.9)."""
    fuse_qkv: bool = False
    """Fuse the attention QKV projections (lossless, fewer kernel launches)."""
    channels_last: bool = False
    """channels_last memory format for the VAE."""
    attention_backend: str | None = None
    """diffusers attention backend name (e.g. native, flash, _native_cudnn); empty: default."""
    step_cache: str = Field("off", validation_alias=AliasChoices("FLUX_CACHE", "FLUX_STEP_CACHE", "step_cache"))
    """Step caching for many-step models: off | fbcache:<threshold>. Lossy, opt-in."""
    prompt_cache_size: int = Field(64, ge=0)
    """LRU entries of prompt embeddings; a repeated prompt skips the text encoders (0 disables)."""
    # --- LoRA adapters -------------------------------------------------------------------------
    lora_dir: Path | None = None
    """Directory of the LoRA library: ``.safetensors`` adapters (diffusers/PEFT, kohya and the other formats
    diffusers' ``load_lora_weights`` converts), optionally in per-family subfolders (``flux/``, ``qwen/``).
    Default: ``FLUX_CACHE_DIR/loras``."""
    lora_cache: int = Field(8, ge=1, le=256)
    """Adapters each model keeps loaded on its device (LRU); activating a loaded one is ``set_adapters``,
    never a reload."""
    max_loras_per_request: int = Field(4, ge=1, le=16)
    """Most adapters one request may name in ``loras``."""
    lora_max_scale: float = Field(2.0, gt=0, le=100)
    """Largest ``|scale|`` a request may give an adapter (400 above it)."""
    lora_max_rank: int = Field(64, ge=1, le=1024)
    """Under FLUX_COMPILE: the rank every adapter slot is padded to (diffusers' ``enable_lora_hotswap
    (target_rank=...)``), so switching adapters or scales never recompiles. Adapters of a higher rank are
    refused there (400)."""
    warmup_enable: bool = True
    """Run a 1-step generation per model, warmup size and warmup text length after loading; /ready waits for it."""
    warmup_sizes: CsvList = Field(default_factory=list)
    """Sizes to warm up (e.g. ``1024x1024,512x512``); empty: the model's default size."""
    warmup_text_lengths: CsvList = Field(default_factory=list)
    """Text lengths (``max_sequence_length``) to warm up at each size (e.g. ``256,512``); empty: the model's
    default. Under FLUX_COMPILE each length is its own compiled shape: a length requests send that no
    warm-up covered compiles on the first such request, after /ready."""

    # --- observability -------------------------------------------------------------------------
    metrics_window: int = Field(200, ge=1)
    """Requests kept for the rolling averages of /v1/metrics/summary."""

    # --- ray serve -----------------------------------------------------------------------------
    ray_num_gpus: float = Field(1.0, ge=0)
    """GPUs per model replica (0: CPU replicas)."""
    ray_num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per model replica."""
    ray_min_replicas: int = Field(1, ge=0)
    """Fewest replicas per model deployment."""
    ray_max_replicas: int = Field(1, ge=1)
    """Most replicas per model deployment."""
    ray_target_ongoing_requests: float = Field(2.0, gt=0)
    """Autoscaling target of ongoing requests per replica."""
    ray_max_queued_requests: int = Field(64, ge=-1)
    """Requests queued per deployment before 429 (-1: unbounded)."""

    # --- validators ----------------------------------------------------------------------------
    @field_validator("preload_models", "devices", "api_keys", "cors_origins", "oom_policy", "warmup_sizes",
                     "warmup_text_lengths", "model_aliases", "models", "admin_keys", "webhook_allowed_hosts",
                     mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _is_device_name(value, allow_auto=True):
            raise ValueError(f"must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str]) -> list[str]:
        bad = [d for d in value if not _is_device_name(d.lower(), allow_auto=False)]
        if bad:
            raise ValueError(f"each entry must be cpu, mps, cuda or cuda:N, got {bad!r}")
        return [d.lower() for d in value]

    @field_validator("attention_slicing")
    @classmethod
    def _slicing(cls, value: str) -> str:
        value = value.strip().lower()
        if value in {"off", "auto", "max"} or (value.isdigit() and int(value) > 0):
            return value
        raise ValueError(f"must be off, auto, max or a positive integer, got {value!r}")

    @field_validator("oom_policy")
    @classmethod
    def _oom_policy(cls, value: list[str]) -> list[str]:
        allowed = {"clear_cache", "slicing", "offload", "downscale"}
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"unknown rung(s) {bad!r}; allowed: {sorted(allowed)}")
        return value

    @field_validator("step_cache")
    @classmethod
    def _step_cache(cls, value: str) -> str:
        value = value.strip().lower()
        if value == "off":
            return value
        kind, _, arg = value.partition(":")
        if kind == "fbcache":
            try:
                threshold = float(arg or "0.08")
            except ValueError:
                raise ValueError(f"fbcache threshold must be a number, got {arg!r}") from None
            if not 0 < threshold < 1:
                raise ValueError(f"fbcache threshold must be in (0, 1), got {threshold}")
            return f"fbcache:{threshold}"
        raise ValueError(f"must be off or fbcache:<threshold>, got {value!r}")

    @field_validator("model_aliases")
    @classmethod
    def _aliases(cls, value: list[str]) -> list[str]:
        parse_model_aliases(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            w, sep, h = size.lower().partition("x")
            if not (sep and w.isdigit() and h.isdigit()):
                raise ValueError(f"sizes look like 1024x1024, got {size!r}")
        return [s.lower() for s in value]

    @field_validator("warmup_text_lengths")
    @classmethod
    def _text_lengths(cls, value: list[str]) -> list[str]:
        for length in value:
            if not (length.isdigit() and int(length) > 0):
                raise ValueError(f"text lengths are positive whole numbers (tokens), got {length!r}")
        return [str(int(length)) for length in dict.fromkeys(value)]

    @field_validator("job_store")
    @classmethod
    def _job_store(cls, value: str) -> str:
        value = value.strip()
        if value in {"sqlite", "memory"} or value.startswith(("postgresql://", "postgres://")):
            return value
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        raise ValueError("must be sqlite, sqlite:///absolute/path, postgresql://... or memory, got "
                         f"{redact_dsn(value)!r}")

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        raw = value.get_secret_value().removeprefix("whsec_").rstrip("=")
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (ValueError, binascii.Error):
            raise ValueError("must be whsec_ followed by base64 (Standard Webhooks secret format)") from None
        if len(key) < 16:
            raise ValueError(f"must carry at least 16 random bytes, got {len(key)}")
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _webhook_hosts(cls, value: list[str]) -> list[str]:
        return [host.lower().rstrip(".") for host in value]

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_size < self.min_size:
            raise ValueError("FLUX_MAX_SIZE must be ≥ FLUX_MIN_SIZE")
        if self.faults and not self.fault_injection:
            raise ValueError("FLUX_FAULTS is set but FLUX_FAULT_INJECTION is not 1 (fault injection is test-only)")
        if self.offload != "none" and self.compile != "off":
            raise ValueError("FLUX_OFFLOAD and FLUX_COMPILE cannot be combined: offload hooks break compiled graphs")
        if self.offload != "none" and self.quantize != "none":
            raise ValueError("FLUX_OFFLOAD and FLUX_QUANTIZE=fp8 cannot be combined")
        if self.step_cache != "off" and self.max_concurrent > 1:
            raise ValueError("FLUX_CACHE (First Block Cache) cannot be combined with FLUX_MAX_CONCURRENT>1: the "
                             "pipeline views share one transformer, whose cache state is per call")
        if self.quantize == "fp8" and self.dtype == "float32":
            raise ValueError("FLUX_QUANTIZE=fp8 needs FLUX_DTYPE=bfloat16 (or auto): fp8 matmuls cannot produce "
                             "float32 outputs with a bias")
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError("FLUX_RAY_MIN_REPLICAS must be ≤ FLUX_RAY_MAX_REPLICAS")
        if self.result_store == "s3" and not self.s3_bucket:
            raise ValueError("FLUX_RESULT_STORE=s3 needs FLUX_S3_BUCKET")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("FLUX_S3_ACCESS_KEY_ID and FLUX_S3_SECRET_ACCESS_KEY go together")
        if self.max_connections_per_client >= self.max_connections:
            raise ValueError(f"FLUX_MAX_CONNECTIONS_PER_CLIENT ({self.max_connections_per_client}) must be below "
                             f"FLUX_MAX_CONNECTIONS ({self.max_connections}): one client must meet its own limit "
                             "before the server's")
        largest_body = max(self.max_body_bytes, self.max_edit_body_bytes)
        if self.body_memory_bytes < 4 * largest_body:
            raise ValueError(f"FLUX_BODY_MEMORY_BYTES ({self.body_memory_bytes}) must be at least 4 × the largest body "
                             f"limit ({largest_body}, FLUX_MAX_BODY_BYTES / FLUX_MAX_EDIT_BODY_BYTES): one client may "
                             "hold half of it, and a body reserves twice its size")
        if self.max_streams_per_client > self.max_connections_per_client:
            raise ValueError("FLUX_MAX_STREAMS_PER_CLIENT must be ≤ FLUX_MAX_CONNECTIONS_PER_CLIENT")
        return self

    # --- sections: what each layer reads (fluxserve.config) -----------------------------------------
    def _section(self, section: type[SectionT]) -> SectionT:
        """``section`` filled from the fields of the same names (lists become tuples: sections are frozen)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(section)}  # type: ignore[arg-type]
        return section(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})

    @cached_property
    def http(self) -> HttpConfig:
        """The HTTP layer's section: keys, CORS, connection and body budgets, request limits."""
        return self._section(HttpConfig)

    @cached_property
    def scheduler(self) -> SchedulerConfig:
        """The job queue's section: queue bounds, batching, timeouts, results' budget."""
        return self._section(SchedulerConfig)

    @cached_property
    def engine(self) -> EngineConfig:
        """The engine's section: device, precision, memory modes, optimizations (sent to worker processes)."""
        return self._section(EngineConfig)

    @cached_property
    def storage(self) -> StorageConfig:
        """The storage layer's section: outputs, url files, job and result stores."""
        return self._section(StorageConfig)

    @cached_property
    def webhooks(self) -> WebhooksConfig:
        """The webhook deliveries' section."""
        return self._section(WebhooksConfig)

    @cached_property
    def observability(self) -> ObservabilityConfig:
        """Logging and metrics."""
        return self._section(ObservabilityConfig)

    @cached_property
    def distributed(self) -> DistributedConfig:
        """The Ray Serve layer's section."""
        return self._section(DistributedConfig)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Settings:
        """A copy with ``update`` applied; its sections are built anew from its own fields."""
        copied = super().model_copy(update=update, deep=deep)
        for name in SECTIONS:
            copied.__dict__.pop(name, None)  # a section cached on the original describes the original
        return copied

    # --- helpers -------------------------------------------------------------------------------
    def all_api_keys(self) -> list[str]:
        """Keys from FLUX_API_KEYS, FLUX_API_KEYS_FILE and FLUX_ADMIN_KEYS together."""
        return read_api_keys(self.api_keys, self.api_keys_file, self.admin_keys)

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict that is safe to log or to show in /v1/models."""
        data = self.model_dump(mode="json")
        data["hf_token"] = "***" if self.hf_token else None
        data["api_keys"] = ["***"] * len(self.api_keys)
        data["admin_keys"] = ["***"] * len(self.admin_keys)
        data["job_store"] = redact_dsn(self.job_store)
        for secret in ("s3_access_key_id", "s3_secret_access_key", "webhook_secret"):
            data[secret] = "***" if getattr(self, secret) else None
        return data

    @property
    def lora_library_dir(self) -> Path:
        """Where the LoRA library lives (FLUX_LORA_DIR, default ``FLUX_CACHE_DIR/loras``)."""
        return lora_library_dir(self.lora_dir, self.cache_dir)

    def hf_token_value(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None


def _is_device_name(value: str, *, allow_auto: bool) -> bool:
    if value in {"cpu", "mps", "cuda"} or (allow_auto and value == "auto"):
        return True
    kind, sep, index = value.partition(":")
    return kind in {"cuda", "mps"} and bool(sep) and index.isdigit()


def env_var_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    field = Settings.model_fields.get(field_name)
    if field is None and any(isinstance(f.validation_alias, AliasChoices) and field_name in f.validation_alias.choices
                             for f in Settings.model_fields.values()):
        return field_name  # pydantic reports an aliased field by the alias it was given (FLUX_PORT, not port)
    if field is not None and isinstance(field.validation_alias, AliasChoices):
        first = field.validation_alias.choices[0]
        if isinstance(first, str):
            return first
    return ENV_PREFIX + field_name.upper()


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment/.env plus explicit overrides (e.g. CLI flags).

    Raises :class:`SettingsError` with one line per bad variable, naming it and what it allows.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            name = env_var_name(loc[0]) if loc else "settings"
            value = err.get("input")
            secret = bool(loc) and loc[0] in {"hf_token", "api_keys", "admin_keys", "job_store", "webhook_secret",
                                              "s3_access_key_id", "s3_secret_access_key"}
            shown = "" if isinstance(value, dict) or secret else f"={value!r}"
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{name}{shown}: {message}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
