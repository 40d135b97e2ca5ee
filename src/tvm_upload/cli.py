"""The ``tvm-upload`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tvm_upload import __version__
from tvm_upload.config import Config, load_config
from tvm_upload.errors import ExitCode, TvmUploadError
from tvm_upload.logsetup import configure_logging

logger = logging.getLogger("tvm_upload")

DEFAULT_CONFIG = "/etc/tvm-upload/config.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvm-upload",
        description="Watch vehicle log directories and upload finished files to S3.",
    )
    parser.add_argument("--version", action="version", version=f"tvm-upload {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground (what systemd runs)")
    _add_config(run)
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--log-format", default="text", choices=["text", "json"])

    check = commands.add_parser(
        "check-config", help="validate the configuration and print it with defaults"
    )
    _add_config(check)

    status = commands.add_parser("status", help="show the queue and registry from the state store")
    _add_config(status)
    status.add_argument("--json", action="store_true", help="print one JSON document")

    upload_now = commands.add_parser(
        "upload-now",
        help="ask the running daemon to upload the whole queue now, whatever the schedule",
    )
    _add_config(upload_now)
    upload_now.add_argument(
        "--wait",
        action="store_true",
        help="show progress until the queue is drained; exit 1 if files failed",
    )
    upload_now.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="with --wait: give up after this many seconds (exit 1)",
    )

    cleanup = commands.add_parser(
        "cleanup", help="run the local deletion rules once now, or list what they would delete"
    )
    _add_config(cleanup)
    cleanup.add_argument("--dry-run", action="store_true", help="list deletions without deleting")
    cleanup.add_argument(
        "--policy",
        choices=["after-upload", "age", "emergency"],
        help="run only this rule (default: every enabled rule)",
    )

    doctor = commands.add_parser(
        "doctor",
        help="check configuration, credentials, bucket, clock, state store, inotify and disks",
    )
    _add_config(doctor)
    doctor.add_argument("--json", action="store_true", help="print one JSON document")

    alarms = commands.add_parser("alarms", help="manage the standard CloudWatch alarms")
    alarm_commands = alarms.add_subparsers(dest="alarm_command", metavar="ACTION", required=True)
    create = alarm_commands.add_parser("create", help="create or update the standard alarms")
    _add_config(create)
    create.add_argument("--sns-topic", help="SNS topic ARN notified when an alarm changes state")
    create.add_argument("--endpoint-url", help="CloudWatch endpoint (default: the region's)")
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(DEFAULT_CONFIG),
        help=f"configuration file (default {DEFAULT_CONFIG})",
    )


def _legacy_arguments(argv: list[str]) -> list[str]:
    """Translate the older uploader's ``--config FILE --test-config`` into ``check-config``."""
    if "--test-config" not in argv:
        return argv
    rest = [arg for arg in argv if arg != "--test-config"]
    return ["check-config", *rest]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command and return its exit code."""
    args_list = _legacy_arguments(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE

    handler = {
        "run": _run,
        "check-config": _check_config,
        "status": _status,
        "upload-now": _upload_now,
        "cleanup": _cleanup,
        "doctor": _doctor,
        "alarms": _alarms,
    }[args.command]
    try:
        return handler(args)
    except TvmUploadError as error:
        print(f"tvm-upload: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK
    except BrokenPipeError:
        # The reader of our output went away (``tvm-upload status | head``):
        # point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(config.effective_yaml(), end="")
    print(f"# {args.config}: configuration is valid", file=sys.stderr)
    return ExitCode.OK


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config)
    except TvmUploadError as error:
        logger.error("%s", error)
        return error.exit_code

    from tvm_upload.daemon import Daemon

    daemon = Daemon(config, config_path=args.config)
    daemon.install_signal_handlers()
    logger.info("Starting tvm-upload %s with %s", __version__, args.config)
    daemon.run()
    return ExitCode.OK


def _status(args: argparse.Namespace) -> int:
    from tvm_upload.status import collect_status, render_status

    config: Config = load_config(args.config)
    report = collect_status(config)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_status(report))
    return ExitCode.OK


def _upload_now(args: argparse.Namespace) -> int:
    from tvm_upload.uploadnow import request_upload_now

    config = load_config(args.config)
    return request_upload_now(config, wait=args.wait, timeout_seconds=args.timeout)


def _cleanup(args: argparse.Namespace) -> int:
    from tvm_upload.retention import cleanup_command
    from tvm_upload.state import StateStore

    configure_logging("WARNING")
    config = load_config(args.config)
    if args.dry_run and not config.state_file.exists():
        print(
            f"No state store at {config.state_file} yet: nothing is uploaded, so nothing to delete."
        )
        return ExitCode.OK

    # A dry run only reads, so it never creates the store or changes its owner.
    with StateStore(config.state_file, read_only=args.dry_run) as store:
        return cleanup_command(config, store, args.policy, args.dry_run, sys.stdout)


def _doctor(args: argparse.Namespace) -> int:
    from tvm_upload.doctor import doctor_exit_code, render_checks, render_checks_json, run_doctor

    checks = run_doctor(args.config)
    print(render_checks_json(checks) if args.json else render_checks(checks))
    return doctor_exit_code(checks)


def _alarms(args: argparse.Namespace) -> int:
    from tvm_upload.alarms import create_alarms
    from tvm_upload.cloudwatch import build_cloudwatch_client

    config = load_config(args.config)
    client = build_cloudwatch_client(config, endpoint_url=args.endpoint_url)
    for name in create_alarms(config, client, sns_topic_arn=args.sns_topic):
        print(f"created or updated alarm {name}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
