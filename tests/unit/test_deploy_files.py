"""The deployment files agree with each other and with the code.

docker-compose.yml runs the Procfile's commands; every VARIFLOW_* name they use is
a setting (a misspelt variable is silently ignored by the app, so it is caught
here); every setting reaches the containers through variflow.env, whose example
lists them all with their defaults; no credential has a default; nothing is shared
on disk between containers; the sandbox env file is what `worker.devstack.sandbox_env`
says; the Dockerfile builds what compose runs, from requirements.lock, which pins
what pyproject.toml asks for. (docker-compose.yml cannot be started here: no Docker
engine; tests/e2e/test_procfile.py runs the Procfile for real.)
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from sandbox.config import SandboxConfig
from tests.s3_support import ACCESS_KEY, AWS_VARIABLES, REGION, SECRET_KEY, start_moto_server
from worker.cli import cli
from worker.config import default_of, load_settings, variables
from worker.devstack import free_port, sandbox_env

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
COMPOSE = ROOT / "docker-compose.yml"
SANDBOX_ENV = ROOT / "docker-compose.sandbox.env"
ENV_EXAMPLE = ROOT / "variflow.env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
CLIENT_PYPROJECT = ROOT / "clients" / "python" / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"

# Procfile entry -> compose service running the same command.
SAME_COMMAND = {
    "release": "migrate",
    "web": "web",
    "worker": "worker",
    "beat": "beat",
    "flower": "flower",
}
# The services that run variflow's processes, and so need its settings.
VARIFLOW_SERVICES = set(SAME_COMMAND.values())
IMAGE_SERVICES = {*VARIFLOW_SERVICES, "sandbox", "results-bucket"}
BACKING_SERVICES = {"postgres", "redis", "s3"}
LONG_RUNNING = {"web", "worker", "beat", "flower"}
VARIABLE = re.compile(r"\bVARIFLOW_[A-Z0-9_]*[A-Z0-9]\b")
# ${NAME}, ${NAME:-default}, ${NAME:?message}, ... (compose's interpolation)
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z0-9_]+)(?P<op>:?[-?+])?(?P<rest>[^}]*)\}")
CREDENTIAL = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|AUTH|CREDENTIAL")
# NAME=value, or "# NAME=value" for a documented default (variflow.env.example).
ASSIGNMENT = re.compile(r"^(?P<comment>#\s*)?(?P<name>VARIFLOW_[A-Z0-9_]+)=(?P<value>.*)$")


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


def example() -> tuple[dict[str, str], dict[str, str]]:
    """variflow.env.example: (the settings it sets, the ones it documents commented out)."""
    set_, documented = {}, {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            target = documented if match["comment"] else set_
            assert match["name"] not in {**set_, **documented}, f"twice: {match['name']}"
            target[match["name"]] = match["value"].strip()
    return set_, documented


def field(variable: str) -> str:
    return variable.removeprefix("VARIFLOW_").lower()


def argv_of(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else command


def without_port_variable(command: str) -> list[str]:
    """The Procfile's command as compose runs it: no shell, so $PORT takes its default."""
    return shlex.split(re.sub(r"\$\{PORT:-(\d+)\}", r"\1", command))


def healthcheck_command(service: str) -> list[str]:
    test = services()[service]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL"), service
    return shlex.split(test[1]) if test[0] == "CMD-SHELL" else list(test[1:])


# --- the Procfile and compose run the same commands --------------------------------------


def test_the_procfile_has_the_platform_entries() -> None:
    assert list(procfile()) == ["release", "web", "worker", "beat", "flower"]


@pytest.mark.parametrize(("entry", "service"), SAME_COMMAND.items())
def test_compose_runs_the_procfile_commands(entry: str, service: str) -> None:
    assert argv_of(services()[service]["command"]) == without_port_variable(procfile()[entry])


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


def test_the_procfile_no_longer_asks_for_a_shared_home_for_results() -> None:
    text = PROCFILE.read_text()
    assert "must see the same VARIFLOW_HOME" not in text
    assert "VARIFLOW_RESULT_STORE" in text


# --- compose: services, order of start, health --------------------------------------------


def test_compose_services_and_their_order_of_start() -> None:
    found = services()
    assert set(found) == BACKING_SERVICES | IMAGE_SERVICES
    assert found["postgres"]["image"] == "postgres:16"
    assert found["redis"]["image"] == "redis:7"
    for backing in BACKING_SERVICES:
        assert found[backing]["volumes"][0].split(":")[0] in compose()["volumes"]
    for backing in ("postgres", "redis"):
        assert found[backing]["healthcheck"]["test"]
    assert found["migrate"]["restart"] == "no"
    assert found["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("web", "worker", "beat"):
        depends = found[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert depends["redis"] == {"condition": "service_healthy"}
        assert depends["results-bucket"] == {"condition": "service_completed_successfully"}
    assert found["flower"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert found["sandbox"]["profiles"] == ["sandbox"]
    for name in IMAGE_SERVICES:
        assert found[name]["build"] == ".", name
        assert found[name]["image"] == found["web"]["image"], name


@pytest.mark.parametrize("service", sorted(LONG_RUNNING))
def test_every_long_running_variflow_service_has_a_health_check(service: str) -> None:
    check = services()[service]["healthcheck"]
    assert healthcheck_command(service)
    assert check["interval"] and check["retries"], service


def test_the_worker_health_check_pings_this_worker_over_the_broker() -> None:
    argv = healthcheck_command("worker")
    assert argv[:5] == ["celery", "-A", "worker.celery_app", "inspect", "ping"]
    # Its own node only ($$ is compose's escape of $: the container's shell expands it).
    destination = argv[argv.index("--destination") + 1]
    assert destination == "celery@$$HOSTNAME"


@pytest.mark.parametrize("service", ["web", "flower"])
def test_http_health_checks_ask_the_port_the_service_listens_on(service: str) -> None:
    port = argv_of(services()[service]["command"])[-1]
    assert f"http://127.0.0.1:{port}/" in " ".join(healthcheck_command(service))


def test_variflow_commands_in_health_checks_exist() -> None:
    for service in LONG_RUNNING:
        argv = healthcheck_command(service)
        if argv[0] == "variflow":
            result = CliRunner().invoke(cli, [*argv[1:], "--help"])
            assert result.exit_code == 0, (service, result.output)
    assert healthcheck_command("beat")[0] == "variflow"


def test_beat_may_run_twice() -> None:
    beat = services()["beat"]
    assert beat["deploy"]["replicas"] >= 2
    assert "container_name" not in beat  # a fixed name would allow one only


# --- compose: settings and credentials ----------------------------------------------------


@pytest.mark.parametrize("service", sorted(VARIFLOW_SERVICES))
def test_every_variflow_service_reads_the_settings_file(service: str) -> None:
    files = services()[service]["env_file"]
    assert files[0] == "variflow.env"
    assert services()[service]["environment"] == compose()["x-variflow-env"]


def test_compose_sets_only_what_it_composes_and_the_env_file_does_not_set_those() -> None:
    composed = set(compose()["x-variflow-env"])
    assert composed == {
        "VARIFLOW_DATABASE_URL",
        "VARIFLOW_BROKER_URL",
        "VARIFLOW_RESULT_STORE",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    set_, documented = example()
    # Compose's environment wins over env_file: a value set there would be ignored.
    assert not composed & set(set_)
    assert {name for name in composed if name.startswith("VARIFLOW_")} <= set(documented)


def test_no_credential_has_a_default_and_compose_refuses_to_start_without_one() -> None:
    text = COMPOSE.read_text()
    required = set()
    for match in INTERPOLATION.finditer(text):
        if CREDENTIAL.search(match["name"]):
            assert match["op"] == ":?", f"{match['name']} must be required: {match[0]}"
            required.add(match["name"])
    assert required == {"POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"}
    found = services()
    assert found["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "${POSTGRES_PASSWORD:?" in compose()["x-variflow-env"]["VARIFLOW_DATABASE_URL"]
    s3_env = found["s3"]["environment"]
    assert s3_env["ROOT_ACCESS_KEY"].startswith("${S3_ACCESS_KEY:?")
    assert s3_env["ROOT_SECRET_KEY"].startswith("${S3_SECRET_KEY:?")


def test_the_compose_settings_are_valid() -> None:
    env = compose()["x-variflow-env"]
    values = {
        field(name): INTERPOLATION.sub("password", value)
        for name, value in env.items()
        if name.startswith("VARIFLOW_")
    }
    settings = load_settings(**values)
    assert settings.broker_url.startswith("redis://redis:")
    assert settings.database_url.startswith("postgresql+psycopg://variflow:password@postgres:")


# --- compose: results in the object store, nothing shared on disk -------------------------


def test_results_go_to_the_s3_service_in_a_bucket_made_before_anything_uses_it() -> None:
    env = compose()["x-variflow-env"]
    found = services()
    bucket = re.fullmatch(r"s3://([a-z0-9.-]+)/\S+", env["VARIFLOW_RESULT_STORE"])
    assert bucket is not None
    assert f'Bucket="{bucket[1]}"' in "\n".join(found["results-bucket"]["command"])
    assert found["results-bucket"]["environment"] == env  # the app's credentials
    assert found["results-bucket"]["restart"] == "no"
    # The app reaches the store where it listens, on the compose network.
    store = found["s3"]
    port = store["command"][store["command"].index("--port") + 1].lstrip(":")
    assert env["AWS_ENDPOINT_URL"] == f"http://s3:{port}"
    assert "ports" not in store  # not published: web streams results (the example says)
    assert example()[0]["VARIFLOW_RESULT_SERVE"] == "stream"


def test_the_results_bucket_one_shot_waits_for_the_store_and_may_run_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Its Python, run as compose runs it, against a real S3-compatible server (moto)
    that starts after it: it waits, makes the bucket; run again, it succeeds."""
    command = services()["results-bucket"]["command"]
    assert command[0] == "python"
    argv = [sys.executable, *command[1:]]
    port = free_port()
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    first = subprocess.Popen(argv, stderr=subprocess.PIPE)  # before the store answers
    with start_moto_server(port=port, log=tmp_path / "moto.log") as server:
        _, errors = first.communicate(timeout=90)
        assert first.returncode == 0, errors.decode()
        again = subprocess.run(argv, capture_output=True, timeout=90, check=False)
        assert again.returncode == 0, again.stderr.decode()
        buckets = [b["Name"] for b in server.client().list_buckets()["Buckets"]]
    assert buckets == ["variflow-results"]


def test_every_image_is_pinned_to_a_version() -> None:
    for name, service in services().items():
        if name not in IMAGE_SERVICES:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), name


def test_no_container_shares_a_disk_with_another() -> None:
    found = services()
    mounted: dict[str, list[str]] = {}
    for name, service in found.items():
        for volume in service.get("volumes", []):
            mounted.setdefault(volume.split(":")[0], []).append(name)
    assert all(len(users) == 1 for users in mounted.values()), mounted
    # variflow's own containers mount nothing: results are in the object store, and each
    # keeps its metrics and beat liveness in its own VARIFLOW_HOME.
    for name in IMAGE_SERVICES:
        assert "volumes" not in found[name], name
    assert set(mounted) == set(compose()["volumes"]) == {"postgres-data", "redis-data", "s3-data"}


def test_the_worker_exposes_the_metrics_port_the_settings_file_sets() -> None:
    port = example()[0]["VARIFLOW_WORKER_METRICS_PORT"]
    assert services()["worker"]["expose"] == [port]


# --- the settings files --------------------------------------------------------------------


def test_every_variflow_variable_is_a_setting() -> None:
    settings = set(variables())
    knobs = {f"VARIFLOW_SANDBOX_{name.upper()}" for name in SandboxConfig.__dataclass_fields__}
    for path in (PROCFILE, COMPOSE, SANDBOX_ENV, ENV_EXAMPLE, DOCKERFILE):
        unknown = set(VARIABLE.findall(path.read_text())) - settings - knobs
        assert not unknown, f"{path.name}: not settings: {sorted(unknown)}"


def test_the_example_settings_file_lists_every_setting() -> None:
    set_, documented = example()
    missing = set(variables()) - set(set_) - set(documented)
    assert not missing, f"variflow.env.example lacks {sorted(missing)}"


def test_the_example_defaults_are_the_settings_defaults() -> None:
    _, documented = example()
    shown = {name: value for name, value in documented.items() if value}
    assert "VARIFLOW_PIAPI_BASE_URL" in shown
    for variable, text in shown.items():
        assert load_settings(**{field(variable): text}).value_of(variable) == default_of(
            variable
        ), variable


def test_the_example_settings_are_valid_and_leave_secrets_to_fill_in() -> None:
    set_, documented = example()
    settings = load_settings(**{field(name): value for name, value in set_.items()})
    assert settings.public_base.startswith("https://")
    # No working password in a file that is checked in.
    assert set_["VARIFLOW_FLOWER_BASIC_AUTH"] == ""
    for name, value in {**set_, **documented}.items():
        if CREDENTIAL.search(name.removeprefix("VARIFLOW_")) and not name.endswith("_URL"):
            assert value == "", name


def test_the_sandbox_env_file_points_every_provider_at_the_sandbox_service() -> None:
    values = env_file(SANDBOX_ENV)
    sandbox = services()["sandbox"]
    port = shlex.split(sandbox["command"])[-1]
    assert sandbox["ports"] == [f"{port}:{port}"]
    assert values == {
        **sandbox_env(f"http://sandbox:{port}"),
        "VARIFLOW_PUBLIC_URL": "http://web:8000",
    }
    settings = load_settings(**{field(k): v for k, v in values.items()})
    assert settings.public_base == "http://web:8000"
    # It goes over variflow.env's values, for every variflow service.
    for service in VARIFLOW_SERVICES:
        overlay = services()[service]["env_file"][-1]
        assert overlay.startswith("${SETTINGS_OVERLAY:-variflow.env}"), service
    assert f"SETTINGS_OVERLAY={SANDBOX_ENV.name}" in COMPOSE.read_text()


# --- the image and its lock ----------------------------------------------------------------


def test_the_image_is_slim_non_root_and_without_dev_extras() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert "[dev]" not in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0"))


def test_the_image_installs_the_lock_with_hashes_then_variflow_without_dependencies() -> None:
    runs = [
        line.strip() for line in DOCKERFILE.read_text().splitlines() if line.startswith("RUN pip")
    ]
    assert runs[0] == f"RUN pip install --require-hashes -r {LOCK.name}"
    assert re.match(r"RUN pip install --no-deps \. \./clients/python\b", runs[1])
    assert len(runs) == 2


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
    assert {"pyproject.toml", "README.md", "worker", "migrations", LOCK.name} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(Path(source).match(pattern) for pattern in ignored), source
    # The settings files carry secrets: never in the image.
    for secret in ("variflow.env", ".env"):
        assert any(Path(secret).match(pattern) for pattern in ignored), secret


def lock_pins() -> dict[str, tuple[Version, str | None, list[str]]]:
    """requirements.lock: name -> (version, environment marker, hashes)."""
    pins: dict[str, tuple[Version, str | None, list[str]]] = {}
    current = ""
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith(" "):
            hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", line)
            assert hashes, f"not a hash line under {current}: {line!r}"
            pins[current][2].extend(hashes)
            continue
        requirement, _, marker = line.rstrip(" \\").partition(";")
        name, _, version = requirement.strip().partition("==")
        current = canonicalize_name(name.split("[")[0])
        assert version and current not in pins, line
        pins[current] = (Version(version), marker.strip() or None, [])
    return pins


# The image's Python: python:3.11-slim, Linux (amd64 or arm64).
IMAGE_ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.9",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def runtime_requirements() -> list[Requirement]:
    server = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    client = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]["dependencies"]
    return [Requirement(text) for text in [*server, *client]]


def test_the_lock_pins_every_dependency_at_a_version_pyproject_allows() -> None:
    pins = lock_pins()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in {LOCK.name}: run `make lock`"
        version, marker, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCK.name} pins {name}=={version}, pyproject.toml asks {requirement.specifier}: "
            "run `make lock`"
        )
        # Installed in the image, not only on some other platform.
        assert marker is None or Marker(marker).evaluate(IMAGE_ENVIRONMENT), (name, marker)


def test_every_pin_of_the_lock_has_hashes_and_no_dev_tool_is_pinned() -> None:
    pins = lock_pins()
    assert len(pins) > len(runtime_requirements())  # the dependencies' own, too
    for name, (_, _, hashes) in pins.items():
        assert hashes, f"{name} has no --hash"
    dev = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["dev"]
    for tool in ("pytest", "ruff", "mypy", "hypothesis", "uv"):
        assert any(Requirement(text).name == tool for text in dev), tool
        assert tool not in pins, tool


def test_make_lock_regenerates_the_lock_from_pyproject() -> None:
    assert "#    make lock" in LOCK.read_text().splitlines()[1]
    recipe = re.search(r"^lock:.*\n((?:\t.*\n)+)", MAKEFILE.read_text(), re.MULTILINE)
    assert recipe is not None
    command = recipe[1].replace("\\\n", " ")
    assert "uv pip compile pyproject.toml" in command
    assert "--generate-hashes" in command
    assert f"-o {LOCK.name}" in command


def test_the_cli_has_the_commands_the_files_use() -> None:
    commands = cli.commands
    assert {"serve", "flower", "db", "sandbox"} <= set(commands)
    db = commands["db"]
    assert isinstance(db, click.Group) and "upgrade" in db.commands
