"""Synthetic survey data with a known structure, for tests, demos and benchmarks without real data.

The generator is built so that a predictor reading text embeddings of
``"Answer: {option}\\nQuestion: {question}"`` has something to learn, and so that what it learns
can be checked:

* Questions are written from templates over a handful of TOPICS (religion, economy, environment,
  ...): the topic is visible in the words, so questions of one topic embed close together.
* Options come from a few answer SCALES (agree/disagree, importance, yes/no, good/bad influence,
  confidence, a 1-10 justifiable scale, ...), each with a natural ordering: every option has an
  endorsement score from +1 (fully endorses what the question asks about) to -1, 0 for neutral or
  "Don't know" answers.
* Each group has a latent STANCE per topic (two shared factors plus an idiosyncratic part, so topics
  correlate as in real value surveys). A group's logits for a question are::

      base[option] + bias[question, option]                     (group-independent)
      + temperature * loading[question] * polarity[question] * stance[group, topic] * score[option]
      + shift[question] * score[option] + style terms + noise

  where `polarity` is -1 for questions phrased against the topic's direction ("Men make better
  political leaders than women" on gender equality). The distribution is the softmax over options.

So groups differ systematically, a group's answers on other questions of a topic predict its answer
on a new one (context helps), and the uniform and group-prior baselines are beatable. Every group
answers most questions (each (group, question) pair is dropped with probability `drop_rate`).
Everything is drawn from one `numpy.random.Generator` seeded by `seed`: same arguments, same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pluralfed.data import SurveyData, SurveyItem, question_id_for
from pluralfed.errors import InputError


@dataclass(frozen=True)
class Scale:
    """One family of answer options, ordered, with how much each option endorses the question's
    subject (+1..-1, 0 = neutral / no answer) and a group-independent logit offset."""

    name: str
    options: tuple[str, ...]
    scores: tuple[float, ...]
    base: tuple[float, ...]


SCALES: dict[str, Scale] = {
    s.name: s
    for s in (
        Scale(
            "agree4",
            ("Strongly agree", "Somewhat agree", "Somewhat disagree", "Strongly disagree"),
            (1.0, 0.35, -0.35, -1.0),
            (0.0, 0.4, 0.4, 0.0),
        ),
        Scale(
            "agree5_dk",
            (
                "Completely agree",
                "Mostly agree",
                "Mostly disagree",
                "Completely disagree",
                "Don't know",
            ),
            (1.0, 0.35, -0.35, -1.0, 0.0),
            (0.0, 0.4, 0.4, 0.0, -1.8),
        ),
        Scale(
            "importance4",
            ("Very important", "Rather important", "Not very important", "Not at all important"),
            (1.0, 0.35, -0.35, -1.0),
            (0.2, 0.4, 0.2, -0.2),
        ),
        Scale("yes_no_dk", ("Yes", "No", "Don't know"), (1.0, -1.0, 0.0), (0.0, 0.0, -2.0)),
        Scale(
            "influence",
            ("A good influence", "A bad influence", "Neither good nor bad (VOL)", "DK/Refused"),
            (1.0, -1.0, 0.0, 0.0),
            (0.0, 0.0, -1.2, -2.2),
        ),
        Scale(
            "favorable4",
            ("Very favorable", "Somewhat favorable", "Somewhat unfavorable", "Very unfavorable"),
            (1.0, 0.35, -0.35, -1.0),
            (-0.2, 0.5, 0.3, -0.2),
        ),
        Scale(
            "confidence4",
            ("A great deal", "Quite a lot", "Not very much", "None at all"),
            (1.0, 0.35, -0.35, -1.0),
            (-0.3, 0.4, 0.4, 0.0),
        ),
        Scale(
            "more_less3",
            ("Spend more", "Spend about the same", "Spend less"),
            (1.0, 0.0, -1.0),
            (0.0, 0.3, -0.2),
        ),
        Scale(
            "priority4",
            (
                "A top priority",
                "Important but a lower priority",
                "Not too important",
                "Should not be done",
            ),
            (1.0, 0.35, -0.35, -1.0),
            (0.0, 0.5, 0.0, -0.8),
        ),
        Scale(
            "justifiable10",
            ("Never justifiable", "2", "3", "4", "5", "6", "7", "8", "9", "Always justifiable"),
            tuple(float(x) for x in np.linspace(-1.0, 1.0, 10)),
            (0.6, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.2),
        ),
    )
}

# slot -> [(template, scale name)]; a template's {x} is filled with one of a topic's slot items
TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "statement": (
        ("How much do you agree or disagree with the following statement? {x}.", "agree4"),
        ("Please tell me whether you agree or disagree: {x}.", "agree5_dk"),
        ("Do you think it is true that {x_lower}?", "yes_no_dk"),
    ),
    "thing": (
        ("In your view, how important a role should {x} play in our society?", "importance4"),
        (
            "Overall, is the influence of {x} on the way things are going in our country good "
            "or bad?",
            "influence",
        ),
        (
            "Please tell me if you have a very favorable, somewhat favorable, somewhat unfavorable "
            "or very unfavorable opinion of {x}.",
            "favorable4",
        ),
    ),
    "institution": (
        ("How much confidence do you have in {x}?", "confidence4"),
        (
            "Could you tell me how much you trust {x}: a great deal, quite a lot, or less?",
            "confidence4",
        ),
    ),
    "spending": (
        ("Should our government spend more, less or about the same on {x}?", "more_less3"),
    ),
    "goal": (("How much of a priority should it be for our government to {x}?", "priority4"),),
    "behaviour": (
        (
            "Please tell me whether you think {x} can always be justified, never be justified, "
            "or something in between.",
            "justifiable10",
        ),
    ),
}

# topic -> slot -> [(item, polarity)]; polarity +1 when endorsing the item goes with the topic's
# direction (religiosity, market economy, pro-environment, gender equality, institutional trust,
# technology optimism, openness to immigration, support for democracy)
TOPICS: dict[str, dict[str, tuple[tuple[str, int], ...]]] = {
    "religion": {
        "statement": (
            ("Religion should play a larger role in public life", 1),
            ("A person must believe in God to be moral and have good values", 1),
            ("Science will eventually make religion unnecessary", -1),
            ("Religious leaders should stay out of politics", -1),
        ),
        "thing": (("religion", 1), ("prayer", 1), ("religious leaders", 1)),
        "institution": (("churches and other religious organizations", 1),),
        "spending": (("religious schools", 1),),
        "goal": (("protect religious traditions and holidays", 1),),
        "behaviour": (
            ("working on a religious holy day", -1),
            ("marrying outside one's faith", -1),
        ),
    },
    "economy": {
        "statement": (
            ("Most people are better off in a free market economy, even if some are rich", 1),
            ("Hard work usually brings a better life", 1),
            ("The government should make sure that everyone has a decent income", -1),
            ("The gap between the rich and the poor is too large in our country", -1),
        ),
        "thing": (
            ("free trade with other countries", 1),
            ("large companies", 1),
            ("labor unions", -1),
        ),
        "institution": (("banks", 1), ("major companies", 1), ("labor unions", -1)),
        "spending": (("unemployment benefits", -1), ("public housing", -1)),
        "goal": (("cut taxes on businesses", 1), ("reduce the gap between rich and poor", -1)),
        "behaviour": (("claiming government benefits to which you are not entitled", -1),),
    },
    "environment": {
        "statement": (
            ("Climate change is a very serious problem for our country", 1),
            ("Protecting the environment should come first, even if it slows economic growth", 1),
            ("Environmental rules cost too many jobs", -1),
        ),
        "thing": (
            ("environmental protection", 1),
            ("renewable energy", 1),
            ("coal power plants", -1),
        ),
        "institution": (("environmental organizations", 1),),
        "spending": (("clean energy research", 1), ("public transport", 1)),
        "goal": (("reduce carbon emissions", 1), ("expand oil and gas drilling", -1)),
        "behaviour": (("throwing litter in a public place", -1),),
    },
    "gender": {
        "statement": (
            ("Men make better political leaders than women do", -1),
            ("When jobs are scarce, men should have more right to a job than women", -1),
            ("A university education is just as important for a girl as for a boy", 1),
            ("Women should have the same rights as men", 1),
        ),
        "thing": (("gender equality", 1), ("women working outside the home", 1)),
        "institution": (("the women's movement", 1),),
        "spending": (("childcare for working parents", 1),),
        "goal": (("make sure women are paid the same as men", 1),),
        "behaviour": (("divorce", 1), ("a husband beating his wife", -1)),
    },
    "trust": {
        "statement": (
            ("Most elected officials care what people like me think", 1),
            ("Most people can be trusted", 1),
            ("The country is run for the benefit of a few big interests", -1),
        ),
        "thing": (("the national government", 1), ("the court system", 1)),
        "institution": (
            ("the police", 1),
            ("the courts", 1),
            ("parliament", 1),
            ("the civil service", 1),
        ),
        "spending": (("the police", 1),),
        "goal": (("strengthen independent courts", 1),),
        "behaviour": (
            ("cheating on taxes if you have a chance", -1),
            ("someone accepting a bribe in the course of their duties", -1),
        ),
    },
    "technology": {
        "statement": (
            (
                "Science and technology are making our lives healthier, easier and more "
                "comfortable",
                1,
            ),
            ("The internet has been a good thing for society", 1),
            ("Artificial intelligence will do more harm than good", -1),
        ),
        "thing": (("the internet", 1), ("social media", 1), ("artificial intelligence", 1)),
        "institution": (("scientists", 1), ("technology companies", 1)),
        "spending": (("scientific research", 1),),
        "goal": (("bring high-speed internet to every household", 1),),
        "behaviour": (("using genetically modified crops", 1),),
    },
    "immigration": {
        "statement": (
            ("Immigrants make our country stronger because of their work and talents", 1),
            ("Immigrants are a burden because they take our jobs and social benefits", -1),
            ("Our way of life needs to be protected against foreign influence", -1),
        ),
        "thing": (("immigrants from other countries", 1), ("cultural diversity", 1)),
        "institution": (("the immigration authorities", -1),),
        "spending": (("border security", -1),),
        "goal": (("reduce the number of immigrants coming into the country", -1),),
        "behaviour": (("employers hiring native workers before immigrants", -1),),
    },
    "democracy": {
        "statement": (
            ("Having a democratic political system is a good way of governing this country", 1),
            (
                "A strong leader who does not have to bother with parliament and elections is good",
                -1,
            ),
            ("The army should rule the country", -1),
        ),
        "thing": (("free and fair elections", 1), ("a free press", 1), ("democracy", 1)),
        "institution": (("political parties", 1), ("the election commission", 1)),
        "spending": (("running elections", 1),),
        "goal": (("guarantee free speech", 1),),
        "behaviour": (("using violence to pursue political goals", -1),),
    },
}

# topic -> loadings on two shared value factors (traditional/secular, survival/self-expression), so
# that a group's stances on different topics are correlated, as in real value surveys
TOPIC_FACTORS: dict[str, tuple[float, float]] = {
    "religion": (0.9, -0.2),
    "economy": (0.1, 0.3),
    "environment": (-0.3, 0.7),
    "gender": (-0.7, 0.5),
    "trust": (0.0, 0.6),
    "technology": (-0.4, 0.3),
    "immigration": (-0.5, 0.5),
    "democracy": (-0.3, 0.7),
}

FRAMINGS: tuple[str, ...] = ("", "Thinking about our country today: ", "In your opinion, ")

GROUP_NAMES: tuple[str, ...] = (
    "Aldoria",
    "Borvenia",
    "Calvaris",
    "Drelmark",
    "Estoria",
    "Fennmark",
    "Galdovia",
    "Harvonia",
    "Istrelle",
    "Jorvika",
    "Kelmora",
    "Lunaria",
    "Marovia",
    "Norvale",
    "Orvania",
    "Pellucia",
    "Quenland",
    "Rostavia",
    "Sarvania",
    "Tavoria",
    "Ulmoria",
    "Valdoria",
    "Westmarch",
    "Xandria",
    "Yrvania",
    "Zemlandia",
)


@dataclass(frozen=True)
class SyntheticQuestion:
    """What the generator knows about one question: its topic, scale and direction."""

    text: str
    topic: str
    scale: str
    polarity: int  # +1: endorsing goes with the topic's direction; -1: against it


@dataclass(frozen=True)
class SyntheticWorld:
    """The generated data plus the truth behind it (for tests, and to check what a model learnt)."""

    data: SurveyData
    questions: tuple[SyntheticQuestion, ...]
    topics: tuple[str, ...]
    stances: dict[str, np.ndarray]  # group -> stance per topic, in `topics` order


def group_names(n: int) -> list[str]:
    """n distinct fictional country names (numbered once the alphabet runs out)."""
    out = list(GROUP_NAMES[:n])
    k = 2
    while len(out) < n:
        out.extend(f"{name} {k}" for name in GROUP_NAMES[: n - len(out)])
        k += 1
    return out


def _question_pool(rng: np.random.Generator, n_questions: int) -> list[SyntheticQuestion]:
    """n distinct questions, topics interleaved so that every topic gets about n/len(TOPICS)."""
    per_topic: list[list[tuple[str, str, int]]] = []
    for slots in TOPICS.values():
        combos: list[tuple[str, str, int]] = []
        for slot, items in slots.items():
            for template, scale in TEMPLATES[slot]:
                for item, polarity in items:
                    text = template.format(x=item, x_lower=item[0].lower() + item[1:])
                    combos.append((text, scale, polarity))
        order = rng.permutation(len(combos))
        per_topic.append([combos[i] for i in order])
    topics = list(TOPICS)
    out: list[SyntheticQuestion] = []
    rounds = 0
    while len(out) < n_questions:
        framing = FRAMINGS[rounds % len(FRAMINGS)]
        wave = rounds // len(FRAMINGS)
        depth = max(len(c) for c in per_topic)
        for i in range(depth):
            for t in rng.permutation(len(topics)):
                if i >= len(per_topic[t]) or len(out) >= n_questions:
                    continue
                text, scale, polarity = per_topic[t][i]
                if framing:
                    text = framing + text[0].lower() + text[1:]
                if wave:
                    text = f"{text} (survey wave {wave + 1})"
                out.append(SyntheticQuestion(text, topics[t], scale, polarity))
        rounds += 1
    return out


def synthetic_world(
    n_groups: int = 8,
    n_questions: int = 200,
    seed: int = 0,
    *,
    temperature: float = 1.0,
    drop_rate: float = 0.1,
    noise: float = 0.15,
    question_bias: float = 0.5,
) -> SyntheticWorld:
    """Generate synthetic survey data and keep the latent truth (see the module docstring).

    temperature: how strongly group stances show in the answers (0: stances do not show; groups
    differ only by response style and noise);
    drop_rate: chance that a group did not answer a question; noise: per-answer logit noise;
    question_bias: spread of the group-independent per-option logit offsets."""
    if not 1 <= n_groups <= 10_000:
        raise InputError(f"number of groups must be 1..10000, got {n_groups}")
    if not 1 <= n_questions <= 100_000:
        raise InputError(f"number of questions must be 1..100000, got {n_questions}")
    if not 0.0 <= drop_rate < 1.0:
        raise InputError(f"drop rate must be in [0, 1), got {drop_rate}")
    for name, value in (("temperature", temperature), ("noise", noise), ("bias", question_bias)):
        if not (np.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite number >= 0, got {value}")

    rng = np.random.default_rng(seed)
    topics = tuple(TOPICS)
    questions = _question_pool(rng, n_questions)
    names = group_names(n_groups)

    # groups: two shared factors + idiosyncratic part -> stance per topic; plus response style
    factors = np.array([TOPIC_FACTORS[t] for t in topics])  # (T, 2)
    z = rng.normal(size=(n_groups, 2))
    stances = z @ factors.T + 0.6 * rng.normal(size=(n_groups, len(topics)))  # (G, T)
    extremity = 0.3 * rng.normal(size=n_groups)  # taste for the ends of a scale
    no_answer = 0.4 * rng.normal(size=n_groups)  # taste for neutral / don't know

    topic_index = {t: i for i, t in enumerate(topics)}
    groups: dict[str, list[SurveyItem]] = {g: [] for g in names}
    keep = rng.random(size=(n_groups, n_questions)) >= drop_rate
    for gi in range(n_groups):  # nobody answers nothing
        if not keep[gi].any():
            keep[gi, rng.integers(n_questions)] = True

    for qi, q in enumerate(questions):
        scale = SCALES[q.scale]
        scores = np.array(scale.scores)
        neutral = (scores == 0.0).astype(np.float64)
        fixed = (
            np.array(scale.base)
            + question_bias * rng.normal(size=len(scores))
            + 0.6 * rng.normal() * scores  # how much everybody endorses this question
        )
        loading = rng.uniform(0.6, 1.4)
        stance = stances[:, topic_index[q.topic]] * q.polarity  # (G,)
        logits = (
            fixed[None, :]
            + temperature * loading * stance[:, None] * scores[None, :]
            + extremity[:, None] * np.abs(scores)[None, :]
            + no_answer[:, None] * neutral[None, :]
            + noise * rng.normal(size=(n_groups, len(scores)))
        )
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        qid = question_id_for(q.text)
        for gi, g in enumerate(names):
            if keep[gi, qi]:
                groups[g].append(SurveyItem(q.text, scale.options, probs[gi].copy(), qid))

    source = (
        f"synthetic(n_groups={n_groups}, n_questions={n_questions}, seed={seed}, "
        f"temperature={temperature}, drop_rate={drop_rate}, noise={noise}, "
        f"question_bias={question_bias})"
    )
    data = SurveyData(groups=groups, source=source)
    return SyntheticWorld(
        data=data,
        questions=tuple(questions),
        topics=topics,
        stances={g: stances[gi].copy() for gi, g in enumerate(names)},
    )


def generate_synthetic(
    n_groups: int = 8,
    n_questions: int = 200,
    seed: int = 0,
    *,
    temperature: float = 1.0,
    drop_rate: float = 0.1,
    noise: float = 0.15,
    question_bias: float = 0.5,
) -> SurveyData:
    """Synthetic survey data, deterministic under `seed` (see the module docstring)."""
    return synthetic_world(
        n_groups,
        n_questions,
        seed,
        temperature=temperature,
        drop_rate=drop_rate,
        noise=noise,
        question_bias=question_bias,
    ).data
