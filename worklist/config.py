"""Settings: read once from the environment, validated at start-up.

Every field says its unit and default. Secrets never appear in a repr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from worklist.errors import ConfigurationError

DEV_SECRET = "dev-only-not-secret"


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    # Where the embedded default keeps its SQLite file (and nothing else of value).
    instance_path: Path = Path("instance")
    # SQLAlchemy URL; default: SQLite file `<instance_path>/worklist.db`.
    database_url: str = ""
    # "development" (embedded default) or "production" (secrets required).
    environment: str = "development"
    # Signs browser sessions and CSRF tokens. Required in production.
    secret_key: str = field(default=DEV_SECRET, repr=False)
    # Local timezone of the region: HL7 times without an offset are in it.
    timezone: str = "Europe/London"
    # MLLP listener bind address and port (IANA HL7 port 2575).
    hl7_host: str = "127.0.0.1"
    hl7_port: int = 2575
    # Largest HL7 message accepted, in bytes; larger ones get AR.
    hl7_max_message_bytes: int = 4 * 1024 * 1024
    # An idle MLLP connection is closed after this many seconds.
    hl7_idle_timeout_seconds: float = 600.0
    # This service's own HL7 identity (MSH-3/MSH-4 of what we send).
    hl7_application: str = "REGIONAL_WORKLIST"
    hl7_facility: str = "GMIC"
    # HL7 processing id we accept and send (MSH-11): P production, T training, D debugging.
    hl7_processing_id: str = "P"
    # TLS for the MLLP listener: server certificate and key (PEM); with a client CA, senders
    # must present a certificate it signed. Empty = plain TCP.
    hl7_tls_cert: str = ""
    hl7_tls_key: str = ""
    hl7_tls_client_ca: str = ""
    # Processes applying stored messages per listener (PostgreSQL; each trust stays in order).
    hl7_apply_workers: int = 1
    # A claim is a lease: minutes before an untouched claim returns to the pool.
    claim_lease_minutes: int = 30
    # Scheduler leader lease (SQLite) in seconds; PostgreSQL uses an advisory lock.
    scheduler_lease_seconds: int = 30
    # How often the scheduler's jobs run, in seconds.
    reprioritise_interval_seconds: int = 60
    expire_claims_interval_seconds: int = 30
    deliver_interval_seconds: float = 2.0
    auto_assign_interval_seconds: int = 60
    # SQLAlchemy pool size per process (PostgreSQL).
    db_pool_size: int = 5
    # A JSON prioritisation rules document (`worklist rules defaults` prints the shape);
    # empty = the built-in UK defaults. Re-read when the file changes.
    priority_rules_path: str = ""

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.instance_path / 'worklist.db').resolve()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from WORKLIST_* variables; raise ConfigurationError on nonsense."""
        env = os.environ if environ is None else environ

        def get(name: str, default: str) -> str:
            return env.get(f"WORKLIST_{name}", default)

        try:
            settings = cls(
                instance_path=Path(get("INSTANCE_PATH", "instance")),
                database_url=get("DATABASE_URL", ""),
                environment=get("ENV", "development"),
                secret_key=get("SECRET_KEY", ""),
                timezone=get("TIMEZONE", "Europe/London"),
                hl7_host=get("HL7_HOST", "127.0.0.1"),
                hl7_port=int(get("HL7_PORT", "2575")),
                hl7_max_message_bytes=int(get("HL7_MAX_MESSAGE_BYTES", str(4 * 1024 * 1024))),
                hl7_idle_timeout_seconds=float(get("HL7_IDLE_TIMEOUT_SECONDS", "600")),
                hl7_application=get("HL7_APPLICATION", "REGIONAL_WORKLIST"),
                hl7_facility=get("HL7_FACILITY", "GMIC"),
                hl7_processing_id=get("HL7_PROCESSING_ID", "P"),
                hl7_tls_cert=get("HL7_TLS_CERT", ""),
                hl7_tls_key=get("HL7_TLS_KEY", ""),
                hl7_tls_client_ca=get("HL7_TLS_CLIENT_CA", ""),
                hl7_apply_workers=int(get("HL7_APPLY_WORKERS", "1")),
                claim_lease_minutes=int(get("CLAIM_LEASE_MINUTES", "30")),
                scheduler_lease_seconds=int(get("SCHEDULER_LEASE_SECONDS", "30")),
                db_pool_size=int(get("DB_POOL_SIZE", "5")),
                priority_rules_path=get("PRIORITY_RULES", ""),
            )
        except ValueError as exc:
            raise ConfigurationError(f"a WORKLIST_* setting is not a number: {exc}") from exc
        return settings.validated()

    def validated(self) -> Settings:
        """Refuse settings that would run unsafely; fill the development secret."""
        if self.environment not in {"development", "production", "test"}:
            raise ConfigurationError(
                f"WORKLIST_ENV must be development, production or test, not {self.environment!r}"
            )
        if not self.secret_key:
            if self.is_production:
                raise ConfigurationError(
                    "WORKLIST_SECRET_KEY must be set in production (WORKLIST_ENV=production)"
                )
            object.__setattr__(self, "secret_key", DEV_SECRET)
        if self.is_production and self.secret_key == DEV_SECRET:
            raise ConfigurationError("WORKLIST_SECRET_KEY must not be the development secret")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError(f"unknown timezone {self.timezone!r}") from exc
        if not 0 < self.hl7_port < 65536 and self.hl7_port != 0:
            raise ConfigurationError(f"HL7 port {self.hl7_port} is out of range")
        for name in ("hl7_tls_cert", "hl7_tls_key", "hl7_tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigurationError(
                    f"WORKLIST_{name.upper()} names {path!r}, which is not a file"
                )
        if (self.hl7_tls_key or self.hl7_tls_client_ca) and not self.hl7_tls_cert:
            raise ConfigurationError("HL7 TLS needs WORKLIST_HL7_TLS_CERT (the server certificate)")
        if self.hl7_apply_workers < 1:
            raise ConfigurationError("WORKLIST_HL7_APPLY_WORKERS must be 1 or more")
        if self.priority_rules_path and not Path(self.priority_rules_path).is_file():
            raise ConfigurationError(
                f"WORKLIST_PRIORITY_RULES names {self.priority_rules_path!r}, which is not a file"
            )
        if self.claim_lease_minutes <= 0:
            raise ConfigurationError("WORKLIST_CLAIM_LEASE_MINUTES must be positive")
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)
