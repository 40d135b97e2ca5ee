"""Configuration reload (SIGHUP): validate the new file, then say what changed.

The new file is validated in full before anything changes; an invalid file
leaves the daemon on its running configuration, with an ERROR naming each
problem. Queued files are never lost by a reload: the queue lives in the
state store, which a reload does not touch (``state_file`` changes need a
restart and are reported as such).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvm_upload.config import Config, load_config
from tvm_upload.errors import ConfigError

logger = logging.getLogger(__name__)

TRIGGER_KEYS = (
    "upload.schedule",
    "upload.operational_hours",
    "upload.batch_upload",
    "upload.upload_on_start",
    "timezone",
)
RESTART_KEYS = ("state_file",)


@dataclass(frozen=True)
class ReloadPlan:
    """A validated new configuration and which parts of it differ from the running one."""

    config: Config
    changed: list[str]
    directories_added: list[str]
    directories_removed: list[str]

    @property
    def s3_changed(self) -> bool:
        return any(key.startswith("s3.") for key in self.changed)

    @property
    def trigger_changed(self) -> bool:
        return any(key.startswith(prefix) for key in self.changed for prefix in TRIGGER_KEYS)

    @property
    def summary(self) -> str:
        if not self.changed:
            return "nothing changed"
        parts = [f"changed {', '.join(self.changed)}"]
        if self.directories_added:
            parts.append(f"watching {', '.join(self.directories_added)}")
        if self.directories_removed:
            parts.append(f"no longer watching {', '.join(self.directories_removed)}")
        return "; ".join(parts)


def load_reload(path: Path, running: Config) -> ReloadPlan | None:
    """Load and validate ``path``; return the plan, or None (logged) when it is invalid."""
    try:
        config = load_config(path)
    except ConfigError as error:
        logger.error(
            "Kept the running configuration because the reloaded file is invalid: %s", error
        )
        return None

    ignored = [key for key in RESTART_KEYS if getattr(config, key) != getattr(running, key)]
    if ignored:
        logger.warning(
            "Ignored a change of %s: it takes effect after a restart", ", ".join(ignored)
        )
        config = config.model_copy(update={key: getattr(running, key) for key in ignored})

    old_dirs = {str(d.path) for d in running.log_directories}
    new_dirs = {str(d.path) for d in config.log_directories}
    return ReloadPlan(
        config=config,
        changed=changed_keys(running.model_dump(mode="json"), config.model_dump(mode="json")),
        directories_added=sorted(new_dirs - old_dirs),
        directories_removed=sorted(old_dirs - new_dirs),
    )


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Return the dotted key paths whose values differ between two dumped configurations."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [
            change
            for key in keys
            for change in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    if old != new:
        return [prefix.rstrip(".")]
    return []
