"""No Docker engine runs here: check the compose files as far as a parser can."""

from pathlib import Path

import yaml

from backend.config import SETTING_NAMES

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
