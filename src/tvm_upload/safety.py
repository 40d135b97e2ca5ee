"""The one gate every local deletion passes: safety rules, the unlink, logging and counters.

``SafeDeleter.delete`` is the only code in tvm-upload that deletes a log
file. Whatever retention rule requests it, it deletes a path only when
all of these hold:

- the path is absolute and has no ``..`` component;
- neither its normalized nor its resolved form is in or under a protected
  system directory (``PROTECTED_DIRECTORIES``), compared by whole path
  components, so ``/varx`` is not ``/var``. This holds even when the log
  directory allows deletion;
- it lies below a configured log directory that has ``allow_deletion: true``
  and matches that directory's ``pattern``, ``exclude`` and ``recursive``;
- no component below the log directory is a symlink and the file is a
  regular file. The configured root itself may be a symlink, because the
  operator named it. Each directory is opened with ``O_NOFOLLOW`` and the
  file is unlinked relative to its parent's descriptor, so a symlink
  swapped in after the check is not followed either;
- the file is not being uploaded;
- when the caller gives the identity it expects (the uploaded one), the
  file still has it.

After a deletion, the parent directories that became empty are removed up
to, never including, the log directory's root.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
from collections.abc import Container, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Protocol

from typing_extensions import Self

from tvm_upload.config import LogDirectory
from tvm_upload.errors import StateStoreError
from tvm_upload.files import FileIdentity

logger = logging.getLogger(__name__)

PROTECTED_DIRECTORIES: tuple[PurePosixPath, ...] = tuple(
    PurePosixPath(path)
    for path in (
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/lib",
        "/lib64",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/usr",
        "/var",
    )
)

# Rejections and failures are logged once per path and kind; the memory is cleared at this size.
MAX_REMEMBERED_REJECTIONS = 10_000

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class DeletionRule(str, enum.Enum):
    """Retention rule that requests a deletion; the value names its counters."""

    AFTER_UPLOAD = "after_upload"
    AGE = "age"
    EMERGENCY = "emergency"

    @property
    def policy(self) -> str:
        """Name of the rule on the command line, as in ``cleanup --policy after-upload``."""
        return self.value.replace("_", "-")

    @classmethod
    def from_policy(cls, name: str) -> DeletionRule:
        """Return the rule named ``name`` on the command line; raise ``ValueError`` if none is."""
        for rule in cls:
            if name in (rule.policy, rule.value):
                return rule
        allowed = ", ".join(rule.policy for rule in cls)
        raise ValueError(f"Unknown retention policy {name!r}; use one of {allowed}")


class DeletionStatus(str, enum.Enum):
    """Result of ``SafeDeleter.delete`` for one path."""

    DELETED = "deleted"
    WOULD_DELETE = "would_delete"
    REJECTED = "rejected"
    VANISHED = "vanished"
    FAILED = "failed"


class Rejection(str, enum.Enum):
    """The safety rule that kept a path from being deleted."""

    NOT_NORMALIZED = "not_normalized"
    PROTECTED = "protected"
    OUTSIDE_DIRECTORIES = "outside_directories"
    DELETION_NOT_ALLOWED = "deletion_not_allowed"
    NOT_A_LOG_FILE = "not_a_log_file"
    SYMLINK = "symlink"
    NOT_A_REGULAR_FILE = "not_a_regular_file"
    IN_FLIGHT = "in_flight"
    CHANGED = "changed"


@dataclass(frozen=True)
class DeletionOutcome:
    """The result of one ``SafeDeleter.delete`` call.

    ``size`` is the file's size in bytes when it was checked (0 if it was
    never reached). ``freed_bytes`` is a lower bound of the space the unlink
    frees: 0 for a file with other hard links, otherwise the smaller of its
    size and its allocated blocks. ``identity`` is the identity found at the
    check. ``detail`` explains a rejection or a failure.
    """

    path: Path
    rule: DeletionRule
    status: DeletionStatus
    reason: str
    data_loss: bool = False
    size: int = 0
    freed_bytes: int = 0
    identity: FileIdentity | None = None
    rejection: Rejection | None = None
    detail: str = ""

    @property
    def deleted(self) -> bool:
        """True if the file was deleted, or would have been in a dry run."""
        return self.status in (DeletionStatus.DELETED, DeletionStatus.WOULD_DELETE)


class CounterSink(Protocol):
    """Counter store that deletions are counted in; ``StateStore`` is one."""

    def increment(self, name: str, by: int = 1) -> int: ...


def counter_names(rule: DeletionRule) -> tuple[str, str]:
    """Return the names of the counters of deleted files and deleted bytes for ``rule``."""
    return f"files_deleted_{rule.value}", f"bytes_deleted_{rule.value}"


DATA_LOSS_FILES = "data_loss_files"
DATA_LOSS_BYTES = "data_loss_bytes"


def protected_directory_of(
    path: PurePosixPath, protected: Sequence[PurePosixPath] = PROTECTED_DIRECTORIES
) -> PurePosixPath | None:
    """Return the protected directory that is or contains ``path``, comparing whole components."""
    for directory in protected:
        if path.parts[: len(directory.parts)] == directory.parts:
            return directory
    return None


def warn_if_protected(
    directory: LogDirectory, protected: Sequence[PurePosixPath] = PROTECTED_DIRECTORIES
) -> None:
    """Log a warning if ``directory`` allows deletion but is under a protected directory."""
    if not directory.allow_deletion:
        return

    for form in (os.path.normpath(directory.path), os.path.realpath(directory.path)):
        found = protected_directory_of(PurePosixPath(form), protected)
        if found is not None:
            logger.warning(
                "Log directory %s has allow_deletion: true, but %s is under the protected"
                " system directory %s: retention never deletes there, not even when the"
                " disk is full. Set allow_deletion: false to silence this",
                directory.path,
                form,
                found,
            )
            return


class _Rejected(Exception):
    def __init__(self, rejection: Rejection, detail: str) -> None:
        super().__init__(detail)
        self.rejection = rejection
        self.detail = detail


@dataclass(frozen=True)
class _Target:
    """A path that passed the rules on its name: its log directory and relative path."""

    directory: LogDirectory
    relative: PurePosixPath


@dataclass
class SafeDeleter:
    """Deletes log files only when every safety rule allows it; see the module docstring.

    ``counters`` receives ``files_deleted_<rule>``, ``bytes_deleted_<rule>``,
    and for deletions of files never uploaded also ``data_loss_files`` and
    ``data_loss_bytes``. ``protected`` exists for tests; keep the default.
    Not thread-safe: use one instance from one thread.
    """

    directories: Sequence[LogDirectory]
    counters: CounterSink | None = None
    protected: Sequence[PurePosixPath] = PROTECTED_DIRECTORIES
    _logged: set[tuple[Path, str]] = field(default_factory=set, init=False, repr=False)

    def delete(
        self,
        path: Path,
        rule: DeletionRule,
        *,
        reason: str,
        in_flight: Container[Path] = (),
        expected: FileIdentity | None = None,
        data_loss: bool = False,
        dry_run: bool = False,
    ) -> DeletionOutcome:
        """Delete ``path`` for ``rule`` if every safety rule allows it, then log and count it.

        ``reason`` explains the rule's request and goes into the log line.
        ``in_flight`` contains the paths being uploaded. ``expected`` is the
        identity the file must still have. ``data_loss`` marks a file that
        was never uploaded: it is logged at ERROR and counted as data loss.
        With ``dry_run`` every check runs but nothing is deleted, logged at
        INFO or counted, and the status is ``WOULD_DELETE``.
        """
        outcome = DeletionOutcome(path, rule, DeletionStatus.REJECTED, reason, data_loss)
        try:
            target = self._check_name(path)
            if path in in_flight:
                raise _Rejected(Rejection.IN_FLIGHT, "it is being uploaded")
            outcome = self._unlink(outcome, target, expected, dry_run)
        except _Rejected as rejected:
            outcome = replace(outcome, rejection=rejected.rejection, detail=rejected.detail)
        except FileNotFoundError:
            outcome = replace(outcome, status=DeletionStatus.VANISHED, detail="it no longer exists")
        except OSError as error:
            outcome = replace(outcome, status=DeletionStatus.FAILED, detail=_failure_detail(error))

        self._report(outcome)
        return outcome

    def _check_name(self, path: Path) -> _Target:
        """Apply the rules that need only the path's name and the configuration."""
        if not path.is_absolute() or ".." in path.parts:
            raise _Rejected(Rejection.NOT_NORMALIZED, "it is not an absolute path without '..'")

        for form in (PurePosixPath(os.path.normpath(path)), PurePosixPath(os.path.realpath(path))):
            protected = protected_directory_of(form, self.protected)
            if protected is not None:
                detail = f"{form} is under the protected system directory {protected}"
                raise _Rejected(Rejection.PROTECTED, detail)

        target = self._locate(path)
        name = f"log directory {target.directory.path} (source {target.directory.source})"
        if not target.directory.allow_deletion:
            raise _Rejected(Rejection.DELETION_NOT_ALLOWED, f"{name} has allow_deletion: false")
        if not target.directory.accepts(target.relative):
            detail = f"it does not match the pattern, exclude or recursive setting of {name}"
            raise _Rejected(Rejection.NOT_A_LOG_FILE, detail)
        return target

    def _locate(self, path: Path) -> _Target:
        for directory in self.directories:
            root_parts = directory.path.parts
            if len(path.parts) > len(root_parts) and path.parts[: len(root_parts)] == root_parts:
                relative = PurePosixPath(*path.parts[len(root_parts) :])
                return _Target(directory, relative)
        raise _Rejected(Rejection.OUTSIDE_DIRECTORIES, "it is outside every log directory")

    def _unlink(
        self,
        outcome: DeletionOutcome,
        target: _Target,
        expected: FileIdentity | None,
        dry_run: bool,
    ) -> DeletionOutcome:
        with _ParentDirectories(target.directory.path, target.relative) as parents:
            st = parents.lstat_file()
            identity = FileIdentity.from_stat(st)
            outcome = replace(
                outcome, size=st.st_size, freed_bytes=_freed_bytes(st), identity=identity
            )
            try:
                _check_file(st, identity, expected)
            except _Rejected as rejected:
                return replace(outcome, rejection=rejected.rejection, detail=rejected.detail)
            if dry_run:
                return replace(outcome, status=DeletionStatus.WOULD_DELETE)

            parents.unlink_file()
            removed = parents.remove_empty_parents()

        for directory in removed:
            logger.info("Removed the empty directory %s left by retention", directory)
        return replace(outcome, status=DeletionStatus.DELETED)

    def _report(self, outcome: DeletionOutcome) -> None:
        if outcome.status is DeletionStatus.DELETED:
            self._log_deletion(outcome)
            self._count(outcome)
        elif outcome.status is DeletionStatus.WOULD_DELETE:
            logger.debug(
                "Would delete %s (rule %s): %s", outcome.path, outcome.rule.value, outcome.reason
            )
        elif outcome.status is DeletionStatus.VANISHED:
            logger.debug(
                "Did not delete %s (rule %s): it no longer exists", outcome.path, outcome.rule.value
            )
        elif outcome.status is DeletionStatus.FAILED:
            level = logging.ERROR if self._first_time(outcome.path, "failed") else logging.DEBUG
            logger.log(
                level,
                "Cannot delete %s (rule %s): %s",
                outcome.path,
                outcome.rule.value,
                outcome.detail,
            )
        else:
            self._log_rejection(outcome)

    def _first_time(self, path: Path, kind: str) -> bool:
        """Remember that ``path`` was not deleted for ``kind``; tell whether that is new."""
        key = (path, kind)
        if key in self._logged:
            return False
        if len(self._logged) >= MAX_REMEMBERED_REJECTIONS:
            self._logged.clear()
        self._logged.add(key)
        return True

    @staticmethod
    def _log_deletion(outcome: DeletionOutcome) -> None:
        if outcome.data_loss:
            logger.error(
                "Deleted %s (%d bytes) before it was uploaded, by retention rule %s: %s."
                " Its data is lost",
                outcome.path,
                outcome.size,
                outcome.rule.value,
                outcome.reason,
            )
            return
        logger.info(
            "Deleted %s (%d bytes) by retention rule %s: %s",
            outcome.path,
            outcome.size,
            outcome.rule.value,
            outcome.reason,
        )

    def _log_rejection(self, outcome: DeletionOutcome) -> None:
        assert outcome.rejection is not None
        first = self._first_time(outcome.path, outcome.rejection.value)
        if not first or outcome.rejection is Rejection.IN_FLIGHT:
            level = logging.DEBUG
        elif outcome.rejection is Rejection.CHANGED:
            level = logging.INFO
        else:
            level = logging.WARNING

        logger.log(
            level,
            "Did not delete %s (rule %s): %s",
            outcome.path,
            outcome.rule.value,
            outcome.detail,
        )

    def _count(self, outcome: DeletionOutcome) -> None:
        if self.counters is None:
            return

        files, size = counter_names(outcome.rule)
        increments = [(files, 1), (size, outcome.size)]
        if outcome.data_loss:
            increments += [(DATA_LOSS_FILES, 1), (DATA_LOSS_BYTES, outcome.size)]
        try:
            for name, by in increments:
                self.counters.increment(name, by)
        except StateStoreError as error:
            logger.warning("Deletion of %s is not counted: %s", outcome.path, error)


def _failure_detail(error: OSError) -> str:
    if error.errno == errno.EROFS:
        return (
            f"{error}. The filesystem is read-only for tvm-upload; under systemd's"
            " ProtectSystem=strict the log directory must be listed in ReadWritePaths"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{error}. Give tvm-upload's user write access to the file's directory,"
            " or set allow_deletion: false for this log directory"
        )
    return str(error)


def _freed_bytes(st: os.stat_result) -> int:
    if st.st_nlink > 1:
        return 0
    return min(st.st_size, st.st_blocks * 512)


def _check_file(st: os.stat_result, identity: FileIdentity, expected: FileIdentity | None) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _Rejected(Rejection.SYMLINK, "it is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise _Rejected(Rejection.NOT_A_REGULAR_FILE, "it is not a regular file")
    if expected is not None and identity != expected:
        detail = (
            f"its size, mtime or inode changed (size {expected.size} -> {identity.size} bytes,"
            f" mtime_ns {expected.mtime_ns} -> {identity.mtime_ns},"
            f" inode {expected.inode} -> {identity.inode})"
        )
        raise _Rejected(Rejection.CHANGED, detail)


class _ParentDirectories:
    """Descriptors of the directories from a log directory's root down to a file's parent.

    The root is opened following symlinks. Every directory below it is
    opened with ``O_NOFOLLOW``, so the file is reached without passing a
    symlink, even one swapped in during the check.
    """

    def __init__(self, root: Path, relative: PurePosixPath) -> None:
        self._root = root
        self._names = relative.parts
        self._descriptors: list[int] = []

    def __enter__(self) -> Self:
        try:
            self._descriptors.append(os.open(self._root, _DIRECTORY_FLAGS))
            for name in self._names[:-1]:
                self._descriptors.append(_open_subdirectory(self._descriptors[-1], name))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()

    def _close(self) -> None:
        for descriptor in reversed(self._descriptors):
            os.close(descriptor)
        self._descriptors.clear()

    def lstat_file(self) -> os.stat_result:
        return os.stat(self._names[-1], dir_fd=self._descriptors[-1], follow_symlinks=False)

    def unlink_file(self) -> None:
        os.unlink(self._names[-1], dir_fd=self._descriptors[-1])

    def remove_empty_parents(self) -> list[Path]:
        """Remove the file's parent directories while they are empty; never the root.

        Return the removed directories, deepest first. The first directory
        that is not empty, or cannot be removed, ends the walk.
        """
        removed = []
        for depth in range(len(self._descriptors) - 1, 0, -1):
            name = self._names[depth - 1]
            try:
                os.rmdir(name, dir_fd=self._descriptors[depth - 1])
            except OSError:
                break
            removed.append(self._root.joinpath(*self._names[:depth]))
        return removed


def _open_subdirectory(parent: int, name: str) -> int:
    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise _Rejected(Rejection.SYMLINK, f"its parent directory {name!r} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise FileNotFoundError(errno.ENOTDIR, f"{name!r} is not a directory")

    try:
        return os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            detail = f"its parent directory {name!r} was replaced by a symlink"
            raise _Rejected(Rejection.SYMLINK, detail) from None
        raise
