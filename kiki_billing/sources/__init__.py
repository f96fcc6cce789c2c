"""Where the numbers come from: a metrics CSV file, a hash-chained audit trail, Prometheus."""

from kiki_billing.sources.base import MetricsSet, PeriodWindow

__all__ = ["MetricsSet", "PeriodWindow"]
