"""`peftserve adapters push|ls|show|rm`: manage a running server's adapters over its REST API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# AdapterHub's save_adapter(..., use_safetensors=True) writes adapter.safetensors, and may add the base's LM head
# (head_config.json + model_head.safetensors) and, for Qwen2, adapter_interface.json: all go up; the server checks.
ADAPTERHUB_FILES = ("adapter_config.json", "adapter.safetensors")
OPTIONAL_FILES = ("head_config.json", "model_head.safetensors", "adapter_interface.json")


def _client(ns: argparse.Namespace) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {ns.key}"} if ns.key else {}
    return httpx.Client(base_url=ns.url.rstrip("/"), headers=headers, timeout=ns.timeout)


def add_connection_args(v: argparse.ArgumentParser, *, admin_key_first: bool = True) -> None:
    """--url, --key and --timeout for a verb that talks to a running server. The key defaults to the admin key
    (then the API key) for verbs that write, or the other way round (`admin_key_first=False`)."""
    v.add_argument("--url", default=os.environ.get("PEFTSERVE_URL", "http://127.0.0.1:8000"),
                   help="server URL [env PEFTSERVE_URL]")
    envs = ("PEFTSERVE_ADMIN_KEY", "PEFTSERVE_API_KEY") if admin_key_first else ("PEFTSERVE_API_KEY",
                                                                                  "PEFTSERVE_ADMIN_KEY")
    help_ = "bearer key (admin key for writes)" if admin_key_first else "bearer key"
    v.add_argument("--key", default=os.environ.get(envs[0]) or os.environ.get(envs[1]),
                   help=f"{help_} [env {envs[0]}]")
    v.add_argument("--timeout", type=float, default=300.0)


def _fail(resp: Any) -> int:
    try:
        msg = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = resp.text
    print(f"peftserve: error: HTTP {resp.status_code}: {msg}", file=sys.stderr)
    return 1


def call(ns: argparse.Namespace, method: str, path: str, ok: int = 200, **kw: Any) -> Any:
    """One request to the server (--url, --key, --timeout): the response when its status is `ok`; otherwise None,
    with the server's error message printed to stderr."""
    with _client(ns) as c:
        r = c.request(method, path, **kw)
    if r.status_code != ok:
        _fail(r)
        return None
    return r


def list_or_json(rows: list[dict[str, Any]], as_json: bool, header: str,
                 line: Callable[[dict[str, Any]], str]) -> int:
    """The `ls` verbs' output: `rows` as indented JSON (--json), or a table (`header`, then `line(row)` each)."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(header)
    for row in rows:
        print(line(row))
    return 0


def _adapter_line(a: dict[str, Any]) -> str:
    rank = a.get("rank") if a.get("rank") is not None else "-"
    return (f"{a['name']:<24} {a['version']:>3} {a.get('peft_type') or a['type']:<14} "
            f"{rank:>4} {a['residency']:<9} {a.get('size_bytes', '-')}")


def _push(ns: argparse.Namespace) -> int:
    def have(f: str) -> bool:
        return os.path.isfile(os.path.join(ns.dir, f))

    adapterhub = have("adapter.safetensors") and not have("adapter_model.safetensors")
    wanted = ADAPTERHUB_FILES if adapterhub else ADAPTER_FILES
    missing = [f for f in wanted if not have(f)]
    if missing:
        print(f"peftserve: error: {ns.dir}: missing {', '.join(missing)} (a PEFT save_pretrained dir, or an "
              "AdapterHub save_adapter(..., use_safetensors=True) dir)", file=sys.stderr)
        return 2
    names = [*wanted, *(f for f in OPTIONAL_FILES if have(f))]
    files = [("files", (f, open(os.path.join(ns.dir, f), "rb").read())) for f in names]
    with _client(ns) as c:
        if ns.replace:
            r = c.put(f"/v1/adapters/{ns.name}", data={"name": ns.name}, files=files)
        else:
            r = c.post("/v1/adapters", data={"name": ns.name}, files=files)
    if r.status_code not in (200, 201):
        return _fail(r)
    rec = r.json()
    print(f"{rec['name']} v{rec['version']} {rec['peft_type']} rank={rec.get('rank')} sha256={rec['sha256'][:12]}")
    return 0


def _ls(ns: argparse.Namespace) -> int:
    r = call(ns, "GET", "/v1/adapters")
    if r is None:
        return 1
    return list_or_json(r.json()["data"], ns.json,
                        f"{'NAME':<24} {'VER':>3} {'TYPE':<14} {'RANK':>4} {'RESIDENCY':<9} SIZE", _adapter_line)


def _show(ns: argparse.Namespace) -> int:
    r = call(ns, "GET", f"/v1/adapters/{ns.name}")
    if r is None:
        return 1
    print(json.dumps(r.json(), indent=2))
    return 0


def _rm(ns: argparse.Namespace) -> int:
    r = call(ns, "DELETE", f"/v1/adapters/{ns.name}", ok=204)
    if r is None:
        return 1
    print(f"deleted {ns.name}")
    return 0


def add_adapter_commands(sub: Any) -> None:
    """Attach `adapters` and its verbs to the top-level `peftserve` parser."""
    p = sub.add_parser("adapters", help="manage a running server's adapters")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))

    common = add_connection_args

    push = verbs.add_parser("push", help="upload a PEFT adapter dir")
    push.add_argument("dir")
    push.add_argument("--name", required=True)
    push.add_argument("--replace", action="store_true", help="upload a new version of an existing adapter")
    common(push)
    push.set_defaults(func=_push)
    ls = verbs.add_parser("ls", help="list adapters")
    ls.add_argument("--json", action="store_true")
    common(ls)
    ls.set_defaults(func=_ls)
    for verb, fn, help_ in (("show", _show, "one adapter's record"), ("rm", _rm, "delete an adapter")):
        v = verbs.add_parser(verb, help=help_)
        v.add_argument("name")
        common(v)
        v.set_defaults(func=fn)
