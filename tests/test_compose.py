"""`docker compose up` runs a real federation: the committed compose file and a short real run."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECORD = b'{"group": "Mali", "question": "Q?", "options": ["Yes", "No"], "distribution": [1, 2]}\n'


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
    assert '"127.0.0.1:${PLURALFED_PORT:-7443}:7443"' in text  # published on loopback only


def _yaml_list(block: str, key: str) -> list[str]:
    """The items of the list `key:` in `block`, as compose's YAML gives them: a JSON-style
    `[...]` on one line, or `- word` items and `- |` literal blocks (their lines, without the
    indentation, joined by newlines)."""
    flow = f"\n{key}: ["
    if flow in block:
        return list(json.loads("[" + block.split(flow, 1)[1].split("\n", 1)[0]))
    lines = block.split(f"\n{key}:\n", 1)[1].splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip())
    items: list[str] = []
    literal: list[str] | None = None
    for line in lines:
        if literal is not None and (not line.strip() or len(line) - len(line.lstrip()) > indent):
            literal.append(line[indent + 2 :])
            continue
        if literal is not None:
            items.append("\n".join(literal))
            literal = None
        if len(line) - len(line.lstrip()) != indent or not line.lstrip().startswith("- "):
            break
        word = line.strip()[2:]
        if word == "|":
            literal = []
        else:
            items.append(word)
    return items


def test_the_coordinators_health_check_runs_as_the_checkouts_owner(tmp_path: Path) -> None:
    """The coordinator and nodes start as root only to run as the checkout's owner, but docker
    runs a health check as the container's user: `python3 -m pluralfed.healthcheck` ran as root
    (review, session 22). It now goes through the entrypoint's own switch, which picks the owner
    of the state folder, or uid 10001 when that is root."""
    text = (REPO / "docker-compose.yml").read_text()
    coordinator = text.split("\n  coordinator:\n", 1)[1].split("\n\n", 1)[0]
    entrypoint = _yaml_list(coordinator, "    entrypoint")
    test = _yaml_list(coordinator, "      test")
    assert test[0] == "CMD"
    assert test[1:5] == entrypoint[:4]  # sh -c <the same switch> run-as-owner
    assert test[5:] == ["python3", "-m", "pluralfed.healthcheck", "localhost:7443", "/health-certs"]
    assert entrypoint[:2] == ["/bin/sh", "-c"] and entrypoint[3:] == ["run-as-owner", "pluralfed"]
    # what the switch runs the health check as: setpriv on the PATH only prints its arguments
    switch = test[3].replace("$$", "$")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "setpriv").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "bin" / "setpriv").chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}

    def runs_as() -> str:
        script = switch.replace("/home/pluralfed/work/coordinator", str(state))
        done = subprocess.run(
            ["sh", "-c", script, *test[4:]], capture_output=True, text=True, env=env, check=True
        )
        return done.stdout.strip()

    health = "python3 -m pluralfed.healthcheck localhost:7443 /health-certs"
    if state.stat().st_uid == 0:  # a checkout of root's (CI): the image's user, never root
        assert runs_as() == f"--reuid=10001 --regid=10001 --clear-groups {health}"
    if os.getuid() == 0:  # another user's checkout
        os.chown(state, 4242, 4343)
    uid, gid = state.stat().st_uid, state.stat().st_gid
    if uid != 0:
        assert runs_as() == f"--reuid={uid} --regid={gid} --clear-groups {health}"


def _gen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_compose.py"), *args],
        capture_output=True,
        text=True,
    )


def _setup_script(compose: str) -> str:
    """The setup service's shell script as sh sees it (compose turns $$ into $)."""
    lines = compose.split("      - |\n", 1)[1].split("\n    volumes:", 1)[0].splitlines()
    return "\n".join(line.removeprefix("        ") for line in lines).replace("$$", "$")


NASTY = ["Cote d'Ivoire", "Korea, South", "Korea South", 'A "$HOME" \\ 100%', "Mali"]


def test_gen_compose_quotes_group_names_for_sh_toml_and_compose(tmp_path: Path) -> None:
    """Apostrophes, quotes, $, backslashes and colliding slugs: the setup script still parses,
    writes an allow-list naming every group under its own node id, and the services match it."""
    data = tmp_path / "own.jsonl"
    rec = {"question": "Q1?", "options": ["Yes", "No"], "distribution": [1, 2]}
    data.write_text("".join(json.dumps({"group": g, **rec}) + "\n" for g in NASTY))
    proc = _gen("--data", str(data), "--held-out", "1")
    assert proc.returncode == 0, proc.stderr
    compose = proc.stdout
    script = _setup_script(compose)
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    allow_line = next(line for line in script.splitlines() if "allow-list.toml" in line)
    out = tmp_path / "out"
    subprocess.run(["sh", "-c", allow_line.replace("/out/", f"{out}/")], check=True)
    allow = tomllib.loads((out / "config" / "allow-list.toml").read_text())["allow_list"]
    assert sorted(allow.values()) == sorted(NASTY)
    services = [line[2:-1] for line in compose.splitlines() if line.startswith("  node-")]
    assert sorted(services) == sorted(allow)  # one service per node id, none twice
    for nid, group in allow.items():
        block = compose.split(f"\n  {nid}:\n", 1)[1].split("\n\n", 1)[0]
        env = next(line for line in block.splitlines() if "PLURALFED_NODE_GROUP:" in line)
        value = json.loads(env.split(": ", 1)[1]).replace("$$", "$")  # YAML "..." as here
        assert value == group
    assert f"--nodes {','.join([*allow, 'node-healthcheck'])} " in script
    split = shlex.split(next(line for line in script.splitlines() if "data split" in line))
    assert sorted(split[split.index("--groups") + 1 :]) == sorted(NASTY)


@pytest.mark.parametrize("held_out", ["-1", "3", "5"])
def test_gen_compose_held_out_must_leave_a_training_group(held_out: str) -> None:
    proc = _gen("--synthetic-groups", "3", "--held-out", held_out)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "gen_compose.py: error: --held-out must be 0 or more and less than the number of "
        f"groups (3), got {held_out}\n"
    )
    assert _gen("--synthetic-groups", "3", "--held-out", "0").returncode == 0


def test_gen_compose_bad_data_is_a_clean_error(tmp_path: Path) -> None:
    proc = _gen("--data", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2
    assert proc.stderr == f"gen_compose.py: error: {tmp_path / 'missing.jsonl'}: file not found\n"


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"\xef\xbb\xbf" + RECORD, "jsonl"),  # a byte-order mark, which the loader accepts
        (b"\n  \t\r\n" + RECORD, "jsonl"),  # blank lines first
        (RECORD, "jsonl"),
        (b"\xef\xbb\xbfquestion,selections,options\n", "csv"),
        (b"question,selections,options\n", "csv"),
    ],
)
def test_setup_script_tells_jsonl_from_csv(tmp_path: Path, content: bytes, kind: str) -> None:
    script = _setup_script((REPO / "docker-compose.yml").read_text())
    line = next(line for line in script.splitlines() if "src=/out/input.$(" in line)
    sniff = line.split("src=/out/input.$(", 1)[1].split(" && echo jsonl", 1)[0]
    (tmp_path / "data").write_bytes(content)
    found = subprocess.run(
        [
            "sh",
            "-c",
            f"{sniff.replace('/input/data', str(tmp_path / 'data'))} && echo jsonl || echo csv",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert found == kind


def _run_setup_lines(
    compose: str, out: Path, data: Path, *needles: str
) -> subprocess.CompletedProcess[str]:
    """The setup script's lines holding any of `needles` (or being one), run by sh against `out` and `data`
    instead of /out and /input/data, with this checkout's `pluralfed` on the PATH."""
    lines = [
        line
        for line in _setup_script(compose).splitlines()
        if any(line.strip() == n or (len(n) > 2 and n in line) for n in needles)
    ]
    script = "set -eu\n" + "\n".join(lines).replace("/out/", f"{out}/")
    script = script.replace("/input/data", str(data))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)


def test_a_second_setup_tops_up_certificates_and_refuses_another_federations_run(
    tmp_path: Path,
) -> None:
    """Before, ./runs/compose from a first `docker compose up` kept its certificates (a new
    federation's nodes crash-looped: no ca.pem) and its run (the coordinator resumed the demo's
    finished run for the new data, and waited for ever)."""
    out, data = tmp_path / "out", tmp_path / "data"
    data.write_bytes(b"")  # empty: the synthetic demo
    demo = (REPO / "docker-compose.yml").read_text()
    certs = ("mkdir -p /out/certs", "ca.pem ]; then", "certs federation", "fi", "for id in")
    guard = ("want=", "federation.txt")
    assert _run_setup_lines(demo, out, data, *certs).returncode == 0
    assert _run_setup_lines(demo, out, data, *guard).returncode == 0  # no run yet: marks it
    (out / "coordinator" / "state.json").write_text("{}")  # the coordinator ran
    assert _run_setup_lines(demo, out, data, *guard).returncode == 0  # the same one resumes

    rec = {"question": "Q1?", "options": ["Yes", "No"], "distribution": [1, 2]}
    data.write_text("".join(json.dumps({"group": g, **rec}) + "\n" for g in ["Mali", "Peru"]))
    own = tmp_path / "own.jsonl"
    shutil.copy(data, own)
    other = _gen("--data", str(own))
    assert other.returncode == 0, other.stderr
    refused = _run_setup_lines(other.stdout, out, data, *guard)
    assert refused.returncode == 2
    assert refused.stderr == (
        "./runs/compose/coordinator holds the run of another federation (other nodes or data), "
        "which the coordinator would resume: remove it for a fresh run (rm -rf "
        "runs/compose/coordinator)\n"
    )
    made = _run_setup_lines(other.stdout, out, data, *certs)
    assert made.returncode == 0, made.stderr
    for node in ("node-mali", "node-peru", "node-aldoria"):
        assert (out / "certs" / "nodes" / node / "cert.pem").is_file(), node
    (out / "coordinator" / "state.json").unlink()
    assert _run_setup_lines(other.stdout, out, data, *guard).returncode == 0
    (out / "coordinator" / "state.json").write_text("{}")
    assert _run_setup_lines(other.stdout, out, data, *guard).returncode == 0
    data.write_text(data.read_text().replace("Q1?", "Q2?"))  # other data, same groups
    assert _run_setup_lines(other.stdout, out, data, *guard).returncode == 2


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


def compose_up(compose: list[str], folder: Path, env: dict[str, str]) -> str:
    """`docker compose up` in `folder` to its end; its output, once it succeeded."""
    done = subprocess.run(
        [*compose, "up", "--no-build", "--no-color"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


@contextlib.contextmanager
def _health_check_uids(project: str) -> Iterator[set[int]]:
    """The users the coordinator's health check of compose project `project` ran as while the
    block ran: a container's processes are the host's too (rootful dockerd), so /proc shows
    them, by command line (python3 ... pluralfed.healthcheck, once the switch has exec'd it)
    and by the coordinator container's cgroup."""
    seen: set[int] = set()
    stop = threading.Event()

    def coordinator() -> str | None:
        ids = subprocess.run(
            [
                "docker",
                "ps",
                "-q",
                "--no-trunc",
                "--filter",
                f"label=com.docker.compose.project={project}",
                "--filter",
                "label=com.docker.compose.service=coordinator",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        return ids[0] if ids else None

    def watch() -> None:
        container = None
        while not stop.wait(0.1 if container else 0.5):
            if container is None:
                container = coordinator()
                continue
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                    if not argv[0].endswith(b"python3") or b"pluralfed.healthcheck" not in argv:
                        continue
                    if container not in Path(entry.path, "cgroup").read_text():
                        continue
                    status = Path(entry.path, "status").read_text().splitlines()
                except OSError:  # it ended meanwhile
                    continue
                uids = next(line for line in status if line.startswith("Uid:")).split()
                seen.add(int(uids[2]))  # the effective one

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(60)


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

    def up() -> str:
        """`docker compose up` to its end; its output, once it succeeded."""
        return compose_up(compose, tmp_path, env)

    try:
        with _health_check_uids(project) as health_uids:
            log = up()
        # a checkout of root's: the image's user, as the coordinator itself (never root)
        owner = tmp_path.stat().st_uid
        assert health_uids == {owner or 10001}, health_uids
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
        # a second `up` on the finished run evaluates it again and ends (before: the
        # coordinator left at once, compose failed on its health check and the nodes it had
        # started retried for ever)
        log = up()
        assert "evaluation after round 3 replaces the earlier one" in log, log[-4000:]
        rows = [json.loads(line) for line in (state / "metrics.jsonl").open()]
        assert [r["round"] for r in rows if r["kind"] == "evaluation"] == [3]
        again_results = json.loads((state / "results.json").read_text())
        assert set(again_results["final_evaluation"]["reports"]) == {
            "training groups (test questions)",
            "held-out groups",
        }  # every node back, the held-out one too
        assert again_results["wall_seconds"] == results["wall_seconds"]  # the run's, kept
        assert "evaluated_again_at" in again_results
        running = subprocess.run(
            ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert running.stdout.strip() == "", "containers still running after the run's end"
    finally:
        subprocess.run(
            [*compose, "down", "-v", "--remove-orphans"],
            cwd=tmp_path,
            capture_output=True,
            timeout=300,
        )
        # the setup container chowned the outputs to the image's user; give them back
        subprocess.run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", str(tmp_path)], check=False)


@pytest.mark.slow
def test_docker_compose_up_leaves_runs_to_the_checkouts_owner(tmp_path: Path) -> None:
    """`./runs` (made by dockerd) belonged to root and `./runs/compose` to the image's uid 10001:
    the user who ran `docker compose up` could not remove either without sudo (Docker review,
    session 20). Now every file compose writes there is the checkout owner's."""
    why = _docker_ready()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the compose federation, but: {why}")
        pytest.skip(why)
    if os.getuid() != 0:
        pytest.skip("makes a checkout of another user's: needs root")
    user = 4242  # a user of the host's that is neither root nor the image's uid 10001
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(REPO / "docker-compose.yml", checkout / "docker-compose.yml")
    os.chown(checkout, user, user)
    project = f"pftest{uuid.uuid4().hex[:8]}"
    compose = ["docker", "compose", "-p", project]
    env = {**os.environ, "ROUNDS": "1", "EVAL_EVERY": "1"}
    try:
        with _health_check_uids(project) as health_uids:
            output = compose_up(compose, checkout, env)
        assert "federation finished: 1 rounds" in output
        assert health_uids == {user}, health_uids  # the health check too, not root
        runs = checkout / "runs"
        assert (runs / "compose" / "coordinator" / "final" / "model.safetensors").is_file()
        owners = {
            str(p.relative_to(checkout)): (p.lstat().st_uid, p.lstat().st_gid)
            for p in [runs, *runs.rglob("*")]
        }
        assert {o for o in owners.values()} == {(user, user)}, {
            p: o for p, o in owners.items() if o != (user, user)
        }
        # so the user removes it all without sudo
        removed = subprocess.run(
            [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--clear-groups",
                "rm",
                "-rf",
                "runs",
            ],
            cwd=checkout,
            capture_output=True,
            text=True,
        )
        assert removed.returncode == 0 and not runs.exists(), removed.stderr
    finally:
        subprocess.run(
            [*compose, "down", "-v", "--remove-orphans"],
            cwd=checkout,
            capture_output=True,
            timeout=300,
        )
