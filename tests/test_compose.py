"""The docker-compose stack: structure checked here, and `docker-compose config` where installed.

Docker engines cannot run on the test machines; the same topology (PostgreSQL, several workers,
the dashboard) is exercised with local processes in tests/test_postgres.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_safety(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "dashboard", "prepare", "worker", "worker-cpu"}
    pg = services["postgres"]
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"] and "pgdata" in compose["volumes"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD}"  # from .env, not the file
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for name in ("dashboard", "prepare", "worker", "worker-cpu"):
        svc = services[name]
        assert svc["image"] == "drtune:latest"
        assert svc["build"] == {"context": ".", "args": {"BASE_IMAGE": "${DRTUNE_BASE_IMAGE}"}}
        assert svc["environment"]["DRTUNE_STORAGE"].startswith("postgresql+psycopg2://${POSTGRES_USER}:")
        assert "runs:/work/runs" in svc["volumes"]  # one artifact store for workers and dashboard
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == "${WORKERS}"
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert worker["command"][:3] == ["drtune", "search", "--grid"]
    # Workers only start in their profile: a plain `up` on a machine without a GPU must not
    # ask for one; the CPU worker runs the same search without the device reservation.
    cpu = services["worker-cpu"]
    assert worker["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert cpu["command"] == worker["command"] and cpu["deploy"]["replicas"] == "${WORKERS}"
    assert "resources" not in cpu["deploy"] and cpu["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert services["dashboard"]["command"][:2] == ["drtune", "dashboard"]
    assert services["prepare"]["profiles"] == ["prepare"]


def test_env_example_defines_every_variable() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), f"missing in .env.example: {sorted(used - set(example))}"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_dockerfile_builds_on_tensorflow_gpu_or_cpu() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=tensorflow/tensorflow:[\d.]+-gpu$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    gpu = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    env = (REPO / ".env.example").read_text()
    assert f"DRTUNE_BASE_IMAGE={gpu}" in env.splitlines()  # .env.example keeps the default
    assert re.search(re.escape(gpu.removesuffix("-gpu")) + r"\s", env)  # and names the CPU image
    assert "pip install" in text and "COPY drtune" in text


@pytest.mark.slow
def test_docker_compose_config_validates(tmp_path: Path) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (.ci/run installs the Debian package)")
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    proc = subprocess.run([exe, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["services"]["worker"]["deploy"]["replicas"] == 2
    assert resolved["services"]["worker-cpu"]["deploy"] == {"replicas": 2}
    assert resolved["services"]["worker"]["build"]["args"]["BASE_IMAGE"].endswith("-gpu")
    assert resolved["services"]["dashboard"]["ports"][0].startswith("127.0.0.1:8080:8080")
