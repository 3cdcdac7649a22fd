"""The GPO model: who attends to whom, the loss against an independent computation, shapes."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import norm
from tinymodel import CFG, DIM, random_item

from pluralfed.data import SurveyItem
from pluralfed.episodes import EmbeddedItem, Episode, make_batch, sample_episode
from pluralfed.errors import InputError
from pluralfed.model import (
    DEFAULT_MEMBERS,
    GPO,
    MAX_PARAMETERS,
    Block,
    GPOConfig,
    context_memory,
    gpo_loss,
    question_softmax,
    upgrade_state_dict,
)
from pluralfed.training import LocalTrainer, TrainingSettings, build_model, train_centralized

torch.set_num_threads(1)


def _predict(
    model: GPO, context: list[EmbeddedItem], targets: list[EmbeddedItem]
) -> list[torch.Tensor]:
    """One predicted distribution per target question."""
    model.eval()
    with torch.no_grad():
        batch = make_batch([Episode(context, targets)])
        pred = model.predict(batch)[0]
    return [pred[a:b] for a, b in batch.question_slices[0][len(context) :]]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.fixture
def setup() -> tuple[GPO, list[EmbeddedItem], list[EmbeddedItem], np.random.Generator]:
    rng = np.random.default_rng(0)
    model = build_model(CFG, seed=1)
    context = [random_item(rng, k, f"c{i}") for i, k in enumerate([3, 4, 5, 2])]
    targets = [random_item(rng, k, f"t{i}") for i, k in enumerate([4, 3, 6])]
    return model, context, targets, rng


def test_target_prediction_ignores_other_targets(setup) -> None:
    model, context, targets, rng = setup
    before = _predict(model, context, targets)[0]
    # change the other targets (their text and their hidden answers) and add one more
    others = [random_item(rng, 5, "x"), random_item(rng, 2, "y"), random_item(rng, 3, "z")]
    after = _predict(model, context, [targets[0], *others])[0]
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-6)


def test_target_probabilities_are_never_read(setup) -> None:
    model, context, targets, _ = setup
    before = _predict(model, context, targets)
    changed = [
        EmbeddedItem(
            SurveyItem(t.item.question, t.item.options, np.roll(t.item.distribution, 1)),
            t.embeddings,
        )
        for t in targets
    ]
    assert _max_diff(before, _predict(model, context, changed)) == 0.0


def test_a_token_is_its_embedding_then_its_shown_probability(setup) -> None:
    """The input layout the weights are stored in (a checkpoint of another build must read the
    same): the first E input features are the option's text embedding, the last its shown
    probability. With the last column of the first layer zeroed, the context's answers are not
    read at all; its text still is."""
    model, context, targets, _ = setup
    with torch.no_grad():
        model.members[0].input_mlp[0].weight[:, DIM] = 0.0
    before = _predict(model, context, targets)
    flipped = [
        EmbeddedItem(
            SurveyItem(c.item.question, c.item.options, c.item.distribution[::-1].copy()),
            c.embeddings,
        )
        for c in context
    ]
    assert _max_diff(before, _predict(model, flipped, targets)) < 1e-7
    other_text = [EmbeddedItem(c.item, -c.embeddings) for c in context]
    assert _max_diff(before, _predict(model, other_text, targets)) > 1e-4


def test_prediction_changes_with_context(setup) -> None:
    model, context, targets, _ = setup
    before = _predict(model, context, targets)
    flipped = [
        EmbeddedItem(
            SurveyItem(c.item.question, c.item.options, c.item.distribution[::-1].copy()),
            c.embeddings,
        )
        for c in context
    ]
    after = _predict(model, flipped, targets)
    # an untrained model reads the probability (1 of E+1 input features) only weakly, but it
    # reads it: the change is far above float32 rounding (~1e-7)
    assert _max_diff(before, after) > 2e-6
    # and the context's text matters too
    other_text = [EmbeddedItem(c.item, -c.embeddings) for c in context]
    assert _max_diff(before, _predict(model, other_text, targets)) > 1e-4


def test_context_order_does_not_matter(setup) -> None:
    model, context, targets, _ = setup
    before = _predict(model, context, targets)
    after = _predict(model, context[::-1], targets)
    assert _max_diff(before, after) < 1e-5


def test_padding_in_batch_does_not_change_predictions(setup) -> None:
    model, context, targets, rng = setup
    alone = _predict(model, context, targets)
    big = Episode([random_item(rng, 7, f"b{i}") for i in range(9)], [random_item(rng, 8, "bt")])
    model.eval()
    with torch.no_grad():
        batch = make_batch([Episode(context, targets), big])
        pred = model.predict(batch)
    row = [pred[0, a:b] for a, b in batch.question_slices[0][len(context) :]]
    assert _max_diff(alone, row) < 1e-5
    used = batch.question_slices[0][-1][1]
    assert used < pred.shape[1] and torch.all(pred[0, used:] == 0)  # padding predicts nothing


def test_predictions_are_distributions(setup) -> None:
    model, context, targets, _ = setup
    pred = _predict(model, context, targets)
    for row, t in zip(pred, targets, strict=True):
        assert row.shape == (len(t.item.options),)
        assert math.isclose(float(row.sum()), 1.0, rel_tol=1e-5)


def test_loss_matches_independent_gaussian_nll(setup) -> None:
    model, context, targets, _ = setup
    batch = make_batch([Episode(context, targets)])
    mean, log_std = model(batch)
    loss = float(gpo_loss(mean, log_std, batch).detach())
    terms = []
    for (a, b), t in zip(batch.question_slices[0][len(context) :], targets, strict=True):
        logits = mean[0, 0, a:b].detach().double().numpy()  # member 0, episode 0
        pred = np.exp(logits - logits.max())
        pred /= pred.sum()
        sigma = np.exp(log_std[0, 0, a:b].detach().double().numpy())
        terms.extend(-norm.logpdf(t.item.distribution, loc=pred, scale=sigma))
    assert loss == pytest.approx(float(np.mean(terms)), rel=1e-4)


def test_an_encoder_block_is_torchs_post_norm_encoder_layer() -> None:
    """Block is torch.nn.TransformerEncoderLayer (post-norm, ReLU feed-forward) with a key mask:
    with the same weights, both give the same output (torch's layer in training mode, dropout 0,
    so that it does not take its fused inference path, which drops masked queries)."""
    torch.manual_seed(0)
    block = Block(CFG)
    ref = torch.nn.TransformerEncoderLayer(
        CFG.d_model, CFG.n_heads, CFG.d_ff, dropout=0.0, batch_first=True
    )
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(block.attn.proj.state_dict())
        ref.linear1.load_state_dict(block.ff[0].state_dict())
        ref.linear2.load_state_dict(block.ff[3].state_dict())
        ref.norm1.load_state_dict(block.norm1.state_dict())
        ref.norm2.load_state_dict(block.norm2.state_dict())
    x = torch.randn(2, 7, CFG.d_model)
    allowed = torch.tensor([[1, 1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(block(x, allowed), ref(x, src_key_padding_mask=~allowed))


def test_dropout_acts_in_training_only(setup) -> None:
    """With dropout configured, training steps are noisy but a prediction is not: the same
    question gets the same answer every time it is asked."""
    _, context, targets, _ = setup
    model = build_model(dataclasses.replace(CFG, dropout=0.5), seed=1)
    batch = make_batch([Episode(context, targets)])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(batch)[0], model(batch)[0])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[0], model(batch)[0], rtol=0, atol=0)


def test_log_std_is_floored_at_min_log_std(setup) -> None:
    """A head that is very sure (log-std -60) is floored at cfg.min_log_std, so the Gaussian NLL
    stays finite instead of dividing by exp(-60)**2."""
    model, context, targets, _ = setup
    batch = make_batch([Episode(context, targets)])
    with torch.no_grad():
        model.members[0].head.bias[1] = -60.0
        mean, log_std = model(batch)
    assert float(log_std.min()) == CFG.min_log_std
    assert math.isfinite(float(gpo_loss(mean, log_std, batch)))


def test_log_std_is_floored_at_the_configured_min_log_std_not_the_default(setup) -> None:
    """min_log_std is a setting: a model configured with -2 floors there, not at the default
    -7 (the test above uses the default, where both agree)."""
    _, context, targets, _ = setup
    model = build_model(dataclasses.replace(CFG, min_log_std=-2.0), seed=1)
    batch = make_batch([Episode(context, targets)])
    head = model.members[0].head
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.bias[1] = -60.0
        _, log_std = model(batch)
    assert float(log_std.min()) == -2.0


def test_the_heads_first_output_is_the_mean_and_its_second_the_log_std(setup) -> None:
    """The head layout the weights are stored in: output 0 is the option's mean (its logit),
    output 1 its log-std."""
    model, context, targets, _ = setup
    batch = make_batch([Episode(context, targets)])
    with torch.no_grad():
        model.members[0].head.weight[1] = 0.0
        model.members[0].head.bias[1] = -3.0
        mean, log_std = model(batch)
    assert torch.all(log_std == -3.0)
    assert float(mean[0, 0, batch.token_mask[0]].std()) > 1e-3


def test_a_batch_without_target_options_is_refused_by_the_loss(setup) -> None:
    model, context, targets, _ = setup
    batch = make_batch([Episode(context, targets)])
    none = dataclasses.replace(batch, is_target=torch.zeros_like(batch.is_target))
    mean, log_std = model(none)
    with pytest.raises(ValueError, match="no target options"):
        gpo_loss(mean, log_std, none)


def test_loss_gradient_flows_and_training_reduces_loss() -> None:
    rng = np.random.default_rng(3)
    model = build_model(CFG, seed=0)
    items = [random_item(rng, 4, f"q{i}") for i in range(20)]
    batch = make_batch([Episode(items[:10], items[10:])])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(60):
        mean, log_std = model(batch)
        loss = gpo_loss(mean, log_std, batch)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first is not None
    assert float(loss.detach()) < first - 0.5


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_each_local_step_is_one_plain_optimizer_step_on_its_own_episodes_loss(
    optimizer: str,
) -> None:
    """LocalTrainer.step is one optimizer step on the loss of the episode it draws, nothing
    more: its gradients are cleared each step. Gradients accumulated across steps would make
    every step after the first move the model by the sum of all earlier gradients too."""
    rng = np.random.default_rng(4)
    items = [random_item(rng, int(rng.integers(2, 5)), f"q{i}") for i in range(12)]
    settings = TrainingSettings(
        learning_rate=1e-2, context_range=(3, 5), target_range=(2, 4), optimizer=optimizer
    )
    model = build_model(CFG, seed=0)
    reference = build_model(CFG, seed=0)
    trainer = LocalTrainer(model, settings, seed=5)
    plain = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(
        reference.parameters(), lr=settings.learning_rate
    )
    draws = np.random.default_rng(5)  # the trainer's episode stream
    for _ in range(3):
        loss = trainer.step([items])
        episode = sample_episode(items, draws, settings.context_range, settings.target_range)
        batch = make_batch([episode])
        plain.zero_grad()
        mean, log_std = reference(batch)
        expected = gpo_loss(mean, log_std, batch)
        expected.backward()
        plain.step()
        assert loss == pytest.approx(float(expected.detach()), rel=1e-6)
        for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_question_softmax_matches_per_question_softmax() -> None:
    rng = np.random.default_rng(7)
    episodes = [
        Episode([random_item(rng, 3, "c")], [random_item(rng, k, f"t{k}") for k in (2, 5)]),
        Episode([random_item(rng, 4, "c2")], [random_item(rng, 3, "t")]),
    ]
    batch = make_batch(episodes)
    logits = torch.randn(batch.token_mask.shape, dtype=torch.float64) * 5
    out = question_softmax(logits, batch)
    for bi, row in enumerate(batch.question_slices):
        for a, b in row:
            torch.testing.assert_close(out[bi, a:b], torch.softmax(logits[bi, a:b], 0))
    assert torch.all(out[~batch.token_mask] == 0)
    # logits far beyond exp's float range (softmax is shift-invariant: no overflow, no 0/0)
    huge = logits * 1000 + 500
    out = question_softmax(huge.float(), batch)
    assert torch.isfinite(out).all()
    for bi, row in enumerate(batch.question_slices):
        for a, b in row:
            torch.testing.assert_close(out[bi, a:b], torch.softmax(huge[bi, a:b].float(), 0))


def test_same_seed_same_weights_and_config_round_trip() -> None:
    a, b = build_model(CFG, seed=5), build_model(CFG, seed=5)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb)
    assert GPOConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown"):
        GPOConfig.from_dict({**CFG.to_dict(), "bogus": 1})


def test_building_a_model_leaves_torchs_global_generator_as_it_was() -> None:
    """build_model seeds only its own initialisation: what the caller draws from torch's
    generator afterwards is what it would have drawn without the model being built."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model(CFG, seed=5)
    assert torch.equal(torch.rand(4), expected)


def test_episode_without_context_is_refused(setup) -> None:
    _, _, targets, _ = setup
    with pytest.raises(ValueError, match="context"):
        make_batch([Episode([], targets)])


def test_a_batch_of_no_episodes_is_refused_saying_so() -> None:
    with pytest.raises(ValueError, match=r"^no episodes to batch$"):
        make_batch([])


def test_an_episode_without_targets_is_refused_naming_which(setup) -> None:
    _, context, targets, _ = setup
    with pytest.raises(
        ValueError, match=r"^episode 1 needs at least one context and one target question$"
    ):
        make_batch([Episode(context, targets), Episode(context, [])])


def test_a_question_with_one_embedding_row_for_several_options_is_refused(setup) -> None:
    """One row for three options would broadcast to all three (every option the same text),
    not fail: make_batch names the question and both shapes."""
    _, context, _, rng = setup
    target = random_item(rng, 3, "three options")
    one_row = EmbeddedItem(target.item, target.embeddings[:1])
    with pytest.raises(
        ValueError,
        match=re.escape(f"'three options' has shape (1, {DIM}), expected (3, {DIM})"),
    ):
        make_batch([Episode(context, [one_row])])


# --- context memory (inference only) -------------------------------------------------------


def _with_options(e: EmbeddedItem, options: tuple[str, ...], dist: np.ndarray) -> EmbeddedItem:
    return EmbeddedItem(SurveyItem(e.item.question, options, dist), e.embeddings)


def _memory_model(weight: float, shrinkage: float = 1.0, temperature: float = 0.1) -> GPO:
    model = build_model(CFG, seed=1)
    model.cfg = GPOConfig(
        **{
            **CFG.to_dict(),
            "memory_weight": weight,
            "memory_shrinkage": shrinkage,
            "memory_temperature": temperature,
        }
    )
    return model


def test_memory_matches_an_independent_computation(setup) -> None:
    _, context, _, rng = setup
    opts = ("yes", "no", "maybe")
    context = [
        *context,
        _with_options(random_item(rng, 3, "m1"), opts, np.array([0.7, 0.2, 0.1])),
        _with_options(random_item(rng, 3, "m2"), opts, np.array([0.1, 0.3, 0.6])),
    ]
    target = _with_options(random_item(rng, 3, "t"), opts, np.array([1 / 3] * 3))
    base = _predict(_memory_model(0.0), context, [target])[0].double().numpy()
    got = _predict(_memory_model(0.8, 2.0, 0.2), context, [target])[0].double().numpy()

    def unit(v: np.ndarray) -> np.ndarray:
        m = v.astype(np.float64).mean(0)
        return m / np.linalg.norm(m)

    matches = context[-2:]
    sims = np.array([unit(c.embeddings) @ unit(target.embeddings) for c in matches]) / 0.2
    weights = np.exp(sims - sims.max()) / np.exp(sims - sims.max()).sum()
    memory = sum(w * c.item.distribution for w, c in zip(weights, matches, strict=True))
    mix = 0.8 * 2 / (2 + 2.0)
    np.testing.assert_allclose(got, (1 - mix) * base + mix * memory, atol=1e-5)
    assert abs(got.sum() - 1) < 1e-5


def test_memory_is_only_for_target_questions(setup) -> None:
    """A context question is not matched against the context (itself included): its memory and
    match count are 0, as the docstring says, so no prediction for it echoes its own answers."""
    _, context, _, rng = setup
    opts = ("yes", "no")
    shown = [
        *context,
        _with_options(random_item(rng, 2, "m1"), opts, np.array([0.9, 0.1])),
        _with_options(random_item(rng, 2, "m2"), opts, np.array([0.2, 0.8])),
    ]
    target = _with_options(random_item(rng, 2, "t"), opts, np.ones(2) / 2)
    batch = make_batch([Episode(shown, [target])])
    memory, matches = context_memory(batch, 0.1)
    assert torch.all(memory[batch.is_context] == 0) and torch.all(matches[batch.is_context] == 0)
    assert torch.all(matches[batch.is_target] == 2)


def test_a_context_question_naming_an_option_twice_is_no_memory(setup) -> None:
    """Options are matched by text: a question that names one twice (the loaders refuse it, a
    caller building items may not) has no well-defined answer per text, so it matches nothing."""
    _, context, _, rng = setup
    twice = _with_options(random_item(rng, 3, "d"), ("a", "a", "b"), np.array([0.5, 0.2, 0.3]))
    target = _with_options(random_item(rng, 2, "t"), ("a", "b"), np.ones(2) / 2)
    batch = make_batch([Episode([*context, twice], [target])])
    memory, matches = context_memory(batch, 0.1)
    assert torch.all(matches == 0) and torch.all(memory == 0)


def test_a_target_question_naming_an_option_twice_gets_no_memory(setup) -> None:
    """The other side of the rule above: a target naming "a" twice has the same option set as a
    context question ("a", "b") but no answer per token; given one, its memory would put the
    group's share of "a" on both tokens, a distribution summing to more than 1."""
    _, context, _, rng = setup
    shown = _with_options(random_item(rng, 2, "c"), ("a", "b"), np.array([0.7, 0.3]))
    twice = _with_options(random_item(rng, 3, "t"), ("a", "a", "b"), np.ones(3) / 3)
    batch = make_batch([Episode([*context, shown], [twice])])
    memory, matches = context_memory(batch, 0.1)
    assert torch.all(matches == 0) and torch.all(memory == 0)


def test_a_small_memory_weight_mixes_in_that_share_of_the_memory(setup) -> None:
    """Any memory_weight above 0 mixes (not only the large ones the other tests use): without
    shrinkage the prediction is (1 - w) * the network's + w * the memory, and with w = 1 it is the
    memory alone."""
    _, context, _, rng = setup
    opts = ("yes", "no", "maybe")
    shown = [*context, _with_options(random_item(rng, 3, "m"), opts, np.array([0.7, 0.2, 0.1]))]
    target = [_with_options(random_item(rng, 3, "t"), opts, np.ones(3) / 3)]
    base = _predict(_memory_model(0.0), shown, target)[0]
    memory = _predict(_memory_model(1.0, shrinkage=0.0), shown, target)[0]
    torch.testing.assert_close(memory, torch.tensor([0.7, 0.2, 0.1]))
    small = _predict(_memory_model(0.25, shrinkage=0.0), shown, target)[0]
    torch.testing.assert_close(small, 0.75 * base + 0.25 * memory)


def test_memory_leaves_targets_without_a_same_option_context_question(setup) -> None:
    _, context, _, rng = setup
    lone = _with_options(random_item(rng, 3, "lone"), ("red", "green", "blue"), np.ones(3) / 3)
    base = _predict(_memory_model(0.0), context, [lone])[0]
    for shrinkage in (1.0, 0.0):  # 0: no shrinkage, and still no 0/0 where nothing matches
        got = _predict(_memory_model(0.9, shrinkage), context, [lone])[0]
        torch.testing.assert_close(base, got)


def test_memory_makes_the_prediction_follow_the_groups_answers(setup) -> None:
    _, context, _, rng = setup
    opts = ("agree", "disagree")
    question = random_item(rng, 2, "q")
    target = _with_options(random_item(rng, 2, "t"), opts, np.ones(2) / 2)
    model = _memory_model(0.9)
    agreeing = [*context, _with_options(question, opts, np.array([0.9, 0.1]))]
    disagreeing = [*context, _with_options(question, opts, np.array([0.1, 0.9]))]
    p_agree = _predict(model, agreeing, [target])[0]
    p_disagree = _predict(model, disagreeing, [target])[0]
    assert float(p_agree[0]) > float(p_disagree[0]) + 0.3
    # and the target's own (hidden) answer is still never read
    hidden = _with_options(target, opts, np.array([0.0, 1.0]))
    torch.testing.assert_close(p_agree, _predict(model, agreeing, [hidden])[0])


@pytest.mark.parametrize(
    "field,value",
    [
        ("memory_weight", 1.5),
        ("memory_weight", -0.1),
        ("memory_shrinkage", -1.0),
        ("memory_temperature", 0.0),
    ],
)
def test_memory_settings_are_validated(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        kwargs: dict[str, Any] = {field: value}
        GPOConfig(**kwargs)


def test_a_memory_temperature_just_below_the_stated_minimum_is_refused() -> None:
    """The message names the lowest temperature taken (1e-06): a value just under it is refused
    as the message says, not somewhere far lower."""
    with pytest.raises(InputError, match=r"memory_temperature must be > 0 \(at least 1e-06\)"):
        GPOConfig(memory_temperature=9e-7)


@pytest.mark.parametrize(
    "field,value",
    [
        ("memory_weight", 0.0),
        ("memory_weight", 1.0),  # the memory alone wherever a target has matches
        ("memory_shrinkage", 0.0),
        ("memory_temperature", 1e-6),
    ],
)
def test_memory_settings_at_their_limits_are_allowed(field: str, value: float) -> None:
    kwargs: dict[str, Any] = {field: value}
    assert getattr(GPOConfig(**kwargs), field) == value


def test_memory_matches_options_by_text_in_any_order(setup) -> None:
    _, context, _, rng = setup
    question = random_item(rng, 3, "q")
    target = random_item(rng, 3, "t")
    model = _memory_model(0.9)
    shown = [*context, _with_options(question, ("a", "b", "c"), np.array([0.8, 0.15, 0.05]))]
    forward = _predict(model, shown, [_with_options(target, ("a", "b", "c"), np.ones(3) / 3)])[0]
    backward = _predict(model, shown, [_with_options(target, ("c", "b", "a"), np.ones(3) / 3)])[0]
    base = _predict(
        _memory_model(0.0), shown, [_with_options(target, ("c", "b", "a"), np.ones(3) / 3)]
    )[0]
    # option "a" is the group's favourite whichever position it takes
    assert int(forward.argmax()) == 0 and int(backward.argmax()) == 2
    assert float(backward[2]) > float(base[2]) + 0.15


ENSEMBLE = GPOConfig(embed_dim=DIM, d_model=32, n_layers=2, n_heads=4, d_ff=32, members=3)


def test_ensemble_predicts_the_mean_of_its_members_distributions(setup) -> None:
    _, context, targets, _ = setup
    model = build_model(ENSEMBLE, seed=2)
    batch = make_batch([Episode(context, targets)])
    model.eval()
    with torch.no_grad():
        means, _ = model(batch)
        pred = model.predict(batch)
    assert means.shape == (3, *batch.token_mask.shape)
    # each member on its own: the softmax of its means within each question
    own = []
    for m in range(3):
        member = np.zeros(batch.token_mask.shape[1])
        for a, b in batch.question_slices[0]:
            x = means[m, 0, a:b].double().numpy()
            member[a:b] = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        own.append(member)
    np.testing.assert_allclose(pred[0].double().numpy(), np.mean(own, axis=0), atol=1e-6)
    # independently initialised: the members disagree
    assert float((means[0] - means[1]).abs().max()) > 1e-3


def test_the_loss_refuses_means_and_log_stds_of_different_shapes(setup) -> None:
    _, context, targets, _ = setup
    batch = make_batch([Episode(context, targets)])
    mean, log_std = build_model(ENSEMBLE, seed=2)(batch)
    with pytest.raises(ValueError, match="differ"):
        gpo_loss(mean, log_std[:, :, :1], batch)  # would broadcast silently


def test_ensemble_loss_is_the_sum_of_its_members_losses(setup) -> None:
    _, context, targets, _ = setup
    model = build_model(ENSEMBLE, seed=2)
    batch = make_batch([Episode(context, targets)])
    mean, log_std = model(batch)
    total = float(gpo_loss(mean, log_std, batch).detach())
    parts = [float(gpo_loss(mean[m], log_std[m], batch).detach()) for m in range(3)]
    assert total == pytest.approx(sum(parts), rel=1e-6)
    # each member's gradient comes from its own loss only
    gpo_loss(mean, log_std, batch).backward()
    alone = build_model(ENSEMBLE, seed=2)
    m0, s0 = alone.members[0](batch)
    gpo_loss(m0, s0, batch).backward()
    for (name, p), (_, q) in zip(
        model.members[0].named_parameters(), alone.members[0].named_parameters(), strict=True
    ):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("members", [0, -1, 17])
def test_members_are_validated(members: int) -> None:
    with pytest.raises(ValueError, match="members"):
        GPOConfig(members=members)


def test_weights_saved_before_ensembles_load_as_member_zero(setup) -> None:
    model, context, targets, _ = setup
    legacy = {k.removeprefix("members.0."): v for k, v in model.state_dict().items()}
    assert not any(k.startswith("members.") for k in legacy)
    again = GPO(CFG)
    again.load_state_dict(upgrade_state_dict(legacy))
    assert _max_diff(_predict(model, context, targets), _predict(again, context, targets)) == 0
    assert upgrade_state_dict(model.state_dict()).keys() == model.state_dict().keys()


def test_a_trainer_with_non_finite_optimizer_state_is_not_finite() -> None:
    """Adam's moments are kept across rounds: an infinite second moment turns every later step
    into NaN, so it counts as much as an infinite weight (the node stops on either)."""
    rng = np.random.default_rng(0)
    items = [random_item(rng, 3, f"Question {i}?") for i in range(12)]
    trainer = LocalTrainer(
        build_model(CFG, 0), TrainingSettings(context_range=(2, 4), target_range=(2, 4)), 0
    )
    trainer.train_steps(items, 1)
    assert trainer.is_finite()
    state = next(iter(trainer.optimizer.state.values()))
    state["exp_avg_sq"].view(-1)[0] = float("inf")
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    assert not trainer.is_finite()


def test_a_centralized_epoch_steps_once_per_batch_of_groups_per_step_shuffled_groups() -> None:
    """The centralized baseline (PROTOCOL.md: "100 epochs of one step per group batch"): each
    epoch shuffles the groups and takes one step on each run of `groups_per_step` of them, so
    every group is trained on once an epoch; on_epoch hears each epoch's mean loss. Steps of one
    group each skipped groups, and an epoch short was a baseline trained less than the paper's."""
    rng = np.random.default_rng(1)
    groups = {f"G{g}": [random_item(rng, 3, f"G{g} q{i}") for i in range(8)] for g in range(5)}
    settings = TrainingSettings(context_range=(2, 4), target_range=(2, 4), groups_per_step=2)
    trainer = LocalTrainer(build_model(CFG, 0), settings, 0)
    heard: list[tuple[int, float]] = []
    losses = train_centralized(trainer, groups, 3, on_epoch=lambda e, loss: heard.append((e, loss)))
    assert len(losses) == 3 and heard == list(enumerate(losses, start=1))
    assert trainer.steps_done == 3 * 3  # 5 groups in batches of 2: 2 + 2 + 1

    by_hand = LocalTrainer(build_model(CFG, 0), settings, 0)
    names = sorted(groups)
    for loss in losses:
        order = [names[i] for i in by_hand.rng.permutation(len(names))]
        steps = [by_hand.step([groups[n] for n in order[i : i + 2]]) for i in (0, 2, 4)]
        assert loss == pytest.approx(float(np.mean(steps)), rel=1e-6)
    for got, want in zip(trainer.model.parameters(), by_hand.model.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def test_a_model_of_exactly_max_parameters_is_allowed_and_one_unit_wider_is_not() -> None:
    """The cap is "more than MAX_PARAMETERS": a config of exactly 1e9 parameters (these widths
    add up to it) is built, and one more feed-forward unit, just over it, is refused. The only
    other size test is a config many times too large, which no loosened cap would admit."""
    exact = GPOConfig(embed_dim=1024, d_model=3502, mlp_layers=2, n_layers=4, n_heads=2, d_ff=28115)
    assert exact.num_parameters() == MAX_PARAMETERS
    with pytest.raises(InputError, match=r"1,000,028,020 parameters, more than 1,000,000,000"):
        dataclasses.replace(exact, d_ff=28116)


def test_the_products_default_ensemble_has_three_members_and_a_bare_config_one() -> None:
    """The coordinator's default is the ensemble that beat the single network (README,
    "Results"); GPOConfig's own default stays the paper's single network, so that a model.json
    written before `members` existed still describes its weights."""
    from coordinator.service import CoordinatorConfig

    assert CoordinatorConfig().members == DEFAULT_MEMBERS == 3
    assert GPOConfig().members == 1
