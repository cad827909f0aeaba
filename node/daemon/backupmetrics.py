"""Metrics of scheduled backups: exported only on a node that has ``backup.dir`` set.

- ``quorumd_backups_total{result}``: scheduled backups written (``ok``) or not (``failed``);
- ``quorumd_backup_last_success_timestamp_seconds``: unix time of the newest archive in the backup
  directory (at startup: the newest file already there; 0 when there is none yet);
- ``quorumd_backup_interval_seconds``: the configured interval, so that the ``QuorumdBackupStale``
  alert can judge staleness against each node's own schedule.

A node without scheduled backups exports none of them, so the alert cannot fire for it.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

RESULTS = ("ok", "failed")


class BackupMetrics:
    """A custom collector; ``enable`` starts the export."""

    def __init__(self) -> None:
        self.enabled = False
        self.interval_seconds = 0.0
        self.last_success = 0.0
        self.counts = dict.fromkeys(RESULTS, 0)

    def enable(self, interval_seconds: float, last_success: float) -> None:
        self.enabled = True
        self.interval_seconds = interval_seconds
        self.last_success = last_success

    def count(self, result: str, at: float | None = None) -> None:
        self.counts[result] += 1
        if result == "ok" and at is not None:
            self.last_success = at

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "quorumd_backups", "Scheduled backups by result (ok, failed).", labels=["result"]
            ),
            GaugeMetricFamily(
                "quorumd_backup_last_success_timestamp_seconds",
                "Unix time of the newest scheduled backup archive (0: none yet).",
            ),
            GaugeMetricFamily("quorumd_backup_interval_seconds", "Configured scheduled backup interval."),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        if not self.enabled:
            return
        total, last, interval = self._families()
        for result in RESULTS:
            total.add_metric([result], float(self.counts[result]))
        last.add_metric([], self.last_success)
        interval.add_metric([], self.interval_seconds)
        yield total
        yield last
        yield interval
