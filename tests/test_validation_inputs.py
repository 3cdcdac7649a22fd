"""Outside input at the edges the audit found open: numbers beyond float64 in survey files, sums that
overflow, whitespace group names, certificate lifetimes past year 9999, negative seeds and
context sizes. Each must end in a clear error naming where (or, when it can be read, load as it
should), never a raw OverflowError / numpy ValueError or a silently zeroed distribution."""

from __future__ import annotations

import argparse
import datetime as dt
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodel import CFG, random_item

from pluralfed import pki, tls
from pluralfed.cli import main
from pluralfed.commands import certs
from pluralfed.data import is_blank, load_survey, normalise_distribution
from pluralfed.episodes import check_seed, evaluation_context, sample_episode, split_group
from pluralfed.errors import InputError
from pluralfed.proto.pluralfed.v1 import reward_pb2 as pb
from pluralfed.reward_server import BadRequest, Limits, parse_context, parse_questions
from pluralfed.training import LocalTrainer, TrainingSettings, build_model, seed_everything

CSV_HEADER = "question,selections,options\n"


def _csv(tmp_path: Path, selections: str, options: str = "['a','b']") -> Path:
    path = tmp_path / "s.csv"
    path.write_text(f'{CSV_HEADER}Q?,"{selections}","{options}"\n', "utf-8")
    return path


def _jsonl(tmp_path: Path, group: str = '"A"', distribution: str = "[1, 1]") -> Path:
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"group": "B", "question": "Q0?", "options": ["a", "b"], "distribution": [1, 3]}\n'
        f'{{"group": {group}, "question": "Q?", "options": ["a", "b"], '
        f'"distribution": {distribution}}}\n',
        "utf-8",
    )
    return path


# --------------------------------------------------------------------------------------------------
# survey files: huge numbers


@pytest.mark.parametrize("digits", [400, 5000])
def test_jsonl_huge_integer_names_file_and_line(tmp_path: Path, digits: int) -> None:
    path = _jsonl(tmp_path, distribution=f"[1{'0' * digits}, 1]")
    with pytest.raises(InputError, match=r"s\.jsonl:2: .*(too large|4300 digits)"):
        load_survey(path)


def test_csv_huge_integer_names_file_and_line(tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{{'A': [1{'0' * 400}, 1]}}")
    with pytest.raises(InputError, match=r"s\.csv:2: selections\['A'\]\[0\] is too large"):
        load_survey(path)


@pytest.mark.parametrize("digits", [309, 400])
def test_a_huge_integer_is_refused_saying_how_many_digits_it_has(
    tmp_path: Path, digits: int
) -> None:
    """1 followed by N zeros has N + 1 digits, and the message says so."""
    path = _jsonl(tmp_path, distribution=f"[1{'0' * digits}, 1]")
    with pytest.raises(
        InputError, match=rf"an integer of about {digits + 1} digits, beyond float64"
    ):
        load_survey(path)


# --------------------------------------------------------------------------------------------------
# survey files and reward requests: sums beyond float64


def test_csv_overflowing_sum_still_normalises(tmp_path: Path) -> None:
    data = load_survey(_csv(tmp_path, "{'A': [1e308, 1e308], 'B': [1.5e308, 5e307]}"))
    np.testing.assert_allclose(data.groups["A"][0].distribution, [0.5, 0.5])
    np.testing.assert_allclose(data.groups["B"][0].distribution, [0.75, 0.25])
    assert data.skipped_all_zero == 0


def test_values_whose_sum_overflows_even_halved_still_normalise(tmp_path: Path) -> None:
    """Scaled by their largest value first: four of 1.5e308 overflow twice over, and must not
    become inf / inf or a distribution of zeros."""
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"group": "A", "question": "Q?", "options": ["a", "b", "c", "d"], '
        '"distribution": [1.5e308, 1.5e308, 1.5e308, 1.5e308]}\n',
        "utf-8",
    )
    np.testing.assert_allclose(load_survey(path).groups["A"][0].distribution, [0.25] * 4)
    big = np.array([1.7e308, 1.7e308, 1.7e308, 0.0])
    normalised = normalise_distribution(big)
    assert normalised is not None
    np.testing.assert_allclose(normalised, [1 / 3, 1 / 3, 1 / 3, 0.0])


def test_jsonl_overflowing_sum_still_normalises(tmp_path: Path) -> None:
    data = load_survey(_jsonl(tmp_path, distribution="[1e308, 1e308]"))
    np.testing.assert_allclose(data.groups["A"][0].distribution, [0.5, 0.5])
    np.testing.assert_allclose(data.groups["B"][0].distribution, [0.25, 0.75])  # unchanged


def test_reward_context_overflowing_sum_still_normalises() -> None:
    msg = pb.RewardGroupContext()
    msg.items.add(question="Q?", options=["a", "b", "c"], distribution=[1e308, 1e308, 0])
    (item,) = parse_context(msg, Limits())
    np.testing.assert_allclose(item.distribution, [0.5, 0.5, 0.0])


def test_reward_requests_exactly_at_each_limit_are_taken() -> None:
    """The reward service's limits (RewardInfo tells clients them) are the most a request may
    hold, not one less: a client that sends exactly the advertised number of questions, answers,
    context items or characters must be served, not refused INVALID_ARGUMENT."""
    limits = Limits()
    text = "q" * limits.max_text_chars
    answers = [f"o{i}" for i in range(limits.max_answers - 1)] + ["a" * limits.max_text_chars]
    questions = [
        pb.RewardQuestion(question=f"Q{i}?", answers=["Yes"]) for i in range(limits.max_questions)
    ]
    questions[0] = pb.RewardQuestion(question=text, answers=answers)
    parsed = parse_questions(questions, limits)
    assert parsed[0] == (text, answers)
    msg = pb.RewardGroupContext()
    for i in range(limits.max_context_items):
        msg.items.add(question=f"Q{i}?", options=answers, distribution=[1.0] * len(answers))
    assert len(parse_context(msg, limits)) == limits.max_context_items


@pytest.mark.parametrize("values", [[1.0], [0.2, 0.3, 0.5]])
def test_a_reward_context_distribution_needs_one_value_per_option(values: list[float]) -> None:
    """Too few values or too many: either way the distribution does not say which share goes
    with which option, so the request is refused naming the item, never cut or padded."""
    msg = pb.RewardGroupContext()
    msg.items.add(question="Fine?", options=["a", "b"], distribution=[1, 1])
    msg.items.add(question="Q?", options=["a", "b"], distribution=values)
    with pytest.raises(BadRequest) as err:
        parse_context(msg, Limits())
    assert err.value.field == "group_context.items[1].distribution"
    given = "1 value" if len(values) == 1 else f"{len(values)} values"
    assert str(err.value).endswith(f"{given} for 2 options, need one each")


def test_normalise_distribution() -> None:
    def norm(values: list[float]) -> np.ndarray | None:
        return normalise_distribution(np.array(values, dtype=np.float64))

    def normalised(values: list[float]) -> np.ndarray:
        out = norm(values)
        assert out is not None, values
        return out

    assert norm([0.0, 0.0]) is None
    np.testing.assert_allclose(normalised([3.0, 1.0]), [0.75, 0.25])
    np.testing.assert_allclose(normalised([1.7e308, 1.7e308, 1e-300]), [0.5, 0.5, 0])
    np.testing.assert_allclose(normalised([5e-324, 5e-324]), [0.5, 0.5])


# --------------------------------------------------------------------------------------------------
# survey files: group names


def test_csv_whitespace_group_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"s\.csv:2: group name must be a non-empty string"):
        load_survey(_csv(tmp_path, "{' \\t': [1, 0]}"))


def test_jsonl_whitespace_group_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"s\.jsonl:2: group must be a non-empty string"):
        load_survey(_jsonl(tmp_path, group='"   "'))


def test_invisible_group_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"s\.jsonl:2: group must be a non-empty string"):
        load_survey(_jsonl(tmp_path, group='"\\u200b\\u2060"'))


@pytest.mark.parametrize(
    ("text", "blank"),
    [
        ("", True),
        (" \t\n", True),
        ("\u200b\u200c\u200d\u2060\ufeff", True),  # zero-width characters, BOM
        ("\x00\x1f", True),
        ("\u200bx", False),
        ("é", False),
        ("\u00a0\u3000", True),  # no-break and ideographic spaces
        ("か", False),
    ],
)
def test_is_blank(text: str, blank: bool) -> None:
    assert is_blank(text) is blank


def test_group_names_with_surrounding_spaces_are_refused_not_blank(tmp_path: Path) -> None:
    """Not blank (that check must not strip them away), but refused: " A " loaded as a group
    of its own that no allow-list entry (which refuses such names) could ever name."""
    with pytest.raises(InputError, match=r"s\.csv:2: group name ' A ' has leading or trailing"):
        load_survey(_csv(tmp_path, "{' A ': [1, 0]}"))


def test_csv_group_listed_twice_in_selections_rejected(tmp_path: Path) -> None:
    # a Python dict literal keeps the last of two equal keys: one answer would vanish silently
    with pytest.raises(InputError, match=r"s\.csv:2: selections lists group 'A' twice"):
        load_survey(_csv(tmp_path, "{'A': [1, 0], 'B': [1, 1], 'A': [0, 1]}"))


def test_jsonl_key_twice_in_one_record_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"s\.jsonl:2: key 'group' appears twice"):
        load_survey(_jsonl(tmp_path, group='"A", "group": "B"'))


# --------------------------------------------------------------------------------------------------
# certificates: lifetimes past 9999-12-31


def run_certs(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pluralfed")
    certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", *argv])
    return int(args.func(args))


def test_cli_federation_days_past_9999_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fed"
    for flag in ("--days", "--ca-days"):
        with pytest.raises(SystemExit) as exit_info:
            run_certs("federation", "--out", str(out), "--nodes", "node-b", flag, "99999999")
        assert exit_info.value.code == 2
        assert f"argument {flag}: 99999999 days from now is past 9999-12-31" in (
            capsys.readouterr().err
        )
        assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["init", "--out", "ca"],
        ["server", "--ca", "ca", "--out", "srv"],
        ["node", "--ca", "ca", "--out", "nodes", "--id", "n1"],
        ["revoke", "--ca", "ca"],
    ],
)
def test_cli_days_past_9999_refused(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_certs(*argv, "--days", "99999999")
    assert exit_info.value.code == 2
    assert "argument --days: 99999999 days from now is past 9999-12-31" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_days_past_9999_refused_by_library(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="past 9999-12-31"):
        pki.create_ca(tmp_path / "ca", days=99999999)
    assert not (tmp_path / "ca" / "ca.key").exists()
    pki.create_ca(tmp_path / "ca")
    with pytest.raises(InputError, match="past 9999-12-31"):
        pki.issue_node_cert(tmp_path / "ca", tmp_path / "n", "n1", days=10**12)
    with pytest.raises(InputError, match="past 9999-12-31"):
        pki.revoke_certificates(tmp_path / "ca", days=99999999)
    assert not (tmp_path / "ca" / tls.CRL_FILE).exists()
    assert not (tmp_path / "n" / "key.pem").exists()


def test_days_up_to_9999_still_accepted(tmp_path: Path) -> None:
    latest = (pki.LAST_DATE - tls.utc_now()).days - 1  # a day's slack for midnight
    pki.check_days(latest)
    pki.create_ca(tmp_path / "ca", days=latest)
    crl, _ = pki.revoke_certificates(tmp_path / "ca", days=latest)
    assert tls.load_revocation_list(crl, tmp_path / "ca" / "ca.pem").serials == frozenset()
    with pytest.raises(InputError, match="at least 1"):
        pki.check_days(0, "--days")


def test_the_most_days_the_refusal_offers_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal says "give at most N": N itself must then be taken, and N + 1 refused. (The
    test above keeps a day's slack for midnight; here the clock stands still.)"""
    now = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
    monkeypatch.setattr(pki, "utc_now", lambda: now)
    latest = (pki.LAST_DATE - now).days
    assert pki.check_days(latest) == latest
    with pytest.raises(InputError, match=rf"give at most {latest}$"):
        pki.check_days(latest + 1)


# --------------------------------------------------------------------------------------------------
# seeds and context sizes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "synth", "--out", "s.jsonl", "--seed", "-1"], "argument --seed: must be 0"),
        (["data", "synth", "--out", "s.jsonl", "--seed", "1e3"], "--seed: not an integer: '1e3'"),
        (["train", "--data", "d", "--out", "o", "--max-context", "x"], "not an integer: 'x'"),
        (["train", "--data", "d.jsonl", "--out", "o", "--seed", "-1"], "argument --seed"),
        (["evaluate", "--checkpoint", "c", "--data", "d", "--seed", "-5"], "argument --seed"),
        (["train", "--data", "d", "--out", "o", "--max-context", "0"], "argument --max-context"),
        (["evaluate", "--checkpoint", "c", "--data", "d", "--max-context", "-3"], "at least 1"),
        (["federate", "--seed", "-1"], "argument --seed"),
        (
            ["federate", "--threads-per-node", "0"],
            "argument --threads-per-node: must be at least 1",
        ),
    ],
)
def test_cli_rejects_negative_seed_and_context_while_parsing(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_synth_seed_zero_still_works(tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    assert main(["data", "synth", "--out", str(out), "--groups", "2", "--questions", "5"]) == 0
    assert out.stat().st_size > 0


def test_library_rejects_negative_seed_and_context() -> None:
    model = build_model(CFG, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        LocalTrainer(model, TrainingSettings(), seed=-1)
    items = [random_item(np.random.default_rng(0), 2, f"q{i}") for i in range(3)]
    with pytest.raises(ValueError, match="max_context must be at least 1, got 0"):
        evaluation_context(items, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        evaluation_context(items, 2, seed=-1)
    assert len(evaluation_context(items, 2, seed=3)) == 2


@pytest.mark.parametrize("seed", [1.5, 2.0, "3"])
def test_a_seed_that_is_not_an_integer_is_refused_not_truncated(seed: object) -> None:
    """A seed of 1.5 is not seed 1 (nor is "3" seed 3): it is refused, naming it."""
    with pytest.raises(ValueError, match=f"^seed must be an integer, got {seed!r}$"):
        check_seed(seed)  # type: ignore[arg-type]


def test_a_numpy_integer_seed_is_taken_as_its_value() -> None:
    value = check_seed(np.int64(7))  # type: ignore[arg-type]
    assert value == 7 and type(value) is int


def test_the_evaluation_context_is_distinct_train_questions_chosen_without_replacement() -> None:
    """PROTOCOL.md's evaluation context is max_context of the group's TRAIN questions, in train
    order, drawn with a fixed seed and without replacement: duplicates would drop questions from
    the context and make the figures incomparable with the reference's."""
    items = [random_item(np.random.default_rng(i), 2, f"q{i}") for i in range(10)]
    for seed in range(5):
        chosen = [e.item.question for e in evaluation_context(items, 4, seed=seed)]
        reference = np.random.default_rng(seed).choice(10, 4, replace=False)
        assert chosen == [f"q{i}" for i in sorted(reference)]
        assert len(set(chosen)) == 4


def test_the_evaluation_context_is_chosen_with_seed_0_unless_told_otherwise() -> None:
    items = [random_item(np.random.default_rng(i), 2, f"q{i}") for i in range(10)]
    chosen = [e.item.question for e in evaluation_context(items, 4)]
    reference = np.random.default_rng(0).choice(10, 4, replace=False)
    assert chosen == [f"q{i}" for i in sorted(reference)]


def test_episode_context_sizes_cover_both_ends_of_context_range() -> None:
    """context_range and target_range are inclusive (the paper's sampling): both ends occur, and
    an equal range (k, k) always gives k. An exclusive upper end never used the largest size and
    made (k, k) an error."""
    items = [random_item(np.random.default_rng(i), 2, f"q{i}") for i in range(10)]
    rng = np.random.default_rng(0)
    episodes = [sample_episode(items, rng, (2, 3), (1, 2)) for _ in range(100)]
    assert {len(ep.context) for ep in episodes} == {2, 3}
    assert {len(ep.targets) for ep in episodes} == {1, 2}
    for _ in range(10):
        ep = sample_episode(items, rng, (3, 3), (2, 2))
        assert (len(ep.context), len(ep.targets)) == (3, 2)


@pytest.mark.parametrize("n", [0, 1])
def test_an_episode_from_fewer_than_two_questions_is_refused(n: int) -> None:
    """An episode needs a context question and a target question: one question alone would
    make an episode without context (or without a target), not an error naming the group."""
    items = [random_item(np.random.default_rng(i), 2, f"q{i}") for i in range(n)]
    with pytest.raises(ValueError, match=f"at least 2 questions, the group has {n}$"):
        sample_episode(items, np.random.default_rng(0), (9, 90), (9, 90))


@pytest.mark.parametrize("n_embeddings", [2, 4])
def test_a_group_split_needs_one_embedding_per_question(n_embeddings: int) -> None:
    """Embeddings are matched to questions by position: one too few or too many means they
    are not this group's, and pairing them up to the shorter list would silently drop
    questions."""
    items = [random_item(np.random.default_rng(i), 2, f"q{i}").item for i in range(3)]
    embeddings = [np.zeros((2, 4), dtype=np.float32)] * n_embeddings
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is (shorter|longer) than argument 1"):
        split_group("G", items, embeddings)


def test_seeds_torch_accepted_keep_their_weights_and_larger_ones_work() -> None:
    def first(seed: int) -> np.ndarray:
        return next(iter(build_model(CFG, seed).state_dict().values())).numpy()

    np.testing.assert_array_equal(first(-1), first(2**64 - 1))  # what torch did before
    np.testing.assert_array_equal(first(2**64 + 5), first(5))  # used to be an OverflowError


def test_seed_everything_seeds_pythons_numpys_and_torchs_generators_by_the_seed() -> None:
    """Same seed, same run: each of the three generators a run draws from follows the seed
    (one left on a fixed seed gave every seed the same shuffles), and a seed past numpy's or
    torch's range is reduced, not refused."""

    def draws(seed: int) -> tuple[float, float, float]:
        seed_everything(seed)
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    assert draws(3) == draws(3)
    one, other = draws(3), draws(4)
    assert all(a != b for a, b in zip(one, other, strict=True))
    assert draws(2**64 + 3)[1:] == draws(3)[1:]  # numpy and torch take it modulo their range
