"""The one settings object: every ``RUNLEDGER_*`` environment variable, read once.

Defaults point at the embedded stack that ``runledger dev up`` starts, so a
laptop needs no configuration; production sets the URLs of real servers and
drops their names from ``RUNLEDGER_EMBEDDED``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Component", "Settings"]

Component = Literal["kafka", "postgres", "redis"]


class Settings(BaseSettings):
    """runledger configuration. Each field is read from ``RUNLEDGER_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix="RUNLEDGER_", frozen=True, extra="forbid")

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:19092", description="RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS: host:port[,host:port...]"
    )
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
        "postgresql://postgres@127.0.0.1:15432/runledger", description="RUNLEDGER_DATABASE_URL"
    )
    db_schema: str = Field(
        "runledger", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="RUNLEDGER_DB_SCHEMA: PostgreSQL schema of the projection tables",
    )
    consumer_group: str = Field(
        "runledger-projector", description="RUNLEDGER_CONSUMER_GROUP: Kafka group of the projection workers"
    )
    redis_url: str = Field("redis://127.0.0.1:16379/0", description="RUNLEDGER_REDIS_URL")
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
        30.0, gt=0, description="RUNLEDGER_PRODUCER_WAIT_S: how long an append waits for a busy stream"
    )
    producer_sweep_s: float = Field(
        5.0, ge=0,
        description="RUNLEDGER_PRODUCER_SWEEP_S: how often producers and workers publish batches left staged by "
        "a producer that failed or died (0: never)",
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
    checkpoint_origin: str = Field(
        "runledger.local/log", min_length=1, pattern=r"^[^\s+]+$",
        description="RUNLEDGER_CHECKPOINT_ORIGIN: the log's name in its checkpoints and signatures")

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("embedded", mode="before")
    @classmethod
    def _split_components(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.events"

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
