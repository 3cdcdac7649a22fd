"""The centralized `train` and `evaluate` commands, end to end, as a user runs them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fedharness import HOST, Pki, free_port

import pluralfed.commands.node as node_command
from group_node.config import NodeConfig
from pluralfed.checkpoint import load_checkpoint
from pluralfed.cli import build_parser, main
from pluralfed.data import write_jsonl
from pluralfed.pki import revoke_certificates
from pluralfed.synthetic import generate_synthetic

TINY = ["--d-model", "32", "--layers", "2", "--heads", "4", "--d-ff", "32", "--mlp-layers", "2"]


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "demo.jsonl"
    write_jsonl(generate_synthetic(n_groups=4, n_questions=50, seed=1), path)
    return path


def _train(data: Path, out: Path, cache: Path, *extra: str) -> dict:
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--eval-every",
            "2",
            "--threads",
            "1",
            "--cache-dir",
            str(cache),
            *TINY,
            *extra,
        ]
    )
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_train_writes_checkpoint_metrics_and_is_deterministic(
    synthetic_file: Path, tmp_path: Path, session_cache_dir: Path
) -> None:
    first = _train(synthetic_file, tmp_path / "a", session_cache_dir, "--seed", "3")
    second = _train(synthetic_file, tmp_path / "b", session_cache_dir, "--seed", "3")
    assert first["reports"] == second["reports"]
    assert first["optimizer_steps"] == 3 * 4
    history = [json.loads(line) for line in (tmp_path / "a" / "history.jsonl").open()]
    assert [h["epoch"] for h in history] == [2, 3]
    ckpt = load_checkpoint(tmp_path / "a")
    assert ckpt.model.cfg.d_model == 32
    assert ckpt.metadata["training_groups"] == sorted(generate_synthetic(4, 50, 1).groups)
    # evaluating the checkpoint reproduces the training run's final figures
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(tmp_path / "a"),
                "--data",
                str(synthetic_file),
                "--cache-dir",
                str(session_cache_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    evaluated = json.loads(out.read_text())["reports"]
    name = "training groups (test questions)"
    assert evaluated[name]["model"] == pytest.approx(first["reports"][name]["model"])


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"group": "A", "question": "q", "options": ["x"], "distribution": [1, 2]}\n')
    code = main(["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "Traceback" not in err


def test_every_command_has_help() -> None:
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest == "command"]
    assert isinstance(actions[0], argparse._SubParsersAction)
    for name, sub in actions[0].choices.items():
        text = sub.format_help()
        assert len(text) > 200, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def _node_action(action: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser("node")._actions if a.dest == "command")
    assert isinstance(commands, argparse._SubParsersAction)
    node = commands.choices["node"]
    sub = next(a for a in node._actions if a.dest == "node_command")
    return sub.choices[action]


def test_node_check_help_lists_only_what_check_uses() -> None:
    """`node check --help` listed every `node run` option (--data, --threads, ...), which a
    check never uses (partner review, session 20). They are still accepted, so a run's command
    line checks as it is."""
    # the options' part of each help (check's description names the ones it does not list)
    check, run = (_node_action(a).format_help().split("\noptions:", 1)[1] for a in ("check", "run"))
    for used in ("--config", "--coordinator", "--group", "--role", "--tls-dir", "--tls-crl"):
        assert used in check and used in run
    for unused in ("--data", "--threads", "--cache-dir", "--personalize-steps", "--seed"):
        assert unused not in check, unused
        assert unused in run, unused
    args = _node_action("check").parse_args(
        ["--group", "G", "--data", "d.jsonl", "--threads", "2", "--insecure"]
    )
    assert (args.group, args.data, args.threads, args.insecure) == ("G", "d.jsonl", "2", True)


def _settings_listed(action: str) -> set[str]:
    """The settings `node ACTION --help` lists (an option line starts with two spaces)."""
    options = _node_action(action).format_help().split("\noptions:", 1)[1]
    flags = re.findall(r"^  (--[a-z][a-z0-9-]*)", options, flags=re.MULTILINE)
    return {flag[2:].replace("-", "_") for flag in flags} - {"help", "config"}


_FIELDS = frozenset(f.name for f in dataclasses.fields(NodeConfig))


class _ReadsRecorded(NodeConfig):
    """A NodeConfig that records the settings read once it is made (its checks read them all)."""

    _read: set[str]  # set on the instance once made (not a field)

    def __getattribute__(self, name: str) -> Any:
        seen = object.__getattribute__(self, "__dict__").get("_read")
        if seen is not None and name in _FIELDS:
            seen.add(name)
        return object.__getattribute__(self, name)


def test_node_check_help_lists_exactly_the_settings_the_check_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`node check --help` hid backoff_initial_s and backoff_max_s, which the check's client
    gives gRPC as its reconnect back-off (review, session 22). What `check` reads, failing
    against a closed port in plain text, with TLS, and with TLS and a revocation list (every
    path that reads another setting), must be what its help lists; the rest is `node run`'s."""
    pki = Pki(tmp_path / "pki")
    revoke_certificates(pki.ca)  # an empty revocation list
    address = f"{HOST}:{free_port()}"  # nobody listens there
    monkeypatch.setattr(
        node_command, "make_encoder", lambda name: SimpleNamespace(identity=f"stub {name}")
    )
    read: set[str] = set()
    for settings in (
        {"insecure": True},
        {"tls_dir": pki.node("node-a"), "tls_server_name": "localhost"},
        {"tls_dir": pki.node("node-a"), "tls_crl": pki.ca / "crl.pem"},
    ):
        cfg = _ReadsRecorded(coordinator=address, group="A", **settings)
        cfg._read = set()
        monkeypatch.setattr(node_command, "load", lambda args, cfg=cfg: cfg)
        assert node_command.check(argparse.Namespace()) == 1, capsys.readouterr()
        read |= cfg._read
    assert {"backoff_initial_s", "backoff_max_s", "tls_crl", "encoder"} <= read
    assert _settings_listed("check") == read
    assert _settings_listed("run") == _FIELDS
    assert not read & set(node_command.RUN_ONLY)


@pytest.mark.slow
def test_centralized_protocol_run_beats_group_prior_on_held_out(
    goqa_csv: Path, tmp_path: Path, session_cache_dir: Path
) -> None:
    """PROTOCOL.md centralized training (8 groups, 100 epochs) on the real shared data."""
    out = tmp_path / "central"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pluralfed.cli",
            "train",
            "--data",
            str(goqa_csv),
            "--out",
            str(out),
            "--threads",
            "2",
            "--members",
            "1",  # PROTOCOL.md's model: the paper's single network
            "--cache-dir",
            str(session_cache_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["reports"]["held-out groups"]
    assert metrics["optimizer_steps"] == 800
    assert held["model"]["num_groups"] == 6
    assert held["model"]["alignment"] > held["prior_baseline"]["alignment"], held
    assert held["model"]["alignment"] > held["uniform_baseline"]["alignment"], held
    train = metrics["reports"]["training groups (test questions)"]
    assert train["model"]["alignment"] > train["prior_baseline"]["alignment"], train


def test_train_an_ensemble_and_evaluate_its_checkpoint(
    synthetic_file: Path, tmp_path: Path, session_cache_dir: Path
) -> None:
    trained = _train(synthetic_file, tmp_path / "e", session_cache_dir, "--members", "2")
    ckpt = load_checkpoint(tmp_path / "e")
    assert ckpt.model.cfg.members == 2 and len(ckpt.model.members) == 2
    out = tmp_path / "eval.json"
    args = ["evaluate", "--checkpoint", str(tmp_path / "e"), "--data", str(synthetic_file)]
    assert main([*args, "--cache-dir", str(session_cache_dir), "--out", str(out)]) == 0
    name = "training groups (test questions)"
    evaluated = json.loads(out.read_text())["reports"][name]["model"]
    assert evaluated == pytest.approx(trained["reports"][name]["model"])


def test_bad_members_is_a_clear_error(
    synthetic_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--data", str(synthetic_file), "--out", str(tmp_path / "o"), "--epochs", "1"]
    assert main([*args, "--members", "0"]) == 2
    err = capsys.readouterr().err
    assert "members" in err and "Traceback" not in err
