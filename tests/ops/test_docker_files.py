"""The Docker files: hadolint-clean, and compose wires the images, volume and /ready healthcheck."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, str(DOCKER / "Dockerfile"), str(DOCKER / "Dockerfile.cpu")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_services_volume_and_healthcheck():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"peftserve", "peftserve-cpu"}
    for svc in services.values():
        assert (DOCKER.parent / svc["build"]["dockerfile"]).is_file()
        assert "adapters:/data/adapters" in svc["volumes"]
        assert svc["environment"]["PEFTSERVE_ADAPTERS_DIR"] == "/data/adapters"
        assert "/ready" in " ".join(svc["healthcheck"]["test"])
    assert "adapters" in compose["volumes"]
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (DOCKER / name).read_text()
        assert "/ready" in text and "PEFTSERVE_HOST=0.0.0.0" in text and 'ENTRYPOINT ["peftserve", "serve"]' in text
