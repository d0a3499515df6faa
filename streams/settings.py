"""The one settings object: every ``RUNLEDGER_*`` environment variable, read once.

Defaults point at the embedded stack that ``runledger dev up`` starts, so a
laptop needs no configuration; production sets the URLs of real servers and
drops their names from ``RUNLEDGER_EMBEDDED``.

No password is a setting: each secret is a file (``RUNLEDGER_*_PASSWORD_FILE``, docker secrets in compose.yaml),
read when a connection is made, so that no environment (``docker inspect``), URL or ``repr`` shows it. Each
component logs in to PostgreSQL as its own role (``database_dsn``): the owner (migrations, operator commands),
the worker, the producers' ``wait``, Grafana's reader and ``runledger serve``'s API.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from runledger.schemas.errors import PermanentError

__all__ = ["Component", "DatabaseLogin", "DATABASE_ROLES", "DATABASE_PASSWORD_FILES", "Settings", "SecretMissing",
           "redact_url"]

Component = Literal["kafka", "postgres", "redis"]
DatabaseLogin = Literal["owner", "worker", "producer", "reader", "api", "admin"]

# The LOGIN role of each component (sql/roles.sql creates them, the migrations grant to them). The owner's login
# is the user RUNLEDGER_DATABASE_URL names (runledger_owner in compose and the embedded stack), the admin's
# RUNLEDGER_DATABASE_ADMIN_USER.
DATABASE_ROLES: dict[DatabaseLogin, str] = {"owner": "runledger_owner", "worker": "runledger_worker",
                                           "producer": "runledger_producer", "reader": "grafana",
                                           "api": "runledger_api"}
# The setting that names each login's password file.
DATABASE_PASSWORD_FILES: dict[DatabaseLogin, str] = {
    "owner": "database_password_file", "worker": "database_worker_password_file",
    "producer": "database_producer_password_file", "reader": "database_reader_password_file",
    "api": "database_api_password_file", "admin": "database_admin_password_file"}
# scheme://user:password@host: the password runs to the authority's last @ (an unencoded @ in it included).
_USERINFO = re.compile(r"(?<=://)([^/@:\s]*):([^/\s]*)@")


def _with_login(url: str, user: str, password: str | None) -> str:
    """``url`` with ``user`` and ``password`` (percent-encoded) in place of the login it names."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    userinfo = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}" if userinfo else host))


class SecretMissing(PermanentError):
    """A secret a setting names cannot be read: the message names the setting and the file. Mount the secret
    (compose.yaml's ``secrets:``) or point the setting at the file that holds it."""

    code = "secret_missing"


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it (``scheme://user:password@host``) written as ``***``."""
    return _USERINFO.sub(lambda m: f"{m[1]}:***@", text)


class Settings(BaseSettings):
    """runledger configuration. Each field is read from ``RUNLEDGER_<FIELD NAME>``."""

    # hide_input_in_errors: a refused value is not repeated (a password set in the wrong variable by mistake).
    model_config = SettingsConfigDict(env_prefix="RUNLEDGER_", frozen=True, extra="forbid", hide_input_in_errors=True)

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:19092", description="RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS: host:port[,host:port...]"
    )
    kafka_sasl_username: str | None = Field(
        None, min_length=1, description="RUNLEDGER_KAFKA_SASL_USERNAME: log in to Kafka with SASL as this user, "
        "its password in RUNLEDGER_KAFKA_SASL_PASSWORD_FILE (unset: no authentication, the embedded broker)")
    kafka_sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="RUNLEDGER_KAFKA_SASL_MECHANISM: SCRAM-SHA-512 (compose.yaml), SCRAM-SHA-256, "
        "or PLAIN (over TLS only)")
    kafka_sasl_password_file: Path | None = Field(
        None, description="RUNLEDGER_KAFKA_SASL_PASSWORD_FILE: the file holding the Kafka SASL password")
    kafka_tls: bool = Field(
        False, description="RUNLEDGER_KAFKA_TLS: talk to Kafka over TLS (SSL, or SASL_SSL with a SASL user)")
    kafka_tls_cafile: Path | None = Field(
        None, description="RUNLEDGER_KAFKA_TLS_CAFILE: the CA certificates Kafka's are checked against (default: "
        "the system's)")
    topic_prefix: str = Field(
        "runledger", pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="RUNLEDGER_TOPIC_PREFIX: topics are <prefix>.events, <prefix>.events.retry.<delay>, ...; "
        "also prefixes Redis keys",
    )
    event_partitions: int = Field(8, ge=1, description="RUNLEDGER_EVENT_PARTITIONS: partitions of a new log topic; "
                                  "a worker refuses to start on a log topic with fewer")
    retry_retention_ms: int = Field(
        7 * 24 * 3600 * 1000, ge=1, description="RUNLEDGER_RETRY_RETENTION_MS: how long a new retry topic keeps a "
        "record (default 7 days: a record waits there seconds; a PostgreSQL outage must not copy the log into "
        "them for ever); the log, dead-letter and checkpoint topics keep theirs for ever")
    topic_replication_factor: int = Field(
        1, ge=1, description="RUNLEDGER_TOPIC_REPLICATION_FACTOR: replicas of each new topic (3 on a Kafka cluster "
        "of three brokers or more: the log is the record)")
    database_url: str = Field(
        "postgresql://runledger_owner@127.0.0.1:15432/runledger",
        description="RUNLEDGER_DATABASE_URL: where PostgreSQL is, and the owner's login (migrations and operator "
        "commands); the other components log in to the same server and database as their own roles. Its password "
        "belongs in RUNLEDGER_DATABASE_PASSWORD_FILE, not in the URL")
    database_password_file: Path | None = Field(
        None, description="RUNLEDGER_DATABASE_PASSWORD_FILE: the owner's password (default <state dir>/secrets/"
        "database-password, which the embedded stack writes)")
    database_worker_password_file: Path | None = Field(
        None, description="RUNLEDGER_DATABASE_WORKER_PASSWORD_FILE: the password of runledger_worker, the workers' "
        "login (default <state dir>/secrets/database-worker-password)")
    database_producer_password_file: Path | None = Field(
        None, description="RUNLEDGER_DATABASE_PRODUCER_PASSWORD_FILE: the password of runledger_producer, the login "
        "of a producer's `wait` (default <state dir>/secrets/database-producer-password)")
    database_reader_password_file: Path | None = Field(
        None, description="RUNLEDGER_DATABASE_READER_PASSWORD_FILE: the password `runledger db roles` gives grafana, "
        "the dashboards' login (default <state dir>/secrets/database-reader-password)")
    database_api_password_file: Path | None = Field(
        None, description="RUNLEDGER_DATABASE_API_PASSWORD_FILE: the password of runledger_api, the login of "
        "`runledger serve` (reads the projection, the proofs and the sources; writes nothing) (default <state dir>/"
        "secrets/database-api-password)")
    database_admin_user: str = Field(
        "postgres", min_length=1, description="RUNLEDGER_DATABASE_ADMIN_USER: the superuser `runledger db roles` "
        "logs in as, on the server and database of RUNLEDGER_DATABASE_URL")
    database_admin_password_file: Path | None = Field(
        None, description="RUNLEDGER_DATABASE_ADMIN_PASSWORD_FILE: that superuser's password (default <state dir>/"
        "secrets/database-admin-password; the embedded stack's superuser needs none on loopback)")
    db_schema: str = Field(
        "runledger", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="RUNLEDGER_DB_SCHEMA: PostgreSQL schema of the projection tables",
    )
    consumer_group: str = Field(
        "runledger-projector", description="RUNLEDGER_CONSUMER_GROUP: Kafka group of the projection workers"
    )
    redis_url: str = Field("redis://127.0.0.1:16379/0", description="RUNLEDGER_REDIS_URL: its password belongs in "
                           "RUNLEDGER_REDIS_PASSWORD_FILE")
    redis_password_file: Path | None = Field(
        None, description="RUNLEDGER_REDIS_PASSWORD_FILE: the file holding Redis' password (requirepass)")
    retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        (1.0, 2.0, 4.0, 8.0, 16.0), description="RUNLEDGER_RETRY_DELAYS: seconds, comma-separated, e.g. 1,2,4,8,16"
    )
    embedded: Annotated[frozenset[Component], NoDecode] = Field(
        frozenset({"kafka", "postgres", "redis"}),
        description="RUNLEDGER_EMBEDDED: which services `runledger dev up` starts, comma-separated "
        "(empty: none, every URL points at a real server)",
    )
    kafka_storage: Literal["s3", "memory"] = Field(
        "s3", description="RUNLEDGER_KAFKA_STORAGE: where the embedded broker keeps the log: s3 (on disk under the "
        "state dir, in runledger's log store: Tansu's S3 engine over SQLite) or memory (lost when it stops)")
    log_store_fsync: bool = Field(
        False, description="RUNLEDGER_LOG_STORE_FSYNC: the embedded log store syncs every write to disk before "
        "answering (survives a power loss, not only a kill -9 of any process, at about half the produce rate)")
    state_dir: Path = Field(Path(".runledger"), description="RUNLEDGER_STATE_DIR: embedded stack data and logs")
    producer_source: str = Field(
        "/producers/runledger", description="RUNLEDGER_PRODUCER_SOURCE: CloudEvents `source` of produced events"
    )
    producer_lease_ms: int = Field(
        5000, ge=100,
        description="RUNLEDGER_PRODUCER_LEASE_MS: how long one producer holds a stream's append lease; "
        "a producer that dies holding it blocks that stream at most this long",
    )
    producer_wait_s: float = Field(
        30.0, gt=0, description="RUNLEDGER_PRODUCER_WAIT_S: how long an append waits for a busy stream, and for "
        "the chain heads' recovery from the log after Redis lost them"
    )
    producer_sweep_s: float = Field(
        5.0, ge=0,
        description="RUNLEDGER_PRODUCER_SWEEP_S: how often the elected producer or worker publishes batches left "
        "staged by a producer that failed or died and moves the heads' checkpoints (0: this process never sweeps)",
    )
    checkpoint_key: Path | None = Field(
        None, description="RUNLEDGER_CHECKPOINT_KEY: the Ed25519 signer key of the transparency log's checkpoints "
        "(`runledger keys init` writes it; default <state dir>/checkpoint.key, its verifier key beside it as .pub)")
    checkpoint_interval_s: float = Field(
        60.0, ge=0, description="RUNLEDGER_CHECKPOINT_INTERVAL_S: how often a signer round signs the log "
        "partitions that grew (in one worker per interval, and in `runledger signer`; 0: not in workers)")
    metrics_host: str = Field(
        "127.0.0.1", min_length=1, description="RUNLEDGER_METRICS_HOST: the address a worker serves its Prometheus "
        "metrics on (0.0.0.0 to be scraped from other hosts)")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="RUNLEDGER_METRICS_PORT: the port a worker serves /metrics on; the next "
        "free one of the 20 from it if taken (several workers on one host); 0: no metrics endpoint")
    db_lock_timeout_s: float = Field(
        5.0, gt=0, description="RUNLEDGER_DB_LOCK_TIMEOUT_S: how long a worker's statement waits for a lock (the "
        "apply lock, a stream's, a partition's tree row) before its batch rolls back and is tried again in place "
        "(PostgreSQL's lock_timeout)")
    db_idle_in_transaction_timeout_s: float = Field(
        10.0, gt=0, description="RUNLEDGER_DB_IDLE_IN_TRANSACTION_TIMEOUT_S: PostgreSQL ends a worker's session that "
        "sits this long inside a transaction without sending a statement (a process frozen mid-batch), releasing "
        "its locks (idle_in_transaction_session_timeout)")
    db_keepalives_idle_s: int = Field(
        10, ge=1, description="RUNLEDGER_DB_KEEPALIVES_IDLE_S: PostgreSQL probes a silent worker connection after "
        "this many seconds (tcp_keepalives_idle)")
    db_keepalives_interval_s: int = Field(
        5, ge=1, description="RUNLEDGER_DB_KEEPALIVES_INTERVAL_S: then once every this many seconds "
        "(tcp_keepalives_interval)")
    db_keepalives_count: int = Field(
        3, ge=1, description="RUNLEDGER_DB_KEEPALIVES_COUNT: and drops it after this many probes unanswered "
        "(tcp_keepalives_count); data it sent that stays unacknowledged as long drops it too (tcp_user_timeout)")
    worker_session_timeout_s: float = Field(
        6.0, ge=1, description="RUNLEDGER_WORKER_SESSION_TIMEOUT_S: a worker that stops sending Kafka heartbeats "
        "(one every third of it) this long loses its partitions to the others (the consumers' session.timeout.ms; "
        "Kafka's group.min.session.timeout.ms, 6 s by default, is the least a broker accepts)")
    test_stop_after_locks: bool = Field(
        False, description="RUNLEDGER_TEST_STOP_AFTER_LOCKS: tests only: a worker stops itself (SIGSTOP) once, in "
        "its first batch, after the batch has taken its locks and before it commits: a frozen worker on cue")
    sources_key_file: Path | None = Field(
        None, description="RUNLEDGER_SOURCES_KEY_FILE: the AES-256-GCM key the HTTP sources' secrets are encrypted "
        "with in PostgreSQL (`runledger sources init-key` writes it, mode 0600, as does the first `sources add`; "
        "default <state dir>/secrets/sources-key); every `serve` replica and the operator's `sources` commands "
        "need the same one")
    http_max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="RUNLEDGER_HTTP_MAX_BODY_BYTES: the largest request body `runledger "
        "serve` reads (default 16 MiB): a longer one is refused with 413 from its Content-Length, or as soon as "
        "that many bytes have arrived, before it is read whole. Each event is held to 512 KiB besides")
    http_start_retry_s: float = Field(
        2.0, gt=0, description="RUNLEDGER_HTTP_START_RETRY_S: how often `serve`, started while Kafka or Redis is "
        "unavailable, tries to reach them again (it answers appends and /readyz with 503 meanwhile)")
    http_timestamp_tolerance_s: int = Field(
        300, ge=1, le=300, description="RUNLEDGER_HTTP_TIMESTAMP_TOLERANCE_S: how far a signed request's "
        "webhook-timestamp may be from the server's clock (at most, and by default, 5 minutes: Standard Webhooks)")
    webhook_retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        (1.0, 2.0, 4.0, 8.0, 16.0), description="RUNLEDGER_WEBHOOK_RETRY_DELAYS: seconds before each retry of a "
        "failed delivery, comma-separated (one retry each: after the last, the delivery is dead)")
    webhook_retry_jitter: float = Field(
        0.1, ge=0, le=1, description="RUNLEDGER_WEBHOOK_RETRY_JITTER: each delay is drawn within this fraction of "
        "itself, above or below (receivers that failed together are not retried together)")
    webhook_retry_after_cap_s: float = Field(
        300.0, ge=0, description="RUNLEDGER_WEBHOOK_RETRY_AFTER_CAP_S: the longest Retry-After a receiver's answer "
        "is honoured for (a longer one waits this long)")
    webhook_allow_private: bool = Field(
        False, description="RUNLEDGER_WEBHOOK_ALLOW_PRIVATE: deliver webhooks over http and to loopback, private, "
        "link-local and metadata addresses too (development and tests only; by default https to public addresses)")
    webhook_disable_after_s: float = Field(
        86_400.0, gt=0, description="RUNLEDGER_WEBHOOK_DISABLE_AFTER_S: an endpoint whose deliveries have failed for "
        "longer than this (default 24 h) is disabled, and an alert raised; `runledger webhooks enable` delivers "
        "what it missed, in order")
    webhook_concurrency: int = Field(
        8, ge=1, le=1000, description="RUNLEDGER_WEBHOOK_CONCURRENCY: requests a delivery worker has open to one "
        "endpoint at most (each stream's events go one after the other whatever this is)")
    webhook_connect_timeout_s: float = Field(
        5.0, gt=0, description="RUNLEDGER_WEBHOOK_CONNECT_TIMEOUT_S: how long a delivery waits to connect")
    webhook_timeout_s: float = Field(
        15.0, gt=0, description="RUNLEDGER_WEBHOOK_TIMEOUT_S: how long a delivery waits for the whole answer")
    checkpoint_origin: str = Field(
        "runledger.local/log", min_length=1, pattern=r"^[^\s+]+$",
        description="RUNLEDGER_CHECKPOINT_ORIGIN: the log's name in its checkpoints and signatures")

    @field_validator("retry_delays", "webhook_retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_retry_delays")
    @classmethod
    def _delays_not_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 <= d < 86_400 for d in value):
            raise ValueError("each delay is 0 to 86,400 seconds")
        return value

    @field_validator("embedded", mode="before")
    @classmethod
    def _split_components(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) else value

    def secret_path(self, setting: str) -> Path:
        """Where the ``*_file`` setting ``setting`` looks for its secret: the file it names, or by default
        ``<state dir>/secrets/<its name>`` (``database_worker_password_file``: ``database-worker-password``), where the
        embedded stack writes it."""
        path: Path | None = getattr(self, setting)
        return path or self.state_dir / "secrets" / setting.removesuffix("_file").replace("_", "-")

    def secret(self, setting: str) -> SecretStr | None:
        """The secret in the file of ``secret_path(setting)``, without its final newline; read now (a rotated secret
        is read again on the next connection). None if the setting is unset and its default file does not exist.
        Raises SecretMissing if a file that was set cannot be read."""
        path = self.secret_path(setting)
        try:
            return SecretStr(path.read_text().removesuffix("\n"))
        except FileNotFoundError:
            if getattr(self, setting) is None:
                return None
            raise SecretMissing(f"RUNLEDGER_{setting.upper()}: {path} does not exist") from None
        except OSError as e:
            raise SecretMissing(f"RUNLEDGER_{setting.upper()}: cannot read {path}: {e}") from None

    def database_dsn(self, login: DatabaseLogin = "owner") -> str:
        """The URL ``login`` connects with: RUNLEDGER_DATABASE_URL's server, database and parameters, that login's
        user, and its password from its secret file. Never print it (``redact_url``)."""
        parts = urlsplit(self.database_url)
        if login == "owner":
            user = unquote(parts.username or "")
        else:
            user = self.database_admin_user if login == "admin" else DATABASE_ROLES[login]
        secret = self.secret(DATABASE_PASSWORD_FILES[login])
        password = secret.get_secret_value() if secret is not None else None
        if password is None and login == "owner" and parts.password:
            password = unquote(parts.password)
        return _with_login(self.database_url, user, password)

    def role_passwords(self) -> dict[str, str]:
        """The password of each LOGIN role ``runledger db roles`` creates, by role name. Raises SecretMissing if
        one has none."""
        out = {}
        for login, role in DATABASE_ROLES.items():
            setting = DATABASE_PASSWORD_FILES[login]
            secret = self.secret(setting)
            if secret is None or not secret.get_secret_value():
                raise SecretMissing(f"{role} has no password: write one to {self.secret_path(setting)} or set "
                                    f"RUNLEDGER_{setting.upper()}")
            out[role] = secret.get_secret_value()
        return out

    @property
    def redis_dsn(self) -> str:
        """RUNLEDGER_REDIS_URL with the password of RUNLEDGER_REDIS_PASSWORD_FILE. Never print it (``redact_url``)."""
        secret = self.secret("redis_password_file")
        if secret is None:
            return self.redis_url
        return _with_login(self.redis_url, unquote(urlsplit(self.redis_url).username or ""), secret.get_secret_value())

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.events"

    @property
    def db_session(self) -> dict[str, str]:
        """The PostgreSQL session settings of the connections that act as the worker role, which bound how long
        they wait for a lock, and how long a stopped or vanished client keeps its locks and its connection."""
        dead_after_s = self.db_keepalives_idle_s + self.db_keepalives_interval_s * self.db_keepalives_count
        return {"lock_timeout": f"{round(self.db_lock_timeout_s * 1000)}ms",
                "idle_in_transaction_session_timeout": f"{round(self.db_idle_in_transaction_timeout_s * 1000)}ms",
                "tcp_keepalives_idle": str(self.db_keepalives_idle_s),
                "tcp_keepalives_interval": str(self.db_keepalives_interval_s),
                "tcp_keepalives_count": str(self.db_keepalives_count),
                "tcp_user_timeout": str(dead_after_s * 1000)}

    @property
    def checkpoint_key_path(self) -> Path:
        return self.checkpoint_key or self.state_dir / "checkpoint.key"

    @property
    def checkpoints_topic(self) -> str:
        return f"{self.topic_prefix}.checkpoints"

    def port_of(self, component: Component) -> int:
        """The port a component's URL names (the first bootstrap server, for Kafka)."""
        if component == "kafka":
            host_port = self.kafka_bootstrap_servers.split(",")[0].strip()
            return int(host_port.rsplit(":", 1)[1])
        url = self.database_url if component == "postgres" else self.redis_url
        port = urlsplit(url).port
        if port is None:
            raise ValueError(f"{url!r} names no port")
        return port
