"""`peftserve ray serve`: the serve flags plus replicas, cluster address and autoscaling; runs the Serve app."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from server.config import SettingsError, add_serve_args, start_settings

RAY_FLAGS: dict[str, tuple[type, str]] = {
    "replicas": (int, "engine replicas (each its own engine and device) (default 2)"),
    "address": (str, "Ray cluster to join: auto (a running local cluster), ray://HOST:PORT, or unset to start "
                     "one in this process"),
    "min_replicas": (int, "autoscale: fewest replicas (with --max-replicas)"),
    "max_replicas": (int, "autoscale: most replicas (with --min-replicas)"),
    "target_ongoing_requests": (float, "autoscale: requests in flight per replica Serve aims for"),
    "replica_cpus": (float, "CPUs Ray reserves per replica (fractions allowed) (default 1)"),
    "replica_gpus": (float, "GPUs per replica; > 0 serves on CUDA (default 0: CPU)"),
    "max_models_per_replica": (int, "adapter ids Serve's multiplexing keeps per replica (default 2 x --max-adapters)"),
    "max_ongoing_requests": (int, "requests one replica accepts at once (default 64)"),
    "writer_resource": (str, "custom Ray resource of the node that mounts --adapters-dir (pins the store writer)"),
    "ray_http_port": (int, "Serve's HTTP port (default --port)"),
}


def add_ray_command(sub: Any) -> None:
    ray = sub.add_parser("ray", help="scale out on Ray Serve (needs the ray extra: pip install 'peftserve[ray]')")
    verbs = ray.add_subparsers(dest="ray_cmd", required=True, parser_class=type(ray))
    serve = verbs.add_parser("serve", help="N engine replicas behind one endpoint, routed by adapter")
    for name, (typ, help_) in RAY_FLAGS.items():
        serve.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)
    serve.add_argument("--no-affinity", action="store_true", help="route with Serve's default (no adapter affinity)")
    add_serve_args(serve)
    serve.set_defaults(func=_ray_serve)


def ray_options(ns: argparse.Namespace) -> Any:
    from server.ray.app import RayOptions

    kw = {k: getattr(ns, k) for k in RAY_FLAGS if k not in ("address", "ray_http_port")
          and getattr(ns, k, None) is not None}
    return RayOptions(affinity=not ns.no_affinity, **kw).validate()


def _ray_serve(ns: argparse.Namespace) -> int:
    settings = start_settings(ns)
    if settings is None:
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        print("peftserve: error: peftserve ray needs Ray Serve: pip install 'peftserve[ray]' "
              "(or pip install 'ray[serve]>=2.40')", file=sys.stderr)
        return 2
    from server.ray.app import build_app

    try:
        opts = ray_options(ns)
        app = build_app(settings, opts)
    except (ValueError, SettingsError) as e:
        print(f"peftserve: error: {e}", file=sys.stderr)
        return 2
    ray.init(address=ns.address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": ns.ray_http_port or settings.port})
    serve.run(app, name="peftserve", route_prefix="/")
    print(f"peftserve: {opts.replicas if opts.min_replicas is None else f'{opts.min_replicas}-{opts.max_replicas}'} "
          f"replicas serving on http://{settings.host}:{ns.ray_http_port or settings.port}", flush=True)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0
