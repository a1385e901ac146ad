"""Settings: one object, built once at start from YAML plus EMBEDDING_* environment overrides.

Nothing else in the package reads the environment or config files; the settings object is passed
down. An invalid value fails at start with a message that names the key (and the variable that set it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Trust X-Forwarded-* from these proxy addresses (uvicorn's forwarded_allow_ips).
    forwarded_allow_ips: str = "127.0.0.1"
    docs_enabled: bool = True
    # On SIGTERM/SIGINT: stop accepting, then give queued and in-flight requests this long to finish.
    shutdown_grace_seconds: float = Field(30, ge=0)
    # FastAPI's native OpenTelemetry spans and metrics, for a process where an OpenTelemetry SDK
    # provider is configured. Off by default: even with no provider, FastAPI looks up the global
    # providers on every request (~7% of the event loop's time per request, profiled); /metrics
    # (Prometheus) is always there. The endpoints called directly (api/responses.py FastJSONRoute:
    # the embedding routes) get the request's span, not FastAPI's per-endpoint sub-spans.
    opentelemetry: bool = False
    # HTTP front-end processes (tkr_embed/frontends.py). 1: one process does everything. More: each
    # front end parses, authenticates, tokenises and answers requests, and one engine process runs
    # the batcher and the model for all of them. One process spends ~0.6 ms of Python per request,
    # which caps it near 1,000-1,600 single-item requests/s however fast the GPU is
    # (docs/benchmarks.md); on a 2-core CPU machine the model is the limit and 1 is right.
    frontends: int = Field(1, ge=1, le=64)


class ModelSettings(_Section):
    # A local directory, a Hugging Face repo id, or pkg://<python package>/<dir inside it>.
    path: str = "OpenSearch-AI/Ops-MM-embedding-v1-7B"
    # The id clients see (and use as the OpenAI "model"); defaults to the repo id or directory name.
    name: str | None = None
    revision: str | None = None
    quantization: Literal["auto", "q4", "q8", "none"] = "auto"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    # Other names clients may use for this model (the OpenAI API's "model" field).
    aliases: list[str] = []
    # Longest input in tokens (prompt template and image tokens included); None = the model's own limit.
    max_tokens: int | None = Field(None, ge=8)
    # Qwen2-VL image budget, in pixels; None = the family default (Ops-MM 256*28*28, GME 4*28*28).
    min_pixels: int | None = Field(None, ge=28 * 28)
    max_pixels: int | None = Field(None, ge=28 * 28)
    download_dir: str | None = None
    # Loaded at start and never evicted (the default model always is); False: loaded on first use.
    preload: bool = True


class EngineSettings(_Section):
    # One batch's budget: padded sequence length x items (image tokens included), or the real
    # tokens where batches run packed (pack_sequences). 0 = by backend: 8192 on GPUs, 4096 on
    # MLX's CPU backend (engine/batcher.py says why).
    max_batch_tokens: int = Field(0, ge=0)
    max_batch_items: int = Field(64, ge=1)
    # Real / padded tokens a batch keeps at least: lower mixes lengths more (bigger batches, more padding).
    min_padding_efficiency: float = Field(0.75, ge=0.0, le=1.0)
    # Items waiting for the worker; beyond this requests get 503 + Retry-After.
    max_queue_items: int = Field(4096, ge=1)
    # Threads that tokenise and decode images (never touch MLX); 0 = one per core.
    cpu_threads: int = Field(0, ge=0)
    # A request whose new items are text only, this many characters in all or fewer, is tokenised
    # on the event loop: ~0.35 us a character, no more than the hand-off to the pool and back
    # costs (engine/service.py). 0 = always in the pool.
    inline_prepare_chars: int = Field(256, ge=0)
    # MLX's CPU backend: split each batch across this many CPU streams (engine/shards.py);
    # 0 = one per core on Linux, 1 elsewhere. Ignored on Metal and CUDA.
    cpu_shards: int = Field(0, ge=0)
    # MLX's CPU backend: run batches on this many replica processes, each a copy of the model on
    # one core taking whole batches of its own, instead of splitting each batch across CPU
    # streams (engine/replicas.py says why). 0 = auto: one per core on Linux for models that run
    # packed sequences (small BERT-family text encoders), none otherwise; 1 = none.
    cpu_replicas: int = Field(0, ge=0)
    # MLX's CPU backend: MiB of freed buffers kept for reuse (engine/buffer_cache.py); MLX's own
    # limit there is 32 MiB, less than one batch. 0 = auto: an eighth of memory, 256 MiB to 4 GiB.
    cpu_buffer_cache_mb: int = Field(0, ge=0)
    # Pad each batch to one of a few sizes and lengths (engine/shapes.py): a new batch shape costs
    # MLX's CUDA backend a one-off 0.1-0.3 s. auto = on for CUDA only; on/off force it.
    shape_buckets: Literal["auto", "on", "off"] = "auto"
    # With shape buckets: padded lengths per power of two (4: up to 25% padding, 8: up to 12.5%,
    # twice as many shapes to compile once).
    length_buckets: int = Field(4, ge=1, le=64)
    # Trace a model's decoder with mx.compile, once per batch shape (Qwen2-VL embedders): fused
    # element-wise ops, less graph building. auto = on for CUDA, as shape_buckets (each new shape
    # costs a trace, so only where shapes are few).
    compile: Literal["auto", "on", "off"] = "auto"
    # Run a batch's sequences packed end to end, without padding, where the model and backend can
    # (BERT-family text encoders on MLX's CPU backend with the native kernels: models/packed_bert.py).
    # Same vectors; mixed lengths no longer pad to the longest. false: always padded batches.
    pack_sequences: bool = True
    retry_after_seconds: int = Field(1, ge=1)

    @field_validator("shape_buckets", "compile", mode="before")
    @classmethod
    def _switch(cls, v):
        # YAML (and env values parsed as YAML) read a bare off/on as false/true.
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v


class CacheSettings(_Section):
    enabled: bool = True
    max_size: int = Field(10000, ge=1)
    ttl_seconds: float = Field(3600, gt=0)


class LimitSettings(_Section):
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_items_per_request: int = Field(256, ge=1)
    max_text_chars: int = Field(32768, ge=1)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # Decoded pixels per image, checked before decoding (decompression bombs).
    max_image_pixels: int = Field(40_000_000, ge=1)
    allowed_image_formats: list[str] = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]

    @field_validator("allowed_image_formats")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [f.upper() for f in v]


class ImageURLSettings(_Section):
    """Fetching images by http(s) URL in /v1/embeddings (data: URIs always work)."""

    enabled: bool = False
    # Hosts that may be fetched: exact names, or "*.example.com" for subdomains. Empty: none.
    allowlist: list[str] = []
    max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    timeout_seconds: float = Field(10, gt=0)
    # Private, loopback and link-local addresses are refused (SSRF). Only for servers whose
    # images live on a trusted LAN.
    allow_private_networks: bool = False


class SecuritySettings(_Section):
    require_api_key: bool = True
    # The master admin key. Set it through EMBEDDING_API_KEY, not in a file.
    api_key: SecretStr | None = None
    # With a server secret, stored key digests are HMAC-SHA256 (a copied database cannot be
    # checked offline). Set through EMBEDDING_KEY_SECRET. Changing it invalidates every key.
    key_secret: SecretStr | None = None
    # SQLAlchemy URL of the key store; default: sqlite:///<data_dir>/keys.db
    database_url: SecretStr | None = None
    # Accept ?api_key=... Off by default: query strings end up in proxy logs and browser history.
    allow_query_key: bool = False
    # /info needs a key (any permission) when auth is on.
    info_requires_auth: bool = True
    # /metrics: "loopback" (open to 127.0.0.1/::1, an admin key from elsewhere), "admin" (always an
    # admin key), or "open" (anyone who can reach the port; for a scraper on a private network).
    metrics_access: Literal["loopback", "admin", "open"] = "loopback"


class RateLimitSettings(_Section):
    enabled: bool = True
    per_minute: int = Field(60, ge=1)
    per_hour: int = Field(1000, ge=1)
    per_day: int = Field(10000, ge=1)
    burst: int = Field(10, ge=1)  # requests allowed within any one second
    # limits storage: memory:// (one process) or redis://host:port (shared by replicas)
    storage_uri: SecretStr = SecretStr("memory://")

    @field_validator("storage_uri")
    @classmethod
    def _scheme(cls, v: SecretStr) -> SecretStr:
        uri = v.get_secret_value()
        if not uri.startswith(("memory://", "redis://", "rediss://", "redis+sentinel://", "redis+cluster://")):
            raise ValueError("must be memory:// or a redis:// URL")
        return v


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: str | None = None
    # json: one JSON object per line; text: readable; auto: json in production, text otherwise.
    format: Literal["auto", "json", "text"] = "auto"
    # One line per request (logger tkr_embed.access, level INFO).
    access: bool = True


class PoolSettings(_Section):
    # MLX memory the models may hold together; past it, the least recently used idle model that is
    # not preloaded is unloaded before another loads. None: no budget.
    memory_budget_mb: float | None = Field(None, gt=0)


class Settings(_Section):
    environment: Literal["development", "production", "testing"] = "production"
    debug: bool = False
    server: ServerSettings = ServerSettings()
    model: ModelSettings = ModelSettings()
    # More models served beside `model` (the default), each addressed by its name or an alias.
    models: list[ModelSettings] = []
    pool: PoolSettings = PoolSettings()
    engine: EngineSettings = EngineSettings()
    cache: CacheSettings = CacheSettings()
    limits: LimitSettings = LimitSettings()
    image_urls: ImageURLSettings = ImageURLSettings()
    security: SecuritySettings = SecuritySettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    logging: LoggingSettings = LoggingSettings()
    # Where the server keeps its state (key store, downloaded models); relative to the config file.
    data_dir: str = "data"

    @model_validator(mode="after")
    def _never_open_on_a_public_address(self) -> "Settings":
        if not self.security.require_api_key and not is_loopback(self.server.host):
            raise ValueError(
                f"security.require_api_key is false but server.host is {self.server.host}: without API keys "
                "the server only binds to a loopback address (127.0.0.1, ::1, localhost)"
            )
        return self

    @model_validator(mode="after")
    def _frontends_share_state(self) -> "Settings":
        if self.server.frontends == 1:
            return self
        if self.models:
            raise ValueError("server.frontends > 1 serves the default model only; remove `models` "
                             "or set server.frontends: 1")
        rl = self.rate_limit
        if rl.enabled and rl.storage_uri.get_secret_value().startswith("memory://"):
            raise ValueError("server.frontends > 1 needs rate limits every front end shares: set "
                             "rate_limit.storage_uri to a redis:// URL, or rate_limit.enabled: false "
                             "(memory:// counts per process, so each client would get frontends x the limit)")
        return self

    @property
    def database_url(self) -> str:
        if self.security.database_url is not None:
            return self.security.database_url.get_secret_value()
        return f"sqlite:///{Path(self.data_dir) / 'keys.db'}"


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the key."""


# The seed README's variables, mapped onto settings keys. Any key can also be set with
# EMBEDDING__SECTION__KEY (double underscores), e.g. EMBEDDING__ENGINE__MAX_BATCH_ITEMS=32.
ENV_ALIASES: dict[str, str] = {
    "EMBEDDING_ENV": "environment",
    "EMBEDDING_DEBUG": "debug",
    "EMBEDDING_HOST": "server.host",
    "EMBEDDING_PORT": "server.port",
    "EMBEDDING_FRONTENDS": "server.frontends",
    "EMBEDDING_MODEL_PATH": "model.path",
    "EMBEDDING_MODEL_NAME": "model.name",
    "EMBEDDING_QUANTIZATION": "model.quantization",
    "EMBEDDING_DEVICE": "model.device",
    "EMBEDDING_MAX_TOKENS": "model.max_tokens",
    "EMBEDDING_CACHE_ENABLED": "cache.enabled",
    "EMBEDDING_CACHE_SIZE": "cache.max_size",
    "EMBEDDING_CACHE_TTL": "cache.ttl_seconds",
    "EMBEDDING_MAX_BATCH_TOKENS": "engine.max_batch_tokens",
    "EMBEDDING_MAX_BATCH_ITEMS": "engine.max_batch_items",
    "EMBEDDING_MAX_QUEUE_ITEMS": "engine.max_queue_items",
    "EMBEDDING_LOG_LEVEL": "logging.level",
    "EMBEDDING_LOG_FILE": "logging.file",
    "EMBEDDING_DATA_DIR": "data_dir",
    "EMBEDDING_API_KEY": "security.api_key",
    "EMBEDDING_KEY_SECRET": "security.key_secret",
    "EMBEDDING_REQUIRE_API_KEY": "security.require_api_key",
    "EMBEDDING_DATABASE_URL": "security.database_url",
    "EMBEDDING_RATE_LIMIT_ENABLED": "rate_limit.enabled",
    "EMBEDDING_RATE_LIMIT_RPM": "rate_limit.per_minute",
    "EMBEDDING_RATE_LIMIT_RPH": "rate_limit.per_hour",
    "EMBEDDING_RATE_LIMIT_RPD": "rate_limit.per_day",
    "EMBEDDING_RATE_LIMIT_BURST": "rate_limit.burst",
    "EMBEDDING_RATE_LIMIT_STORAGE": "rate_limit.storage_uri",
}


# Values taken from the environment verbatim (secrets and URLs are strings, whatever they look like).
RAW_STRING_KEYS = {"security.api_key", "security.key_secret", "security.database_url", "rate_limit.storage_uri",
                   "model.path", "model.name", "server.host"}


def _set_path(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[leaf] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """dotted key -> (raw value, variable name)."""
    out: dict[str, tuple[str, str]] = {}
    for var, value in env.items():
        if var in ENV_ALIASES:
            out[ENV_ALIASES[var]] = (value, var)
        elif var.startswith("EMBEDDING__"):
            out[var[len("EMBEDDING__"):].lower().replace("__", ".")] = (value, var)
    return out


def _parse_env_value(raw: str) -> Any:
    # YAML scalars give "true" -> True, "8000" -> 8000, "[a, b]" -> list; pydantic checks the type.
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def load_settings(
    config_file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings: YAML file, then EMBEDDING_* variables, then explicit overrides (CLI flags)."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = config_file or env.get("EMBEDDING_CONFIG")
    base_dir = Path.cwd()
    if path:
        p = Path(path)
        if not p.is_file():
            raise SettingsError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SettingsError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {p} must hold a mapping at the top level")
        data = loaded
        base_dir = p.resolve().parent
    sources: dict[str, str] = {}
    for dotted, (raw, var) in _env_overrides(env).items():
        _set_path(data, dotted, raw if dotted in RAW_STRING_KEYS else _parse_env_value(raw))
        sources[dotted] = var
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, dotted, value)
            sources[dotted] = "command line"
    # A model name in the file belongs to the file's model: when the path comes from elsewhere
    # (environment, command line) and the name does not, the name is derived from the new path.
    if "model.path" in sources and "model.name" not in sources and isinstance(data.get("model"), dict):
        data["model"].pop("name", None)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            origin = f" (from {sources[key]})" if key in sources else ""
            problems.append(f"{key}{origin}: {err['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
    # Relative data_dir is relative to the config file, so a service started elsewhere finds it.
    if not Path(settings.data_dir).is_absolute():
        settings.data_dir = str((base_dir / settings.data_dir).resolve())
    return settings
