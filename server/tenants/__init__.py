"""Tenants: API keys scoped to adapters and assistants, quotas and usage per key (issue 21).

- `principal`: who a request is (a tenant key, a bootstrap key, or nobody), put on `request.state`.
- `quotas`: token buckets (requests/min, tokens/min) and the concurrency count, per key, in memory.
- `service`: `Tenants`, built once per server: authentication, admission, ownership and visibility, usage.
- `guards`: what route handlers call (404 for anything the key may not see, ownership after a write).
- `api`: `/v1/keys` (admin) and `/v1/usage`.

Naming: adapter and assistant names stay one global namespace (no name is rewritten in any body); a tenant
creates names only under its own prefix `<tenant>.`, so a name taken by another tenant can never be
revealed by a 409. Everything else (files, jobs, fine-tuned models, compositions) has server-made ids.
"""
