"""`Tenants`: authentication of tenant keys, admission (scopes, quotas), ownership, visibility and usage."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from adapters_store.keys import DEFAULT_TENANT, KeyRecord, KeyStore, parse_key
from server.api.errors import APIError
from server.tenants.metrics import TenantMetrics
from server.tenants.principal import (
    ANONYMOUS_OPEN,
    ANONYMOUS_USER,
    BOOTSTRAP_ADMIN,
    BOOTSTRAP_USER,
    STATE_KEY,
    Principal,
)
from server.tenants.quotas import KeyLimiter, Refusal, monotonic

log = logging.getLogger("peftserve.tenants")

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FT_SUFFIX = re.compile(r":([0-9a-f]{8})(?::ckpt-step-\d+)?$")  # ft:<base>[:<suffix>]:<job8>[:ckpt-step-N]
STORAGE_RETRY_S = 60  # Retry-After of a storage refusal: the bytes come back only when something is deleted


@dataclass(frozen=True)
class Denial:
    status: int
    message: str
    code: str
    headers: dict[str, str] = field(default_factory=dict)
    limit: str | None = None  # a quota's name, for the rejected counter


def required_scope(method: str, path: str) -> str | None:
    """The scope a tenant key needs for this route; None: any valid key (reads are filtered per key)."""
    if path == "/v1/keys" or path.startswith("/v1/keys/") or path == "/v1/evals" or path.startswith("/v1/evals/"):
        return "admin"
    if path == "/v1/load_lora_adapter":  # reads the operator's server-side directories
        return "admin"
    if path in GENERATION_PATHS:
        return "infer"
    if path.startswith(("/v1/files", "/v1/fine_tuning")):
        return "finetune"
    if method in WRITE_METHODS:
        if path == "/v1/assistants" or path.startswith("/v1/assistants/"):
            return "assistants:write"
        if path in ("/v1/adapters", "/v1/unload_lora_adapter") or path.startswith("/v1/adapters/"):
            return "adapters:write"
    return None


@dataclass
class Usage:
    """One key's counters since start-up (memory only)."""

    tenant: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Admission:
    """One request's pass through the tenants layer: its principal, a refusal, and the accounting at its end."""

    def __init__(self, tenants: Tenants, principal: Principal | None, denied: Denial | None = None,
                 limiter: KeyLimiter | None = None) -> None:
        self.tenants, self.principal, self.denied, self.limiter = tenants, principal, denied, limiter
        self._done = False

    @property
    def key_id(self) -> str | None:
        return self.principal.key_id if self.principal is not None else None

    def revoked(self) -> bool:
        """A tenant key deleted since this request was admitted."""
        p = self.principal
        return p is not None and not p.bootstrap and self.tenants.keys.get(p.key_id) is None

    def finish(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Once per admitted request: release its concurrency slot, take its tokens, count its usage."""
        if self._done or self.principal is None or self.denied is not None:
            return
        self._done = True
        pt, ct = prompt_tokens or 0, completion_tokens or 0
        if self.limiter is not None:
            self.limiter.done(pt + ct)
        self.tenants.count(self.principal, pt, ct)


class Tenants:
    """Built once per server (`server.api.state.build_state`); `bind` gives it the server state."""

    def __init__(self, keys: KeyStore, *, max_labels: int = 20) -> None:
        self.keys = keys
        self.clock: Callable[[], float] = monotonic  # tests replace it to move time on
        self.state: Any = None
        self.metrics: TenantMetrics | None = None
        self.max_labels = max_labels
        self._lock = threading.Lock()
        self._limiters: dict[str, KeyLimiter] = {}
        self._verified: dict[str, bytes] = {}  # key id -> sha256 of the full key, after one scrypt check
        self._usage: dict[str, Usage] = {}
        self._pending: dict[str, int] = {}  # storage bytes being written now, per key
        # On a Ray replica (server/tenants/mirror.py): whether the cluster has tenant keys (the local store holds
        # only the keys mirrored so far); None: this process's own store decides.
        self.cluster_has_keys: bool | None = None
        self._remote: dict[str, dict[str, Usage]] = {}  # other processes' counters (the Ray writer), per source

    def bind(self, state: Any) -> None:
        self.state = state

    def install_metrics(self, registry: Any) -> None:
        if self.metrics is None or self.metrics.registry is not registry:
            self.metrics = TenantMetrics(registry, self.max_labels)

    # ---- authentication and admission ------------------------------------------------------------
    async def admit(self, scope: dict[str, Any], method: str, path: str, token: str | None,
                    bootstrap_error: Callable[[], tuple[int, str] | None], generation: bool) -> Admission:
        """Who the request is and whether it may run now. Bootstrap keys keep today's rules exactly
        (`bootstrap_error` is the middleware's check); a tenant key is checked here."""
        parsed = parse_key(token) if token else None
        if parsed is None:
            err = bootstrap_error()
            if err is not None:
                status, msg = err
                code = "invalid_api_key" if status == 401 else "admin_key_required"
                return Admission(self, None, Denial(status, msg, code,
                                                    {"www-authenticate": "Bearer"} if status == 401 else {}))
            p = self._bootstrap(token)
            if p.key_id == "anonymous" and self.has_keys() and (path == "/v1" or path.startswith("/v1/")):
                return Admission(self, None, Denial(401, "missing API key: send the header 'Authorization: Bearer "
                                                    "<key>' (this server has tenant keys)", "invalid_api_key",
                                                    {"www-authenticate": "Bearer"}))
            self._set(scope, p)
            return Admission(self, p)
        kid, secret = parsed
        rec = await self._verify(kid, token or "", secret)
        if rec is None:
            log.info("refused an unknown or revoked key id %s", kid)
            return Admission(self, None, Denial(401, "invalid API key", "invalid_api_key",
                                                {"www-authenticate": "Bearer"}))
        p = Principal.of_key(rec)
        self._set(scope, p)
        need = required_scope(method, path)
        if need is not None and need not in p.scopes:
            return Admission(self, p, Denial(403, f"{method} {path} needs the scope {need!r}; key {kid} has "
                                                  f"{', '.join(sorted(p.scopes)) or 'none'}", "insufficient_scope"))
        if not (path == "/v1" or path.startswith("/v1/")):
            return Admission(self, p)
        limiter = self._limiter(rec)
        refusal = limiter.admit(generation)
        if refusal is not None:
            self._reject(p, refusal.limit)
            return Admission(self, p, _quota_denial(refusal))
        return Admission(self, p, limiter=limiter)

    def has_keys(self) -> bool:
        return self.cluster_has_keys if self.cluster_has_keys is not None else len(self.keys) > 0

    def _bootstrap(self, token: str | None) -> Principal:
        s = self.state.settings
        if token and s.admin_key and hmac.compare_digest(token.encode(), s.admin_key.encode()):
            return BOOTSTRAP_ADMIN
        if token and s.api_key and hmac.compare_digest(token.encode(), s.api_key.encode()):
            return BOOTSTRAP_USER
        return ANONYMOUS_OPEN if not (s.admin_key or s.api_key) else ANONYMOUS_USER

    @staticmethod
    def _set(scope: dict[str, Any], p: Principal) -> None:
        scope.setdefault("state", {})[STATE_KEY] = p

    async def _verify(self, kid: str, token: str, secret: str) -> KeyRecord | None:
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(kid)
        if known is not None:  # verified once already: a fast constant-time check of the whole key
            rec = self.keys.get(kid) if hmac.compare_digest(digest, known) else None
            if rec is None:
                self._verified.pop(kid, None)  # revoked, perhaps by another process on the same store
            return rec
        rec = await asyncio.to_thread(self.keys.verify, kid, secret)  # scrypt: off the event loop
        if rec is not None and self.keys.get(kid) is not None:
            self._verified[kid] = digest
        return rec

    def _limiter(self, rec: KeyRecord) -> KeyLimiter:
        with self._lock:
            lim = self._limiters.get(rec.id)
            if lim is None:
                lim = self._limiters[rec.id] = KeyLimiter(rec.id, rec.limits, lambda: self.clock())
            return lim

    def revoke(self, kid: str) -> KeyRecord | None:
        """Delete a key: its next request is refused (401); an open stream is cut at its next chunk."""
        rec = self.keys.delete(kid)
        self._verified.pop(kid, None)
        with self._lock:
            self._limiters.pop(kid, None)
        if rec is not None:
            log.info("key %s (tenant %s) revoked", kid, rec.tenant)
        return rec

    # ---- usage -----------------------------------------------------------------------------------
    def _usage_of(self, p: Principal) -> Usage:
        u = self._usage.get(p.key_id)
        if u is None:
            u = self._usage[p.key_id] = Usage(p.tenant)
        return u

    def count(self, p: Principal, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            u = self._usage_of(p)
            u.requests += 1
            u.prompt_tokens += prompt_tokens
            u.completion_tokens += completion_tokens
        if self.metrics is not None:
            self.metrics.observe(p.tenant, prompt_tokens, completion_tokens)

    def _reject(self, p: Principal, limit: str) -> None:
        with self._lock:
            u = self._usage_of(p)
            u.rejected[limit] = u.rejected.get(limit, 0) + 1
        if self.metrics is not None:
            self.metrics.rejected(p.tenant, limit)

    def usage_rows(self) -> dict[str, dict[str, Any]]:
        """This process's counters, per key id (a Ray replica sends them to the writer: `merge_usage`)."""
        with self._lock:
            return {k: {"tenant": u.tenant, "requests": u.requests, "prompt_tokens": u.prompt_tokens,
                        "completion_tokens": u.completion_tokens, "rejected": dict(u.rejected)}
                    for k, u in self._usage.items()}

    def merge_usage(self, source: str, rows: dict[str, dict[str, Any]]) -> None:
        """Another process's latest counters (they replace that source's previous ones); `usage` sums them in."""
        with self._lock:
            self._remote[source] = {k: Usage(r["tenant"], r["requests"], r["prompt_tokens"], r["completion_tokens"],
                                             dict(r["rejected"])) for k, r in rows.items()}

    def usage(self, p: Principal) -> list[dict[str, Any]]:
        """The caller's own key's usage; an admin's: every key's (tenant keys and the bootstrap keys seen)."""
        with self._lock:
            seen: dict[str, Usage] = {}
            for src in (self._usage, *self._remote.values()):
                for k, u in src.items():
                    s = seen.setdefault(k, Usage(u.tenant))
                    s.requests += u.requests
                    s.prompt_tokens += u.prompt_tokens
                    s.completion_tokens += u.completion_tokens
                    for lim, n in u.rejected.items():
                        s.rejected[lim] = s.rejected.get(lim, 0) + n
        if p.admin:
            ids = [r.id for r in self.keys.list()] + sorted(k for k in seen if self.keys.get(k) is None)
        else:
            ids = [p.key_id]
        out = []
        for kid in ids:
            rec = self.keys.get(kid)
            u = seen.get(kid) or Usage(rec.tenant if rec else p.tenant)
            out.append({"key_id": kid, "object": "usage", "tenant": u.tenant, "name": rec.name if rec else None,
                        "requests": u.requests, "prompt_tokens": u.prompt_tokens,
                        "completion_tokens": u.completion_tokens,
                        "total_tokens": u.prompt_tokens + u.completion_tokens,
                        "storage_bytes": self.storage_used(kid), "training_tokens": self.training_tokens(kid),
                        "rejected": u.rejected, "limits": dict(rec.limits) if rec else {}})
        return out

    # ---- ownership -------------------------------------------------------------------------------
    def own(self, p: Principal | None, kind: str, name: str) -> None:
        if p is not None:
            self.keys.own(kind, name, p.tenant, p.key_id)

    def _owner(self, kind: str, name: str) -> tuple[str, str | None]:
        """(tenant, key id) owning a resource; the default tenant's when it has no row."""
        o = None
        if kind == "adapter" and name.startswith("ft:"):
            m = _FT_SUFFIX.search(name)  # a fine-tuned model or checkpoint belongs to its job's owner
            if m is not None:
                o = self.keys.owner("jobsfx", m.group(1))
        if o is None:
            o = self.keys.owner(kind, name)
        return o if o is not None else (DEFAULT_TENANT, None)

    def sees_adapter(self, p: Principal | None, name: str) -> bool:
        """May `p` list, read and run adapter `name`? A composition: when it may use every source."""
        if p is None or p.admin:
            return True
        entry = self.state.registry.entry(name) if self.state is not None else None
        if entry is not None and entry.derived is not None:
            return all(self.sees_adapter(p, k[0]) for k in entry.sources)
        tenant, _ = self._owner("adapter", name)
        return tenant == p.tenant or (tenant == DEFAULT_TENANT and _matches(name, p.adapters))

    def sees_assistant(self, p: Principal | None, a: Any) -> bool:
        if p is None or p.admin:
            return True
        tenant, _ = self._owner("assistant", a.id)
        return tenant == p.tenant or (tenant == DEFAULT_TENANT and _matches(a.name, p.adapters))

    def sees(self, p: Principal | None, kind: str, rid: str) -> bool:
        """Files ("file") and jobs ("job"): only their tenant's keys (and admins)."""
        if p is None or p.admin:
            return True
        return self._owner(kind, rid)[0] == p.tenant

    def may_use_model(self, p: Principal | None, model: str | None) -> bool:
        """A generation's `model`: the base (if the key allows it), a visible assistant or adapter."""
        if p is None or p.admin:
            return True
        st = self.state
        if model is None or model == st.base_name:
            return p.allow_base
        store = st.assistants.store if st.assistants is not None else None
        a = store.get(model) if store is not None else None
        if a is not None:
            return self.sees_assistant(p, a)
        return self.sees_adapter(p, model)

    def check_new_name(self, p: Principal | None, name: str, what: str) -> None:
        """A tenant creates adapter and assistant names only under `<tenant>.` (see the package docstring)."""
        if p is None or p.tenant == DEFAULT_TENANT:
            return
        if not name.startswith(p.tenant + "."):
            raise APIError(400, f"{what} name {name!r} is outside tenant {p.tenant!r}'s namespace: names of this "
                                f"tenant start with '{p.tenant}.'", param="name", code="invalid_name")

    # ---- storage ---------------------------------------------------------------------------------
    def storage_used(self, kid: str) -> int:
        """Bytes of the adapters (latest versions; fine-tuned ones included) and files the key created."""
        st = self.state
        if st is None or st.store is None:
            return 0
        total = sum(r.size_bytes for r in st.store.list() if self._owner("adapter", r.name)[1] == kid)
        ft = getattr(st, "finetune", None)
        if ft is not None:
            for fid in self.keys.owned_by("file", kid):
                with contextlib.suppress(Exception):
                    total += ft.files.get(fid).bytes
        return total

    def training_tokens(self, kid: str) -> int:
        ft = getattr(self.state, "finetune", None) if self.state is not None else None
        if ft is None:
            return 0
        total = 0
        for jid in self.keys.owned_by("job", kid):
            job = ft.jobs.get(jid)
            total += (job or {}).get("trained_tokens") or 0
        return total

    @contextlib.contextmanager
    def storage(self, p: Principal | None, incoming: int, replacing: str | None = None) -> Iterator[None]:
        """Check the key's storage_bytes before a write of `incoming` bytes, and count them while it runs (a
        concurrent write of the same key sees them)."""
        limit = p.limits.get("storage_bytes") if p is not None else None
        if p is None or not limit:
            yield
            return
        kid = p.key_id
        with self._lock:
            used = self.storage_used(kid) + self._pending.get(kid, 0)
            if replacing is not None:  # a new version replaces the latest one in the count
                with contextlib.suppress(Exception):
                    used -= self.state.store.get(replacing).size_bytes
            if used + incoming > limit:
                refusal = Refusal("storage_bytes", f"key {kid} stores {used} bytes; {incoming} more would exceed "
                                  f"its limit storage_bytes of {limit}; delete adapters or files first",
                                  STORAGE_RETRY_S)
                self._usage_of(p).rejected["storage_bytes"] = self._usage_of(p).rejected.get("storage_bytes", 0) + 1
                if self.metrics is not None:
                    self.metrics.rejected(p.tenant, "storage_bytes")
                d = _quota_denial(refusal)
                raise APIError(d.status, d.message, param="storage_bytes", code=d.code, headers=d.headers)
            self._pending[kid] = self._pending.get(kid, 0) + incoming
        try:
            yield
        finally:
            with self._lock:
                self._pending[kid] -= incoming

    # ---- /metrics --------------------------------------------------------------------------------
    def filter_metrics(self, p: Principal | None, text: bytes) -> bytes:
        """An admin's (or an unauthenticated open scrape's) view is the whole text; a tenant sees only the series
        of adapters and assistants it may use and of its own tenant label."""
        if p is None or p.admin:
            return text
        own = self.metrics.label(p.tenant) if self.metrics is not None else p.tenant
        store = self.state.assistants.store if self.state.assistants is not None else None
        kept = []
        seen: dict[str, bool] = {}  # one ownership lookup per adapter, not per series
        for line in text.decode().splitlines():
            if not line.startswith("#"):
                labels = dict(_LABEL.findall(line))
                a = labels.get("adapter")
                if a is not None and a not in _SHARED_LABELS:
                    if a not in seen:
                        seen[a] = self.sees_adapter(p, _unescape(a))
                    if not seen[a]:
                        continue
                t = labels.get("tenant")
                if t is not None and t != own:
                    continue
                asst = labels.get("assistant")
                if asst is not None and asst not in _SHARED_LABELS:
                    rec = store.get(_unescape(asst)) if store is not None else None
                    if rec is None or not self.sees_assistant(p, rec):
                        continue
            kept.append(line)
        return ("\n".join(kept) + "\n").encode()


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_SHARED_LABELS = frozenset({"base", "other", "none", ""})


def _unescape(v: str) -> str:
    return v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _quota_denial(r: Refusal) -> Denial:
    return Denial(429, r.message, "quota_exceeded", {"retry-after": str(max(1, r.retry_after))}, limit=r.limit)
