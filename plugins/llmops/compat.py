"""The Airflow names this project uses that moved between Airflow 3.0 (the Airflow 3 that Amazon
MWAA runs: 3.0.6) and 3.2+ (what ``requirements.txt`` pins). DAGs and the library import them
from here, so the same files parse on both; ``tests/integration/test_mwaa_bundle.py`` proves it
on 3.0.6 in a clean virtualenv.

* ``TriggerRule`` joined ``airflow.sdk`` in 3.1; before, ``airflow.utils.trigger_rule``.
* The timetables joined ``airflow.sdk`` in 3.2; before, ``airflow.timetables.*``.
* ``AirflowSkipException`` and friends joined ``airflow.sdk.exceptions`` in 3.2; before,
  ``airflow.exceptions``.
* Human-in-the-loop operators (``ApprovalOperator``) exist from 3.1: ``HAS_HITL``.
"""

from __future__ import annotations

try:
    from airflow.sdk import TriggerRule
except ImportError:  # Airflow 3.0
    from airflow.utils.trigger_rule import TriggerRule

try:
    from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable, CronTriggerTimetable
except ImportError:  # Airflow 3.0, 3.1
    from airflow.timetables.assets import AssetOrTimeSchedule
    from airflow.timetables.interval import CronDataIntervalTimetable
    from airflow.timetables.trigger import CronTriggerTimetable

try:
    from airflow.sdk.exceptions import (
        AirflowException,
        AirflowFailException,
        AirflowSensorTimeout,
        AirflowSkipException,
    )
except ImportError:  # Airflow 3.0, 3.1
    from airflow.exceptions import AirflowException, AirflowFailException, AirflowSensorTimeout, AirflowSkipException


def _airflow_at_least(major: int, minor: int) -> bool:
    from airflow import __version__

    parts = __version__.split(".")
    return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (major, minor)


HAS_HITL = _airflow_at_least(3, 1)

__all__ = [
    "HAS_HITL",
    "AirflowException",
    "AirflowFailException",
    "AirflowSensorTimeout",
    "AirflowSkipException",
    "AssetOrTimeSchedule",
    "CronDataIntervalTimetable",
    "CronTriggerTimetable",
    "TriggerRule",
]
