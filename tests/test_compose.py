"""Deployment files: docker-compose.yml validates and wires the services; configs/ load."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from flywheel.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ALWAYS = {"postgres", "redis", "migrate", "demo-model", "server", "worker", "nginx"}
CPU_ONLY = {"server-cpu", "worker-cpu"}


def compose_command() -> list[str] | None:
    """``docker-compose`` (v1, Debian's package) or ``docker compose`` (v2 plugin), if any."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


KEYS = {"FLYWHEEL_API_KEYS": "user-key", "FLYWHEEL_ADMIN_KEY": "admin-key"}


def run_config(*args: str, keys: dict[str, str] = KEYS) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed "
                    "(apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "COMPOSE_"))}
    return subprocess.run([*command, "-f", str(COMPOSE_FILE), *args, "config"],
                          capture_output=True, text=True, cwd=ROOT, env={**env, **keys},
                          timeout=60)


def compose_config(*args: str) -> dict[str, Any]:
    result = run_config(*args)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_requires_keys_and_binds_loopback() -> None:
    for missing in KEYS:
        result = run_config(keys={k: v for k, v in KEYS.items() if k != missing})
        assert result.returncode != 0 and missing in result.stderr, result.stderr
    ports = compose_config()["services"]["nginx"]["ports"]
    published = ports[0] if isinstance(ports[0], str) else ports[0].get("host_ip")
    assert "127.0.0.1" in str(published), ports


@pytest.mark.parametrize("profile", [None, "cpu"])
def test_compose_config_validates(profile: str | None) -> None:
    config = compose_config(*(["--profile", profile] if profile else []))
    assert set(config["services"]) >= ALWAYS | CPU_ONLY
    assert {"pgdata", "redisdata", "models", "checkpoints"} <= set(config["volumes"])


def test_compose_wiring() -> None:
    services = compose_config()["services"]
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name in ("server", "server-cpu"):
        server = services[name]
        assert server["command"] == ["serve"]
        assert "/readyz" in " ".join(server["healthcheck"]["test"])
        assert server["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "flywheel-server" in server["networks"]["default"]["aliases"]
        assert int(server["deploy"]["replicas"]) >= 2
    assert services["server"]["environment"]["FLYWHEEL_ENGINE"] == "vllm"
    assert services["server-cpu"]["environment"]["FLYWHEEL_ENGINE"] == "transformers"
    assert services["server-cpu"]["profiles"] == ["cpu"]
    gpus = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["capabilities"] == ["gpu"]
    for name in ("server", "worker", "server-cpu", "worker-cpu"):
        env = services[name]["environment"]
        assert env["FLYWHEEL_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["FLYWHEEL_CHECKPOINT_DIR"] == "/data/checkpoints", name
        targets = {v.split(":")[1] if isinstance(v, str) else v["target"]
                   for v in services[name]["volumes"]}
        assert {"/data/checkpoints", "/models"} <= targets, name
    assert any("nginx.conf" in str(v) for v in services["nginx"]["volumes"])


def test_nginx_config_is_sse_friendly_and_private() -> None:
    text = (ROOT / "configs" / "nginx.conf").read_text()
    for directive in ("proxy_buffering off;", "proxy_read_timeout 1h;", "resolver 127.0.0.11",
                      "set $flywheel_replicas flywheel-server:8000;",
                      "proxy_pass http://$flywheel_replicas;", "proxy_http_version 1.1;",
                      "location = /metrics", "return 404"):
        assert directive in text, directive


def test_images_are_overridable_and_only_nginx_publishes() -> None:
    services = compose_config()["services"]
    assert services["postgres"]["image"] == "postgres:16-alpine"
    env = {"POSTGRES_IMAGE": "local/postgres:x", "REDIS_IMAGE": "local/redis:x",
           "NGINX_IMAGE": "local/nginx:x", "PYTHON_IMAGE": "local/python:x"}
    result = run_config(keys={**KEYS, **env})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("postgres", "redis", "nginx"):
        assert services[name]["image"] == f"local/{name}:x"
        assert "ports" not in services[name] or name == "nginx", name
    assert services["server-cpu"]["build"]["args"]["PYTHON_IMAGE"] == "local/python:x"
    assert {name for name, service in services.items() if service.get("ports")} == {"nginx"}


def test_gpu_and_cpu_stacks_are_profiles() -> None:
    services = compose_config()["services"]
    assert services["server"]["profiles"] == services["worker"]["profiles"] == ["gpu"]
    assert services["server-cpu"]["profiles"] == services["worker-cpu"]["profiles"] == ["cpu"]
    shared = {"postgres", "redis", "migrate", "demo-model", "nginx"}
    assert not any(services[name].get("profiles") for name in shared)


def _unknown_keys(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    unknown = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(prefix + key)
        elif isinstance(value, dict) and isinstance(field.annotation, type) \
                and issubclass(field.annotation, BaseModel):
            unknown += _unknown_keys(value, field.annotation, f"{prefix}{key}.")
    return unknown


@pytest.mark.parametrize("name", ["local.yaml", "production.yaml"])
def test_example_configs_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / "configs" / name
    # Settings ignore unknown keys, so a typo would pass silently: check every key by name.
    assert _unknown_keys(yaml.safe_load(path.read_text()), Settings) == []
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(path))
    settings = Settings()
    assert settings.engine == ("vllm" if name == "production.yaml" else "transformers")
