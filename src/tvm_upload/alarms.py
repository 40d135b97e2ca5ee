"""The standard CloudWatch alarms of one vehicle, created by ``tvm-upload alarms create``.

PutMetricAlarm creates an alarm or replaces the one with the same name, so
running the command again updates the alarms in place and never creates
duplicates. Every alarm name starts with the vehicle id, and every alarm
watches the metrics of that vehicle only (dimension ``VehicleId``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from tvm_upload.config import Config

logger = logging.getLogger(__name__)

CloudWatchClient = Any

SECONDS_PER_DAY = 86400
MiB = 1024 * 1024

MAX_EVALUATION_SECONDS = 7 * SECONDS_PER_DAY
"""CloudWatch limits Period times EvaluationPeriods to seven days (PutMetricAlarm)."""


@dataclass(frozen=True)
class AlarmSpec:
    """One alarm: a statistic of a metric compared with a threshold over some periods.

    ``comparison`` and ``treat_missing_data`` take the values PutMetricAlarm names.
    """

    suffix: str
    description: str
    metric: str
    statistic: str
    comparison: str
    threshold: float
    period_seconds: int
    evaluation_periods: int
    treat_missing_data: str


def rounded_period(seconds: float) -> int:
    """Round a publish interval up to a period that alarms accept: a multiple of 60 s."""
    return max(60, math.ceil(seconds / 60.0) * 60)


def standard_alarms(config: Config) -> list[AlarmSpec]:
    """Return the standard alarms for this configuration.

    Alarms on per-period values use the publish interval as their period,
    so each period contains one datum. The low-upload alarm is left out when
    ``monitoring.low_upload_threshold_mb`` is 0.
    """
    monitoring = config.monitoring
    period = rounded_period(monitoring.publish_interval_seconds)
    warning_percent = config.disk.warning_threshold * 100
    alarms = [
        AlarmSpec(
            suffix="no-upload-24h",
            description="No log file was uploaded in the last 24 hours, or no metrics arrived.",
            metric="FileCount",
            statistic="Sum",
            comparison="LessThanThreshold",
            threshold=1,
            period_seconds=SECONDS_PER_DAY,
            evaluation_periods=1,
            treat_missing_data="breaching",
        ),
        AlarmSpec(
            suffix="upload-failures",
            description="Upload attempts failed; see 'tvm-upload status' and the journal.",
            metric="FailureCount",
            statistic="Sum",
            comparison="GreaterThanThreshold",
            threshold=0,
            period_seconds=period,
            evaluation_periods=1,
            treat_missing_data="notBreaching",
        ),
        AlarmSpec(
            suffix="disk-usage",
            description=(
                f"A watched filesystem is at least {warning_percent:g}% full"
                " (disk.warning_threshold); emergency cleanup is running."
            ),
            metric="DiskUsagePercent",
            statistic="Maximum",
            comparison="GreaterThanOrEqualToThreshold",
            threshold=warning_percent,
            period_seconds=period,
            evaluation_periods=1,
            treat_missing_data="notBreaching",
        ),
        AlarmSpec(
            suffix="data-loss",
            description="Emergency cleanup deleted log files that were never uploaded.",
            metric="DataLossFiles",
            statistic="Sum",
            comparison="GreaterThanThreshold",
            threshold=0,
            period_seconds=period,
            evaluation_periods=1,
            treat_missing_data="notBreaching",
        ),
    ]
    low_upload = _low_upload_alarm(config)
    if low_upload is not None:
        alarms.append(low_upload)
    return alarms


def _low_upload_alarm(config: Config) -> AlarmSpec | None:
    monitoring = config.monitoring
    if monitoring.low_upload_threshold_mb <= 0:
        return None

    days = monitoring.alarm_evaluation_periods
    max_days = MAX_EVALUATION_SECONDS // SECONDS_PER_DAY
    if days > max_days:
        logger.warning(
            "monitoring.alarm_evaluation_periods is %d, but CloudWatch evaluates at most %d"
            " daily periods; the low-upload alarm uses %d",
            days,
            max_days,
            max_days,
        )
        days = max_days
    return AlarmSpec(
        suffix="low-upload",
        description=(
            f"Less than {monitoring.low_upload_threshold_mb:g} MiB uploaded per day"
            f" for {days} days in a row (monitoring.low_upload_threshold_mb)."
        ),
        metric="BytesUploaded",
        statistic="Sum",
        comparison="LessThanThreshold",
        threshold=monitoring.low_upload_threshold_mb * MiB,
        period_seconds=SECONDS_PER_DAY,
        evaluation_periods=days,
        treat_missing_data="notBreaching",
    )


def alarm_name(vehicle_id: str, spec: AlarmSpec) -> str:
    return f"{vehicle_id}-tvm-upload-{spec.suffix}"


def create_alarms(
    config: Config, client: CloudWatchClient, *, sns_topic_arn: str | None = None
) -> list[str]:
    """Create or update the standard alarms of ``config.vehicle_id``; return their names.

    ``sns_topic_arn`` receives a notification when an alarm fires and when it
    returns to OK. Raises botocore's ``ClientError`` when CloudWatch refuses a
    call (for example AccessDenied without ``cloudwatch:PutMetricAlarm``);
    alarms created before the failure stay.
    """
    names = []
    for spec in standard_alarms(config):
        arguments = _alarm_arguments(config, spec, sns_topic_arn)
        client.put_metric_alarm(**arguments)
        names.append(arguments["AlarmName"])
        logger.info("Created or updated the CloudWatch alarm %s", arguments["AlarmName"])
    return names


def _alarm_arguments(config: Config, spec: AlarmSpec, sns_topic_arn: str | None) -> dict[str, Any]:
    actions = [sns_topic_arn] if sns_topic_arn else []
    return {
        "AlarmName": alarm_name(config.vehicle_id, spec),
        "AlarmDescription": spec.description,
        "ActionsEnabled": bool(actions),
        "AlarmActions": actions,
        "OKActions": actions,
        "Namespace": config.monitoring.namespace,
        "MetricName": spec.metric,
        "Dimensions": [{"Name": "VehicleId", "Value": config.vehicle_id}],
        "Statistic": spec.statistic,
        "Period": spec.period_seconds,
        "EvaluationPeriods": spec.evaluation_periods,
        "Threshold": float(spec.threshold),
        "ComparisonOperator": spec.comparison,
        "TreatMissingData": spec.treat_missing_data,
    }
