"""`peftserve adapters push|ls|show|rm` against a live server."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.adapters import make_lora
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "adapters", *args], capture_output=True, text=True,
                          timeout=120)


def test_push_ls_show_rm(tiny_root, tmp_path):
    base = make_tiny_checkpoint(tiny_root, "llama", seed=11)
    d = make_lora(base, os.path.join(tiny_root, "cli-lora"), r=4, targets=["q_proj"], seed=3)
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=128, kv_cache_blocks=32) as srv:
        r = cli("push", d, "--name", "from-cli", "--url", srv.url)
        assert r.returncode == 0 and "from-cli v1 LORA rank=4" in r.stdout, r.stderr
        r = cli("push", d, "--name", "from-cli", "--url", srv.url)
        assert r.returncode == 1 and "409" in r.stderr and "already exists" in r.stderr
        r = cli("push", d, "--name", "from-cli", "--replace", "--url", srv.url)
        assert r.returncode == 0 and "from-cli v2" in r.stdout
        r = cli("ls", "--url", srv.url)
        assert r.returncode == 0 and "from-cli" in r.stdout and "disk" in r.stdout
        r = cli("show", "from-cli", "--url", srv.url)
        assert r.returncode == 0 and '"version": 2' in r.stdout
        assert cli("rm", "from-cli", "--url", srv.url).returncode == 0
        r = cli("show", "from-cli", "--url", srv.url)
        assert r.returncode == 1 and "404" in r.stderr
        r = cli("push", str(tmp_path), "--name", "x", "--url", srv.url)
        assert r.returncode == 2 and "adapter_config.json" in r.stderr
