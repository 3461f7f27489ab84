"""`peftserve` command line: `serve` starts the server; `adapters` and `assistants` manage a running server's;
`finetune` runs fine-tuning jobs on it; `eval` scores an eval set on several of its models."""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys

from server.assistants_cli import add_assistant_commands
from server.client import add_adapter_commands
from server.config import ArgParser, add_serve_args, start_settings
from server.evals.cli import add_eval_command
from server.finetune_cli import add_finetune_commands
from server.keys_cli import add_key_commands
from server.ray.cli import add_ray_command


def _serve(ns: argparse.Namespace) -> int:
    settings = start_settings(ns)
    if settings is None:
        return 2
    import uvicorn

    from server.api.app import create_app
    from server.api.state import build_state
    from server.shutdown import DrainingServer

    try:
        state = build_state(settings)
    except (ValueError, FileNotFoundError, OSError, sqlite3.Error) as e:
        print(f"peftserve: error: {e}", file=sys.stderr)
        return 2
    app = create_app(state)
    # The server drains in-flight requests on SIGTERM (one deadline, see server.shutdown), then uvicorn
    # re-raises the signal; a drained shutdown is a clean exit, so turn that into status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    DrainingServer(config, state.engine, settings.shutdown_timeout).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="peftserve", description="Multi-adapter PEFT inference server")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=ArgParser)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    add_serve_args(serve)
    serve.set_defaults(func=_serve)
    add_adapter_commands(sub)
    add_finetune_commands(sub)
    add_assistant_commands(sub)
    add_eval_command(sub)
    add_key_commands(sub)
    add_ray_command(sub)  # peftserve ray serve: Ray Serve scale-out (server/ray)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
