"""install.sh, uninstall.sh, the systemd unit and the IAM policy, tested in a temporary root."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tvm_upload.errors import ExitCode

REPOSITORY = Path(__file__).resolve().parents[1]
INSTALL = REPOSITORY / "scripts" / "install.sh"
UNINSTALL = REPOSITORY / "scripts" / "uninstall.sh"
UNIT_TEMPLATE = REPOSITORY / "packaging" / "tvm-upload.service"
IAM_POLICY = REPOSITORY / "docs" / "iam-policy.json"
CONFIG_EXAMPLE = REPOSITORY / "config" / "config.yaml.example"

INSTALLED_UNIT = "etc/systemd/system/tvm-upload.service"
INSTALLED_CONFIG = "etc/tvm-upload/config.yaml"
SCRIPT_TIMEOUT_SECONDS = 60

# Used when the repository has no example yet, so the installer can still be tested.
MINIMAL_EXAMPLE = """\
vehicle_id: vehicle-001
log_directories:
  - path: /var/log/tvm/ros
    source: ros
s3:
  bucket: fleet-logs
  region: cn-north-1
"""

DELETABLE_CONFIG = """\
vehicle_id: vehicle-042
log_directories:
  - path: /data/ros
    source: ros
  - path: /data/bags
    source: bags
    allow_deletion: false
  - path: "/data/camera logs"
    source: camera
    allow_deletion: true
  - path: /var/log/syslog-archive
    source: syslog
  - /data/legacy
state_file: /srv-state/tvm/state.db
s3:
  bucket: fleet-logs
  region: cn-north-1
"""


def run_script(script: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_SECONDS,
        check=False,
    )


def unit_setting(unit_text: str, key: str) -> list[str]:
    """Return every value of ``key=`` in a unit file, in order."""
    prefix = key + "="
    return [line[len(prefix) :] for line in unit_text.splitlines() if line.startswith(prefix)]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Map every path under ``root`` to its mode and content hash (or link target)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            content = "link:" + os.readlink(path)
        elif path.is_file():
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = "directory"
        entries[str(path.relative_to(root))] = (info.st_mode, content)
    return entries


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    """A source tree with the real unit template and the config example."""
    source = tmp_path / "source"
    (source / "packaging").mkdir(parents=True)
    (source / "config").mkdir()
    shutil.copy(UNIT_TEMPLATE, source / "packaging" / "tvm-upload.service")
    example = source / "config" / "config.yaml.example"
    if CONFIG_EXAMPLE.exists():
        shutil.copy(CONFIG_EXAMPLE, example)
    else:
        example.write_text(MINIMAL_EXAMPLE)
    return source


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty target root; the space in its name checks the scripts' quoting."""
    path = tmp_path / "target root"
    path.mkdir()
    return path


def install(root: Path, source_tree: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run_script(
        INSTALL,
        "--root",
        root,
        "--source",
        source_tree,
        "--no-venv",
        "--python",
        sys.executable,
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return result


def place_config(root: Path, text: str) -> Path:
    config = root / INSTALLED_CONFIG
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    return config


def test_install_creates_layout(root: Path, source_tree: Path) -> None:
    result = install(root, source_tree)

    assert mode_of(root / "etc/tvm-upload") == 0o750
    assert mode_of(root / "etc/tvm-upload/aws") == 0o750
    assert mode_of(root / "var/lib/tvm-upload") == 0o750
    assert mode_of(root / "opt/tvm-upload") == 0o755
    assert mode_of(root / INSTALLED_UNIT) == 0o644
    assert mode_of(root / INSTALLED_CONFIG) == 0o640
    assert not (root / "opt/tvm-upload/venv").exists()
    assert "not creating the tvm-upload user" in result.stdout
    assert "skipping systemctl daemon-reload" in result.stdout


def test_install_copies_config_example(root: Path, source_tree: Path) -> None:
    install(root, source_tree)

    example = source_tree / "config" / "config.yaml.example"
    assert (root / INSTALLED_CONFIG).read_bytes() == example.read_bytes()


def test_install_twice_gives_same_tree(root: Path, source_tree: Path) -> None:
    install(root, source_tree)
    first = snapshot(root)

    install(root, source_tree)

    assert snapshot(root) == first


def test_install_keeps_existing_config(root: Path, source_tree: Path) -> None:
    install(root, source_tree)
    config = root / INSTALLED_CONFIG
    config.write_text("vehicle_id: edited-by-operator\n")
    config.chmod(0o600)
    os.utime(config, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))

    result = install(root, source_tree)

    assert config.read_text() == "vehicle_id: edited-by-operator\n"
    assert mode_of(config) == 0o600
    assert config.stat().st_mtime_ns == 1_700_000_000_000_000_000
    assert "keeping existing /etc/tvm-upload/config.yaml" in result.stdout


def test_unit_lists_deletable_directories(root: Path, source_tree: Path) -> None:
    (root / "data/ros").mkdir(parents=True)
    (root / "data/camera logs").mkdir(parents=True)
    place_config(root, DELETABLE_CONFIG)

    result = install(root, source_tree)

    unit_text = (root / INSTALLED_UNIT).read_text()
    assert unit_setting(unit_text, "ReadWritePaths") == [
        '-/srv-state/tvm -/data/ros "-/data/camera logs" -/data/legacy'
    ]
    assert "/var/log/syslog-archive is under a protected system directory" in result.stderr
    assert "/data/legacy does not exist yet" in result.stderr


def test_unit_keeps_template_otherwise(root: Path, source_tree: Path) -> None:
    place_config(root, DELETABLE_CONFIG)

    install(root, source_tree)

    installed = (root / INSTALLED_UNIT).read_text().splitlines()
    template = UNIT_TEMPLATE.read_text().splitlines()
    changed = [pair for pair in zip(template, installed) if pair[0] != pair[1]]
    assert len(installed) == len(template)
    assert [old for old, _ in changed] == ["ReadWritePaths=-/var/lib/tvm-upload"]


def test_unit_escapes_percent_and_quotes(root: Path, source_tree: Path) -> None:
    config = """\
vehicle_id: vehicle-042
log_directories:
  - path: /data/100%
    source: full
  - path: '/data/say "hi"'
    source: quoted
s3:
  bucket: fleet-logs
  region: cn-north-1
"""
    place_config(root, config)

    install(root, source_tree)

    unit_text = (root / INSTALLED_UNIT).read_text()
    assert unit_setting(unit_text, "ReadWritePaths") == [
        '-/var/lib/tvm-upload -/data/100%% "-/data/say \\"hi\\""'
    ]


def test_legacy_state_directory_writable(root: Path, source_tree: Path) -> None:
    (root / "home/ros/.uploader").mkdir(parents=True)
    (root / "home/ros/.uploader/queue.json").write_text("[]")
    config = """\
vehicle_id: vehicle-042
log_directories:
  - path: /data/ros
    source: ros
    allow_deletion: false
upload:
  queue_file: /home/ros/.uploader/queue.json
  processed_files_registry:
    registry_file: /home/ros/.uploader/gone.json
s3:
  bucket: fleet-logs
  region: cn-north-1
"""
    place_config(root, config)

    install(root, source_tree)

    unit_text = (root / INSTALLED_UNIT).read_text()
    assert unit_setting(unit_text, "ReadWritePaths") == [
        "-/var/lib/tvm-upload -/home/ros/.uploader"
    ]


def test_unreadable_yaml_keeps_state_directory(root: Path, source_tree: Path) -> None:
    place_config(root, "vehicle_id: [unclosed\n")

    result = install(root, source_tree)

    unit_text = (root / INSTALLED_UNIT).read_text()
    assert unit_setting(unit_text, "ReadWritePaths") == ["-/var/lib/tvm-upload"]
    assert "could not read /etc/tvm-upload/config.yaml" in result.stderr


def test_python_without_yaml_falls_back(root: Path, source_tree: Path, tmp_path: Path) -> None:
    bare_venv = tmp_path / "bare-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(bare_venv)],
        check=True,
        timeout=SCRIPT_TIMEOUT_SECONDS,
    )
    place_config(root, DELETABLE_CONFIG)

    result = install(root, source_tree, "--python", str(bare_venv / "bin" / "python"))

    unit_text = (root / INSTALLED_UNIT).read_text()
    assert unit_setting(unit_text, "ReadWritePaths") == ["-/var/lib/tvm-upload"]
    assert "no Python with PyYAML" in result.stderr


@pytest.fixture
def yaml_only_python(tmp_path: Path) -> Path:
    """An interpreter that can import yaml but not tvm_upload, like a bare system python3."""
    venv = tmp_path / "yaml-only-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=SCRIPT_TIMEOUT_SECONDS,
    )
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=SCRIPT_TIMEOUT_SECONDS,
    ).stdout.strip()
    yaml_parent = Path(yaml.__file__).resolve().parents[1]
    (Path(purelib) / "yaml-only.pth").write_text(f"{yaml_parent}\n")
    return python


def test_plain_yaml_reader_expands_variables(
    root: Path, source_tree: Path, yaml_only_python: Path
) -> None:
    config = """\
vehicle_id: vehicle-042
log_directories:
  - path: /data/$USER/ros
    source: ros
  - path: /data/${UNDEFINED_FOR_TEST}/bags
    source: bags
  - path: /data/cost$$
    source: cost
  - path: ~/inbox
    source: inbox
s3:
  bucket: fleet-logs
  region: cn-north-1
"""
    place_config(root, config)

    result = install(root, source_tree, "--python", str(yaml_only_python))

    unit_text = (root / INSTALLED_UNIT).read_text()
    assert unit_setting(unit_text, "ReadWritePaths") == [
        "-/var/lib/tvm-upload -/data/tvm-upload/ros -/data/cost$"
    ]
    assert "uses $UNDEFINED_FOR_TEST" in result.stderr
    assert "/var/lib/tvm-upload/inbox is under a protected system directory" in result.stderr


def test_invalid_config_read_as_plain_yaml(root: Path, source_tree: Path) -> None:
    config = """\
vehicle_id: vehicle-042
colour: blue
log_directories:
  - path: /data/ros
    source: ros
s3:
  bucket: fleet-logs
  region: cn-north-1
"""
    place_config(root, config)

    result = install(root, source_tree)

    unit_text = (root / INSTALLED_UNIT).read_text()
    assert unit_setting(unit_text, "ReadWritePaths") == ["-/var/lib/tvm-upload -/data/ros"]
    assert "config.yaml is not valid, so it is read as plain YAML" in result.stderr


def test_install_links_command(root: Path, source_tree: Path) -> None:
    venv_command = root / "opt/tvm-upload/venv/bin/tvm-upload"
    venv_command.parent.mkdir(parents=True)
    venv_command.write_text("#!/bin/sh\n")
    venv_command.chmod(0o755)

    install(root, source_tree)
    install(root, source_tree)

    link = root / "usr/local/bin/tvm-upload"
    assert os.readlink(link) == "/opt/tvm-upload/venv/bin/tvm-upload"

    result = run_script(UNINSTALL, "--root", root)

    assert result.returncode == 0, result.stderr
    assert not link.is_symlink()


def test_install_keeps_foreign_command(root: Path, source_tree: Path) -> None:
    venv_command = root / "opt/tvm-upload/venv/bin/tvm-upload"
    venv_command.parent.mkdir(parents=True)
    venv_command.write_text("#!/bin/sh\n")
    venv_command.chmod(0o755)
    link = root / "usr/local/bin/tvm-upload"
    link.parent.mkdir(parents=True)
    link.symlink_to("/opt/other/bin/tvm-upload")

    result = install(root, source_tree)

    assert os.readlink(link) == "/opt/other/bin/tvm-upload"
    assert "is not install.sh's link" in result.stderr


def test_install_rejects_unknown_option(root: Path) -> None:
    result = run_script(INSTALL, "--root", root, "--frobnicate")

    assert result.returncode == 2
    assert "unknown option: --frobnicate" in result.stderr


def test_install_rejects_missing_root(tmp_path: Path) -> None:
    result = run_script(INSTALL, "--root", tmp_path / "absent", "--no-venv")

    assert result.returncode == 1
    assert "is not a directory" in result.stderr


def test_install_requires_config_example(root: Path, source_tree: Path) -> None:
    (source_tree / "config" / "config.yaml.example").unlink()

    result = run_script(INSTALL, "--root", root, "--source", source_tree, "--no-venv")

    assert result.returncode == 1
    assert "config.yaml.example is missing" in result.stderr


def test_uninstall_keeps_config_and_state(root: Path, source_tree: Path) -> None:
    install(root, source_tree)
    (root / "var/lib/tvm-upload/state.db").write_text("state")
    (root / "opt/tvm-upload/venv/bin").mkdir(parents=True)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "tvm-upload.service").symlink_to("/etc/systemd/system/tvm-upload.service")

    for _ in range(2):
        result = run_script(UNINSTALL, "--root", root)
        assert result.returncode == 0, result.stderr

    assert not (root / INSTALLED_UNIT).exists()
    assert not (wants / "tvm-upload.service").is_symlink()
    assert not (root / "opt/tvm-upload").exists()
    assert (root / INSTALLED_CONFIG).exists()
    assert (root / "var/lib/tvm-upload/state.db").read_text() == "state"
    assert "kept /etc/tvm-upload and /var/lib/tvm-upload" in result.stdout


def test_uninstall_purge_removes_data(root: Path, source_tree: Path) -> None:
    install(root, source_tree)
    (root / "var/lib/tvm-upload/state.db").write_text("state")
    drop_in = root / "etc/systemd/system/tvm-upload.service.d"
    drop_in.mkdir()
    (drop_in / "override.conf").write_text("[Service]\n")

    for _ in range(2):
        result = run_script(UNINSTALL, "--root", root, "--purge")
        assert result.returncode == 0, result.stderr

    assert not (root / INSTALLED_UNIT).exists()
    assert not (root / "opt/tvm-upload").exists()
    assert not (root / "etc/tvm-upload").exists()
    assert not (root / "var/lib/tvm-upload").exists()
    assert not drop_in.exists()


def test_uninstall_keeps_foreign_command(root: Path) -> None:
    command = root / "usr/local/bin/tvm-upload"
    command.parent.mkdir(parents=True)
    command.symlink_to("/usr/bin/true")

    result = run_script(UNINSTALL, "--root", root)

    assert result.returncode == 0, result.stderr
    assert command.is_symlink()


def test_uninstall_rejects_unknown_option(root: Path) -> None:
    result = run_script(UNINSTALL, "--root", root, "--everything")

    assert result.returncode == 2
    assert "unknown option: --everything" in result.stderr


def test_unit_core_settings() -> None:
    unit_text = UNIT_TEMPLATE.read_text()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/tvm-upload/venv/bin/tvm-upload run --config /etc/tvm-upload/config.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "RestartPreventExitStatus": str(int(ExitCode.CONFIG)),
        "User": "tvm-upload",
        "Group": "tvm-upload",
        "StateDirectory": "tvm-upload",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
    }

    for key, value in expected.items():
        assert unit_setting(unit_text, key) == [value], key


def test_unit_stop_timeout_exceeds_drain() -> None:
    unit_text = UNIT_TEMPLATE.read_text()

    [timeout] = unit_setting(unit_text, "TimeoutStopSec")

    assert timeout.endswith("s")
    assert int(timeout.removesuffix("s")) > 10


def test_unit_comments_every_setting() -> None:
    """Each setting has a comment above it, or belongs to a block that starts with one."""
    previous = ""
    uncommented = []
    for line in UNIT_TEMPLATE.read_text().splitlines():
        is_setting = "=" in line and not line.startswith("#")
        if is_setting and previous == "" and not line.startswith("Description="):
            uncommented.append(line)
        previous = "" if not line or line.startswith("[") else line

    assert uncommented == []


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return path


def verify_unit(unit_text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze verify with ExecStart pointing at a binary that exists here."""
    true_command = shutil.which("true")
    assert true_command is not None
    runnable = unit_text.replace(
        "ExecStart=/opt/tvm-upload/venv/bin/tvm-upload", "ExecStart=" + true_command
    )
    unit = directory / "tvm-upload.service"
    unit.write_text(runnable)
    return subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_SECONDS,
        check=False,
    )


def test_unit_template_verifies(tmp_path: Path) -> None:
    result = verify_unit(UNIT_TEMPLATE.read_text(), tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_installed_unit_verifies(root: Path, source_tree: Path, tmp_path: Path) -> None:
    place_config(root, DELETABLE_CONFIG)
    install(root, source_tree)

    result = verify_unit((root / INSTALLED_UNIT).read_text(), tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def iam_statements() -> list[dict[str, object]]:
    policy = json.loads(IAM_POLICY.read_text())
    assert policy["Version"] == "2012-10-17"
    return list(policy["Statement"])


def as_list(value: object) -> list[str]:
    return [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]


def test_iam_policy_arns_use_china_partition() -> None:
    resources = [
        resource for statement in iam_statements() for resource in as_list(statement["Resource"])
    ]

    arns = [resource for resource in resources if resource != "*"]
    assert arns
    for arn in arns:
        assert arn.startswith("arn:aws-cn:"), arn


def test_iam_policy_grants_upload_actions() -> None:
    grants = {
        action: as_list(statement["Resource"])
        for statement in iam_statements()
        for action in as_list(statement["Action"])
    }

    object_arn = "arn:aws-cn:s3:::BUCKET/VEHICLE_ID/*"
    bucket_arn = "arn:aws-cn:s3:::BUCKET"
    for action in [
        "s3:PutObject",
        "s3:GetObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    ]:
        assert grants[action] == [object_arn], action
    assert grants["s3:ListBucketMultipartUploads"] == [bucket_arn]
    assert grants["s3:ListBucket"] == [bucket_arn]


def test_iam_policy_limits_metric_namespace() -> None:
    [statement] = [
        statement
        for statement in iam_statements()
        if "cloudwatch:PutMetricData" in as_list(statement["Action"])
    ]

    assert statement["Resource"] == "*"
    assert statement["Condition"] == {"StringEquals": {"cloudwatch:namespace": "TVM/Upload"}}


def test_iam_policy_alarms_in_own_statement() -> None:
    [statement] = [
        statement
        for statement in iam_statements()
        if "cloudwatch:PutMetricAlarm" in as_list(statement["Action"])
    ]

    assert sorted(as_list(statement["Action"])) == [
        "cloudwatch:DescribeAlarms",
        "cloudwatch:PutMetricAlarm",
    ]
