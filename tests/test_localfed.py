"""`pluralfed federate`'s launcher (pluralfed/localfed.py): node ids that stay unique, and failing
processes that end the run at once with their own words instead of a wait until --timeout."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.service import check_roles
from pluralfed import localfed
from pluralfed.cli import build_parser, main
from pluralfed.commands import coordinator as coordinator_command
from pluralfed.commands import federate as federate_command
from pluralfed.data import SurveyData, SurveyItem
from pluralfed.errors import InputError
from pluralfed.localfed import (
    LocalFederation,
    Processes,
    Progress,
    node_id,
    node_ids,
    prepare,
    toml_string,
    wait_for_coordinator,
    wait_for_port,
)
from pluralfed.tls import NODE_ID_PATTERN

ITEM = SurveyItem("Q?", ("Yes", "No"), np.array([0.5, 0.5]))


# --------------------------------------------------------------------------------------------------
# node ids


def test_node_ids_stay_unique_when_slugs_collide() -> None:
    ids = node_ids(["Korea, South", "Korea South", "Mali", "x" * 80, "x" * 79 + "y"])
    assert len(set(ids.values())) == 5
    assert ids["Mali"] == node_id("Mali") == "node-mali"  # no collision: the plain id
    assert ids["Korea, South"].startswith("node-korea-south-")
    # a name's id does not depend on which other names collide with it
    assert node_ids(["Korea South", "Korea-South"])["Korea South"] == ids["Korea South"]
    assert all(NODE_ID_PATTERN.fullmatch(i) for i in ids.values())


def test_a_long_group_name_alone_gets_a_node_id_of_63_characters() -> None:
    """A long name that collides with no other keeps its plain id, cut so that the whole id is
    63 characters (a DNS label), which NODE_ID_PATTERN admits."""
    nid = node_ids(["y" * 80])["y" * 80]
    assert nid == node_id("y" * 80) == "node-" + "y" * 58
    assert NODE_ID_PATTERN.fullmatch(nid)
    reserved = node_ids(["Healthcheck", "Mali"], reserved=["node-healthcheck"])
    assert reserved["Healthcheck"] != "node-healthcheck" and reserved["Mali"] == "node-mali"


def test_prepare_allows_every_group_even_when_slugs_collide(tmp_path: Path) -> None:
    groups = ["Korea, South", "Korea South", "Mali"]
    data = SurveyData(groups={g: [ITEM] for g in groups}, source="mem")
    info = prepare(LocalFederation(out_dir=tmp_path, training_groups=groups), data)
    cfg = tomllib.loads(Path(info["coordinator_config"]).read_text())
    assert sorted(cfg["allow_list"].values()) == sorted(groups)
    assert cfg["min_nodes"] == 3
    assert len({p.name for p in info["node_configs"].values()}) == 3
    for g, path in info["node_configs"].items():
        node = tomllib.loads(path.read_text())
        assert node["group"] == g
        assert cfg["allow_list"][Path(node["tls_dir"]).name] == g


def test_prepare_makes_held_out_groups_evaluate_only_nodes_that_never_personalize(
    tmp_path: Path,
) -> None:
    """A held-out group's node must evaluate only (a node config saying train would have its
    group trained on, or be refused by the coordinator), and only training nodes fine-tune
    after the run: a held-out group has nothing of its own to fine-tune a model for."""
    data = SurveyData(groups={g: [ITEM] for g in ("A", "B", "C")}, source="mem")
    run = LocalFederation(
        out_dir=tmp_path, training_groups=["A", "B"], held_out_groups=["C"], personalize_steps=5
    )
    info = prepare(run, data)
    cfg = tomllib.loads(Path(info["coordinator_config"]).read_text())
    assert (cfg["min_nodes"], cfg["evaluate_only"]) == (2, ["C"])
    nodes = {g: tomllib.loads(path.read_text()) for g, path in info["node_configs"].items()}
    assert {g: n["role"] for g, n in nodes.items()} == {
        "A": "train",
        "B": "train",
        "C": "evaluate-only",
    }
    assert nodes["A"]["personalize_steps"] == 5
    assert Path(nodes["A"]["personalized_dir"]) == tmp_path / "personalized" / info["node_ids"]["A"]
    assert "personalize_steps" not in nodes["C"] and "personalized_dir" not in nodes["C"]


def test_prepare_gives_every_node_the_runs_seed(tmp_path: Path) -> None:
    """Nodes seed their episode sampling from their own config, not from the coordinator's
    task (federation.proto's Hyperparameters.seed), so `federate --seed N` must write N into
    every node's config: before, every node sampled with seed 0 whatever N was."""
    data = SurveyData(groups={g: [ITEM] for g in ("A", "B", "C")}, source="mem")
    for seed in (0, 7):
        run = LocalFederation(
            out_dir=tmp_path / str(seed),
            training_groups=["A", "B"],
            held_out_groups=["C"],
            coordinator_settings={"seed": seed},
        )
        info = prepare(run, data)
        assert tomllib.loads(Path(info["coordinator_config"]).read_text())["seed"] == seed
        nodes = [tomllib.loads(p.read_text()) for p in info["node_configs"].values()]
        assert [n["seed"] for n in nodes] == [seed] * 3


def test_toml_strings_take_any_group_name() -> None:
    for text in ["Côte d'Ivoire", 'say "hi" \\ there', "emoji \U0001f600", "tab\tdel\x7f\x00"]:
        assert tomllib.loads(f"k = {toml_string(text)}")["k"] == text


def test_toml_strings_escape_every_control_character() -> None:
    """TOML forbids every control character but tab unescaped in a basic string, U+0000 to
    U+001F and DEL: a group name holding any of them still makes a config TOML reads."""
    text = "".join(chr(c) for c in [*range(0x20), 0x7F])
    assert tomllib.loads(f"k = {toml_string(text)}")["k"] == text


def test_threads_per_node_must_be_at_least_one(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"threads per node must be 1\.\.1024, got 0"):
        LocalFederation(out_dir=tmp_path, training_groups=["A"], threads_per_node=0)


def test_a_group_both_trained_and_held_out_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """One group as a training node and an evaluate-only node would be two nodes of one group
    under one node id: refused by name, and nothing is written."""
    data = SurveyData(groups={"A": [ITEM], "B": [ITEM]})
    run = LocalFederation(
        out_dir=tmp_path / "out", training_groups=["A", "B"], held_out_groups=["A"]
    )
    with pytest.raises(InputError, match="a group is listed twice"):
        prepare(run, data)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verbose", [False, True])
def test_federate_verbose_reaches_the_coordinator_and_the_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verbose: bool
) -> None:
    """`pluralfed -v federate` used to log debug lines in the launcher only: the coordinator and
    the nodes, whose logs are the ones that matter, ran without -v."""
    handed: list[LocalFederation] = []

    def record(run: LocalFederation, data: SurveyData) -> dict[str, object]:
        handed.append(run)
        raise InputError("recorded")

    monkeypatch.setattr(federate_command, "run_local", record)
    argv = ["federate", "--out", str(tmp_path / "run"), "--synthetic-groups", "3"]
    assert main([*(["-v"] if verbose else []), *argv]) == 2
    assert [run.verbose for run in handed] == [verbose]
    # and run_local puts -v before the subcommand of the process it starts (a stand-in python
    # that writes down its arguments and exits, as a coordinator with a bad setting would)
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "argv"}\nexit 2\n')
    stand_in.chmod(0o755)
    data = SurveyData(groups={g: [ITEM] for g in ("A", "B")}, source="mem")
    run = LocalFederation(
        out_dir=tmp_path / "local",
        training_groups=["A", "B"],
        python=str(stand_in),
        verbose=verbose,
    )
    with pytest.raises(InputError, match="the coordinator exited with code 2"):
        localfed.run_local(run, data)
    words = (tmp_path / "argv").read_text().split()
    assert words[: words.index("coordinator")] == ["-m", "pluralfed.cli"] + ["-v"] * verbose


def test_federate_holds_out_groups_by_default_only_when_no_groups_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the demo data a quarter of the groups (at least one) are held out; naming --groups
    means exactly those train and none is held out unless --held-out says so (as `train`)."""
    handed: list[LocalFederation] = []

    def record(run: LocalFederation, data: SurveyData) -> dict[str, object]:
        handed.append(run)
        raise InputError("recorded")

    monkeypatch.setattr(federate_command, "run_local", record)
    argv = ["federate", "--out", str(tmp_path / "run")]
    assert main([*argv, "--synthetic-groups", "4"]) == 2
    assert main([*argv, "--synthetic-groups", "3"]) == 2
    assert main([*argv, "--synthetic-groups", "4", "--groups", "Aldoria,Borvenia"]) == 2
    assert (
        main([*argv, "--synthetic-groups", "4", "--groups", "Aldoria", "--held-out", "Calvaris"])
        == 2
    )
    assert [(list(r.training_groups), list(r.held_out_groups)) for r in handed] == [
        (["Aldoria", "Borvenia", "Calvaris"], ["Drelmark"]),
        (["Aldoria", "Borvenia"], ["Calvaris"]),
        (["Aldoria", "Borvenia"], []),
        (["Aldoria"], ["Calvaris"]),
    ]


# --------------------------------------------------------------------------------------------------
# failing processes


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


FAIL_AT_START = (
    "import sys; print('starting'); print('error: threads must be 1..1024, got 0'); sys.exit(2)"
)


def test_every_training_node_failing_ends_the_wait_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localfed, "NODES_FAILED_GRACE_S", 0.2)
    procs = Processes(tmp_path)
    try:
        procs.start("coordinator", _py("import time; time.sleep(60)"), {})
        for name in ("node-a", "node-b"):
            procs.start(name, _py(FAIL_AT_START), {})
        procs.start("node-held", _py("import time; time.sleep(60)"), {})  # evaluate-only
        # both have failed before the wait looks: on a loaded machine node-b's interpreter could
        # start later than the grace after node-a's failure, and the wait then rightly reported
        # "1 of 2 training nodes stopped"
        for name in ("node-a", "node-b"):
            procs.children[name].wait()
        started = time.monotonic()
        with pytest.raises(InputError) as err:
            wait_for_coordinator(procs, ["node-a", "node-b"], tmp_path, 60, time.time())
        assert time.monotonic() - started < 20
    finally:
        procs.stop_all(grace_s=2)
    text = str(err.value)
    assert text.startswith(
        "every training node stopped before the run finished: node node-a exited with code 2"
    )
    assert str(tmp_path / "node-a.log") in text
    assert text.endswith("  starting\n  error: threads must be 1..1024, got 0")


def test_too_few_training_nodes_left_for_the_quorum_ends_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, only all training nodes failing ended the wait: with one of three failed and a
    quorum of three (what `federate` sets), it waited out --timeout for a run that could not go on."""
    monkeypatch.setattr(localfed, "NODES_FAILED_GRACE_S", 0.2)
    procs = Processes(tmp_path)
    try:
        procs.start("coordinator", _py("import time; time.sleep(60)"), {})
        procs.start("node-a", _py("import time; time.sleep(60)"), {})
        procs.start("node-b", _py(FAIL_AT_START), {})
        procs.start("node-c", _py("import time; time.sleep(60)"), {})
        training = ["node-a", "node-b", "node-c"]
        started = time.monotonic()
        with pytest.raises(InputError) as err:
            wait_for_coordinator(procs, training, tmp_path, 60, time.time(), quorum=3)
        assert time.monotonic() - started < 20
        # a quorum the others still make: the wait goes on (here, to its timeout)
        with pytest.raises(InputError, match="did not finish in 2 s"):
            wait_for_coordinator(procs, training, tmp_path, 2, time.time(), quorum=2)
    finally:
        procs.stop_all(grace_s=2)
    text = str(err.value)
    assert text.startswith(
        "1 of 3 training nodes stopped, and the other 2 are fewer than the coordinator's quorum "
        "of 3 (min_nodes): the run cannot finish: node node-b exited with code 2"
    )
    assert text.endswith("  starting\n  error: threads must be 1..1024, got 0")


def test_nodes_that_finished_do_not_end_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes exit 0 once they hear SHUTDOWN, and may fail personalizing after a finished run
    (results.json written): in both cases the coordinator is left to finish."""
    monkeypatch.setattr(localfed, "NODES_FAILED_GRACE_S", 0.0)
    started = time.time()
    (tmp_path / "results.json").write_text("{}")
    # a file's time comes from the kernel's coarse clock, which can be a few ms behind
    # time.time(): written "after" `started`, its mtime could still be before it
    os.utime(tmp_path / "results.json", (started + 1, started + 1))
    procs = Processes(tmp_path)
    try:
        procs.start("coordinator", _py("import time; time.sleep(1.5)"), {})
        procs.start("node-a", _py("pass"), {})
        procs.start("node-b", _py("import sys; sys.exit(1)"), {})
        assert wait_for_coordinator(procs, ["node-a", "node-b"], tmp_path, 60, started) == 0
        procs.start("coordinator", _py("import time; time.sleep(1.5)"), {})
        assert wait_for_coordinator(procs, ["node-b"], tmp_path, 60, started) == 0
        # no results yet: a node that exited 0 has not failed, so the wait goes on to --timeout
        (tmp_path / "results.json").unlink()
        procs.start("coordinator", _py("import time; time.sleep(60)"), {})
        with pytest.raises(InputError, match=r"did not finish in 2 s"):
            wait_for_coordinator(procs, ["node-a"], tmp_path, 2, time.time(), quorum=1)
    finally:
        procs.stop_all(grace_s=2)


def test_timeout_is_a_clear_error(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        procs.start(
            "coordinator",
            _py("print('waiting for 2 nodes', flush=True); import time; time.sleep(60)"),
            {},
        )
        procs.start("node-a", _py("import time; time.sleep(60)"), {})
        with pytest.raises(InputError, match=r"did not finish in 1 s \(--timeout\)") as err:
            wait_for_coordinator(procs, ["node-a"], tmp_path, 1, time.time())
    finally:
        procs.stop_all(grace_s=2)
    assert str(err.value).endswith("  waiting for 2 nodes")


def test_coordinator_exiting_at_start_quotes_its_log(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        coordinator = procs.start("coordinator", _py(FAIL_AT_START), {})
        with pytest.raises(InputError) as err:
            wait_for_port(tmp_path, coordinator, 60, tmp_path / "coordinator.log")
    finally:
        procs.stop_all(grace_s=2)
    assert str(err.value).startswith("the coordinator exited with code 2; the end of ")
    assert str(err.value).endswith("error: threads must be 1..1024, got 0")


def test_a_failed_start_quotes_only_this_attempts_part_of_the_log(tmp_path: Path) -> None:
    """Logs are appended to by every attempt of a run: the error of an earlier attempt (a typo
    since fixed) was quoted as this one's cause."""
    log = tmp_path / "coordinator.log"
    log.write_text("pluralfed coordinator: error: unknown settings ['server_optimiser']\n" * 2)
    procs = Processes(tmp_path)
    try:
        fail = "import sys; print('error: server_optimizer must be one of fedavg'); sys.exit(2)"
        coordinator = procs.start("coordinator", _py(fail), {})
        with pytest.raises(InputError) as err:
            wait_for_port(tmp_path, coordinator, 60, log)
    finally:
        procs.stop_all(grace_s=2)
    message = str(err.value)
    assert message.endswith(f"the end of {log}:\n  error: server_optimizer must be one of fedavg")
    assert "server_optimiser" not in message
    # the earlier attempt's lines stay in the file, and where this attempt began is marked
    lines = log.read_text().splitlines()
    assert lines[2].startswith("--- pluralfed federate: coordinator started ")
    assert len(lines) == 4


def test_a_log_tail_quotes_the_last_lines_of_the_latest_attempt_only(tmp_path: Path) -> None:
    """A run started three times has three attempts in each log: only the last one's lines
    are its cause (the second attempt's error was quoted too when the first marker was taken),
    the last `lines` of them, each cut at `width` characters."""
    marker = localfed.ATTEMPT_MARKER
    log = tmp_path / "node.log"
    log.write_text(
        f"{marker}node started 1 ---\nfirst attempt's error\n"
        f"{marker}node started 2 ---\nsecond attempt's error\n"
        f"{marker}node started 3 ---\nline a\n\nline b\n" + "x" * 500 + "\n"
    )
    tail = localfed.log_tail(log, lines=2, width=400)
    assert tail.splitlines() == ["  line b", "  " + "x" * 400 + " ..."]
    assert localfed.log_tail(log, lines=5).splitlines()[0] == "  line a"
    log.write_text(f"{marker}node started 1 ---\nold\n{marker}node started 2 ---\n\n")
    assert localfed.log_tail(log) == f"  ({log} is empty)"


def test_federate_with_a_bad_coordinator_setting_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["federate", "--synthetic-groups", "3", "--synthetic-questions", "20", "--rounds", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--set", "bogus_key=1"]) == 2
    err = capsys.readouterr().err
    assert "error: --set bogus_key=1: unknown settings ['bogus_key']" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()  # no coordinator started


def test_an_unknown_set_key_is_never_told_to_be_a_setting_the_launcher_makes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--set state_dirr=...` is refused as unknown without "did you mean 'state_dir'?": the
    launcher sets state_dir itself (from --out) and refuses it in --set, so the known settings
    listed are only those --set may give."""
    argv = ["federate", "--synthetic-groups", "3", "--synthetic-questions", "20", "--rounds", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--set", "state_dirr=1"]) == 2
    err = capsys.readouterr().err
    assert "error: --set state_dirr=1: unknown settings ['state_dirr']; known: [" in err, err
    assert "'state_dir'" not in err and "'listen'" not in err and "'allow_list'" not in err
    assert "'rounds'" in err  # the settable ones are listed


@pytest.mark.parametrize("pair", ["=1", " =1", "rounds"])
def test_a_set_without_a_key_is_refused_as_not_key_value(
    pair: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--set takes KEY=VALUE: one without a key, or without "=", is refused as such (not read
    as a setting named ''), before anything is written."""
    argv = ["federate", "--synthetic-groups", "3", "--synthetic-questions", "20", "--rounds", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--set", pair]) == 2
    assert f"error: --set takes KEY=VALUE, got {pair!r}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("argv", "key", "message"),
    [
        (["--rounds", "0"], "rounds", "rounds must be in 1..1000000, got 0"),
        (["--set", "learning_rate=abc"], "learning_rate", "expected a number, got 'abc'"),
        (["--set", "fairness_q=nan"], "fairness_q", "fairness_q must be a finite number, got nan"),
        (
            ["--set", "server-optimizer=sgd"],
            "server_optimizer",
            "server_optimizer must be one of fedavg, fedadagrad, fedadam, fedyogi, adam, got 'sgd'",
        ),
        (  # across settings: min_nodes is the launcher's (2 training groups)
            ["--set", "min_updates=20"],
            "min_updates",
            "min_updates must be at most min_nodes (2), got 20",
        ),
        (
            ["--set", "d_model=0"],
            "d_model",
            "coordinator config: d_model must be in 1..8192, got 0",
        ),
        (  # against the allow-list the launcher writes: 2 groups train, 1 is held out
            ["--set", "min_nodes=5"],
            "min_nodes",
            "evaluate_only leaves 2 allow-listed group(s) to train, fewer than min_nodes (5)",
        ),
        (
            ["--set", "fairness_q=2", "--set", "min_updates=0"],
            "min_updates",
            "min_updates must be in",
        ),
        (["--local-steps", "0"], "local_steps", "local_steps must be in"),
    ],
)
def test_federate_refuses_a_bad_setting_before_writing_anything(
    argv: list[str], key: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --set value was refused only by the coordinator, once the demo data, certificates
    and configs had been written and the coordinator started; now at once, with the message the
    coordinator gives for the same value in its config file, naming the argument."""
    out = tmp_path / "run"
    base = ["federate", "--synthetic-groups", "3", "--synthetic-questions", "20", "--rounds", "1"]
    assert main([*base, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    given = argv[-1] if argv[-2] == "--set" else None
    source = f"--set {given}" if given else argv[-2]
    assert f"pluralfed federate: error: {source}: {message}" in err, err
    assert not out.exists()  # nothing written
    # the coordinator says the same of the same value in its config file (as federate writes it)
    settings: dict[str, Any] = {"min_nodes": "2", "min_updates": "2", "evaluate_only": ["C"]}
    settings[key] = argv[-1].split("=", 1)[-1]
    config = tmp_path / "coordinator.toml"
    allow = {"node-a": "A", "node-b": "B", "node-c": "C"}
    localfed.write_toml(config, settings, {"allow_list": allow})
    args = build_parser().parse_args(["coordinator", "--config", str(config)])
    with pytest.raises(InputError, match=re.escape(message)):
        check_roles(*coordinator_command.load(args))  # as run_coordinator starts


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("pair", "key", "source"),
    [
        ("state_dir=x", "state_dir", "--out"),
        ("listen=127.0.0.1:1", "listen", "a free loopback port"),
        ("tls-dir=certs", "tls_dir", "--insecure"),
        ("allow_list_file=a.toml", "allow_list_file", "exactly the nodes it starts"),
    ],
)
def test_federate_refuses_at_once_a_setting_the_launcher_owns(
    pair: str, key: str, source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--set state_dir=x` put the coordinator's state in ./x while the launcher watched
    OUT/coordinator, and after 120 s it reported a coordinator that never started."""
    argv = ["federate", "--synthetic-groups", "3", "--synthetic-questions", "20", "--rounds", "1"]
    started = time.monotonic()
    assert main([*argv, "--out", str(tmp_path / "run"), "--set", pair]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert f"coordinator setting {key!r} cannot be changed (--set)" in err
    assert f"sets it itself, from {source}" in err
    assert not (tmp_path / "run" / "logs").exists()  # no coordinator was started


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "rounds=3"], "--set rounds=3: use --rounds 3 (rounds has its own option)"),
        (["--set", "local-steps=2"], "--set local-steps=2: use --local-steps 2"),
        (
            ["--set", "fairness_q=2", "--set", "fairness-q=3"],
            "--set fairness-q=3: fairness_q is already set by --set fairness_q=2; give it once",
        ),
    ],
)
def test_federate_refuses_a_setting_given_twice(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--set rounds=3` overrode `--rounds`, and of two `--set` of one key the last won, both
    without a word: which value a run used was not what its command line seemed to say."""
    out = tmp_path / "run"
    assert main(["federate", "--out", str(out), "--rounds", "1", *argv]) == 2
    assert f"pluralfed federate: error: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--groups", "Nowhere"], "unknown group(s): 'Nowhere'"),
        (["--threads-per-node", "5000"], "threads per node must be 1..1024, got 5000"),
        (["--personalize-steps", "1000000"], "personalize steps must be 0..100000, got 1000000"),
    ],
)
def test_federate_refuses_bad_groups_and_node_limits_before_writing_anything(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """These were refused by prepare or by every node, after --out, the demo data (and for the
    node limits, certificates and configs) had been written."""
    out = tmp_path / "run"
    assert main(["federate", "--out", str(out), "--rounds", "1", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_federate_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    assert main(["federate", "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_progress_logs_each_new_round_and_evaluation_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`make demo` printed nothing for five minutes; a resumed run's old rows are not repeated."""
    metrics = tmp_path / "metrics.jsonl"

    def write(rows: list[dict]) -> None:
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.utime(metrics, ns=(time.time_ns(), time.time_ns() + len(rows)))  # a new stamp

    old = {"kind": "round", "round": 1, "participants": ["a"], "selected": ["a"], "seconds": 1.0}
    write([old])
    progress = Progress(tmp_path)
    new = {
        "kind": "round",
        "round": 2,
        "participants": ["a"],
        "selected": ["a", "b"],
        "seconds": 2.5,
    }
    model = {"alignment": 0.75, "worst": 0.7}
    evaluation = {
        "kind": "evaluation",
        "round": 2,
        "reports": {"held-out groups": {"model": model}},
    }
    with caplog.at_level(logging.INFO, logger="pluralfed.localfed"):
        write([old, new, evaluation])
        progress.poll()
        progress.poll()  # nothing new: nothing logged
        metrics.write_text("{half a row")  # being replaced: skipped, not an error
        progress.poll()
    assert [r.getMessage() for r in caplog.records] == [
        "round 2 done: 1/2 updates in 2.5 s",
        "evaluation after round 2: held-out 0.7500 (worst 0.7000)",
    ]


# --------------------------------------------------------------------------------------------------
# stopping by signal: every process the launcher started stops with it (no orphans)


def test_a_stop_signal_raises_stopped_once_and_waits_for_held_blocks() -> None:
    # what was there before (SIGINT is ignored, not Python's handler, in a background job)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(localfed.Stopped) as term, localfed.stop_on_signals():
        signal.raise_signal(signal.SIGTERM)
        time.sleep(5)  # not reached: the handler raises in the main thread
    assert term.value.exit_code == 143 and str(term.value) == "stopped by SIGTERM"
    # starting or stopping children is not cut short: the signal is raised after it, and a
    # second signal meanwhile changes nothing
    finished = []
    with pytest.raises(localfed.Stopped) as interrupt, localfed.stop_on_signals():
        with localfed._signals_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            finished.append("held block")
        finished.append("not reached")
    assert finished == ["held block"] and interrupt.value.exit_code == 130
    # outside the block the previous handlers are back
    assert {sig: signal.getsignal(sig) for sig in before} == before


def _children(pid: int) -> set[int]:
    """The live (not zombie) child processes of `pid`, read from /proc."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_to_federate_stops_the_coordinator_and_every_node(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """Before, SIGTERM ended `pluralfed federate` at once and left the coordinator and every
    node running (parent 1), still writing into --out."""
    tiny = ["d_model=32", "n_layers=2", "d_ff=32", "mlp_layers=2", "members=1"]
    argv = [sys.executable, "-m", "pluralfed.cli", "federate", "--out", str(tmp_path / "run")]
    argv += ["--rounds", "300", "--synthetic-groups", "3", "--synthetic-questions", "40"]
    argv += ["--local-steps", "1", "--eval-every", "0", *[f"--set={s}" for s in tiny]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # its own session: whatever happens, the teardown can stop all that it started
    launcher = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while len(children := _children(launcher.pid)) < 4:  # coordinator + 3 nodes
            assert launcher.poll() is None, launcher.communicate()[0].decode()
            assert time.monotonic() < deadline, "the federation did not start"
            time.sleep(0.1)
        launcher.send_signal(signum)
        output = launcher.communicate(timeout=60)[0].decode()
        assert launcher.returncode == code, output
        assert f"stopped by {signum.name}: the coordinator and the nodes were stopped" in output
        assert not [pid for pid in children if _alive(pid)], output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def test_a_stop_is_not_an_exception() -> None:
    """`except Exception` anywhere on the way must not swallow a stop (then every later signal
    was ignored): Stopped is a BaseException, like KeyboardInterrupt."""
    from pluralfed.localfed import Stopped

    try:
        try:
            raise Stopped(signal.SIGTERM)
        except Exception:  # what a data loader's error handling does
            pytest.fail("Stopped was caught as an Exception")
    except Stopped as stop:
        assert stop.signum == signal.SIGTERM


def test_federate_says_it_ignores_the_settings_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exported PLURALFED_NODE_THREADS does nothing in a local federation: said at start,
    with the way that works (--set)."""

    def record(run: LocalFederation, data: SurveyData) -> dict[str, object]:
        raise InputError("recorded")

    monkeypatch.setattr(federate_command, "run_local", record)
    monkeypatch.setenv("PLURALFED_NODE_THREADS", "64")
    argv = ["federate", "--out", str(tmp_path / "run"), "--synthetic-groups", "3"]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "note: a local federation ignores PLURALFED_NODE_THREADS" in err
    assert "use --set KEY=VALUE" in err


def test_federate_set_takes_spaces_around_the_equals_sign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--set "server_optimizer = fedadam"` (as a TOML file spells it) sets fedadam."""
    handed: list[LocalFederation] = []

    def record(run: LocalFederation, data: SurveyData) -> dict[str, object]:
        handed.append(run)
        raise InputError("recorded")

    monkeypatch.setattr(federate_command, "run_local", record)
    argv = ["federate", "--out", str(tmp_path / "run"), "--synthetic-groups", "3"]
    assert main([*argv, "--set", "server_optimizer = fedadam"]) == 2
    assert [run.coordinator_settings["server_optimizer"] for run in handed] == ["fedadam"]


def test_children_do_not_get_the_settings_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PLURALFED_COORDINATOR_STATE_DIR left exported for a real coordinator moved a local
    federation's state folder (the launcher then waited for a coordinator that ran elsewhere):
    the launcher's configs say every setting, so the children do not see such variables."""
    monkeypatch.setenv("PLURALFED_COORDINATOR_STATE_DIR", "/elsewhere")
    monkeypatch.setenv("PLURALFED_NODE_THREADS", "64")
    monkeypatch.setenv("PLURALFED_CACHE_DIR", "/cache")  # not a setting: passed on
    env = localfed.child_env(2)
    assert "PLURALFED_COORDINATOR_STATE_DIR" not in env
    assert "PLURALFED_NODE_THREADS" not in env
    assert env["PLURALFED_CACHE_DIR"] == "/cache" and env["OMP_NUM_THREADS"] == "2"
    assert localfed.settings_variables() == [
        "PLURALFED_COORDINATOR_STATE_DIR",
        "PLURALFED_NODE_THREADS",
    ]


# --------------------------------------------------------------------------------------------------
# what prepare writes, and the launcher's own limits (mutation round 12a)


def test_node_limits_at_their_maximum_are_allowed(tmp_path: Path) -> None:
    """The limits are inclusive, as every node's own check: as many threads and personalization
    steps as a node takes are not refused by the launcher."""
    from group_node.config import MAX_PERSONALIZE_STEPS, MAX_THREADS

    run = LocalFederation(
        out_dir=tmp_path,
        training_groups=["A"],
        threads_per_node=MAX_THREADS,
        personalize_steps=MAX_PERSONALIZE_STEPS,
    )
    assert (run.threads_per_node, run.personalize_steps) == (MAX_THREADS, MAX_PERSONALIZE_STEPS)


# every coordinator setting the launcher decides itself, listed here (not read from the module)
OWNED = ["listen", "state_dir", "allow_list", "allow_list_file", "insecure", "tls_dir", "tls_ca"]
OWNED += ["tls_cert", "tls_key", "encoder", "evaluate_only"]


@pytest.mark.parametrize("key", OWNED)
def test_every_setting_the_launcher_makes_is_refused_in_coordinator_settings(
    key: str, tmp_path: Path
) -> None:
    """A `--set` of any of them (not only the ones the CLI tests try) would be written over what
    the launcher decides: --set evaluate_only=[] trained the held-out groups, --set encoder=...
    gave the coordinator another encoder than its nodes."""
    with pytest.raises(InputError, match=rf"^coordinator setting {key!r} cannot be changed"):
        LocalFederation(out_dir=tmp_path, training_groups=["A"], coordinator_settings={key: 1})


def test_the_coordinator_config_listens_on_loopback_and_waits_for_every_training_node(
    tmp_path: Path,
) -> None:
    """A local federation is reachable from this machine only, uses the certificates it issued
    for the coordinator, and by default waits for an update from every training node."""
    data = SurveyData(groups={g: [ITEM] for g in ("A", "B", "C")}, source="mem")
    run = LocalFederation(out_dir=tmp_path, training_groups=["A", "B"], held_out_groups=["C"])
    cfg = tomllib.loads(Path(prepare(run, data)["coordinator_config"]).read_text())
    assert cfg["listen"] == "127.0.0.1:0"
    assert (cfg["min_nodes"], cfg["min_updates"]) == (2, 2)
    assert Path(cfg["tls_dir"]) == tmp_path / "certs" / "coordinator"
    assert (Path(cfg["tls_dir"]) / "cert.pem").exists()


def test_a_min_nodes_given_overrides_the_launchers_default(tmp_path: Path) -> None:
    """`--set min_nodes=1` must reach the coordinator: the launcher's "every training node" is
    only the default."""
    data = SurveyData(groups={g: [ITEM] for g in ("A", "B", "C")}, source="mem")
    run = LocalFederation(
        out_dir=tmp_path,
        training_groups=["A", "B", "C"],
        coordinator_settings={"min_nodes": 1, "min_updates": 1},
    )
    cfg = tomllib.loads(Path(prepare(run, data)["coordinator_config"]).read_text())
    assert (cfg["min_nodes"], cfg["min_updates"]) == (1, 1)


def test_node_configs_carry_the_runs_node_settings(tmp_path: Path) -> None:
    """Threads, encoder and cache folder are the run's, for every node; without a --seed the
    nodes get the coordinator's default seed (the one its task carries)."""
    from coordinator.service import CoordinatorConfig

    data = SurveyData(groups={g: [ITEM] for g in ("A", "B")}, source="mem")
    run = LocalFederation(
        out_dir=tmp_path,
        training_groups=["A"],
        held_out_groups=["B"],
        threads_per_node=3,
        encoder="hashing",
        cache_dir=tmp_path / "cache",
    )
    info = prepare(run, data)
    for path in info["node_configs"].values():
        node = tomllib.loads(path.read_text())
        assert (node["threads"], node["encoder"]) == (3, "hashing")
        assert Path(node["cache_dir"]) == tmp_path / "cache"
        assert node["seed"] == CoordinatorConfig().seed
    # no cache folder given: none written, the node's own default applies
    again = prepare(LocalFederation(out_dir=tmp_path / "b", training_groups=["A"]), data)
    assert "cache_dir" not in tomllib.loads(again["node_configs"]["A"].read_text())


def test_the_coordinators_certificate_names_the_server_name_the_nodes_check(
    tmp_path: Path,
) -> None:
    """Each node checks the coordinator's certificate against its tls_server_name: a name the
    certificate does not hold fails every handshake."""
    from cryptography import x509

    data = SurveyData(groups={"A": [ITEM]}, source="mem")
    info = prepare(LocalFederation(out_dir=tmp_path, training_groups=["A"]), data)
    node = tomllib.loads(info["node_configs"]["A"].read_text())
    pem = (tmp_path / "certs" / "coordinator" / "cert.pem").read_bytes()
    names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert node["tls_server_name"] in names.value.get_values_for_type(x509.DNSName)


def test_preparing_a_run_again_keeps_its_certificates(tmp_path: Path) -> None:
    """A resumed run (same --out) keeps its CA and certificates: a new CA would leave nothing
    issued before (nor a copy of ca.pem given out) verifiable."""
    data = SurveyData(groups={g: [ITEM] for g in ("A", "B")}, source="mem")
    run = LocalFederation(out_dir=tmp_path, training_groups=["A", "B"])
    prepare(run, data)
    pems = sorted((tmp_path / "certs").rglob("*.pem"))
    before = {p: p.read_bytes() for p in pems}
    prepare(run, data)
    assert {p: p.read_bytes() for p in pems} == before


def test_a_hashed_node_id_equal_to_another_groups_plain_id_is_refused() -> None:
    """Colliding names get "node-<slug>-<first 8 hex of sha256(name)>"; a third group whose
    own name slugs to exactly that would share the node id (one certificate, one allow-list
    entry for two groups): refused, naming the groups."""
    digest = hashlib.sha256(b"Korea South").hexdigest()[:8]
    ids = node_ids(["Korea South", "Korea, South"])
    assert ids["Korea South"] == f"node-korea-south-{digest}"
    with pytest.raises(InputError, match=rf"get the same node id 'node-korea-south-{digest}'"):
        node_ids(["Korea South", "Korea, South", f"Korea South {digest}"])


def test_long_colliding_group_names_get_hashed_ids_of_63_characters() -> None:
    """A hashed id is cut like a plain one, to 63 characters (a DNS label): "node-", 49 of the
    slug, "-" and 8 hex. NODE_ID_PATTERN admits 64, so it alone would not notice one too long."""
    long_a, long_b = "w" * 70 + " a", "w" * 70 + " b"  # plain ids equal: both hashed
    ids = node_ids([long_a, long_b])
    assert ids[long_a] != ids[long_b]
    assert [len(nid) for nid in ids.values()] == [63, 63]
    assert ids[long_a].startswith("node-" + "w" * 49 + "-")


def test_none_values_are_left_out_of_a_toml_file(tmp_path: Path) -> None:
    """TOML has no null: a setting of None is not written, so the reader's default applies."""
    path = tmp_path / "c.toml"
    localfed.write_toml(path, {"a": None, "b": 1, "c": True}, {"t": {"k k": "v"}})
    assert tomllib.loads(path.read_text()) == {"b": 1, "c": True, "t": {"k k": "v"}}


def test_children_keep_an_exported_hf_hub_offline() -> None:
    """HF_HUB_OFFLINE defaults to 1 for the children (no download at every start), but one
    exported by the user (0: fetch the encoder) is kept."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "0")
        assert localfed.child_env(1)["HF_HUB_OFFLINE"] == "0"
        mp.delenv("HF_HUB_OFFLINE")
        assert localfed.child_env(1)["HF_HUB_OFFLINE"] == "1"


# --------------------------------------------------------------------------------------------------
# logs, ports and progress (mutation round 12a)


def test_a_log_tail_of_a_first_attempt_leaves_out_its_marker_line(tmp_path: Path) -> None:
    """A log holding one attempt starts with the marker itself (no newline before it): the
    marker is the launcher's line, not the process's words, and is not quoted."""
    log = tmp_path / "node.log"
    log.write_text(f"{localfed.ATTEMPT_MARKER}node started 1 ---\nonly error\n")
    assert localfed.log_tail(log) == "  only error"


def test_a_log_line_exactly_as_wide_as_the_width_is_quoted_whole(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    log.write_text("y" * 10 + "\n" + "z" * 11 + "\n")
    assert localfed.log_tail(log, width=10).splitlines() == [
        "  " + "y" * 10,
        "  " + "z" * 10 + " ...",
    ]


def test_an_empty_port_file_is_read_again_until_it_holds_the_port(tmp_path: Path) -> None:
    """The port file may be seen created but not yet written: read as a port, "" made the
    launcher fail with a ValueError instead of waiting for it."""
    port_file = tmp_path / "coordinator.port"
    port_file.write_text("")
    procs = Processes(tmp_path)
    try:
        write_later = f"import time, pathlib; time.sleep(0.5); pathlib.Path({str(port_file)!r}).write_text('4321'); time.sleep(60)"
        coordinator = procs.start("coordinator", _py(write_later), {})
        assert wait_for_port(tmp_path, coordinator, 60) == 4321
    finally:
        procs.stop_all(grace_s=2)


def test_a_coordinator_that_never_listens_is_a_clear_error(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        coordinator = procs.start("coordinator", _py("import time; time.sleep(60)"), {})
        with pytest.raises(InputError, match=r"^the coordinator did not start listening in 1 s$"):
            wait_for_port(tmp_path, coordinator, 1)
    finally:
        procs.stop_all(grace_s=2)


def test_results_of_an_earlier_run_do_not_hide_failed_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only results written since this run started mean the run finished: a results.json left
    by an earlier run in the same folder must not make failed nodes look finished."""
    monkeypatch.setattr(localfed, "NODES_FAILED_GRACE_S", 0.0)
    (tmp_path / "results.json").write_text("{}")
    started = time.time()
    os.utime(tmp_path / "results.json", (started - 100, started - 100))
    procs = Processes(tmp_path)
    try:
        procs.start("coordinator", _py("import time; time.sleep(60)"), {})
        procs.start("node-a", _py(FAIL_AT_START), {})
        with pytest.raises(InputError, match="every training node stopped"):
            wait_for_coordinator(procs, ["node-a"], tmp_path, 60, started)
    finally:
        procs.stop_all(grace_s=2)


def test_a_node_that_exited_0_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Exit 0 is a node that finished (it heard SHUTDOWN): only an error exit is logged as a
    node that "exited with code N", with its log's last line."""
    procs = Processes(tmp_path)
    try:
        procs.start("coordinator", _py("import time; time.sleep(60)"), {})
        procs.start("node-a", _py("pass"), {})
        procs.children["node-a"].wait()
        with (
            caplog.at_level(logging.WARNING, logger="pluralfed.localfed"),
            pytest.raises(InputError, match="did not finish"),
        ):
            wait_for_coordinator(procs, ["node-a"], tmp_path, 0.5, time.time())
    finally:
        procs.stop_all(grace_s=2)
    assert not [r.getMessage() for r in caplog.records if "exited" in r.getMessage()]


def test_progress_skips_rows_without_a_round_and_never_repeats_old_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row that is not a round's (no whole "round") is not described, not a crash; and the
    rows there when Progress starts are not logged, not even by its own first look."""
    metrics = tmp_path / "metrics.jsonl"
    old = {"kind": "round", "round": 1, "participants": ["a"], "selected": ["a"], "seconds": 1.0}
    metrics.write_text(json.dumps(old) + "\n" + json.dumps({"kind": "note"}) + "\n")
    with caplog.at_level(logging.INFO, logger="pluralfed.localfed"):
        progress = Progress(tmp_path)
        new = {**old, "round": 2, "seconds": 2.0}
        metrics.write_text("".join(json.dumps(r) + "\n" for r in [old, {"round": "3"}, new]))
        os.utime(metrics, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new stamp
        progress.poll()
    assert [r.getMessage() for r in caplog.records] == ["round 2 done: 1/1 updates in 2.0 s"]


def test_after_a_stop_the_cleanups_held_blocks_are_not_stopped_again() -> None:
    """Stopped is raised once: the cleanup that follows (stopping every child, in a held block)
    must run to its end, not be cut short by the same signal raised anew."""
    done = []
    with pytest.raises(localfed.Stopped), localfed.stop_on_signals():
        try:
            signal.raise_signal(signal.SIGTERM)
            time.sleep(5)  # not reached
        except localfed.Stopped:
            with localfed._signals_held():
                done.append("held")
            done.append("after the held block")
            raise
    assert done == ["held", "after the held block"]


# --------------------------------------------------------------------------------------------------
# run_local with a stand-in python (mutation round 12a)


def _stand_in_run(
    tmp_path: Path,
    coordinator: str,
    node_a: str,
    earlier_state: dict[str, str] | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[LocalFederation, SurveyData]:
    """A run of groups A and B whose `python` writes down its arguments and, as the
    coordinator, runs `coordinator` (a shell snippet; $STATE is the state folder); the node of
    group A runs `node_a`, other nodes exit 0. `earlier_state` files are put in the state
    folder first, as an earlier run left them."""
    script = tmp_path / "python"
    state = tmp_path / "out" / "coordinator"
    state.mkdir(parents=True)
    for name, text in (earlier_state or {}).items():
        (state / name).write_text(text)
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "argv"}\nSTATE={state}\nmkdir -p "$STATE"\n'
        f'case "$3" in\n  coordinator) {coordinator};;\n'
        f'  node) case "$*" in *node-a.toml*) {node_a};; esac; exit 0;;\nesac\n'
    )
    script.chmod(0o755)
    data = SurveyData(groups={g: [ITEM] for g in ("A", "B")}, source="mem")
    run = LocalFederation(
        out_dir=tmp_path / "out",
        training_groups=["A", "B"],
        coordinator_settings=settings or {},
        python=str(script),
    )
    return run, data


def test_a_stale_port_file_is_not_taken_for_the_new_coordinators(tmp_path: Path) -> None:
    """The port file an earlier run left: read before the coordinator writes its own, it sent
    every node to a port nothing listens on (or another process's)."""
    run, data = _stand_in_run(tmp_path, "exit 2", "exit 0", {"coordinator.port": "1"})
    with pytest.raises(InputError, match="the coordinator exited with code 2"):
        localfed.run_local(run, data)
    assert [line.split()[2] for line in (tmp_path / "argv").read_text().splitlines()] == [
        "coordinator"
    ]


def test_a_coordinator_failing_after_it_started_is_its_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A coordinator that listened, then exited 3, ends the run with its exit code and log, not
    with a missing results.json; and a folder holding an earlier run's state is said to be
    resumed."""
    listen_then_fail = 'echo 5 > "$STATE/coordinator.port"; exit 3'
    run, data = _stand_in_run(tmp_path, listen_then_fail, "exit 0", {"state.json": "{}"})
    with (
        caplog.at_level(logging.WARNING, logger="pluralfed.localfed"),
        pytest.raises(InputError, match=r"^the coordinator exited with code 3; the end of "),
    ):
        localfed.run_local(run, data)
    assert any("holds an earlier run" in r.getMessage() for r in caplog.records)


def test_run_local_waits_on_while_the_given_quorum_still_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --set min_nodes=1, one of two training nodes failing leaves the quorum standing:
    the run goes on to its results (before, the launcher counted every training node as
    needed and ended a run the coordinator could finish)."""
    monkeypatch.setattr(localfed, "NODES_FAILED_GRACE_S", 0.0)
    finish = 'echo 5 > "$STATE/coordinator.port"; sleep 3; echo \'{"done": 1}\' > "$STATE/results.json"; exit 0'
    quorum = {"min_nodes": 1, "min_updates": 1}
    run, data = _stand_in_run(tmp_path, finish, "exit 1", settings=quorum)
    assert localfed.run_local(run, data) == {"done": 1}
