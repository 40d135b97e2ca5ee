"""SafeDeleter: every safety rule on real files under tmp_path.

Paths under the real protected directories are only ever rejected by name,
before any file is opened, and no test deletes anything outside tmp_path.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from tvm_upload.config import LogDirectory
from tvm_upload.files import FileIdentity
from tvm_upload.safety import (
    DeletionRule,
    DeletionStatus,
    Rejection,
    SafeDeleter,
    protected_directory_of,
)

RULE = DeletionRule.AFTER_UPLOAD


class Counters:
    """Counter sink that keeps the values in a dict."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def increment(self, name: str, by: int = 1) -> int:
        self.values[name] = self.values.get(name, 0) + by
        return self.values[name]


def write(path: Path, size: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def directory(root: Path, **settings: object) -> LogDirectory:
    return LogDirectory(path=root, source="ros", **settings)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def counters() -> Counters:
    return Counters()


@pytest.fixture
def deleter(root: Path, counters: Counters) -> SafeDeleter:
    return SafeDeleter([directory(root)], counters)


def test_deletes_log_file_and_counts_it(
    deleter: SafeDeleter, root: Path, counters: Counters, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(root / "a.log", size=1234)

    with caplog.at_level(logging.INFO, logger="tvm_upload.safety"):
        outcome = deleter.delete(path, RULE, reason="uploaded 14 days ago")

    assert outcome.status is DeletionStatus.DELETED
    assert outcome.size == 1234
    assert not path.exists()
    assert counters.values == {"files_deleted_after_upload": 1, "bytes_deleted_after_upload": 1234}
    record = caplog.records[-1]
    assert record.levelno == logging.INFO
    assert str(path) in record.getMessage()
    assert "1234 bytes" in record.getMessage()
    assert "after_upload" in record.getMessage()


def test_data_loss_logged_at_error_and_counted(
    deleter: SafeDeleter, root: Path, counters: Counters, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(root / "a.log", size=10)

    with caplog.at_level(logging.INFO, logger="tvm_upload.safety"):
        outcome = deleter.delete(
            path, DeletionRule.EMERGENCY, reason="disk critical", data_loss=True
        )

    assert outcome.status is DeletionStatus.DELETED
    assert caplog.records[-1].levelno == logging.ERROR
    assert "before it was uploaded" in caplog.records[-1].getMessage()
    assert counters.values["data_loss_files"] == 1
    assert counters.values["data_loss_bytes"] == 10
    assert counters.values["files_deleted_emergency"] == 1
    assert counters.values["bytes_deleted_emergency"] == 10


def test_dry_run_deletes_and_counts_nothing(
    deleter: SafeDeleter, root: Path, counters: Counters
) -> None:
    path = write(root / "a.log")

    outcome = deleter.delete(path, RULE, reason="test", dry_run=True)

    assert outcome.status is DeletionStatus.WOULD_DELETE
    assert outcome.deleted
    assert path.exists()
    assert counters.values == {}


def test_protected_directory_rejected_even_when_deletion_allowed(counters: Counters) -> None:
    configured = directory(Path("/var/log/tvm-test-nonexistent"), allow_deletion=True)
    deleter = SafeDeleter([configured], counters)

    outcome = deleter.delete(
        Path("/var/log/tvm-test-nonexistent/a.log"), RULE, reason="test", dry_run=True
    )

    assert outcome.status is DeletionStatus.REJECTED
    assert outcome.rejection is Rejection.PROTECTED
    assert "/var" in outcome.detail


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/var/x", "/var"),
        ("/var", "/var"),
        ("/usr/lib/a.log", "/usr"),
        ("/lib64/a", "/lib64"),
        ("/varx/a.log", None),
        ("/variable/a.log", None),
        ("/data/var/a.log", None),
        ("/libx/a.log", None),
        ("/home/user/logs/a.log", None),
    ],
)
def test_protected_directory_compares_components(path: str, expected: str | None) -> None:
    found = protected_directory_of(PurePosixPath(path))

    assert found == (None if expected is None else PurePosixPath(expected))


def test_protected_prefix_name_is_not_protected(tmp_path: Path, counters: Counters) -> None:
    protected = [PurePosixPath(tmp_path / "var")]
    inside = write(tmp_path / "var" / "x" / "a.log")
    beside = write(tmp_path / "varx" / "a.log")
    deleter = SafeDeleter(
        [directory(tmp_path / "var" / "x"), directory(tmp_path / "varx")], counters, protected
    )

    rejected = deleter.delete(inside, RULE, reason="test")
    deleted = deleter.delete(beside, RULE, reason="test")

    assert rejected.rejection is Rejection.PROTECTED
    assert inside.exists()
    assert deleted.status is DeletionStatus.DELETED
    assert not beside.exists()


def test_protected_checked_on_resolved_path(tmp_path: Path, counters: Counters) -> None:
    protected_root = tmp_path / "system" / "logs"
    target = write(protected_root / "a.log")
    link = tmp_path / "logs-link"
    link.symlink_to(protected_root, target_is_directory=True)
    deleter = SafeDeleter([directory(link)], counters, [PurePosixPath(tmp_path / "system")])

    outcome = deleter.delete(link / "a.log", RULE, reason="test")

    assert outcome.rejection is Rejection.PROTECTED
    assert target.exists()


def test_deletion_not_allowed_rejected(root: Path, counters: Counters) -> None:
    path = write(root / "a.log")
    deleter = SafeDeleter([directory(root, allow_deletion=False)], counters)

    outcome = deleter.delete(path, RULE, reason="test")

    assert outcome.rejection is Rejection.DELETION_NOT_ALLOWED
    assert path.exists()
    assert counters.values == {}


def test_pattern_mismatch_rejected(root: Path, counters: Counters) -> None:
    path = write(root / "a.txt")
    deleter = SafeDeleter([directory(root, pattern=["*.log"])], counters)

    outcome = deleter.delete(path, RULE, reason="test")

    assert outcome.rejection is Rejection.NOT_A_LOG_FILE
    assert path.exists()


def test_excluded_name_rejected(deleter: SafeDeleter, root: Path) -> None:
    path = write(root / "a.log.part")

    outcome = deleter.delete(path, RULE, reason="test")

    assert outcome.rejection is Rejection.NOT_A_LOG_FILE
    assert path.exists()


def test_subdirectory_rejected_without_recursion(root: Path, counters: Counters) -> None:
    path = write(root / "sub" / "a.log")
    deleter = SafeDeleter([directory(root, recursive=False)], counters)

    outcome = deleter.delete(path, RULE, reason="test")

    assert outcome.rejection is Rejection.NOT_A_LOG_FILE
    assert path.exists()


def test_outside_directories_rejected(deleter: SafeDeleter, tmp_path: Path) -> None:
    path = write(tmp_path / "elsewhere" / "a.log")

    outcome = deleter.delete(path, RULE, reason="test")

    assert outcome.rejection is Rejection.OUTSIDE_DIRECTORIES
    assert path.exists()


def test_root_itself_is_not_a_file_to_delete(deleter: SafeDeleter, root: Path) -> None:
    outcome = deleter.delete(root, RULE, reason="test")

    assert outcome.rejection is Rejection.OUTSIDE_DIRECTORIES
    assert root.is_dir()


def test_dot_dot_path_rejected(deleter: SafeDeleter, root: Path, tmp_path: Path) -> None:
    outside = write(tmp_path / "outside.log")

    outcome = deleter.delete(root / ".." / "outside.log", RULE, reason="test")

    assert outcome.rejection is Rejection.NOT_NORMALIZED
    assert outside.exists()


def test_relative_path_rejected(deleter: SafeDeleter) -> None:
    outcome = deleter.delete(Path("logs/a.log"), RULE, reason="test")

    assert outcome.rejection is Rejection.NOT_NORMALIZED


def test_symlink_to_outside_file_rejected(deleter: SafeDeleter, root: Path, tmp_path: Path) -> None:
    target = write(tmp_path / "outside" / "secret.log")
    link = root / "link.log"
    link.symlink_to(target)

    outcome = deleter.delete(link, RULE, reason="test")

    assert outcome.rejection is Rejection.SYMLINK
    assert target.exists()
    assert link.is_symlink()


def test_symlinked_directory_rejected(deleter: SafeDeleter, root: Path, tmp_path: Path) -> None:
    target = write(tmp_path / "outside" / "a.log")
    (root / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)

    outcome = deleter.delete(root / "sub" / "a.log", RULE, reason="test")

    assert outcome.rejection is Rejection.SYMLINK
    assert target.exists()


def test_configured_root_may_be_symlink(tmp_path: Path, counters: Counters) -> None:
    real_root = tmp_path / "real"
    path = write(real_root / "sub" / "a.log")
    link = tmp_path / "logs-link"
    link.symlink_to(real_root, target_is_directory=True)
    deleter = SafeDeleter([directory(link)], counters)

    outcome = deleter.delete(link / "sub" / "a.log", RULE, reason="test")

    assert outcome.status is DeletionStatus.DELETED
    assert not path.exists()
    assert real_root.is_dir()


def test_fifo_rejected(deleter: SafeDeleter, root: Path) -> None:
    fifo = root / "pipe.log"
    os.mkfifo(fifo)

    outcome = deleter.delete(fifo, RULE, reason="test")

    assert outcome.rejection is Rejection.NOT_A_REGULAR_FILE
    assert fifo.exists()


def test_file_being_uploaded_rejected(deleter: SafeDeleter, root: Path) -> None:
    path = write(root / "a.log")

    outcome = deleter.delete(path, RULE, reason="test", in_flight={path})

    assert outcome.rejection is Rejection.IN_FLIGHT
    assert path.exists()


def test_changed_identity_rejected(deleter: SafeDeleter, root: Path) -> None:
    path = write(root / "a.log", size=100)
    uploaded = FileIdentity.of(path)
    with path.open("ab") as stream:
        stream.write(b"more")

    outcome = deleter.delete(path, RULE, reason="test", expected=uploaded)

    assert outcome.rejection is Rejection.CHANGED
    assert outcome.identity is not None
    assert outcome.identity.size == 104
    assert path.exists()


def test_matching_identity_deleted(deleter: SafeDeleter, root: Path) -> None:
    path = write(root / "a.log")

    outcome = deleter.delete(path, RULE, reason="test", expected=FileIdentity.of(path))

    assert outcome.status is DeletionStatus.DELETED


def test_vanished_file_reported(deleter: SafeDeleter, root: Path, counters: Counters) -> None:
    outcome = deleter.delete(root / "sub" / "gone.log", RULE, reason="test")

    assert outcome.status is DeletionStatus.VANISHED
    assert counters.values == {}


def test_empty_parents_removed_up_to_root(deleter: SafeDeleter, root: Path) -> None:
    path = write(root / "a" / "b" / "c.log")

    deleter.delete(path, RULE, reason="test")

    assert not (root / "a").exists()
    assert root.is_dir()


def test_non_empty_parent_kept(deleter: SafeDeleter, root: Path) -> None:
    path = write(root / "a" / "b" / "c.log")
    sibling = write(root / "a" / "other.log")

    deleter.delete(path, RULE, reason="test")

    assert not (root / "a" / "b").exists()
    assert sibling.exists()


def test_root_kept_when_emptied(deleter: SafeDeleter, root: Path) -> None:
    path = write(root / "only.log")

    deleter.delete(path, RULE, reason="test")

    assert root.is_dir()


def test_rejection_warned_once(
    root: Path, counters: Counters, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(root / "a.log")
    deleter = SafeDeleter([directory(root, allow_deletion=False)], counters)

    with caplog.at_level(logging.DEBUG, logger="tvm_upload.safety"):
        deleter.delete(path, RULE, reason="test")
        deleter.delete(path, RULE, reason="test")

    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]
    assert "allow_deletion: false" in caplog.records[0].getMessage()


def test_policy_names_round_trip() -> None:
    for rule in DeletionRule:
        assert DeletionRule.from_policy(rule.policy) is rule

    assert DeletionRule.from_policy("after-upload") is DeletionRule.AFTER_UPLOAD
    with pytest.raises(ValueError, match="after-upload, age, emergency"):
        DeletionRule.from_policy("everything")


@pytest.fixture
def read_only_root(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs holding logs/a.log, remounted read-only; skips unless mounts work (root)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        write(mount_point / "logs" / "a.log")
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        yield mount_point / "logs"
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_read_only_filesystem_fails_with_advice(
    read_only_root: Path, counters: Counters, caplog: pytest.LogCaptureFixture
) -> None:
    deleter = SafeDeleter([directory(read_only_root)], counters)
    path = read_only_root / "a.log"

    with caplog.at_level(logging.DEBUG, logger="tvm_upload.safety"):
        first = deleter.delete(path, RULE, reason="test")
        deleter.delete(path, RULE, reason="test")

    assert first.status is DeletionStatus.FAILED
    assert "ReadWritePaths" in first.detail
    assert path.exists()
    assert counters.values == {}
    assert [record.levelno for record in caplog.records] == [logging.ERROR, logging.DEBUG]
