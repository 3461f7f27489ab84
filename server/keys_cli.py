"""`peftserve keys create|ls|rm` and `peftserve usage`: tenant keys and usage of a running server over REST."""

from __future__ import annotations

import argparse
import json
from typing import Any

from server.client import add_connection_args, call, list_or_json

_LIMIT_FLAGS = (("rpm", "requests_per_minute"), ("tpm", "tokens_per_minute"), ("concurrency", "concurrent_requests"),
                ("storage_bytes", "storage_bytes"))


def _create(ns: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tenant": ns.tenant, "name": ns.name or "", "scopes": ns.scope or ["infer"],
                            "adapters": ns.adapters or [], "allow_base": not ns.no_base,
                            "limits": {field: getattr(ns, flag) for flag, field in _LIMIT_FLAGS
                                       if getattr(ns, flag) is not None}}
    r = call(ns, "POST", "/v1/keys", json=body, ok=201)
    if r is None:
        return 1
    k = r.json()
    if ns.json:
        print(json.dumps(k, indent=2))
    else:  # the key goes to stdout alone (scripts capture it); it is never shown again
        print(k["key"])
    return 0


def _ls(ns: argparse.Namespace) -> int:
    r = call(ns, "GET", "/v1/keys")
    if r is None:
        return 1
    return list_or_json(r.json()["data"], ns.json,
                        f"{'ID':<14} {'TENANT':<16} {'NAME':<16} {'SCOPES':<44} LIMITS", _key_line)


def _key_line(k: dict[str, Any]) -> str:
    limits = " ".join(f"{n}={v}" for n, v in k["limits"].items() if v is not None) or "-"
    return f"{k['id']:<14} {k['tenant']:<16} {k['name'] or '-':<16} {','.join(k['scopes']):<44} {limits}"


def _rm(ns: argparse.Namespace) -> int:
    r = call(ns, "DELETE", f"/v1/keys/{ns.id}")
    if r is None:
        return 1
    print(f"revoked {ns.id}")
    return 0


def _usage(ns: argparse.Namespace) -> int:
    r = call(ns, "GET", "/v1/usage")
    if r is None:
        return 1
    print(json.dumps(r.json()["data"], indent=2))
    return 0


def add_key_commands(sub: Any) -> None:
    """Attach `keys` (create|ls|rm) and `usage` to the top-level `peftserve` parser."""
    p = sub.add_parser("keys", help="manage a running server's tenant API keys (admin key)")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    create = verbs.add_parser("create", help="create a key; prints it (shown once)")
    create.add_argument("tenant", help="the tenant the key belongs to (a-z 0-9 _ -)")
    create.add_argument("--name", help="a label for the key")
    create.add_argument("--scope", action="append", choices=("infer", "adapters:write", "finetune",
                                                             "assistants:write", "admin"),
                        help="a scope (repeatable; default infer)")
    create.add_argument("--adapters", action="append", metavar="PATTERN",
                        help="a name pattern (fnmatch) of the default tenant's adapters/assistants it may use too "
                             "(repeatable)")
    create.add_argument("--no-base", action="store_true", help="the key may not run the base model alone")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="prompt + generated tokens per minute")
    create.add_argument("--concurrency", type=int, help="requests in flight at once")
    create.add_argument("--storage-bytes", dest="storage_bytes", type=int, help="bytes of adapters + files")
    create.add_argument("--json", action="store_true", help="print the whole record (with the key)")
    add_connection_args(create)
    create.set_defaults(func=_create)
    ls = verbs.add_parser("ls", help="list keys (never the keys themselves)")
    ls.add_argument("--json", action="store_true")
    add_connection_args(ls)
    ls.set_defaults(func=_ls)
    rm = verbs.add_parser("rm", help="revoke a key at once")
    rm.add_argument("id", help="the key's id (GET /v1/keys)")
    add_connection_args(rm)
    rm.set_defaults(func=_rm)
    usage = sub.add_parser("usage", help="a key's usage (an admin key: every key's)")
    add_connection_args(usage, admin_key_first=False)
    usage.set_defaults(func=_usage)
