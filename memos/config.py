"""Daemon configuration: etc/memosd.toml, overridden by MEMOS_* variables.

Precedence, highest first: arguments given in code (command-line flags),
environment variables (``MEMOS_DAEMON__SOCKET``; ``__`` separates sections),
the TOML file (``MEMOS_CONFIG`` or ``--config`` names another one), defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, create_model, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .backends import check_storage
from .catalog_retention import RetentionRules
from .errors import ConfigError
from .memtypes import MemoryType, load_types
from .validation import Limits


def default_runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "memos" if base else Path(f"/tmp/memos-{os.getuid()}")


def default_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "memos"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "memos"


class DaemonSettings(BaseModel):
    socket: Path | None = Field(None, description="ipc socket path; default: memosd.sock in the runtime dir.")
    runtime_dir: Path = Field(default_factory=default_runtime_dir, description="Private 0700 folder for sockets and the lock.")
    data_dir: Path = Field(default_factory=default_data_dir, description="Folder of the LMDB store.")
    max_message_bytes: int = Field(64 << 20, ge=1 << 10, description="Largest request accepted; larger ones get too_large.")
    read_workers: int = Field(4, ge=1, le=256, description="Threads serving read requests concurrently.")
    max_group: int = Field(256, ge=1, description="Most writes made durable in one group commit.")
    allow_uids: list[int] = Field(default_factory=list, description="Other local users allowed to connect; "
                                  "they must present an agent token. Needs socket_group.")
    uid_agents: dict[int, str] = Field(default_factory=dict, description="Other local users allowed to connect "
                                       "without a token, each acting as the agent named (the kernel vouches for "
                                       "the uid). Needs socket_group.")
    socket_group: str | int | None = Field(None, description="Group (name or gid) that may reach the socket: "
                                           "its folder becomes 0710 and the socket 0660 of that group. Without "
                                           "it only this user can connect.")
    require_token: bool = Field(False, description="Every client, this user's included, must present a token; "
                                "the administrator's is kept in admin_token_file.")
    admin_token_file: Path = Field(default_factory=lambda: default_config_dir() / "admin.token",
                                   description="Where memosd keeps the administrator's token (0600) when "
                                   "require_token is on; memosctl reads it.")
    listen: list[str] = Field(default_factory=list, description="tcp endpoints (tcp://HOST:PORT) served beside "
                              "the ipc socket, with CURVE: encrypted, and every client must present a token. "
                              "The server key pair is made in data_dir (curve.key, curve.key.pub).")
    curve_clients: list[str] = Field(default_factory=list, description="z85 public keys of the clients allowed on "
                                     "the tcp endpoints; empty: any client key (its token still decides).")
    max_watchers: int = Field(256, ge=1, le=65_536, description="Most clients following events at once.")
    request_retention_s: float = Field(86_400, ge=0, le=10 * 365 * 86_400, description="How long replies are kept for idempotent retries.")
    log_level: str = Field("INFO", description="Logging level.")
    policies: Path | None = Field(None, description="Policies' schedules and thresholds; default: etc/policies.toml.")
    governance: Path | None = Field(None, description="Rules of rollback; default: etc/governance.toml.")
    clock_file: Path | None = Field(None, description="For tests and demonstrations only: read the daemon's "
                                    "wall clock from this file (seconds since the epoch). See memos.clock.")

    @field_validator("listen")
    @classmethod
    def _tcp_only(cls, endpoints: list[str]) -> list[str]:
        for endpoint in endpoints:  # only tcp: other transports would bypass both the uid check and CURVE
            if not endpoint.startswith("tcp://"):
                raise ValueError(f"listen takes tcp://HOST:PORT endpoints, not {endpoint!r}")
        return endpoints

    @field_validator("curve_clients")
    @classmethod
    def _z85_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key) != 40:
                raise ValueError(f"curve_clients takes z85 public keys of 40 characters, not {key!r}")
        return keys

    def socket_path(self) -> Path:
        return self.socket or self.runtime_dir / "memosd.sock"


class StoreSettings(BaseModel):
    map_size: int = Field(64 << 30, description="Initial LMDB map size in bytes (sparse; grows when full).")


class AuditSettings(BaseModel):
    """Signed checkpoints of the audit chain (memos.checkpoints, docs/audit.md)."""

    # Both files live outside the data folder: whoever can rewrite the store must not reach them.
    signing_key: Path | None = Field(None, description="Ed25519 private key (PEM, mode 0600), made on first "
                                     "start; default: $XDG_CONFIG_HOME/memos/audit-signing.key. Its public "
                                     "key is written beside it as <key>.pub.")
    checkpoint_file: Path | None = Field(None, description="Append-only file of signed checkpoints, one JSON "
                                         "line each; default: audit-checkpoints.jsonl beside the key.")
    checkpoint_every_s: float = Field(300, gt=0, description="How often memosd signs the audit head (when it "
                                      "moved); once more at a clean shutdown.")

    def key_path(self) -> Path:
        return (self.signing_key or default_config_dir() / "audit-signing.key").expanduser()

    def checkpoint_path(self) -> Path:
        return (self.checkpoint_file or self.key_path().parent / "audit-checkpoints.jsonl").expanduser()


class Settings(BaseSettings):
    """Everything memosd reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="MEMOS_", env_nested_delimiter="__", extra="ignore")

    storage: str = Field("lmdb", description="Where the store lives: \"lmdb\", one file in data_dir, or a "
                         "postgresql:// URL, which several daemons may share (docs/storage.md). "
                         "MEMOS_STORAGE overrides it.")
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    limits: Limits = Field(default_factory=Limits)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    retention: RetentionRules = Field(default_factory=RetentionRules,
                                      description="Default rules of history retention (cube_compact).")
    # Each memory type with settings adds its own section (see settings_class).

    @field_validator("storage")
    @classmethod
    def _known_storage(cls, storage: str) -> str:
        try:
            return check_storage(storage)
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, _config_file()))


_explicit_file: Path | None = None


def _config_file() -> Path:
    if _explicit_file is not None:
        return _explicit_file
    named = os.environ.get("MEMOS_CONFIG")
    if named:
        return Path(named)
    return Path(str(resources.files("memos.etc") / "memosd.toml"))


def settings_class(types: Mapping[str, type[MemoryType]]) -> type[Settings]:
    """Settings with a section for each memory type that has settings (``[search]`` for plaintext...)."""
    sections: dict[str, Any] = {}
    for name, cls in types.items():
        if cls.settings_model is not None:
            section = type_section(cls)
            sections[section] = (cls.settings_model, Field(default_factory=cls.settings_model,
                                                           description=f"Settings of the {name} memory type."))
    return create_model("Settings", __base__=Settings, **sections) if sections else Settings


def type_section(cls: type[MemoryType]) -> str:
    return cls.config_section or cls.name


def type_settings(settings: Settings, cls: type[MemoryType]) -> BaseModel | None:
    """A memory type's own section of the settings."""
    return None if cls.settings_model is None else getattr(settings, type_section(cls))


def load(config: str | os.PathLike[str] | None = None, types: Mapping[str, type[MemoryType]] | None = None,
         **overrides: Any) -> Settings:
    """Read settings from ``config`` (or the default file), the environment and overrides.

    ``types``: memory-type classes whose sections to read; default: every registered one.
    """
    global _explicit_file
    if config is not None and not Path(config).is_file():
        from .errors import InvalidRequest

        raise InvalidRequest(f"config file {config} does not exist")
    cls = settings_class(load_types() if types is None else types)
    _explicit_file = Path(config) if config is not None else None
    try:
        return cls(**overrides)
    finally:
        _explicit_file = None
