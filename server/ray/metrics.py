"""The ingress's /metrics: every replica's Prometheus text, each series labelled with its replica."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def merge_metrics(reports: dict[str, str], label: str = "replica") -> str:
    """One exposition from several: samples of one family stay together under one HELP/TYPE, and each
    carries `label="<replica id>"`."""
    families: dict[str, object] = {}
    for replica, text in sorted(reports.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = type(fam)(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.samples.append(Sample(s.name, {**s.labels, label: replica}, s.value, s.timestamp,
                                             s.exemplar))
    return "".join(_render(f) for f in families.values())


def _render(fam: object) -> str:
    from prometheus_client.exposition import generate_latest

    class _One:
        def collect(self) -> list[object]:
            return [fam]

    return generate_latest(_One()).decode()  # type: ignore[arg-type]
