"""`pluralfed coordinator` refuses to start without an allow-list (README: "The coordinator refuses
to start without an allow-list"): with neither --config nor --allow-list-file it exits 2 with one
error line, before it makes any state or listens, whether it would serve TLS or plain text. The
real CLI in a child process, as an operator runs it."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from fedharness import CLI, HOST, Pki, env_for_children, scaled

pytestmark = pytest.mark.timeout(120)

REFUSAL = (
    "pluralfed coordinator: error: no allow-list: give --allow-list-file or an [allow_list] "
    "table in --config\n"
)


def coordinator(args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "coordinator", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


@pytest.fixture
def env() -> dict[str, str]:
    """The child's environment without any coordinator setting (an allow_list_file there would
    be an allow-list)."""
    return {
        k: v for k, v in env_for_children().items() if not k.startswith("PLURALFED_COORDINATOR_")
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("transport", ["tls", "insecure"])
def test_the_coordinator_refuses_to_start_without_an_allow_list(
    tmp_path: Path, env: dict[str, str], pki: Pki, transport: str
) -> None:
    state = tmp_path / "state"
    security = ["--tls-dir", str(pki.server)] if transport == "tls" else ["--insecure"]
    done = coordinator(["--listen", f"{HOST}:0", "--state-dir", str(state), *security], env)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", REFUSAL)
    assert not state.exists()  # no run made, never listened (it writes coordinator.port there)


def test_an_allow_list_file_is_enough_to_pass_that_check(
    tmp_path: Path, env: dict[str, str], pki: Pki
) -> None:
    """The control: the same command with an allow-list file gets past the check (here to
    --print-config, which prints the settings and exits without starting)."""
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-a" = "A"\n', "utf-8")
    state = tmp_path / "state"
    args = ["--listen", f"{HOST}:0", "--state-dir", str(state), "--tls-dir", str(pki.server)]
    done = coordinator([*args, "--allow-list-file", str(allow), "--print-config"], env)
    assert done.returncode == 0, done.stderr
    assert "no allow-list" not in done.stderr and str(state) in done.stdout
    # and the variable an operator may set instead of the option counts the same
    by_env = {**env, "PLURALFED_COORDINATOR_ALLOW_LIST_FILE": str(allow)}
    done = coordinator([*args, "--print-config"], by_env)
    assert done.returncode == 0, done.stderr
    assert os.fspath(allow) in done.stdout


def test_two_allow_lists_are_refused(tmp_path: Path, env: dict[str, str], pki: Pki) -> None:
    """An [allow_list] table in --config and an allow_list_file: the file's list was used and
    the table ignored without a word."""
    config = tmp_path / "coordinator.toml"
    config.write_text('[allow_list]\n"node-x" = "X"\n', "utf-8")
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-a" = "A"\n', "utf-8")
    args = ["--config", str(config), "--listen", f"{HOST}:0", "--tls-dir", str(pki.server)]
    done = coordinator([*args, "--allow-list-file", str(allow), "--print-config"], env)
    assert done.returncode == 2, done.stdout
    assert f"{config}: has an [allow_list] table and allow_list_file names {allow}" in done.stderr
    done = coordinator([*args, "--print-config"], env)  # the table alone is the allow-list
    assert done.returncode == 0 and '"node-x": "X"' in done.stdout, done.stderr


def test_an_allow_list_file_beside_a_config_without_a_list_is_the_allow_list(
    tmp_path: Path, env: dict[str, str], pki: Pki
) -> None:
    """A --config with settings only and an allow_list_file: the file's list is used (the
    config is not read as one), and an empty [allow_list] table still counts as a second list."""
    config = tmp_path / "coordinator.toml"
    config.write_text("rounds = 3\n", "utf-8")
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-a" = "A"\n', "utf-8")
    args = ["--config", str(config), "--listen", f"{HOST}:0", "--tls-dir", str(pki.server)]
    done = coordinator([*args, "--allow-list-file", str(allow), "--print-config"], env)
    assert done.returncode == 0, done.stderr
    assert '"node-a": "A"' in done.stdout and '"rounds": 3' in done.stdout
    config.write_text("rounds = 3\n[allow_list]\n", "utf-8")
    done = coordinator([*args, "--allow-list-file", str(allow), "--print-config"], env)
    assert done.returncode == 2, done.stdout
    assert f"{config}: has an [allow_list] table and allow_list_file names {allow}" in done.stderr


def through_pipe(path: Path) -> str:
    """Bash's process substitution of `path`'s text: the command sees a pipe, /dev/fd/N."""
    return f"<(cat {shlex.quote(str(path))})"


def piped(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


def test_a_config_given_as_a_pipe_is_read_once_for_settings_and_allow_list(
    tmp_path: Path, env: dict[str, str], pki: Pki
) -> None:
    """`--config <(...)`: a pipe can be read only once; read again, it is empty. The settings
    and the [allow_list] table both come from the one read."""
    with_table = tmp_path / "with_table.toml"
    with_table.write_text('rounds = 7\n[allow_list]\n"node-p" = "P"\n', "utf-8")
    settings_only = tmp_path / "settings_only.toml"
    settings_only.write_text("rounds = 5\n", "utf-8")
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-q" = "Q"\n', "utf-8")
    coordinator = shlex.join([*CLI, "coordinator"])
    rest = shlex.join(["--listen", f"{HOST}:0", "--tls-dir", str(pki.server), "--print-config"])

    done = piped(f"{coordinator} --config {through_pipe(with_table)} {rest}", env)
    assert done.returncode == 0, done.stderr
    assert '"rounds": 7' in done.stdout and '"node-p": "P"' in done.stdout
    # an allow-list file given as a pipe too, beside a config (a pipe) without a table
    config, allow_list = through_pipe(settings_only), through_pipe(allow)
    done = piped(f"{coordinator} --config {config} --allow-list-file {allow_list} {rest}", env)
    assert done.returncode == 0, done.stderr
    assert '"rounds": 5' in done.stdout and '"node-q": "Q"' in done.stdout
    # and a table beside a file is still refused, the config read once
    config = through_pipe(with_table)
    done = piped(f"{coordinator} --config {config} --allow-list-file {allow_list} {rest}", env)
    assert done.returncode == 2, done.stdout
    assert "has an [allow_list] table and allow_list_file names /dev/fd/" in done.stderr


def test_the_running_coordinator_reports_on_stderr_only(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Its progress lines go to stderr (with its log), leaving stdout to --print-config: here
    a start that finds no quorum and gives up (exit 1)."""
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"node-a" = "A"\n', "utf-8")
    state = tmp_path / "state"
    args = ["--listen", f"{HOST}:0", "--insecure", "--allow-list-file", str(allow)]
    done = coordinator([*args, "--state-dir", str(state), "--quorum-timeout-s", "0.5"], env)
    assert done.returncode == 1, done.stderr
    assert "coordinator run " in done.stderr and f"state in {state}" in done.stderr
    assert done.stdout == ""
