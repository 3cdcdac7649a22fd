"""Layered configuration (file < environment < options) and the documented example configs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from coordinator.service import (
    CoordinatorConfig,
    check_roles,
    dump_config,
    model_config,
    rpc_threads_for,
)
from group_node.config import NodeConfig
from pluralfed.auth import AllowList
from pluralfed.commands import node as node_cmd
from pluralfed.config import MAX_TOML_BYTES, add_config_args, load_config
from pluralfed.errors import InputError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_node_config_loads_and_documents_every_field() -> None:
    path = EXAMPLES / "node.toml"
    cfg = load_config(NodeConfig, path, "PLURALFED_NODE_", {}, environ={})
    assert cfg.group == "Nigeria" and cfg.tls_dir == Path("/certs/node-nigeria")
    text = path.read_text()
    for f in dataclasses.fields(NodeConfig):
        key = f.name.removeprefix("tls_") if f.name.startswith("tls_") else f.name
        assert f"{key} =" in text, f"examples/node.toml does not document {f.name}"


def test_example_coordinator_config_loads_and_documents_every_field() -> None:
    path = EXAMPLES / "coordinator.toml"
    cfg = load_config(CoordinatorConfig, path, "X_", {}, environ={}, skip_tables=("allow_list",))
    assert cfg.min_nodes == 8 and cfg.context_range == (9, 90)
    cfg.round_settings()  # valid as a whole
    assert len(AllowList.from_toml(path)) == 14
    check_roles(cfg, AllowList.from_toml(path))  # its held-out groups are allow-listed
    assert cfg.evaluate_only is not None and len(cfg.evaluate_only) == 6
    text = path.read_text()
    for f in dataclasses.fields(CoordinatorConfig):
        key = f.name.removeprefix("tls_") if f.name.startswith("tls_") else f.name
        assert f"{key} =" in text, f"examples/coordinator.toml does not document {f.name}"


def test_precedence_file_env_options(tmp_path: Path) -> None:
    path = tmp_path / "n.toml"
    path.write_text('group = "A"\ndata = "a.jsonl"\nthreads = 2\n[tls]\ndir = "/c"\n')
    env = {"PLURALFED_NODE_THREADS": "3", "PLURALFED_NODE_SEED": "9"}
    cfg = load_config(NodeConfig, path, "PLURALFED_NODE_", {"threads": None}, environ=env)
    assert (cfg.threads, cfg.seed, cfg.tls_dir) == (3, 9, Path("/c"))
    cfg = load_config(NodeConfig, path, "PLURALFED_NODE_", {"threads": "4"}, environ=env)
    assert cfg.threads == 4


@pytest.mark.parametrize(
    "value",
    ['"China"', "China", '["China", 1]', "[" * 100_000 + "]" * 100_000],
)
def test_a_list_setting_from_the_environment_must_be_a_json_array_of_names(value: str) -> None:
    """evaluate_only given as a variable (or an option) is a JSON array of names. An array
    nested 100,000 deep was a RecursionError traceback."""
    env = {"X_EVALUATE_ONLY": value}
    with pytest.raises(InputError, match=r"^environment X_EVALUATE_ONLY: expected a (JSON )?"):
        load_config(CoordinatorConfig, None, "X_", {}, environ=env)
    env = {"X_EVALUATE_ONLY": '["China", "Japan"]'}
    assert load_config(CoordinatorConfig, None, "X_", {}, environ=env).evaluate_only == (
        "China",
        "Japan",
    )


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('group = "A"\ndata = "a"\nbogus = 1\n', {}, "unknown settings ['bogus']"),
        ('group = "A"\ndata = "a"\nthreads = "many"\n', {}, "threads: expected an integer"),
        ('group = "A"\ndata = "a"\ninsecure = "maybe"\n', {}, "insecure: expected true or false"),
        ('group = "A"\ndata = "a"\n', {"PLURALFED_NODE_THREADS": "x"}, "PLURALFED_NODE_THREADS"),
        ('group = "A"\ndata = "a"\nrole = "boss"\n', {}, "role must be train or evaluate-only"),
        ('data = "a"\n', {}, "group is required"),
        (
            'group = "A"\ndata = "a"\npersonalize_steps = -1\n',
            {},
            "personalize_steps must be 0..100000, got -1",
        ),
        (
            'group = "A"\ndata = "a"\npersonalize_steps = 5\n',
            {},
            "personalize_steps is set, so personalized_dir is required",
        ),
        ("group = [\n", {}, "not valid TOML"),
        # tomllib recurses into nested arrays: a RecursionError traceback
        ("group = " + "[" * 5000 + "]" * 5000 + "\n", {}, "not valid TOML: nested too deeply"),
        ("group = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n", {}, "nested too deeply"),
        # a traceback ("embedded null byte") when the file was opened
        ('group = "A"\ndata = "x\\u0000y.jsonl"\n', {}, "data: a path cannot hold a NUL"),
        # int() and float() read other scripts' digits: "٣" was 3 rounds
        ('group = "A"\ndata = "a"\nthreads = "\u0663"\n', {}, "expected an integer"),
        ('group = "A"\ndata = "a"\n', {"PLURALFED_NODE_THREADS": "\uff17"}, "expected an integer"),
        ('group = "A"\ndata = "a"\nbackoff_initial_s = "\u0661.5"\n', {}, "expected a number"),
        # float(True) is 1.0: TOML's true was taken as a number of seconds
        (
            'group = "A"\ndata = "a"\nbackoff_initial_s = true\n',
            {},
            "backoff_initial_s: expected a number, got True",
        ),
        # a fraction is not cut to a whole number: threads = 1.5 was 1 thread without a word
        ('group = "A"\ndata = "a"\nthreads = 1.5\n', {}, "threads: expected an integer, got 1.5"),
    ],
)
def test_bad_config_names_what_and_where(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_config(NodeConfig, path, "PLURALFED_NODE_", {}, environ=env)
    assert message in str(err.value)


def test_a_config_or_allow_list_that_never_ends_or_nests_too_deeply_is_refused(
    tmp_path: Path,
) -> None:
    """/dev/zero as a config or an allow-list (a device, a wrong path) was read until the
    memory ran out; now the read stops past MAX_TOML_BYTES and says so. Arrays nested
    thousands deep were a RecursionError traceback."""
    zero = Path("/dev/zero")
    with pytest.raises(InputError) as err:
        load_config(NodeConfig, zero, "PLURALFED_NODE_", {}, environ={})
    assert str(err.value) == "/dev/zero: more than 16 MiB, too large for a config file"
    with pytest.raises(InputError) as err:
        AllowList.from_toml(zero)
    assert str(err.value) == (
        "allow-list file /dev/zero: more than 16 MiB, too large for an allow-list"
    )
    deep = tmp_path / "allow.toml"
    deep.write_text('[allow_list]\n"node-a" = ' + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(InputError) as err:
        AllowList.from_toml(deep)
    assert str(err.value) == f"allow-list file {deep}: invalid TOML: nested too deeply"
    assert MAX_TOML_BYTES == 16 << 20


def test_a_missing_or_unreadable_config_file_is_named(tmp_path: Path) -> None:
    """A node or coordinator given a wrong --config path must say which file it looked for
    (and that it is the config file), not a bare "not found" the operator must guess at."""
    missing = tmp_path / "no-such" / "node.toml"
    with pytest.raises(InputError) as err:
        load_config(NodeConfig, missing, "PLURALFED_NODE_", {}, environ={})
    assert str(err.value) == f"{missing}: config file not found"
    with pytest.raises(InputError) as err:
        load_config(NodeConfig, tmp_path, "PLURALFED_NODE_", {}, environ={})  # a folder
    assert str(err.value).startswith(f"{tmp_path}: cannot read config: ")


def test_each_option_says_its_default_once() -> None:
    """`--help` adds "(default: X)" to each setting's help unless the help already says its
    own default ("default: never"): saying both ("(default: never) (default: None)")
    contradicts itself."""
    parser = argparse.ArgumentParser()
    add_config_args(parser, NodeConfig, node_cmd.HELP)
    helps = {a.dest: a.help or "" for a in parser._actions if a.dest in node_cmd.HELP}
    assert helps["give_up_after_s"].endswith("(default: never)")
    said_twice = [dest for dest, text in helps.items() if text.count("(default:") > 1]
    assert said_twice == []


def test_a_whole_float_is_an_integer_setting(tmp_path: Path) -> None:
    """TOML writes 2.0 for a number some tools turn into a float: a whole one is taken."""
    path = tmp_path / "node.toml"
    path.write_text('group = "A"\ndata = "a"\nthreads = 2.0\n')
    assert load_config(NodeConfig, path, "PLURALFED_NODE_", {}, environ={}).threads == 2


def test_an_empty_environment_variable_leaves_an_optional_setting_unset() -> None:
    """`PLURALFED_NODE_GIVE_UP_AFTER_S=` (or `none`) is how an exported value is taken back in
    a shell or compose file: it means "not set", not a value that fails to parse."""
    for value in ("", "  ", "none", "None"):
        env = {"PLURALFED_NODE_GROUP": "A", "PLURALFED_NODE_GIVE_UP_AFTER_S": value}
        cfg = load_config(NodeConfig, None, "PLURALFED_NODE_", {}, environ=env)
        assert cfg.give_up_after_s is None, value
    env = {"PLURALFED_NODE_GROUP": "A", "PLURALFED_NODE_GIVE_UP_AFTER_S": "90"}
    assert load_config(NodeConfig, None, "PLURALFED_NODE_", {}, environ=env).give_up_after_s == 90


def test_switches_and_home_paths_from_the_environment_mean_what_a_shell_user_means() -> None:
    """A switch is on with 1/true/yes/on and off with 0/false/no/off, in any case and with
    spaces around; a path setting that starts with ~ is in the home folder."""
    cases = [("1", True), ("true", True), ("Yes", True), (" ON ", True), ("on", True)]
    cases += [("0", False), ("false", False), ("No", False), ("OFF", False)]
    for value, expected in cases:
        env = {"PLURALFED_NODE_GROUP": "A", "PLURALFED_NODE_INSECURE": value}
        cfg = load_config(NodeConfig, None, "PLURALFED_NODE_", {}, environ=env)
        assert cfg.insecure is expected, value
    env = {"PLURALFED_NODE_GROUP": "A", "PLURALFED_NODE_DATA": "~/a.jsonl"}
    cfg = load_config(NodeConfig, None, "PLURALFED_NODE_", {}, environ=env)
    assert cfg.data == Path.home() / "a.jsonl"


def test_bad_coordinator_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("min_nodes = 2\nmin_updates = 3\n")
    # refused when the config loads, not when the run starts
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: min_updates"):
        load_config(CoordinatorConfig, path, "X_", {}, environ={})


@pytest.mark.parametrize("value", ["[9, 90, 100]", "[9]", "'9,90,100'"])
def test_a_range_setting_is_two_numbers_no_more_no_fewer(tmp_path: Path, value: str) -> None:
    """context_range is [low, high]: a third number is refused, not read as a range."""
    path = tmp_path / "c.toml"
    path.write_text(f"context_range = {value}\n")
    with pytest.raises(InputError, match="context_range: expected two numbers like"):
        load_config(CoordinatorConfig, path, "X_", {}, environ={})


@pytest.mark.parametrize("key", ["upload_chunk_bytes", "download_chunk_bytes"])
@pytest.mark.parametrize("value", ["0", "4095", "1048577", "'512k'", "true"])
def test_bad_chunk_size_is_refused(tmp_path: Path, key: str, value: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(InputError, match=key):
        load_config(CoordinatorConfig, path, "X_", {}, environ={})
    path.write_text(f"{key} = 65536\n")
    assert getattr(load_config(CoordinatorConfig, path, "X_", {}, environ={}), key) == 65536


@pytest.mark.parametrize("value", ["0", "65535", "16777217", "'1M'", "true"])
def test_bad_upload_window_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"upload_window_bytes = {value}\n")
    with pytest.raises(
        InputError,
        match=r"c\.toml: upload_window_bytes(: expected an integer| must be 65536\.\.16777216 bytes)",
    ):
        load_config(CoordinatorConfig, path, "X_", {}, environ={})
    path.write_text("upload_window_bytes = 4194304\n")
    cfg = load_config(CoordinatorConfig, path, "X_", {}, environ={})
    assert cfg.upload_window_bytes == 4194304


def test_bad_model_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("members = 0\n")
    cfg = load_config(CoordinatorConfig, path, "X_", {}, environ={})
    with pytest.raises(InputError, match="members"):
        model_config(cfg, 384)
    path.write_text("members = 3\n")
    good = load_config(CoordinatorConfig, path, "X_", {}, environ={})
    assert model_config(good, 384).members == 3


def test_rpc_threads_follow_the_allow_list_unless_set() -> None:
    """A fixed 64 threads could not serve 128 nodes: their long polls took every thread, the
    heartbeats queued, sessions expired and no round ran (`bench/systems.py --scenarios D
    --d-nodes 128 --max-workers 64`, session 14). Unset, the count follows the allow-list."""
    assert CoordinatorConfig().max_workers is None
    assert [rpc_threads_for(n) for n in (0, 16, 128, 10**6)] == [64, 64, 288, 10_000]
    assert CoordinatorConfig(max_workers=8).max_workers == 8


@pytest.mark.parametrize(
    "listen",
    [
        "0.0.0.0:\u00b2",
        "127.0.0.1:\uff17\uff14\uff14\uff13",
        "7443",
        ":7443",
        "127.0.0.1:65536",
        " 127.0.0.1:7443",
        "unix:",
    ],
)
def test_a_listen_address_that_is_not_host_and_port_is_refused(tmp_path: Path, listen: str) -> None:
    """ "²" passed isdigit() and failed in int() with no key named; "７４４３" bound as 7443
    failed as "the port is in use"."""
    path = tmp_path / "c.toml"
    path.write_text(f"listen = {listen!r}\n", encoding="utf-8")
    want = (
        "listen 'unix:' names no socket path" if listen == "unix:" else "listen must be host:port"
    )
    with pytest.raises(InputError, match=want) as err:
        load_config(CoordinatorConfig, path, "X_", {}, environ={})
    assert str(path) in str(err.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:65535", "[::1]:0", "unix:/run/pluralfed.sock"])
def test_a_listen_address_at_the_edge_is_taken(listen: str) -> None:
    assert CoordinatorConfig(listen=listen).listen == listen


def test_a_listen_address_that_is_not_text_is_refused_naming_the_key() -> None:
    """A port alone as a number (listen = 7443 made in code) is refused as a listen address,
    not an AttributeError from its parsing."""
    with pytest.raises(
        InputError, match=r"^coordinator config: listen must be host:port, got 7443$"
    ):
        CoordinatorConfig(listen=7443)  # type: ignore[arg-type]


def test_max_workers_is_taken_up_to_its_cap_and_refused_above_it() -> None:
    """max_workers is bounded like every count: 10000 RPC threads, not any number a typo gives."""
    assert CoordinatorConfig(max_workers=10_000).max_workers == 10_000
    with pytest.raises(InputError, match=r"max_workers must be in 1\.\.10000, got 10001"):
        CoordinatorConfig(max_workers=10_001)


@pytest.mark.parametrize("encoder", ["", "   ", 384])
def test_a_blank_encoder_is_refused(encoder: object) -> None:
    with pytest.raises(InputError, match="encoder must name a text encoder"):
        CoordinatorConfig(encoder=encoder)  # type: ignore[arg-type]


def test_an_empty_evaluate_only_still_needs_enough_groups_for_the_quorum() -> None:
    """evaluate_only = [] says every allow-listed group trains: there must be min_nodes of them."""
    allow = AllowList({"node-a": "A", "node-h": "H"})
    with pytest.raises(InputError, match=r"leaves 2 allow-listed group\(s\) to train"):
        check_roles(CoordinatorConfig(evaluate_only=(), min_nodes=3, min_updates=1), allow)
    check_roles(CoordinatorConfig(evaluate_only=(), min_nodes=2, min_updates=1), allow)


def test_an_evaluate_only_group_the_allow_list_lacks_is_refused_naming_what_it_admits() -> None:
    """The refusal lists the groups the allow-list does admit, so a typo is seen at once."""
    allow = AllowList({"node-a": "A", "node-h": "Hungary"})
    with pytest.raises(InputError) as err:
        check_roles(CoordinatorConfig(evaluate_only=("Hungray",)), allow)
    assert str(err.value) == (
        "coordinator config: evaluate_only names ['Hungray'], which the allow-list does not "
        "admit (it admits ['A', 'Hungary'])"
    )


def test_no_upload_or_download_limit_is_a_setting_the_coordinator_takes() -> None:
    """max_concurrent_uploads / max_concurrent_downloads = 0 is no bound (StreamSlots), a value
    the coordinator takes: only a negative count is refused."""
    cfg = CoordinatorConfig(max_concurrent_uploads=0, max_concurrent_downloads=0)
    assert (cfg.max_concurrent_uploads, cfg.max_concurrent_downloads) == (0, 0)


def test_linger_s_is_taken_up_to_a_year_and_refused_above_it() -> None:
    """linger_s is bounded like every duration (a deadline must stay a representable time)."""
    year = 365 * 24 * 3600.0
    assert CoordinatorConfig(linger_s=year).linger_s == year
    with pytest.raises(InputError, match=r"^coordinator config: linger_s"):
        CoordinatorConfig(linger_s=year * 2)


def test_the_printed_config_lists_the_allow_list_by_node_id() -> None:
    """--print-config shows the allow-list table sorted by node id, whatever order the file
    gave it in, beside every setting."""
    allow = AllowList({"node-c": "C", "node-a": "A", "node-b": "B"})
    printed = json.loads(dump_config(CoordinatorConfig(rounds=3), allow))
    assert list(printed["allow_list"].items()) == [
        ("node-a", "A"),
        ("node-b", "B"),
        ("node-c", "C"),
    ]
    assert printed["rounds"] == 3
    assert "allow_list" not in json.loads(dump_config(CoordinatorConfig()))


def test_the_log_says_which_roles_the_nodes_have(caplog: pytest.LogCaptureFixture) -> None:
    """evaluate_only unset, empty or naming groups: three different setups, three lines."""
    from coordinator.service import _log_roles

    with caplog.at_level("INFO", logger="pluralfed.coordinator"):
        for evaluate_only in (None, (), ("China", "Brazil")):
            _log_roles(CoordinatorConfig(evaluate_only=evaluate_only))
    assert [r.getMessage() for r in caplog.records] == [
        "roles: each node's Join says whether it trains (evaluate_only is not set)",
        "roles: every allow-listed group trains (evaluate_only is empty)",
        "roles: Brazil, China only evaluate, every other allow-listed group trains",
    ]


def test_configured_rpc_threads_are_used_and_too_few_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from coordinator.service import _rpc_threads

    allow = AllowList({f"node-{i}": f"G{i}" for i in range(10)})
    assert _rpc_threads(CoordinatorConfig(), allow) == rpc_threads_for(10) == 64
    assert not caplog.records
    with caplog.at_level("WARNING", logger="pluralfed.coordinator"):
        assert _rpc_threads(CoordinatorConfig(max_workers=12), allow) == 12
    assert "max_workers = 12 RPC threads for 10 allow-listed nodes" in caplog.text
