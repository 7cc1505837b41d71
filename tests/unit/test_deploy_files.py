"""The deployment files agree with each other and with the code.

docker-compose.yml runs the Procfile's commands; every VARIFLOW_* name they use is
a setting (a misspelt variable is silently ignored by the app, so it is caught
here); the defaults compose fills in are the settings' own; the sandbox env file
is what `worker.devstack.sandbox_env` says; the Dockerfile builds what compose runs.
(docker-compose.yml cannot be started here; tests/e2e/test_procfile.py runs the
Procfile for real.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from sandbox.config import SandboxConfig
from worker.cli import cli
from worker.config import default_of, load_settings, variables
from worker.devstack import sandbox_env

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
COMPOSE = ROOT / "docker-compose.yml"
SANDBOX_ENV = ROOT / "docker-compose.sandbox.env"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Procfile entry -> compose service running the same command.
SAME_COMMAND = {
    "release": "migrate",
    "web": "web",
    "worker": "worker",
    "beat": "beat",
    "flower": "flower",
}
APP_SERVICES = {*SAME_COMMAND.values(), "sandbox"}
VARIABLE = re.compile(r"\bVARIFLOW_[A-Z0-9_]*[A-Z0-9]\b")
INTERPOLATION = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):-(?P<default>[^}]*)\}$")


def procfile() -> dict[str, str]:
    entries = {}
    for line in PROCFILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def without_port_variable(command: str) -> list[str]:
    """The Procfile's command as compose runs it: no shell, so $PORT takes its default."""
    return shlex.split(re.sub(r"\$\{PORT:-(\d+)\}", r"\1", command))


def test_the_procfile_has_the_platform_entries() -> None:
    assert list(procfile()) == ["release", "web", "worker", "beat", "flower"]


@pytest.mark.parametrize(("entry", "service"), SAME_COMMAND.items())
def test_compose_runs_the_procfile_commands(entry: str, service: str) -> None:
    command = services()[service]["command"]
    argv = shlex.split(command) if isinstance(command, str) else command
    assert argv == without_port_variable(procfile()[entry])


def test_web_and_flower_listen_on_platform_port_with_the_compose_ports_as_defaults() -> None:
    entries = procfile()
    assert "--host 0.0.0.0 --port ${PORT:-8000}" in entries["web"]
    assert "--port ${PORT:-5555}" in entries["flower"]
    assert services()["web"]["ports"] == ["8000:8000"]
    assert services()["flower"]["ports"] == ["5555:5555"]


@pytest.mark.parametrize("entry", ["release", "web", "flower"])
def test_procfile_variflow_commands_parse(entry: str) -> None:
    argv = shlex.split(re.sub(r"\$\{PORT:-(\d+)\}", r"\1", procfile()[entry]))
    assert argv[0] == "variflow"
    result = CliRunner().invoke(cli, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output


def test_celery_commands_name_the_app_module() -> None:
    for entry in ("worker", "beat"):
        argv = shlex.split(procfile()[entry])
        assert argv[:4] == ["celery", "-A", "worker.celery_app", entry]


def test_compose_services_and_their_order_of_start() -> None:
    found = services()
    assert set(found) == {"postgres", "redis", *APP_SERVICES}
    assert found["postgres"]["image"] == "postgres:16"
    assert found["redis"]["image"] == "redis:7"
    for backing in ("postgres", "redis"):
        assert found[backing]["healthcheck"]["test"]
        assert found[backing]["volumes"][0].split(":")[0] in compose()["volumes"]
    assert found["migrate"]["restart"] == "no"
    assert found["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("web", "worker", "beat"):
        depends = found[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert depends["redis"] == {"condition": "service_healthy"}
    assert found["flower"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert found["sandbox"]["profiles"] == ["sandbox"]
    for name in APP_SERVICES:
        assert found[name]["build"] == ".", name
        assert found[name]["image"] == found["web"]["image"], name


def test_worker_and_web_share_the_folder_of_stored_results() -> None:
    found = services()
    assert found["web"]["volumes"] == found["worker"]["volumes"]
    volume, _, path = found["web"]["volumes"][0].partition(":")
    assert volume in compose()["volumes"]
    assert f"VARIFLOW_HOME={path}" in DOCKERFILE.read_text().replace(" ", "")


def test_web_and_worker_share_a_metrics_folder_that_starts_empty() -> None:
    found = services()
    home = found["web"]["volumes"][0].partition(":")[2]
    mount = f"variflow-metrics:{home}/metrics"  # metrics_dir's default: $VARIFLOW_HOME/metrics
    assert mount in found["web"]["volumes"]
    assert mount in found["worker"]["volumes"]
    assert compose()["volumes"]["variflow-metrics"]["driver_opts"]["type"] == "tmpfs"
    uid = re.search(r"--uid (\d+)", DOCKERFILE.read_text())
    assert uid is not None
    assert f"uid={uid[1]}" in compose()["volumes"]["variflow-metrics"]["driver_opts"]["o"]


def test_every_variflow_variable_is_a_setting() -> None:
    settings = set(variables())
    knobs = {f"VARIFLOW_SANDBOX_{name.upper()}" for name in SandboxConfig.__dataclass_fields__}
    for path in (PROCFILE, COMPOSE, SANDBOX_ENV, DOCKERFILE):
        unknown = set(VARIABLE.findall(path.read_text())) - settings - knobs
        assert not unknown, f"{path.name}: not settings: {sorted(unknown)}"


def test_compose_defaults_are_the_settings_defaults() -> None:
    env = compose()["x-variflow-env"]
    defaulted = {}
    for name, value in env.items():
        match = INTERPOLATION.match(str(value))
        if match and match["default"]:
            assert match["name"] == name
            defaulted[name.removeprefix("VARIFLOW_").lower()] = match["default"]
    assert "piapi_base_url" in defaulted
    for field, text in defaulted.items():
        variable = f"VARIFLOW_{field.upper()}"
        assert load_settings(**{field: text}).value_of(variable) == default_of(variable)


def test_secrets_are_required_or_come_from_the_host() -> None:
    env = compose()["x-variflow-env"]
    for name in (
        "VARIFLOW_PIAPI_API_KEY",
        "VARIFLOW_PICLAZA_API_KEY",
        "VARIFLOW_LEMONDATA_API_KEY",
    ):
        assert env[name] == f"${{{name}:-}}"
    flower_env = services()["flower"]["environment"]
    assert flower_env["VARIFLOW_FLOWER_BASIC_AUTH"].startswith("${VARIFLOW_FLOWER_BASIC_AUTH:?")
    assert env["VARIFLOW_PUBLIC_URL"].startswith("${VARIFLOW_PUBLIC_URL:?")
    # Only Flower gets Flower's password.
    for name, service in services().items():
        if name != "flower":
            assert "VARIFLOW_FLOWER_BASIC_AUTH" not in (service.get("environment") or {}), name


def test_the_sandbox_env_file_points_every_provider_at_the_sandbox_service() -> None:
    values = env_file(SANDBOX_ENV)
    sandbox = services()["sandbox"]
    port = shlex.split(sandbox["command"])[-1]
    assert sandbox["ports"] == [f"{port}:{port}"]
    assert values == {
        **sandbox_env(f"http://sandbox:{port}"),
        "VARIFLOW_PUBLIC_URL": "http://web:8000",
    }
    settings = load_settings(**{k.removeprefix("VARIFLOW_").lower(): v for k, v in values.items()})
    assert settings.public_base == "http://web:8000"


def test_the_image_is_slim_non_root_and_without_dev_extras() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^RUN pip install \.", text, re.MULTILINE)
    assert "[dev]" not in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0"))


def test_the_build_context_keeps_what_the_dockerfile_copies() -> None:
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        part
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ")
        for part in line.split()[1:-1]
    ]
    assert {"pyproject.toml", "README.md", "worker", "migrations"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(Path(source).match(pattern) for pattern in ignored), source


def test_the_cli_has_the_commands_the_files_use() -> None:
    commands = cli.commands
    assert {"serve", "flower", "db", "sandbox"} <= set(commands)
    db = commands["db"]
    assert isinstance(db, click.Group) and "upgrade" in db.commands
