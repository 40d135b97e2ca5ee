"""Configuration reload (SIGHUP): validate the new file, then log what changed.

The new file is validated in full before anything changes, including
building the S3 client when the ``s3`` section changed. An invalid file
leaves the daemon on its running configuration, with an ERROR naming each
problem. A reload never touches the state store, so the queue survives it,
except for the rows of files that no configured directory accepts any more
(a removed directory, a narrower pattern): those leave the queue, because
nothing outside the configured directories is uploaded. ``state_file``
changes need a restart and are reported as such.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvm_upload.config import Config, load_config
from tvm_upload.errors import ConfigError, TvmUploadError
from tvm_upload.intake import Intake, directory_of
from tvm_upload.state import FileState, StateStore
from tvm_upload.uploader import Uploader

logger = logging.getLogger(__name__)

TRIGGER_KEYS = (
    "upload.schedule",
    "upload.operational_hours",
    "upload.batch_upload",
    "upload.upload_on_start",
    "timezone",
)
RESTART_KEYS = ("state_file",)
EXAMPLES_LOGGED = 3


@dataclass(frozen=True)
class ReloadPlan:
    """A validated new configuration and which parts of it differ from the running one.

    ``uploader`` is a new uploader for the new ``s3`` settings, or None when
    they did not change.
    """

    config: Config
    changed: list[str]
    directories_added: list[str]
    directories_removed: list[str]
    uploader: Uploader | None = None

    @property
    def s3_changed(self) -> bool:
        return any(key.startswith("s3.") for key in self.changed)

    @property
    def trigger_changed(self) -> bool:
        return any(key.startswith(prefix) for key in self.changed for prefix in TRIGGER_KEYS)

    @property
    def directories_changed(self) -> bool:
        """True when a log directory was added, removed or has other settings."""
        return any(key.startswith("log_directories") for key in self.changed)

    @property
    def summary(self) -> str:
        """One line for the log: the changed keys and the directories (un)watched."""
        if not self.changed:
            return "nothing changed"
        parts = [f"changed {', '.join(self.changed)}"]
        if self.directories_added:
            parts.append(f"watching {', '.join(self.directories_added)}")
        if self.directories_removed:
            parts.append(f"no longer watching {', '.join(self.directories_removed)}")
        return "; ".join(parts)


def load_reload(path: Path, running: Config) -> ReloadPlan | None:
    """Load and validate ``path``; return the plan, or None (logged at ERROR) when it is invalid."""
    try:
        config = load_config(path)
    except ConfigError as error:
        _log_rejected(path, error)
        return None

    ignored = [key for key in RESTART_KEYS if getattr(config, key) != getattr(running, key)]
    if ignored:
        logger.warning(
            "Ignored a change of %s: it takes effect after a restart", ", ".join(ignored)
        )
        config = config.model_copy(update={key: getattr(running, key) for key in ignored})

    changed = changed_keys(running.model_dump(mode="json"), config.model_dump(mode="json"))
    uploader = None
    if any(key.startswith("s3.") for key in changed):
        try:
            uploader = Uploader.from_config(config)
        except TvmUploadError as error:
            _log_rejected(path, error)
            return None

    old_dirs = {str(d.path) for d in running.log_directories}
    new_dirs = {str(d.path) for d in config.log_directories}
    return ReloadPlan(
        config=config,
        changed=changed,
        directories_added=sorted(new_dirs - old_dirs),
        directories_removed=sorted(old_dirs - new_dirs),
        uploader=uploader,
    )


def _log_rejected(path: Path, error: TvmUploadError) -> None:
    """Log one ERROR line naming every problem, so one journal line shows what to fix."""
    problems = error.problems if isinstance(error, ConfigError) else [str(error)]
    logger.error(
        "Kept the running configuration because the reloaded file %s is invalid: %s",
        path,
        "; ".join(problems),
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


def rescope_files(config: Config, intake: Intake, store: StateStore) -> list[Path]:
    """Fit files not yet uploaded to the log directories of ``config``; return those dropped.

    Watcher events still waiting, files waiting to become ready and ready files
    not queued yet carry the directory they were found in. They get their
    directory in ``config``, so a renamed source reaches the object key, or
    are forgotten when no directory accepts them any more. Pending and failed
    queue rows of such files leave the queue. Uploads already running are
    left to finish.
    """
    _rescope_events(config, intake)
    intake.release_unqueued()
    for path in intake.stability.tracked():
        directory = directory_of(config, path)
        if directory is None:
            intake.stability.forget(path)
        else:
            intake.stability.observe(path, directory)

    dropped = _drop_unaccepted_rows(config, store)
    if dropped:
        logger.info(
            "Removed %d files from the queue because no configured log directory accepts"
            " them any more, for example %s",
            len(dropped),
            ", ".join(str(path) for path in dropped[:EXAMPLES_LOGGED]),
        )
    return dropped


def _rescope_events(config: Config, intake: Intake) -> None:
    waiting = []
    while True:
        try:
            waiting.append(intake.events.get_nowait())
        except queue.Empty:
            break

    for path, _ in waiting:
        directory = directory_of(config, path)
        if directory is not None:
            intake.events.put((path, directory))


def _drop_unaccepted_rows(config: Config, store: StateStore) -> list[Path]:
    dropped = []
    for state in (FileState.PENDING, FileState.FAILED):
        for record in list(store.files_in_state(state)):
            if directory_of(config, record.path) is None:
                store.remove(record.id)
                dropped.append(record.path)
    return dropped
