"""No Docker engine runs here: check the compose files as far as a parser can."""

import importlib.util
import re
from dataclasses import fields
from pathlib import Path

import yaml

from backend.config import SETTING_NAMES, Settings

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def test_compose_files_pass_only_settings_the_backend_reads_and_run_on_the_cpu_by_default():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    gpu = yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text())
    assert set(compose["x-backend-env"]) <= {name.upper() for name in SETTING_NAMES}
    assert "deploy" not in compose["services"]["worker"]  # a GPU reservation fails on hosts without one
    assert set(gpu["services"]) <= set(compose["services"])
    assert gpu["services"]["backend"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/cu128")
    assert gpu["services"]["worker"]["image"] == gpu["services"]["backend"]["image"]  # the image built above
    assert compose["services"]["worker"]["healthcheck"]["test"][-2:] == ["backend.healthcheck", "--worker"]


def test_in_the_gpu_stack_device_reaches_only_the_service_with_the_gpu():
    # DEVICE=cuda from the shell, meant for the worker, would stop the server: no GPU is reserved for it there
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    gpu = yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text())
    shell = {"DEVICE": "cuda"}
    for name in ("backend", "worker"):
        environment = {**compose["services"][name]["environment"], **gpu["services"][name].get("environment", {})}
        device = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: shell.get(m[1]) or m[2], environment["DEVICE"])
        assert (device == "cuda") == ("deploy" in gpu["services"][name]), name


def test_every_compose_service_is_restarted_when_it_dies():
    # a worker on a GPU runs its jobs in its own process (backend.worker): a job that crashes it takes the worker down,
    # and only a restart policy brings it back (rq retries the job); likewise after a reboot of the host
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert {name: service.get("restart") for name, service in compose["services"].items()} == {
        name: "unless-stopped" for name in compose["services"]
    }


def test_the_build_context_holds_exactly_what_the_dockerfile_copies():
    # the repository holds virtual environments, wheels and model files (hundreds of MB) the image does not need
    copied = {line.split()[1] for line in (DOCKER / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    ignore = [line for line in (DOCKER.parent / ".dockerignore").read_text().splitlines() if line.strip()]
    assert "*" in ignore
    assert {line[1:].rstrip("/") for line in ignore if line.startswith("!")} == copied


README = DOCKER.parent / "README.md"


def test_the_readme_settings_table_names_every_setting_with_its_default():
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            name_cell, default_cell = [cell.strip() for cell in line.strip("|").split("|")][:2]
            names = re.findall(r"`([A-Z_]+)`", name_cell)
            defaults = re.findall(r"`([^`]*)`", default_cell) or [""] * len(names)  # "–": empty
            documented.update(zip(names, defaults, strict=True))
    default = Settings()
    assert documented == {f.name.upper(): str(getattr(default, f.name)) for f in fields(Settings)}


def test_the_readme_names_the_settings_the_compose_file_takes_from_the_shell():
    compose = (DOCKER / "docker-compose.yml").read_text()
    from_shell = set(re.findall(r"\$\{([A-Z_]+)", compose))
    before, after = README.read_text().split(" pass through from the shell", 1)
    sentence = before.rsplit("\n\n", 1)[-1].rsplit(".", 1)[-1] + after.split(";", 1)[0]  # (to the server, ...)
    assert set(re.findall(r"`([A-Z_]+)`", sentence)) == from_shell
    assert from_shell <= {name.upper() for name in SETTING_NAMES}


def test_the_modules_the_docker_files_run_exist():
    commands = (DOCKER / "Dockerfile").read_text() + (DOCKER / "docker-compose.yml").read_text()
    modules = set(re.findall(r'"-m", "([\w.]+)"', commands)) | set(re.findall(r"\b(\w+):app\b", commands))
    assert {"backend.healthcheck", "backend.worker", "_wsgi"} <= modules
    assert all(importlib.util.find_spec(module) for module in modules)
