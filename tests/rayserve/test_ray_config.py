"""The Ray Serve application without a cluster: options and autoscaling reach the deployments, the Serve config
files (serve.yaml, the KubeRay RayService) build the application they describe, the CLI refuses bad flags by name,
merged metrics carry a replica label, and the Ray Docker files are valid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.cli import main
from server.config import Settings
from server.ray.app import RayOptions, build, build_app  # needs the ray extra: make test installs it
from server.ray.metrics import merge_metrics

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _deployments(app: Any) -> dict[str, Any]:
    """name -> Deployment of the application graph (ingress first)."""
    out: dict[str, Any] = {}
    todo = [app]
    while todo:
        a = todo.pop()
        d = a._bound_deployment
        out[d.name] = d
        todo += [x for x in (*d.init_args, *d.init_kwargs.values()) if hasattr(x, "_bound_deployment")]
    return out


def test_fixed_replicas_and_resources() -> None:
    d = _deployments(build_app(Settings(model="demo", max_adapters=3), RayOptions(replicas=3, replica_cpus=0.5)))
    assert set(d) == {"Ingress", "Replica", "StoreWriter"}
    rep = d["Replica"]
    assert rep._deployment_config.num_replicas == 3 and rep._deployment_config.autoscaling_config is None
    assert rep.ray_actor_options["num_cpus"] == 0.5 and rep.ray_actor_options["num_gpus"] == 0
    settings, _writer, max_models = rep.init_args
    assert settings["device"] == "cpu" and max_models == 6  # multiplexing keeps 2 x the slots' adapter ids
    assert d["Ingress"]._deployment_config.num_replicas == 1 and d["StoreWriter"]._deployment_config.num_replicas == 1


def test_autoscaling_passes_through() -> None:
    opts = RayOptions(min_replicas=1, max_replicas=5, target_ongoing_requests=6, replica_gpus=1)
    rep = _deployments(build_app(Settings(model="demo"), opts))["Replica"]
    auto = rep._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 5, 6)
    assert rep.ray_actor_options["num_gpus"] == 1 and rep.init_args[0]["device"] == "cuda"


@pytest.mark.parametrize("kw, flag", [
    ({"replicas": 0}, "--replicas"),
    ({"min_replicas": 2}, "--max-replicas"),
    ({"min_replicas": 4, "max_replicas": 2}, "--min-replicas"),
    ({"target_ongoing_requests": 0}, "--target-ongoing-requests"),
    ({"replica_cpus": -1}, "--replica-cpus"),
])
def test_bad_options_name_the_flag(kw: dict[str, Any], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        RayOptions(**kw).validate()


def test_cli_refuses_by_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ray", "serve", "--model", "demo", "--min-replicas", "3"]) == 2
    assert "--max-replicas" in capsys.readouterr().err
    assert main(["ray", "serve", "--model", "demo", "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs" in capsys.readouterr().err


def _serve_config_apps(cfg: dict[str, Any]) -> dict[str, Any]:
    (app,) = cfg["applications"]
    assert app["import_path"] == "server.ray.app:build" and app["route_prefix"] == "/"
    return _deployments(build(app["args"]))


def test_serve_yaml_builds_its_application() -> None:
    d = _serve_config_apps(yaml.safe_load((DOCKER / "ray" / "serve.yaml").read_text()))
    assert d["Replica"]._deployment_config.num_replicas == 2
    assert d["StoreWriter"].ray_actor_options["resources"] == {"peftserve_store": 0.01}
    assert d["Replica"].init_args[0]["adapters_dir"] == "/data/adapters"


def test_rayservice_manifest() -> None:
    docs = list(yaml.safe_load_all((DOCKER / "ray" / "rayservice.yaml").read_text()))
    svc = next(x for x in docs if x["kind"] == "RayService")
    assert svc["apiVersion"] == "ray.io/v1"
    d = _serve_config_apps(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    auto = d["Replica"]._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 8, 16)
    assert d["Replica"].ray_actor_options["num_gpus"] == 1
    cluster = svc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert "peftserve_store" in head["rayStartParams"]["resources"]  # the writer's node ...
    mounts = head["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "adapters", "mountPath": "/data/adapters"} in mounts  # ... is the one mounting the store
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claim = head["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert any(x["kind"] == "PersistentVolumeClaim" and x["metadata"]["name"] == claim for x in docs)


def test_compose_two_node_cluster() -> None:
    compose = yaml.safe_load((DOCKER / "compose.ray.yaml").read_text())
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    for svc in (head, worker):
        assert (DOCKER.parent / svc["build"]["dockerfile"]).name == "Dockerfile.ray"
    cmd = " ".join(head["command"])
    assert "ray start --head" in cmd and "peftserve_store" in cmd
    assert "peftserve ray serve --address auto --replicas 2" in cmd and "--writer-resource peftserve_store" in cmd
    assert "adapters:/data/adapters" in head["volumes"]
    assert not any("adapters:" in v for v in worker.get("volumes", [])), "only the head mounts the store"
    assert "--address=ray-head:6379" in worker["command"] and worker["depends_on"] == ["ray-head"]
    assert "adapters" in compose["volumes"]


def test_dockerfile_ray_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, str(DOCKER / "Dockerfile.ray")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"ray[serve]==2.60.0"' in (DOCKER / "Dockerfile.ray").read_text()


A = """# HELP peftserve_requests_total Requests
# TYPE peftserve_requests_total counter
peftserve_requests_total{adapter="a"} 3.0
# HELP peftserve_running Running
# TYPE peftserve_running gauge
peftserve_running 1.0
"""
B = A.replace("3.0", "5.0").replace("peftserve_running 1.0", "peftserve_running 2.0")


def test_merged_metrics_carry_the_replica() -> None:
    text = merge_metrics({"r1": A, "r2": B})
    assert text.count("# TYPE peftserve_requests_total counter") == 1  # one family, both replicas' samples
    got = {(s.name, s.labels.get("replica"), s.labels.get("adapter")): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[("peftserve_requests_total", "r1", "a")] == 3.0
    assert got[("peftserve_requests_total", "r2", "a")] == 5.0
    assert got[("peftserve_running", "r1", None)] == 1.0 and got[("peftserve_running", "r2", None)] == 2.0


def test_replica_refuses_bytes_that_do_not_match_the_sha256(tmp_path: Path) -> None:
    """A replica writes fetched adapter bytes only when they hash to the catalogue's sha256."""
    from adapters_store.store import content_sha256
    from server.ray.app import Replica

    src = tmp_path / "src"
    src.mkdir()
    files = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"\x00" * 64}
    for n, data in files.items():
        (src / n).write_bytes(data)
    sha, _ = content_sha256(src)
    rep = object.__new__(Replica.func_or_class)  # the class Serve runs, without starting an engine
    rep.local = tmp_path / "replica"
    got = {"files": files, "sha256": sha, "record": {}}
    path = rep._write_verified("a", 1, sha, got)
    assert content_sha256(path)[0] == sha and path.name == "v1"
    tampered = {**got, "files": {**files, "adapter_model.safetensors": b"\x01" + b"\x00" * 63}}
    with pytest.raises(RuntimeError, match="hash"):
        rep._write_verified("a", 2, sha, tampered)
    assert not (rep.local / "fetched" / "a" / "v2").exists()
    assert not any((rep.local / "fetched" / ".tmp").iterdir()), "nothing half-written is left"
