"""Per-tenant series in /metrics, under a bounded `tenant` label.

The first `max_labels` tenants seen get their own label value; the rest share "other", so a server with
thousands of tenants still exports a bounded number of series.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter

OTHER = "other"


class TenantMetrics:
    def __init__(self, registry: Any, max_labels: int) -> None:
        self.registry = registry
        self.max_labels = max_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self.requests = Counter("peftserve_tenant_requests", "Requests admitted per tenant", ["tenant"],
                                registry=registry)
        self.tokens = Counter("peftserve_tenant_tokens", "Prompt and generated tokens per tenant",
                              ["tenant", "kind"], registry=registry)
        self.rejections = Counter("peftserve_tenant_quota_rejections", "Requests refused by a key's quota (429)",
                                  ["tenant", "limit"], registry=registry)

    def label(self, tenant: str) -> str:
        with self._lock:
            if tenant in self._labels:
                return tenant
            if len(self._labels) < self.max_labels and tenant != OTHER:
                self._labels.add(tenant)
                return tenant
            return OTHER

    def observe(self, tenant: str, prompt_tokens: int, completion_tokens: int) -> None:
        t = self.label(tenant)
        self.requests.labels(t).inc()
        if prompt_tokens:
            self.tokens.labels(t, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(t, "generated").inc(completion_tokens)

    def rejected(self, tenant: str, limit: str) -> None:
        self.rejections.labels(self.label(tenant), limit).inc()
