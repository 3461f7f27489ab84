"""`peftserve assistants create|update|ls|show|rm`: manage a running server's assistants over its REST API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from server.client import _client, _fail, add_connection_args, call, list_or_json

# flag → JSON field of an assistant's sampling defaults and description
_FIELDS = (("temperature", float), ("top_p", float), ("max_tokens", int), ("description", str))


def _body(ns: argparse.Namespace) -> dict[str, Any] | None:
    """The JSON fields the flags set; None (after printing why) when a flag's value is unusable."""
    body: dict[str, Any] = {}
    if getattr(ns, "model", None) is not None:
        body["model"] = ns.model
    if ns.instructions is not None and ns.instructions_file is not None:
        print("peftserve: error: give --instructions or --instructions-file, not both", file=sys.stderr)
        return None
    if ns.instructions_file is not None:
        try:
            with open(ns.instructions_file, encoding="utf-8") as f:
                body["instructions"] = f.read()
        except OSError as e:
            print(f"peftserve: error: --instructions-file {ns.instructions_file}: {e.strerror or e}", file=sys.stderr)
            return None
    elif ns.instructions is not None:
        body["instructions"] = ns.instructions
    for name, _ in _FIELDS:
        value = getattr(ns, name)
        if value is not None:
            body[name] = value
    if ns.stop:
        body["stop"] = ns.stop
    if ns.metadata:
        meta = {}
        for item in ns.metadata:
            key, sep, value = item.partition("=")
            if not sep or not key:
                print(f"peftserve: error: --metadata {item!r}: expected KEY=VALUE", file=sys.stderr)
                return None
            meta[key] = value
        body["metadata"] = meta
    for field in getattr(ns, "clear", None) or []:  # update only: back to "no default"
        body[field] = None
    return body


def _summary(a: dict[str, Any]) -> str:
    defaults = " ".join(f"{k}={a[k]}" for k in ("temperature", "top_p", "max_tokens", "stop") if a.get(k) is not None)
    return f"{a['name']} {a['id']} model={a['model']}" + (f" {defaults}" if defaults else "")


def _create(ns: argparse.Namespace) -> int:
    body = _body(ns)
    if body is None:
        return 2
    r = call(ns, "POST", "/v1/assistants", json={"name": ns.name, **body})
    if r is None:
        return 1
    print(_summary(r.json()))
    return 0


def _update(ns: argparse.Namespace) -> int:
    body = _body(ns)
    if body is None:
        return 2
    if ns.rename is not None:
        body["name"] = ns.rename
    if not body:
        print("peftserve: error: nothing to change: give at least one of --model, --rename, --instructions, "
              "--temperature, --top-p, --max-tokens, --stop, --metadata, --description, --clear", file=sys.stderr)
        return 2
    r = call(ns, "POST", f"/v1/assistants/{ns.name}", json=body)
    if r is None:
        return 1
    print(_summary(r.json()))
    return 0


def _ls(ns: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    with _client(ns) as c:
        params: dict[str, Any] = {"limit": 100, "order": "asc"}
        while True:  # every page
            r = c.get("/v1/assistants", params=params)
            if r.status_code != 200:
                return _fail(r)
            page = r.json()
            rows += page["data"]
            if not page["has_more"]:
                break
            params["after"] = page["last_id"]
    return list_or_json(rows, ns.json,
                        f"{'NAME':<24} {'MODEL':<24} {'TEMP':>5} {'TOP_P':>5} {'MAX_TOK':>7} INSTRUCTIONS",
                        _assistant_line)


def _assistant_line(a: dict[str, Any]) -> str:
    instr = (a.get("instructions") or "").replace("\n", " ")
    instr = instr if len(instr) <= 40 else instr[:39] + "…"
    cells = [("-" if a.get(k) is None else str(a[k])) for k in ("temperature", "top_p", "max_tokens")]
    return f"{a['name']:<24} {a['model']:<24} {cells[0]:>5} {cells[1]:>5} {cells[2]:>7} {instr}"


def _show(ns: argparse.Namespace) -> int:
    r = call(ns, "GET", f"/v1/assistants/{ns.name}")
    if r is None:
        return 1
    print(json.dumps(r.json(), indent=2))
    return 0


def _rm(ns: argparse.Namespace) -> int:
    r = call(ns, "DELETE", f"/v1/assistants/{ns.name}")
    if r is None:
        return 1
    print(f"deleted {r.json().get('name', ns.name)}")
    return 0


_common = add_connection_args


def _defaults(v: argparse.ArgumentParser) -> None:
    v.add_argument("--instructions", help="the system message put first in every chat")
    v.add_argument("--instructions-file", help="read the instructions from this file (UTF-8)")
    v.add_argument("--description")
    v.add_argument("--temperature", type=float, help="default when a request sends none")
    v.add_argument("--top-p", dest="top_p", type=float, help="default when a request sends none")
    v.add_argument("--max-tokens", dest="max_tokens", type=int, help="default when a request sends none")
    v.add_argument("--stop", action="append", help="default stop string (repeatable)")
    v.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="metadata pair (repeatable)")


def add_assistant_commands(sub: Any) -> None:
    """Attach `assistants` and its verbs to the top-level `peftserve` parser."""
    p = sub.add_parser("assistants", help="manage a running server's assistants (name → adapter + instructions "
                                          "+ sampling defaults)")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    create = verbs.add_parser("create", help="create an assistant")
    create.add_argument("name", help="its model id in /v1/models and in completions/chat")
    create.add_argument("--model", required=True, help="an adapter's name or the base model's id")
    _defaults(create)
    _common(create)
    create.set_defaults(func=_create)
    update = verbs.add_parser("update", help="change an assistant's fields (the others stay)")
    update.add_argument("name", help="the assistant's name or id")
    update.add_argument("--model", help="an adapter's name or the base model's id")
    update.add_argument("--rename", help="a new name")
    update.add_argument("--clear", action="append", metavar="FIELD",
                        choices=("instructions", "description", "temperature", "top_p", "max_tokens", "stop",
                                 "metadata"), help="remove a field's value (repeatable)")
    _defaults(update)
    _common(update)
    update.set_defaults(func=_update)
    ls = verbs.add_parser("ls", help="list assistants")
    ls.add_argument("--json", action="store_true")
    _common(ls)
    ls.set_defaults(func=_ls)
    for verb, fn, help_ in (("show", _show, "one assistant"), ("rm", _rm, "delete an assistant")):
        v = verbs.add_parser(verb, help=help_)
        v.add_argument("name", help="the assistant's name or id")
        _common(v)
        v.set_defaults(func=fn)
