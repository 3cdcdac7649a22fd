"""Settings and saved files from outside are checked when read, naming what and where: the model
config (coordinator settings, model.json, Join replies), a checkpoint, the coordinator's config,
and the state a coordinator resumes from."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import coordinator.state as state_module
import pluralfed.checkpoint as checkpoint_module
from coordinator.history import EVALUATIONS_FILE, HISTORY_FILE, EvaluationLog, RoundHistory
from coordinator.server import task_to_proto
from coordinator.service import CoordinatorConfig, model_config
from coordinator.settings import NODE_MAX_HEARTBEAT_S, NODE_MAX_LOCAL_STEPS, RoundSettings
from coordinator.state import STATE_FILE, CheckpointError, RunState, load_state, save_state
from coordinator.tasks import TaskKind, TaskSpec
from group_node.client import MAX_HEARTBEAT_INTERVAL_S
from group_node.node import MAX_LOCAL_STEPS, local_steps_of, training_settings
from pluralfed import protocol
from pluralfed.checkpoint import load_checkpoint, save_checkpoint
from pluralfed.commands import coordinator as coordinator_command
from pluralfed.config import ConfigValueError, load_config
from pluralfed.errors import InputError
from pluralfed.model import GPO, GPOConfig
from pluralfed.tensorfiles import save_tensors
from pluralfed.training import build_model

SMALL = GPOConfig(embed_dim=8, d_model=8, mlp_layers=1, n_layers=1, n_heads=2, d_ff=8)

# ------------------------------------------------------------------------------- GPOConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_heads", 0),
        ("d_model", 0),
        ("d_model", 10**7),
        ("d_ff", -3),
        ("n_layers", -1),
        ("mlp_layers", 0),
        ("embed_dim", 0),
        ("dropout", 2.0),
        ("dropout", 1.0),
        ("dropout", math.nan),
        ("memory_temperature", math.nan),
        ("memory_temperature", 1e-300),
        ("memory_shrinkage", math.nan),
        ("memory_shrinkage", math.inf),
        ("memory_weight", math.nan),
        ("min_log_std", math.nan),
        ("members", True),
        ("d_model", "128"),
        ("d_model", 128.0),
        ("dropout", "0.1"),
    ],
)
def test_model_config_refuses_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(InputError, match=field):
        GPOConfig(**{field: value})


def test_model_config_needs_heads_that_divide_the_width() -> None:
    with pytest.raises(InputError, match="n_heads"):
        GPOConfig(d_model=130, n_heads=4)


def test_model_config_caps_the_total_size_before_anything_is_allocated() -> None:
    # every field within its own limit, together far too large
    with pytest.raises(InputError, match="parameters"):
        GPOConfig(d_model=8192, d_ff=32768, n_layers=64, members=16)


@pytest.mark.parametrize(
    "cfg",
    [GPOConfig(), SMALL, GPOConfig(members=3, mlp_layers=2, d_ff=64, embed_dim=16, d_model=32)],
)
def test_the_size_is_computed_as_the_network_has_it(cfg: GPOConfig) -> None:
    assert cfg.num_parameters() == GPO(cfg).num_parameters()


def test_model_config_from_json_must_be_an_object() -> None:
    with pytest.raises(InputError, match="JSON object"):
        GPOConfig.from_dict([])  # type: ignore[arg-type]
    # an int where a float is expected is fine (JSON writes 0.0 as 0 sometimes)
    assert GPOConfig.from_dict({**SMALL.to_dict(), "dropout": 0}).dropout == 0


# ------------------------------------------------------------------------------- checkpoints


def _checkpoint(tmp_path: Path, **config: Any) -> Path:
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, build_model(SMALL, 0), "enc", {})
    meta = json.loads((folder / "model.json").read_text())
    meta["config"] = {**meta["config"], **config}
    (folder / "model.json").write_text(json.dumps(meta))  # allows NaN, as a hand edit might
    return folder


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_heads", 0),
        ("d_ff", -1),
        ("memory_temperature", math.nan),
        ("members", True),
        ("dropout", 2.0),
    ],
)
def test_checkpoint_with_a_bad_model_config_is_refused(
    tmp_path: Path, field: str, value: Any
) -> None:
    folder = _checkpoint(tmp_path, **{field: value})
    with pytest.raises(InputError, match=rf"model\.json: bad model config: {field}"):
        load_checkpoint(folder)


@pytest.mark.parametrize("error", [RuntimeError, ZeroDivisionError, OverflowError])
def test_checkpoint_turns_torch_failures_into_input_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    folder = _checkpoint(tmp_path)

    def broken(cfg: GPOConfig) -> GPO:
        raise error("from torch")

    monkeypatch.setattr(checkpoint_module, "GPO", broken)
    with pytest.raises(InputError, match=r"model\.json: bad model config: from torch"):
        load_checkpoint(folder)


def test_a_good_checkpoint_still_loads(tmp_path: Path) -> None:
    assert load_checkpoint(_checkpoint(tmp_path)).model.cfg == SMALL


# ------------------------------------------------------------------------------- coordinator config


def test_the_coordinator_config_has_every_round_setting_with_the_same_default() -> None:
    """The config repeats RoundSettings' fields (one TOML key each): a field added to one and
    not the other, or a default changed in one only, would run code and configs differently."""
    settings = {f.name: f for f in dataclasses.fields(RoundSettings)}
    config = {f.name: f for f in dataclasses.fields(CoordinatorConfig)}
    assert set(settings) <= set(config), set(settings) - set(config)
    for name, field in settings.items():
        assert config[name].type == field.type, name
    assert CoordinatorConfig().round_settings() == RoundSettings()


def test_a_coordinator_runs_protocol_md_by_default() -> None:
    """Every reported figure follows PROTOCOL.md (pluralfed.protocol): a coordinator started
    without settings runs that experiment."""
    s = RoundSettings()
    assert (s.rounds, s.local_steps, s.learning_rate, s.eval_every) == (
        protocol.FEDERATED_ROUNDS,
        protocol.LOCAL_STEPS,
        protocol.LEARNING_RATE,
        protocol.EVAL_EVERY,
    )
    assert (s.context_range, s.target_range, s.max_context) == (
        protocol.CONTEXT_RANGE,
        protocol.TARGET_RANGE,
        protocol.EVAL_MAX_CONTEXT,
    )
    assert s.local_optimizer == protocol.LOCAL_OPTIMIZER


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> CoordinatorConfig:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(
        CoordinatorConfig, path, "X_", {}, environ=env or {}, skip_tables=("allow_list",)
    )


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("seed = -1", "seed"),
        ("seed = 18446744073709551616", "seed"),
        ("max_context = 0", "max_context"),
        ("max_context = 4294967296", "max_context"),
        ("context_range = [9, 5000000000]", "context_range"),
        ("context_range = [0, 5]", "context_range"),
        ("target_range = [9, 3]", "target_range"),
        ("local_steps = 0", "local_steps"),
        ("local_steps = 100001", "local_steps"),
        ("learning_rate = 0.0", "learning_rate"),
        ("learning_rate = 5.0", "learning_rate"),
        ("learning_rate = inf", "learning_rate"),
        ("learning_rate = nan", "learning_rate"),
        ("round_timeout_s = inf", "round_timeout_s"),
        ("round_timeout_s = 0", "round_timeout_s"),
        ("eval_timeout_s = nan", "eval_timeout_s"),
        ("session_timeout_s = inf", "session_timeout_s"),
        ("heartbeat_interval_s = 0.0001", "heartbeat_interval_s"),
        ("quorum_timeout_s = nan", "quorum_timeout_s"),
        ("quorum_timeout_s = -1", "quorum_timeout_s"),
        ("linger_s = nan", "linger_s"),
        ("linger_s = -1", "linger_s"),
        ("server_lr = nan", "server_lr"),
        ("server_lr = 0", "server_lr"),
        ("norm_bound = inf", "norm_bound"),
        ("embedding_noise = nan", "embedding_noise"),
        ("fairness_q = inf", "fairness_q"),
        ("rounds = 0", "rounds"),
        ("rounds = 1e300", "rounds"),
        ("min_nodes = 1e20", "min_nodes"),
        ("min_nodes = 0", "min_nodes"),
        ("min_updates = 0", "min_updates"),
        ("eval_every = -1", "eval_every"),
        ("max_workers = 0", "max_workers"),
        ("max_workers = -1", "max_workers"),
        ("max_concurrent_uploads = -1", "max_concurrent_uploads"),
        ("max_concurrent_downloads = -1", "max_concurrent_downloads"),
        ("listen = ''", "listen"),
        ("listen = 'localhost'", "listen"),
        ("listen = 'localhost:99999'", "listen"),
        ("encoder = ''", "encoder"),
        ("weighting = 'loudest'", "weighting"),
        ("server_optimizer = 'sgd'", "server_optimizer"),
        ("evaluate_only = ['China', 'Japan ']", "evaluate_only name 'Japan ' has leading"),
        # the allow-list refuses such a name, so no node could ever answer for it
        (
            "evaluate_only = ['China', \"Ja\\tpan\"]",
            "evaluate_only name 'Ja\\tpan' holds control characters",
        ),
    ],
)
def test_coordinator_config_refuses_at_load_naming_file_and_key(
    tmp_path: Path, line: str, key: str
) -> None:
    with pytest.raises(InputError) as err:
        _load(tmp_path, line + "\n")
    assert str(err.value).startswith(f"{tmp_path / 'c.toml'}: {key}"), str(err.value)


def test_coordinator_config_names_the_environment_variable_or_option(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^environment X_SEED: seed"):
        _load(tmp_path, "", {"X_SEED": "-1"})
    with pytest.raises(InputError, match=r"^--local-steps: local_steps"):
        load_config(CoordinatorConfig, None, "X_", {"local_steps": "100001"}, environ={})
    with pytest.raises(InputError, match=r"^coordinator config: linger_s"):
        CoordinatorConfig(linger_s=math.nan)


def test_coordinator_refuses_what_every_node_would_refuse() -> None:
    assert NODE_MAX_LOCAL_STEPS == MAX_LOCAL_STEPS
    assert NODE_MAX_HEARTBEAT_S == MAX_HEARTBEAT_INTERVAL_S
    with pytest.raises(InputError, match=r"heartbeat_interval_s must be in \[0\.5, 3600\]"):
        CoordinatorConfig(heartbeat_interval_s=7200.0, session_timeout_s=14400.0)


def test_a_session_must_outlive_its_heartbeat_interval() -> None:
    """JoinReply.session_timeout is "several heartbeat intervals": one not longer than the
    interval would expire every session between two beats (the protocol review found this
    check untested)."""
    for timeout in (5.0, 4.0):
        with pytest.raises(InputError, match=r"session_timeout_s \(\d+\) must be longer than"):
            RoundSettings(heartbeat_interval_s=5.0, session_timeout_s=timeout)
    assert RoundSettings(heartbeat_interval_s=5.0, session_timeout_s=5.5).session_timeout_s == 5.5


def test_coordinator_limits_are_values_the_protocol_and_nodes_take(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        "seed = 18446744073709551615\nlocal_steps = 100000\nlearning_rate = 1.0\n"
        "context_range = [1, 4294967295]\nmax_context = 4294967295\nlinger_s = 0\n"
        "heartbeat_interval_s = 0.5\n",
    )
    settings = cfg.round_settings()
    task = task_to_proto(TaskSpec(TaskKind.TRAIN, "t", 1, "v", time.time() + 60, settings))
    assert local_steps_of(task.hyperparameters) == 100000
    assert training_settings(task.hyperparameters, "TRAIN").learning_rate == 1.0
    assert task.hyperparameters.seed == 2**64 - 1
    assert task.evaluation.max_context == 2**32 - 1


def test_coordinator_command_checks_the_model_settings_at_load(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('d_model = 0\n[allow_list]\nnode-a = "A"\n')
    parser = argparse.ArgumentParser()
    coordinator_command.register(parser.add_subparsers())
    args = parser.parse_args(["coordinator", "--config", str(path)])
    with pytest.raises(InputError, match="d_model"):
        coordinator_command.load(args)
    path.write_text('d_model = 64\n[allow_list]\nnode-a = "A"\n')
    cfg, _ = coordinator_command.load(parser.parse_args(["coordinator", "--config", str(path)]))
    assert model_config(cfg, 384).d_model == 64


# ------------------------------------------------------------------------------- resume state


def _state(folder: Path, **changes: Any) -> Path:
    """A real saved state, then state.json edited as given."""
    folder.mkdir(exist_ok=True)
    save_state(
        folder,
        RunState(
            run_id="r",
            completed_rounds=2,
            weights={"w": np.ones(3, np.float32)},
            model_config=SMALL.to_dict(),
            encoder_identity="enc",
            history=RoundHistory.from_records(
                folder / HISTORY_FILE,
                [{"round": 1, "participants": ["A"]}, {"round": 2, "participants": []}],
                "test",
            ),
            evaluations=EvaluationLog.from_records(
                folder / EVALUATIONS_FILE,
                [{"round": 2, "kind": "evaluation", "groups": [], "reports": {}}],
                "test",
            ),
        ),
    )
    raw = json.loads((folder / STATE_FILE).read_text())
    raw.update(changes)
    (folder / STATE_FILE).write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"completed_rounds": -7}, "completed_rounds"),
        ({"completed_rounds": True}, "completed_rounds"),
        ({"completed_rounds": 2.5}, "completed_rounds"),
        ({"run_id": 5}, "run_id"),
        ({"model_config": []}, "model_config"),
        ({"history_bytes": -1}, "history_bytes"),
        ({"history_bytes": True}, "history_bytes"),
        ({"history_bytes": "12"}, "history_bytes"),
        ({"history_digest": "ab"}, "history_digest"),
        ({"history_digest": None}, "history_digest"),
        ({"version": 3}, "version"),
        ({"version": 2.0}, "version"),
        ({"history_digest": "0" * 64}, "history_digest"),
        ({"version": 1, "history": [1, 2]}, "history"),
        ({"version": 1, "history": [{"round": 1}]}, "participants"),
        ({"version": 1, "history": [{"round": -1, "participants": []}]}, "history"),
        ({"version": 1, "history": "ab"}, "history"),
        ({"version": 1, "history": [], "evaluations": "ab"}, "evaluations"),
        ({"version": 1, "history": [], "evaluations": [{"round": "2", "reports": {}}]}, "round"),
        ({"version": 1, "history": [], "evaluations": [{"round": 2, "reports": []}]}, "reports"),
        ({"evaluations_bytes": -1}, "evaluations_bytes"),
        ({"evaluations_digest": "0" * 64}, "evaluations_digest"),
        ({"evaluations_digest": 5}, "evaluations_digest"),
        ({"weights_file": "../x.safetensors"}, "weights_file"),
        ({"weights_file": "/etc/passwd"}, "weights_file"),
        ({"weights_file": "sub/w.safetensors"}, "weights_file"),
        ({"weights_file": ".."}, "weights_file"),
        ({"weights_file": 3}, "weights_file"),
        ({"optimizer_file": "../o.safetensors"}, "optimizer_file"),
        ({"optimizer_scalars": [1]}, "optimizer_scalars"),
        # the exact refusal, not another check's that a bad value happens to trip later
        ({"history_digest": "ab"}, "field 'history_digest' must be a BLAKE3 digest"),
        ({"evaluations_digest": "0" * 63}, "field 'evaluations_digest' must be a BLAKE3"),
        ({"weights_digest": "ab"}, "field 'weights_digest' must be a BLAKE3 digest"),
        ({"weights_digest": 7}, "field 'weights_digest' must be a BLAKE3 digest"),
        ({"version": 1, "history": "ab"}, "field 'history' missing or not a list"),
        ({"version": 1, "history": [], "evaluations": {}}, "'evaluations' missing or not a list"),
        ({"encoder_identity": 5}, "field 'encoder_identity' missing or not a str"),
        ({"completed_rounds": True}, "field 'completed_rounds' missing or not a int"),
        ({"completed_rounds": -7}, "field 'completed_rounds' is -7, < 0"),
        # fields that disagree with each other or with the records
        (
            {"completed_rounds": 1, "weights_file": "weights-r00001.safetensors"},
            "'completed_rounds' is 1, but the history holds 2 round record",
        ),
        ({"weights_file": "weights-r00001.safetensors"}, "'weights_file' is 'weights-r00001"),
        ({"optimizer_file": "optimizer-r00001.safetensors"}, "'optimizer_file' is 'optimizer-r0"),
        (
            {
                "version": 1,
                "completed_rounds": 1,
                "weights_file": "weights-r00001.safetensors",
                "history": [{"round": 1, "participants": []}],
                "evaluations": [{"round": 2, "groups": [], "reports": {}}],
            },
            "evaluations hold one of round 2, beyond completed_rounds 1",
        ),
    ],
)
def test_resume_state_fields_are_checked(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    folder = _state(tmp_path / "run", **changes)
    with pytest.raises(InputError, match=rf"state\.json.*{field}"):
        load_state(folder)


def test_resume_state_must_be_an_object(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("[]")
    with pytest.raises(InputError, match=r"state\.json: expected a JSON object"):
        load_state(tmp_path)


def test_resume_state_refuses_non_finite_weights(tmp_path: Path) -> None:
    folder = _state(tmp_path / "run")
    name = json.loads((folder / STATE_FILE).read_text())["weights_file"]
    save_tensors(folder / name, {"w": np.array([1.0, np.nan, 1.0], np.float32)})
    with pytest.raises(InputError, match=r"weights-r00002\.safetensors: tensor 'w'.*non-finite"):
        load_state(folder)


def test_a_good_resume_state_still_loads(tmp_path: Path) -> None:
    state = load_state(_state(tmp_path / "run"))
    assert state is not None and state.completed_rounds == 2
    assert [r["round"] for r in state.history.records()] == [1, 2]
    np.testing.assert_array_equal(state.weights["w"], np.ones(3, np.float32))


def _round(n: int) -> Any:
    """A record of round `n` as the checks of history.jsonl take it."""
    return {"round": n, "participants": ["A"]}


def test_the_server_optimizers_state_is_resumed_whole(tmp_path: Path) -> None:
    """Its arrays go to optimizer-r*.safetensors, its scalars into state.json: a resume gets
    both back, and the previous round's files are removed once the new state.json names its."""
    folder = _state(tmp_path / "run")
    state = load_state(folder)
    assert state is not None and state.optimizer_state == {}
    moment = np.arange(3, dtype=np.float32)
    state.optimizer_state = {"step": 3, "beta": 0.5, "m.w": moment}
    state.completed_rounds = 3
    save_state(folder, state, record=_round(3))
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "optimizer-r00003.safetensors",
        "weights-r00003.safetensors",
    ]
    again = load_state(folder)
    assert again is not None and again.completed_rounds == 3
    assert sorted(again.optimizer_state) == ["beta", "m.w", "step"]
    assert (again.optimizer_state["step"], again.optimizer_state["beta"]) == (3, 0.5)
    np.testing.assert_array_equal(again.optimizer_state["m.w"], moment)


def test_a_failed_checkpoint_removes_only_the_files_it_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at state.json: the round's weights file this checkpoint made is removed (no
    state.json names it), but one that was there before it (written again) is the caller's."""
    folder = _state(tmp_path / "run")
    state = load_state(folder)
    assert state is not None

    def full(path: Path, _obj: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module, "atomic_write_json", full)
    state.completed_rounds = 3
    with pytest.raises(CheckpointError):
        save_state(folder, state, record=_round(3))
    assert not (folder / "weights-r00003.safetensors").exists()
    save_tensors(folder / "weights-r00003.safetensors", {"w": np.zeros(3, np.float32)})
    state.optimizer_state = {"m": np.ones(2, np.float32)}  # a file not there before: removed
    with pytest.raises(CheckpointError):
        save_state(folder, state)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "weights-r00002.safetensors",
        "weights-r00003.safetensors",
    ]


def test_digests_in_upper_case_hex_are_taken(tmp_path: Path) -> None:
    """A digest is hex, in either case: one written in capitals by hand or by another tool is
    the same digest, not a damaged file."""
    raw = json.loads((_state(tmp_path / "run") / STATE_FILE).read_text())
    changes = {k: raw[k].upper() for k in ("weights_digest", "history_digest")}
    assert all(v != raw[k] for k, v in changes.items())
    state = load_state(_state(tmp_path / "again", **changes))
    assert state is not None and [r["round"] for r in state.history.records()] == [1, 2]


def test_a_state_whose_records_are_in_another_folder_is_not_saved(tmp_path: Path) -> None:
    """The records are appended in place: state.json in one folder must not count bytes of a
    history.jsonl in another."""
    state = load_state(_state(tmp_path / "run"))
    assert state is not None
    (tmp_path / "other").mkdir()
    before = (tmp_path / "run" / STATE_FILE).read_bytes()
    with pytest.raises(ValueError, match=r"the records of a state saved to .*other are in"):
        save_state(tmp_path / "other", state)
    assert not list((tmp_path / "other").iterdir())
    assert (tmp_path / "run" / STATE_FILE).read_bytes() == before


def test_a_failed_checkpoint_over_a_state_json_that_is_no_object_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean-up of a failed checkpoint reads the state.json on disk to spare the files it
    names; one that is not an object names nothing it can tell, so nothing is removed, and the
    failure is still the CheckpointError naming the file, not an AttributeError."""
    folder = _state(tmp_path / "run")
    state = load_state(folder)
    assert state is not None
    (folder / STATE_FILE).write_text("[]")

    def full(path: Path, _obj: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module, "atomic_write_json", full)
    state.completed_rounds = 3
    with pytest.raises(CheckpointError, match=r"cannot write .*state\.json: .*No space left"):
        save_state(folder, state, record=_round(3))
    assert (folder / "weights-r00003.safetensors").exists()


@pytest.mark.parametrize(
    "field",
    ["round_timeout_s", "eval_timeout_s", "learning_rate", "session_timeout_s", "norm_bound"],
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_round_settings_built_directly_refuse_non_finite_floats(field: str, value: float) -> None:
    """NaN passes every comparison and infinity breaks deadlines: settings made in code refuse
    both, as the config does."""
    with pytest.raises(ValueError, match=r"must be a finite number"):
        kwargs: dict[str, Any] = {field: value}
        RoundSettings(**kwargs)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": 2.5}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"max_context": 0}, "max_context"),
        ({"seed": 2**64}, "seed"),
        ({"local_steps": 100_001}, "local_steps"),
        ({"learning_rate": 2.0}, "learning_rate"),
        ({"heartbeat_interval_s": 0.1}, "heartbeat_interval_s"),
        ({"round_timeout_s": 1e12}, "round_timeout_s"),
        ({"context_range": (0, 5)}, "context_range"),
        ({"context_range": [9, 90]}, "context_range"),
        ({"target_range": (9, 2**32)}, "target_range"),
        ({"server_optimizer": "sgd"}, "server_optimizer"),
        ({"server_optimizer": None}, "server_optimizer"),
        ({"weighting": 3}, "weighting"),
        ({"local_optimizer": "rmsprop"}, "local_optimizer"),
        ({"eval_at_start": 1}, "eval_at_start"),
        ({"min_nodes": 2, "min_updates": 3}, "min_updates"),
        ({"heartbeat_interval_s": 60.0}, "session_timeout_s"),
    ],
)
def test_round_settings_made_in_code_get_the_configs_checks(
    changes: dict[str, Any], key: str
) -> None:
    """Benchmarks and tests make RoundSettings without a config: the same limits hold there
    (until session 14 only the config checked these, so a bench could start a run no node
    would take)."""
    with pytest.raises(ConfigValueError, match=rf"^round settings: {key}") as err:
        RoundSettings(**changes)
    assert err.value.key == key


@pytest.mark.parametrize(
    "changes",
    [
        {"context_range": (5, 5), "target_range": (1, 1)},  # a fixed size: low == high
        {"eval_every": 0},  # only at the end
        {"min_nodes": 3, "min_updates": 3},  # every node's update needed
        {"embedding_noise": 0.0, "fairness_q": 0.0, "seed": 0},
        {"heartbeat_interval_s": 10.0, "session_timeout_s": 10.5},
    ],
)
def test_round_settings_at_the_edge_of_their_ranges_are_taken(changes: dict[str, Any]) -> None:
    """The limits refuse what no run could use and nothing more: each bound is a setting a run
    can be made with (a check one step too strict refuses a valid config at load)."""
    settings = RoundSettings(**changes)
    assert all(getattr(settings, k) == v for k, v in changes.items())


def test_server_optimizer_names_are_taken_in_any_case() -> None:
    assert RoundSettings(server_optimizer="FedAdam").server_optimizer == "FedAdam"
    with pytest.raises(ConfigValueError, match="must be one of examples, uniform, got 'Uniform'"):
        RoundSettings(weighting="Uniform")  # only the optimizer's name is case-blind


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("min_nodes = 2\nmin_updates = 3", "min_updates"),
        ("heartbeat_interval_s = 90", "session_timeout_s"),
    ],
)
def test_coordinator_config_refuses_settings_that_clash_at_load(
    tmp_path: Path, line: str, key: str
) -> None:
    """Checks across keys run when the config loads and name the file and the key."""
    with pytest.raises(InputError) as err:
        _load(tmp_path, line + "\n")
    assert str(err.value).startswith(f"{tmp_path / 'c.toml'}: {key}"), str(err.value)
