"""`docker compose up` runs a real federation: the committed compose file and a short real run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_committed_compose_file_is_the_generators_default() -> None:
    generated = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_compose.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (REPO / "docker-compose.yml").read_text() == generated, (
        "docker-compose.yml is stale: run .venv/bin/python scripts/gen_compose.py > docker-compose.yml"
    )


def test_nodes_mount_only_their_own_key_and_data() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    blocks = text.split("\n  node-")[1:]
    assert len(blocks) == 5
    for block in blocks:
        name = "node-" + block.split(":", 1)[0]
        mounts = [line.strip() for line in block.splitlines() if line.strip().startswith("- ./")]
        assert mounts == [
            f"- ./runs/compose/certs/nodes/{name}:/certs:ro",
            f"- ./runs/compose/nodes/{name}:/data:ro",
        ]
    assert '"127.0.0.1:7443:7443"' in text  # published on loopback only


def _docker_ready() -> str | None:
    """None if docker and the image are there, else why not."""
    if shutil.which("docker") is None:
        return "no docker client"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no docker daemon (scripts/docker-setup starts one)"
    if subprocess.run(
        ["docker", "image", "inspect", "pluralfed:latest"], capture_output=True
    ).returncode:
        return "no pluralfed:latest image (scripts/build-image builds it)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        return "no docker compose (scripts/docker-setup installs it)"
    return None


@pytest.mark.slow
def test_docker_compose_up_runs_a_federation(tmp_path: Path) -> None:
    why = _docker_ready()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the compose federation, but: {why}")
        pytest.skip(why)
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    project = f"pftest{uuid.uuid4().hex[:8]}"
    compose = ["docker", "compose", "-p", project]
    env = {**os.environ, "ROUNDS": "3", "EVAL_EVERY": "3"}
    try:
        up = subprocess.run(
            [*compose, "up", "--no-build", "--no-color"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        log = up.stdout + up.stderr
        assert up.returncode == 0, log[-4000:]
        state = tmp_path / "runs" / "compose" / "coordinator"
        rows = [json.loads(line) for line in (state / "metrics.jsonl").open()]
        rounds = [r["round"] for r in rows if r["kind"] == "round"]
        assert rounds == [1, 2, 3], log[-4000:]
        assert all(len(r["participants"]) >= 3 for r in rows if r["kind"] == "round")
        results = json.loads((state / "results.json").read_text())
        assert set(results["final_evaluation"]["reports"]) == {
            "training groups (test questions)",
            "held-out groups",
        }
        assert (state / "final" / "model.safetensors").is_file()
        assert "mutual TLS" in log and "federation finished: 3 rounds" in log
        ps = subprocess.run(
            [*compose, "ps"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        ).stdout
        assert "Exit 0" in ps and "Exit 1" not in ps, ps
    finally:
        subprocess.run(
            [*compose, "down", "-v", "--remove-orphans"],
            cwd=tmp_path,
            capture_output=True,
            timeout=300,
        )
        # the setup container chowned the outputs to the image's user; give them back
        subprocess.run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", str(tmp_path)], check=False)
