"""deploy/: the unit file passes `systemd-analyze verify`, keeps its hardening score, and the examples load."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forecastd.config import load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "forecastd.service"
ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointed at an executable that exists here (verify checks the path)."""
    unit = tmp_path / "forecastd.service"
    unit.write_text(UNIT.read_text().replace("/opt/forecastd/bin/forecastd", sys.executable))
    return unit


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_declares_what_the_daemon_relies_on():
    d = _directives()
    for key, value in {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "KillMode": "mixed",
                       "DynamicUser": "yes", "StateDirectory": "forecastd", "ProtectSystem": "strict",
                       "NoNewPrivileges": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert d.get(key) == [value], key
    assert int(d["WatchdogSec"][0]) > 0 and int(d["TimeoutStopSec"][0]) > 0
    assert "serve --config" in d["ExecStart"][0]


@needs_systemd
def test_systemd_analyze_verify(tmp_path):
    result = subprocess.run([ANALYZE, "verify", str(_unit_here(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@needs_systemd
def test_security_score_is_the_one_recorded_in_the_readme(tmp_path):
    result = subprocess.run([ANALYZE, "security", "--offline=yes", str(_unit_here(tmp_path))],
                            capture_output=True, text=True)
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip("this systemd-analyze cannot analyze a unit file offline")
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout).group(1))
    recorded = float(re.search(r"overall exposure ([\d.]+)", (DEPLOY / "README.md").read_text()).group(1))
    assert score <= recorded, f"the unit's exposure rose to {score}; README records {recorded}"


def test_example_config_loads():
    config = load_config(DEPLOY / "forecastd.toml.example")
    assert config.state.dir == "/var/lib/forecastd/state" and config.serve.http_host == "127.0.0.1"
    env = (DEPLOY / "forecastd.env.example").read_text()
    assert "FORECASTD_CONFIG=/etc/forecastd/forecastd.toml" in env


def test_documentation_is_installed_by_the_readme_steps():
    """Documentation= pointed at a file nothing installed; each file:// one is put there by deploy/README.md."""
    root = DEPLOY.parent
    readme = (DEPLOY / "README.md").read_text()
    docs = [uri for value in _directives().get("Documentation", []) for uri in value.split()]
    assert docs
    for uri in docs:
        if not uri.startswith("file://"):
            continue
        target = uri.removeprefix("file://")
        step = [line for line in readme.splitlines() if line.startswith("sudo install") and line.split("#")[0].split()[-1] == target]
        assert step, f"deploy/README.md installs nothing at {target}"
        source = step[0].split("#")[0].split()[-2]
        assert (root / source).is_file(), f"{source} (installed as {target}) is not in the repository"


def test_first_training_step_can_cache_compiled_code():
    """Under DynamicUser= only the state and cache directories are writable, and numba needs a cache."""
    readme = (DEPLOY / "README.md").read_text()
    command = readme.split("sudo systemd-run", 1)[1].split("forecastd train", 1)[0]
    assert "-p CacheDirectory=forecastd" in command and "-E XDG_CACHE_HOME=/var/cache/forecastd" in command
    assert "XDG_CACHE_HOME=%C/forecastd" in " ".join(_directives()["Environment"])
    assert _directives()["CacheDirectory"] == ["forecastd"]
