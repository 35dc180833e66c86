"""Runtime settings from the environment, validated once at start-up.

A bad value is reported as one line naming the variable and what is expected (``ConfigError``);
the CLI prints it without a traceback.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError
from worker.redis_conn import RedisUrlError, is_sentinel_url, parse_sentinel_url

DEFAULT_DATABASE_URL = "sqlite:///keyrotor.db"


_DIGITS = re.compile(r"[0-9]+")
REDIS_URL_FORMS = ("expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB, unix:///PATH?db=DB or "
                   "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME/DB")


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, in one line that never repeats it (it may hold a password).

    redis-py quietly falls back to database 0 when the path is not a number (``redis://h/abc``):
    two deployments meant to be apart would then share one database, so anything it would not read
    exactly as written is refused here. Sentinel URLs are checked by ``parse_sentinel_url``.
    """
    if is_sentinel_url(url):
        try:
            parse_sentinel_url(url)
        except RedisUrlError as exc:
            return str(exc)
        return None
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss", "unix"}:
        return REDIS_URL_FORMS
    if parsed.scheme == "unix":
        if not parsed.path or parsed.path == "/":
            return "a unix:// URL needs the socket's path: unix:///PATH?db=DB"
        path_db = ""
    else:
        if not parsed.hostname:
            return REDIS_URL_FORMS
        try:
            parsed.port
        except ValueError:
            return "the port is not a number between 0 and 65535; " + REDIS_URL_FORMS
        path_db = parsed.path.removeprefix("/")
        if path_db and not _DIGITS.fullmatch(path_db):
            return f"the database {path_db!r} is not a number; " + REDIS_URL_FORMS
    query_db = parse_qs(parsed.query).get("db", [])
    if any(not _DIGITS.fullmatch(db) for db in query_db) or len(query_db) > 1:
        return "the db query parameter must be one number (db=N)"
    if query_db and path_db and int(query_db[0]) != int(path_db):
        return f"two databases: {path_db} in the path and {query_db[0]} in ?db=; give one"
    return None


#: Default metrics ports by process role (KEYROTOR_METRICS_PORT overrides both).
DEFAULT_METRICS_PORTS = {"worker": 9108, "scheduler": 9109}


class Settings(BaseSettings):
    """Every knob keyrotor reads from the environment. See ``config/settings.md``."""

    # populate_by_name: overrides by field name (load_settings(vault_addr=...)) work on every
    # pydantic-settings the range allows, not only on those that accept them without it.
    model_config = SettingsConfigDict(env_prefix="KEYROTOR_", extra="ignore", frozen=True, populate_by_name=True)

    database_url: str = Field(DEFAULT_DATABASE_URL, description="SQLAlchemy URL: sqlite:///FILE or postgresql://...")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the Dramatiq broker, locks and rate limits")
    config: Path | None = Field(None, description="Inventory YAML file (providers, keys, integrations, policies)")

    vault_addr: str | None = Field(None, validation_alias=AliasChoices("VAULT_ADDR", "KEYROTOR_VAULT_ADDR"))
    vault_token: str | None = Field(None, validation_alias=AliasChoices("VAULT_TOKEN", "KEYROTOR_VAULT_TOKEN"), repr=False)
    vault_namespace: str | None = Field(None, validation_alias=AliasChoices("VAULT_NAMESPACE", "KEYROTOR_VAULT_NAMESPACE"))
    vault_cacert: Path | None = Field(None, validation_alias=AliasChoices("VAULT_CACERT", "KEYROTOR_VAULT_CACERT"))
    vault_skip_verify: bool = Field(False, validation_alias=AliasChoices("VAULT_SKIP_VERIFY", "KEYROTOR_VAULT_SKIP_VERIFY"),
                                    description="turn off TLS verification of Vault (refused in production)")
    env: Literal["production", "development"] = Field(
        "production", description="production refuses turning TLS verification off (Vault, providers, integrations)")
    vault_k8s_role: str | None = Field(None, description="Kubernetes auth role; used when VAULT_TOKEN is unset")
    vault_k8s_mount: str = "kubernetes"
    vault_k8s_jwt_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    vault_mount: str = Field("secret", description="KV v2 mount holding managed keys")
    vault_staging_prefix: str = Field("keyrotor/staging", description="Where issued keys wait before promotion")
    vault_deposit_prefix: str = Field("keyrotor/deposits", description="Where owners write credentials they created (assisted mode), one path per key: <prefix>/<key slug> on KEYROTOR_VAULT_MOUNT")
    vault_timeout_s: float = Field(10.0, gt=0)

    # Kubernetes API (integrations of kind kubernetes_secret). Unset API server: in-cluster config
    # (the pod's service account). The override exists for tests and for a worker outside the cluster.
    k8s_api_server: str | None = Field(None, description="Kubernetes API server URL; unset = in-cluster service account")
    k8s_token: str | None = Field(None, repr=False, description="Bearer token with KEYROTOR_K8S_API_SERVER")
    k8s_token_path: Path | None = Field(None, description="File holding the bearer token (read on every client build)")
    k8s_ca_cert: Path | None = Field(None, description="CA bundle of the API server with KEYROTOR_K8S_API_SERVER")
    k8s_timeout_s: float = Field(10.0, gt=0, description="Timeout of one Kubernetes API request")
    k8s_restart_settle_s: float = Field(5.0, ge=0, description="Quiet time after the last Secret write before a workload is restarted")
    k8s_batch_max_wait_s: float = Field(600.0, gt=0, description="Longest a workload restart waits for other runs of its batch to write their Secrets")
    k8s_rollout_poll_s: float = Field(5.0, gt=0, description="How often verification looks at a restart's rollout")

    queue_namespace: str = Field("keyrotor", description="Dramatiq namespace (Redis key prefix)")
    broker_heartbeat_timeout_s: float = Field(15.0, ge=2, le=3600, description="A worker silent this long is dead: its unacknowledged and delayed messages go back to live workers")
    request_stream_claim_idle_s: float = Field(30.0, ge=1, le=86400, description="A rotation request a worker read from the stream but has not acknowledged for this long (it died) is claimed by another worker")
    http_timeout_s: float = Field(15.0, gt=0, description="Timeout of one call to a provider or integration")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port (0 = off); unset: worker 9108, scheduler 9109")
    metrics_max_key_series: int = Field(500, ge=0, le=100_000, description="Most keys the scheduler exports per-key expiry/due series for (soonest due first)")
    metrics_collect_timeout_s: float = Field(2.0, gt=0, le=30, description="Timeout of the Redis/database reads behind the queue and key metrics at scrape time")

    # Database connection pool (PostgreSQL; SQLite ignores them). Per process: size + overflow.
    db_pool_size: int = Field(5, ge=1, le=1000, description="Connections each process keeps open to PostgreSQL")
    db_max_overflow: int = Field(10, ge=0, le=1000, description="Extra connections a process may open under load, closed when returned")
    db_pool_timeout_s: float = Field(30.0, gt=0, description="How long a thread waits for a free pooled connection before failing")
    db_pool_recycle_s: float = Field(1800.0, ge=-1, description="Reconnect pooled connections older than this (-1 = never)")
    db_ping_idle_s: float = Field(5.0, ge=0, description="Ping a pooled connection before use only if it sat idle this long (0 = before every use); a busy worker reuses its connections within milliseconds, and a dead one among them fails one step, which is retried")
    db_application_name: str = Field("keyrotor", max_length=63, description="application_name shown in pg_stat_activity (the chart sets keyrotor-worker/-scheduler/-migrate)")
    db_prepared_statements: bool = Field(True, description="false behind PgBouncer in transaction pooling mode (psycopg prepare_threshold=None)")

    # Scheduler (jobs/scheduler.py): intervals of the jobs, the leader lock, the reconciler's limits.
    step_max_retries: int = Field(8, ge=0, le=50, description="Retries of one pipeline step before the run fails over (rollback / needs_attention)")
    step_min_backoff_s: float = Field(2.0, gt=0, description="First retry delay of a step (doubles, jittered)")
    step_max_backoff_s: float = Field(300.0, gt=0, description="Longest retry delay of a step")
    step_time_limit_s: float = Field(120.0, ge=1, description="Time limit of one execution of one step")
    activation_timeout_s: float = Field(120.0, gt=0, description="How long precheck waits for a new key to go live")
    activation_poll_s: float = Field(2.0, gt=0, description="How often precheck asks whether a new key is live")
    scheduler_detection_interval_s: float = Field(60.0, gt=0, description="How often due keys are looked for")
    scheduler_reconcile_interval_s: float = Field(120.0, gt=0, description="How often stuck runs and orphans are looked for")
    scheduler_retirement_interval_s: float = Field(60.0, gt=0, description="How often runs past their grace period are retired")
    scheduler_orphan_interval_s: float = Field(900.0, gt=0, description="How often providers' key lists are scanned for orphans")
    scheduler_reminder_interval_s: float = Field(3600.0, gt=0, description="How often reminders for keys rotated by a person are checked")
    scheduler_lock_ttl_s: float = Field(30.0, ge=1, description="TTL of the scheduler's Redis leader lock (renewed every third of it)")
    scheduler_batch_size: int = Field(500, ge=1, description="Most keys one detection pass requests a rotation for")
    reconcile_max_attempts: int = Field(5, ge=1, description="Re-enqueues of a stuck run before it goes to needs_attention")
    reconcile_step_timeout_s: float = Field(900.0, gt=0, description="Deadline given to a step the reconciler re-enqueues")
    orphan_min_age_s: float = Field(600.0, ge=0, description="A provider key named after a run is only revoked once this old")
    reminder_lead_time_s: float = Field(14 * 86400.0, ge=0, description="Remind owners of manually rotated keys this long before due")
    reminder_repeat_s: float = Field(86400.0, gt=0, description="Least time between two reminders for one key")
    scheduler_deposit_interval_s: float = Field(60.0, gt=0, description="How often owners' deposit paths in Vault are read (assisted mode); reminders and deposit deadlines are checked then too")
    scheduler_liveness_interval_s: float = Field(300.0, gt=0, description="How often the liveness job checks a few keys' current credentials at their provider")
    scheduler_liveness_per_pass: int = Field(10, ge=1, description="Most keys one liveness pass checks")
    scheduler_retry_base_s: float = Field(900.0, gt=0, description="A still-due key whose run ended is tried again this long after (doubling per further run)")
    scheduler_retry_max_s: float = Field(6 * 3600.0, gt=0, description="Longest wait before a still-due key is tried again")
    notify_timeout_s: float = Field(10.0, gt=0, description="Timeout of one notification delivery")
    notify_attempts: int = Field(3, ge=1, le=10, description="Delivery attempts per notification sink")

    def metrics_port_for(self, role: str) -> int:
        """KEYROTOR_METRICS_PORT when set; otherwise the role's own default, so a worker and a
        scheduler started side by side on one host do not both ask for the same port."""
        if self.metrics_port is not None:
            return self.metrics_port
        return DEFAULT_METRICS_PORTS[role]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        scheme = urlparse(value).scheme.split("+")[0]
        if scheme not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError(f"expected sqlite:///FILE or postgresql://USER@HOST/DB, got scheme {scheme or 'none'!r}")
        if value.startswith("postgres://"):
            value = "postgresql://" + value[len("postgres://") :]
        if value.startswith("postgresql://"):  # psycopg 3 is the driver we ship
            value = "postgresql+psycopg://" + value[len("postgresql://") :]
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        problem = redis_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("vault_addr")
    @classmethod
    def _vault_addr(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parsed = urlparse(value)
        if parsed.scheme not in {"http", "https"} or not parsed.hostname:
            raise ValueError("expected http(s)://HOST:PORT")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _backoff_order(self) -> "Settings":
        if self.step_min_backoff_s > self.step_max_backoff_s:
            raise ValueError("KEYROTOR_STEP_MIN_BACKOFF_S must not exceed KEYROTOR_STEP_MAX_BACKOFF_S")
        return self

    @field_validator("k8s_api_server")
    @classmethod
    def _k8s_api_server(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parsed = urlparse(value)
        if parsed.scheme not in {"http", "https"} or not parsed.hostname:
            raise ValueError("expected https://HOST:PORT")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _k8s_auth(self) -> "Settings":
        if self.k8s_api_server and not (self.k8s_token or self.k8s_token_path):
            raise ValueError("KEYROTOR_K8S_API_SERVER is set but neither KEYROTOR_K8S_TOKEN nor KEYROTOR_K8S_TOKEN_PATH is")
        return self

    @model_validator(mode="after")
    def _tls_verification(self) -> "Settings":
        if self.vault_skip_verify and self.env == "production":
            raise ValueError("VAULT_SKIP_VERIFY turns off TLS verification of Vault, which is refused when "
                             "KEYROTOR_ENV=production (the default): give Vault's CA with VAULT_CACERT instead, or set "
                             "KEYROTOR_ENV=development on a test system")
        return self

    @model_validator(mode="after")
    def _vault_auth(self) -> "Settings":
        if self.vault_addr and not (self.vault_token or self.vault_k8s_role):
            raise ValueError("VAULT_ADDR is set but neither VAULT_TOKEN nor KEYROTOR_VAULT_K8S_ROLE is")
        return self


_ENV_NAMES = {
    "vault_addr": "VAULT_ADDR",
    "vault_token": "VAULT_TOKEN",
    "vault_namespace": "VAULT_NAMESPACE",
    "vault_cacert": "VAULT_CACERT",
    "vault_skip_verify": "VAULT_SKIP_VERIFY",
}


def _env_name(field: str) -> str:
    if field.isupper():  # pydantic reports the alias (e.g. VAULT_ADDR) that carried the value
        return field
    return _ENV_NAMES.get(field, "KEYROTOR_" + field.upper())


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the environment; raise ``ConfigError`` with one line per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err.get("loc") or ()
            name = _env_name(str(loc[0])) if loc else "settings"
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            lines.append(f"{name}: {msg}")
        raise ConfigError("; ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached). Tests call ``get_settings.cache_clear()``."""
    return load_settings()
