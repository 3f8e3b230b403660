"""Prometheus metrics at /metrics, read from the database at each scrape (so they always agree
with it, whichever process did the work): counters of files taken in, done, failed, quarantined
and duplicated, worker deaths, fixity mismatches and review decisions; a gauge of the queue's
depth by state (`state="quarantined"`: the files quarantined now); seconds per input megapixel
by stage and model; the last output's time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from daemon.web.views import Site

__all__ = ["BUCKETS", "CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds per input megapixel: from a fast stage on a GPU to a GAN on a small CPU.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0)


class Metrics:
    """A collector over the site's database, registered in a registry of its own."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        store, queue = self.site.state()
        totals = store.totals()
        counts = queue.counts()
        for name, value, text in (
            ("files_ingested", totals.ingested, "File versions hashed and recorded."),
            ("files_done", totals.done, "Runs that published outputs."),
            ("files_failed", totals.failed, "Runs that failed."),
            ("files_duplicate", totals.duplicates, "Files linked to an existing output."),
            ("files_quarantined", totals.quarantined, "Quarantines (a retry releases a file)."),
            ("worker_deaths", totals.died, "Runs whose worker process died."),
            ("fixity_mismatches", totals.fixity_mismatches, "Fixity audit hash mismatches."),
        ):
            yield CounterMetricFamily(f"scanrestore_{name}", text, value=value)
        depth = GaugeMetricFamily(
            "scanrestore_queue_depth", "Jobs in the queue by state.", labels=["state"]
        )
        for state, count in sorted(counts.items()):
            depth.add_metric([state], count)
        yield depth
        reviews = CounterMetricFamily(
            "scanrestore_review_decisions", "Review decisions recorded.", labels=["decision"]
        )
        for decision, count in sorted(store.review_counts().items()):
            reviews.add_metric([decision], count)
        yield reviews
        last = GaugeMetricFamily(
            "scanrestore_last_output_timestamp_seconds",
            "When the last output was published (Unix time; 0: never).",
            value=totals.last_output_at.timestamp() if totals.last_output_at else 0.0,
        )
        yield last
        yield self._timings(store)

    def _timings(self, store: object) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "scanrestore_stage_seconds_per_megapixel",
            "Seconds a stage took per input megapixel, by stage and model.",
            labels=["stage", "model"],
        )
        groups: dict[tuple[str, str], list[float]] = {}
        for timing in store.stage_timings():  # type: ignore[attr-defined]
            if timing.input_megapixels:
                key = (timing.stage, timing.model or "")
                groups.setdefault(key, []).append(timing.seconds / timing.input_megapixels)
        for (stage, model), values in sorted(groups.items()):
            buckets = [(str(b), sum(v <= b for v in values)) for b in BUCKETS]
            buckets.append(("+Inf", len(values)))
            family.add_metric([stage, model], buckets, sum_value=sum(values))
        return family
