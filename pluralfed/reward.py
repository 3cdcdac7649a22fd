"""The trained GPO predictor as a reward model: how much would this group agree with this answer?

A `RewardModel` wraps a checkpoint and its text encoder. Given a group — its few-shot context: the
questions whose answer distributions the group is known to give — and a target question with
candidate answers (the target's options), it predicts the group's distribution over the candidates
(`score`, `score_batch`) and turns it into one reward per candidate (`rewards`).

Reward choice. The default reward of an answer is the group's predicted LOG-probability,
``ln(max(p, 1e-6))`` (`LOG_FLOOR` below the floor). Why not the probability: a policy maximising
``E[reward] + entropy`` is optimal exactly when it answers with the group's distribution
(softmax of log p is p), so a KL/entropy-regularised RL trainer is pushed towards *representing*
the group, not towards always giving its majority answer; and log-probabilities separate a 1% from
a 0.01% answer, where probabilities barely differ. ``kind="prob"`` gives the probability instead
(in [0, 1]: the expected share of the group that would give that answer). Best-of-n picks the same
answer under either kind, since one is a monotone function of the other.

Group contexts. A context holds at most `MAX_CONTEXT_ITEMS` (90, PROTOCOL.md's evaluation context)
items; a longer list is cut to 90 the way PROTOCOL.md's evaluation does it (a fixed-seed sample,
`pluralfed.episodes.evaluation_context`). The model holds named contexts (`add_group`,
`add_groups_from_data`: each group's TRAIN questions per the PROTOCOL.md split), so callers can say
"France" instead of re-sending France's answers.

Free-text completions. `map_completion` maps a policy's free-text answer to one option, by the
first rule that applies (all comparisons ignore case, runs of whitespace and typographic
quotes):

1. ``exact``: the completion is an option's text, e.g. ``"  yes "`` -> "Yes".
2. ``choice``: the completion starts with a choice label: a letter or a 1-based number, either
   alone (``"B"``, ``"2"``), bracketed (``"(b)"``, ``"[B]"``), or followed by ``)``, ``.`` or
   ``:`` (``"B. No"``, ``"2) ..."``, ``"b: ..."``), optionally after ``Answer``/``Option``/
   ``Choice``/``The answer is`` (``"Answer: B"``, ``"Option 2 because ..."``). Letters map
   by position (a = first option), numbers too (1 = first option) — except when an option's own
   text is that number (a 0-10 scale), then the number names that option. A letter followed by just a space (``"A lot
   of people"``, ``"I think"``) is NOT a choice label, and labels beyond the number of options are
   ignored.
   ``label_conflict``: when the text right after the label is another option's text (``"B.
   Somewhat disagree"`` where B is "Somewhat agree"), that text wins: small models often write
   a letter that does not match the option text they copy (SmolLM2-135M in 19 of its 104
   labelled answers in bench/results/best_of_n.json), and the text is the more specific of the
   two. The rule name lets a caller treat such answers differently (e.g. penalise them).
3. ``contains``: an option's text occurs in the completion as whole words (``"I'd say yes,
   definitely"`` -> "Yes"; ``"yesterday"`` does not contain "Yes"). If several do, the longest
   option text wins ("Very good" over "Good"), then the earliest occurrence, then option order.
4. ``similar``: the option whose text embedding (the model's encoder, plain text) has the highest
   cosine similarity with the completion's. A last resort: sentence encoders like MiniLM put
   antonyms close together ("Favorable"/"Unfavorable"), so this rule is right for clear
   paraphrases ("I concur" -> "Agree") and unreliable on polarity.
5. ``none``: an empty completion maps to no option; its reward is `LOG_FLOOR` (kind "logprob") or
   0 (kind "prob").

The rules are literal: "not yes" contains "yes", and "B, though maybe No" picks B.

`make_reward_fn` builds the callable TRL's reward-based trainers (GRPO/RLOO ``reward_funcs``) and
best-of-n samplers take: ``(prompts, completions, **kwargs) -> list[float]``.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import numpy as np

from pluralfed.checkpoint import load_checkpoint
from pluralfed.data import (
    SurveyData,
    SurveyItem,
    is_blank,
    is_test_question,
    load_survey,
    normalise_distribution,
)
from pluralfed.embeddings import (
    CachedEncoder,
    TextEncoder,
    default_cache_dir,
    make_encoder,
    option_text,
)
from pluralfed.episodes import EmbeddedItem, evaluation_context
from pluralfed.errors import InputError, counted
from pluralfed.evaluation import predict_targets
from pluralfed.model import GPO, GPOConfig
from pluralfed.protocol import EVAL_MAX_CONTEXT

MAX_CONTEXT_ITEMS = EVAL_MAX_CONTEXT
# the most model time one reward-service call may ask for: calls take the model in turns, so
# one call of minutes (no deadline, every list at its limit) would stall every client
DEFAULT_MAX_CALL_S = 120.0
# the service's workers: one client's share (4) plus the health Checks any certificate of the CA
# may hold (auth.MAX_EXEMPT_CALLS, 4) still leave 4 for the other clients
DEFAULT_MAX_WORKERS = 12
PROB_FLOOR = 1e-6
LOG_FLOOR = math.log(PROB_FLOOR)
RewardKind = Literal["logprob", "prob"]
REWARD_KINDS: tuple[str, ...] = ("logprob", "prob")
# texts whose vectors are kept in memory, keyed by a 16-byte digest of the text so that long
# texts cost no more than short ones: about 90 MB at 384 dims, whatever the texts
DEFAULT_EMBED_MEMORY = 50_000
# the packaged encoder reads at most this many tokens of a text (HFTextEncoder.max_length)
MAX_EMBED_TOKENS = 256
# texts, and estimated tokens, embedded between two checks of a caller's `should_stop`: at most
# the packaged encoder's batch, and fewer long texts (a batch of 64 long texts took seconds)
EMBED_CHUNK = 64
EMBED_CHUNK_TOKENS = 2048
# a completion is embedded (last mapping rule) from its first this many characters: the encoder
# reads at most a few hundred tokens anyway, and a runaway generation must not cost unbounded time
MAX_EMBED_COMPLETION_CHARS = 8192


# ------------------------------------------------------------------------------------------------
# group contexts


@dataclass(frozen=True)
class GroupContext:
    """A group's few-shot context, embedded and ready to condition predictions on."""

    name: str | None
    items: tuple[EmbeddedItem, ...]

    def __len__(self) -> int:
        return len(self.items)


T = TypeVar("T")


def protocol_context(
    items: Sequence[T], max_context: int = MAX_CONTEXT_ITEMS, seed: int = 0
) -> list[T]:
    """At most `max_context` of items, chosen as PROTOCOL.md's evaluation context is (the same
    fixed-seed sample as `pluralfed.episodes.evaluation_context`, whatever the item type)."""
    return cast(list[T], evaluation_context(cast(Sequence[EmbeddedItem], items), max_context, seed))


def check_item(item: SurveyItem, where: str) -> SurveyItem:
    """A context item with a valid, renormalised distribution, or an InputError naming `where`."""
    check_question(item.question, f"{where}.question")
    options = tuple(check_answers(item.options, f"{where}.options"))
    try:
        dist = np.asarray(item.distribution, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}.distribution: not numbers ({err})") from None
    if dist.ndim != 1 or dist.shape[0] != len(options):
        raise InputError(
            f"{where}.distribution: {counted(dist.size, 'value')} for "
            f"{counted(len(options), 'option')}, need one each"
        )
    if not np.isfinite(dist).all():
        raise InputError(f"{where}.distribution: not finite ({dist.tolist()})")
    if (dist < 0).any():
        raise InputError(f"{where}.distribution: negative values ({dist.tolist()})")
    normalised = normalise_distribution(dist)  # values summing beyond float64 must not become 0s
    if normalised is None:
        raise InputError(f"{where}.distribution: all zero")
    return SurveyItem(item.question, options, normalised, item.question_id)


def check_question(question: Any, where: str) -> str:
    """A non-empty string, or an InputError naming `where`."""
    if not isinstance(question, str):
        raise InputError(f"{where}: not a string ({question!r:.60})")
    if is_blank(question):
        raise InputError(f"{where}: empty")
    return question


def check_answers(answers: Sequence[str], where: str) -> list[str]:
    """1+ distinct non-empty strings (compared exactly)."""
    if isinstance(answers, str):
        raise InputError(f"{where}: a list of answers is needed, not a single string")
    if not isinstance(answers, Iterable):
        raise InputError(f"{where}: a list of answers is needed, got {type(answers).__name__}")
    out = list(answers)
    if not out:
        raise InputError(f"{where}: no answers")
    seen: dict[str, int] = {}
    for i, a in enumerate(out):
        if not isinstance(a, str):
            raise InputError(f"{where}[{i}]: not a string ({a!r})")
        if is_blank(a):
            raise InputError(f"{where}[{i}]: empty")
        if a in seen:
            raise InputError(f"{where}[{i}]: duplicate of {where}[{seen[a]}] ({a!r})")
        seen[a] = i
    return out


# ------------------------------------------------------------------------------------------------
# the reward model


def estimated_tokens(texts: Iterable[str]) -> int:
    """About how many tokens the encoder reads for texts (4 characters a token, at most
    MAX_EMBED_TOKENS a text): embedding time follows length, and a count of texts let a call of
    long texts take several times the service's per-call limit (reward service review)."""
    return sum(min(len(t) // 4 + 2, MAX_EMBED_TOKENS) for t in texts)


def _chunks(texts: Sequence[tuple[bytes, str]]) -> Iterator[Sequence[tuple[bytes, str]]]:
    """Consecutive runs of at most EMBED_CHUNK texts and (past the first) EMBED_CHUNK_TOKENS."""
    start, tokens = 0, 0
    for i, (_, text) in enumerate(texts):
        size = estimated_tokens([text])
        if i > start and (i - start == EMBED_CHUNK or tokens + size > EMBED_CHUNK_TOKENS):
            yield texts[start:i]
            start, tokens = i, 0
        tokens += size
    if start < len(texts):
        yield texts[start:]


class WorkStopped(Exception):
    """Embedding stopped between batches: the caller's `should_stop` gave this reason."""


def text_key(text: str) -> bytes:
    """The in-memory embedding cache's key for `text`: a digest, so a kept text costs 16 bytes
    however long it is (lone surrogates, which the Python API lets through, hash as they are)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class WorkLock:
    """A re-entrant lock that counts, per thread, the seconds the thread held it (outermost
    acquisitions only)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()

    def __enter__(self) -> None:
        self._lock.acquire()
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._local.since = time.perf_counter()
        self._local.depth = depth + 1

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            held = time.perf_counter() - self._local.since
            self._local.held = getattr(self._local, "held", 0.0) + held
        self._lock.release()

    def held_seconds(self) -> float:
        """Including the hold in progress, so a call can tell how long it has worked so far."""
        held = float(getattr(self._local, "held", 0.0))
        if getattr(self._local, "depth", 0):
            held += time.perf_counter() - self._local.since
        return held


class RewardModel:
    """A GPO checkpoint as a reward model. Thread-safe: concurrent calls take turns."""

    def __init__(
        self,
        model: GPO,
        encoder: TextEncoder,
        *,
        encoder_identity: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_context: int = MAX_CONTEXT_ITEMS,
        context_seed: int = 0,
        embed_memory: int = DEFAULT_EMBED_MEMORY,
    ) -> None:
        """`encoder_identity`: the checkpoint's; when given, it must be the encoder's."""
        if encoder_identity is not None and encoder.identity != encoder_identity:
            raise InputError(
                f"the checkpoint was trained with encoder {encoder_identity!r}, but the given "
                f"encoder is {encoder.identity!r}: its vectors would mean nothing to the model"
            )
        if model.cfg.embed_dim != encoder.dim:
            raise InputError(
                f"the model reads {model.cfg.embed_dim}-dim embeddings, the encoder makes "
                f"{encoder.dim}-dim ones"
            )
        if not 1 <= max_context <= MAX_CONTEXT_ITEMS:
            raise InputError(f"max_context must be 1..{MAX_CONTEXT_ITEMS}, got {max_context}")
        if isinstance(embed_memory, bool) or not isinstance(embed_memory, int) or embed_memory < 0:
            raise InputError(f"embed_memory must be a whole number >= 0, got {embed_memory!r}")
        model.eval()
        self.model = model
        self.encoder = encoder
        self.metadata = dict(metadata or {})
        self.max_context = max_context
        self.context_seed = context_seed
        self._groups: dict[str, GroupContext] = {}
        self._memory: OrderedDict[bytes, np.ndarray] = OrderedDict()  # text_key(text) -> vector
        self._memory_size = embed_memory
        self._lock = WorkLock()  # the encoder and the model: held for the length of their work
        # the embedding memory and the group table: held only to look up or store, so that the
        # service's cheap checks (what a call costs, whether its group exists) never wait for
        # the model, and a call it must refuse is refused at once (reward service review)
        self._table_lock = threading.Lock()

    def work_seconds(self) -> float:
        """Seconds this thread has held the model so far: a call's own work, without the time it
        queued behind other calls (what the server's cost estimate must learn from)."""
        return self._lock.held_seconds()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        encoder: TextEncoder | None = None,
        cache_dir: str | Path | None = None,
        memory: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> RewardModel:
        """Load a checkpoint folder (model.safetensors + model.json).

        `memory`: context-memory settings that replace the checkpoint's (GPOConfig fields
        memory_weight, memory_shrinkage, memory_temperature; pluralfed/model.py): with a weight
        > 0 a group's own answers to same-option questions shape its scores.

        `encoder`: the text encoder the checkpoint was trained with (its identity is checked);
        default: the packaged all-MiniLM-L6-v2, wrapped in the on-disk embedding cache at
        `cache_dir` (default `default_cache_dir()`). A given encoder is used as it is.
        """
        ckpt = load_checkpoint(Path(path))
        if memory:
            try:
                ckpt.model.cfg = GPOConfig.from_dict({**ckpt.model.cfg.to_dict(), **memory})
            except (TypeError, ValueError) as err:
                raise InputError(f"context memory settings: {err}") from err
        if encoder is None:
            encoder = CachedEncoder(
                make_encoder(None, show_progress=False),
                Path(cache_dir) if cache_dir is not None else default_cache_dir(),
            )
            if encoder.identity != ckpt.encoder:
                raise InputError(
                    f"{path}: trained with encoder {ckpt.encoder!r}, not the default "
                    f"{encoder.identity!r}: pass encoder= (e.g. make_encoder(NAME_OR_PATH))"
                )
        return cls(
            ckpt.model,
            encoder,
            encoder_identity=ckpt.encoder,
            metadata=ckpt.metadata,
            **kwargs,
        )

    @property
    def encoder_identity(self) -> str:
        return self.encoder.identity

    # -- embeddings ------------------------------------------------------------------------------

    def embed_texts(
        self,
        texts: Sequence[str],
        *,
        disk_cache: bool = True,
        remember: bool = True,
        should_stop: Callable[[], str | None] | None = None,
    ) -> np.ndarray:
        """Vectors for texts, (n, dim) float32; recent ones are kept in memory.

        `disk_cache=False` bypasses a CachedEncoder's disk cache (for texts from outside, such as
        policy completions or a service's requests, which would only grow it without bound);
        `remember=False` keeps them out of memory too (one-off texts of any length).
        `should_stop` is asked before each batch of new texts (`_chunks`): a reason stops the
        work with WorkStopped (the batches done stay in memory), so a service's call stops
        soon after its deadline or its time limit instead of embedding on for minutes."""
        if not remember:
            encoder = self.encoder
            if not disk_cache and isinstance(encoder, CachedEncoder):
                encoder = encoder.inner
            if not texts:
                return np.zeros((0, self.encoder.dim), dtype=np.float32)
            with self._lock:
                return np.asarray(encoder.encode(list(texts)), dtype=np.float32)
        keys = [text_key(t) for t in texts]
        with self._lock:
            with self._table_lock:
                missing = dict.fromkeys(
                    (k, t) for k, t in zip(keys, texts, strict=True) if k not in self._memory
                )
            encoder = self.encoder
            if not disk_cache and isinstance(encoder, CachedEncoder):
                encoder = encoder.inner
            # longest first, as the packaged encoder batches them itself
            todo = sorted(missing, key=lambda kt: len(kt[1]), reverse=True)
            try:
                for chunk in _chunks(todo):
                    reason = should_stop() if should_stop is not None else None
                    if reason is not None:
                        raise WorkStopped(reason)
                    vectors = np.asarray(encoder.encode([t for _, t in chunk]), dtype=np.float32)
                    with self._table_lock:
                        for (k, _), v in zip(chunk, vectors, strict=True):
                            # a copy: a row kept as a view would keep its batch's array alive
                            self._memory[k] = v.copy()
                with self._table_lock:
                    out = np.stack([self._memory[k] for k in keys]) if texts else None
                    for k in keys:
                        self._memory.move_to_end(k)
            finally:
                with self._table_lock:
                    while len(self._memory) > self._memory_size:
                        self._memory.popitem(last=False)
        if out is None:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        return out

    def warm_up(self) -> None:
        """Load the text encoder and run it once (it loads on first use otherwise), so that a
        service's first call costs what later ones do; nothing is cached."""
        self.embed_texts(["warm-up"], disk_cache=False, remember=False)

    def uncached(self, texts: Iterable[str]) -> int:
        """How many of texts are not in memory."""
        return len(self.uncached_texts(texts))

    def uncached_texts(self, texts: Iterable[str]) -> list[str]:
        """The distinct texts not in memory (for how long embedding them will take)."""
        with self._table_lock:
            return [t for t in dict.fromkeys(texts) if text_key(t) not in self._memory]

    def _embed_items(
        self, items: Sequence[SurveyItem], disk_cache: bool = True
    ) -> list[EmbeddedItem]:
        texts = [option_text(it.question, o) for it in items for o in it.options]
        vectors = self.embed_texts(texts, disk_cache=disk_cache)
        out, start = [], 0
        for it in items:
            out.append(EmbeddedItem(it, vectors[start : start + len(it.options)]))
            start += len(it.options)
        return out

    # -- groups ----------------------------------------------------------------------------------

    def context(
        self, items: Sequence[SurveyItem], name: str | None = None, *, disk_cache: bool = True
    ) -> GroupContext:
        """Validate and embed a group's known answers. More than `max_context` items are cut to
        `max_context` by PROTOCOL.md's fixed-seed sample."""
        where = f"group {name!r}" if name else "group context"
        if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
            raise InputError(
                f"{where}: a list of SurveyItems is needed, got {type(items).__name__}"
            )
        checked = []
        for i, it in enumerate(items):
            if not isinstance(it, SurveyItem):
                raise InputError(f"{where} items[{i}]: not a SurveyItem ({type(it).__name__})")
            checked.append(check_item(it, f"{where} items[{i}]"))
        if not checked:
            raise InputError(f"{where}: no context items; the model needs at least one")
        chosen = protocol_context(checked, self.max_context, self.context_seed)
        return GroupContext(name=name, items=tuple(self._embed_items(chosen, disk_cache)))

    def add_group(self, name: str, items: Sequence[SurveyItem] | GroupContext) -> GroupContext:
        """Hold a named group context (replacing one of the same name)."""
        if not isinstance(name, str) or is_blank(name):
            raise InputError(f"group name must be a non-empty string, got {name!r}")
        ctx = (
            GroupContext(name, items.items)
            if isinstance(items, GroupContext)
            else self.context(items, name)
        )
        with self._table_lock:
            self._groups[name] = ctx
        return ctx

    def add_groups_from_data(
        self, data: SurveyData | str | Path, names: Iterable[str] | None = None
    ) -> dict[str, GroupContext]:
        """Hold each named group (default: all) of a survey file with its TRAIN questions
        (PROTOCOL.md split) as context. Groups without TRAIN questions are skipped."""
        survey = data if isinstance(data, SurveyData) else load_survey(data)
        if isinstance(names, str):  # list("France") would ask for groups "F", "r", ...
            raise InputError(f"names: a list of group names is needed, not the string {names!r}")
        wanted = list(names) if names is not None else list(survey.groups)
        unknown = [g for g in wanted if g not in survey.groups]
        if unknown:
            raise InputError(f"{survey.source or 'data'}: no group(s) {unknown}")
        added = {}
        for g in wanted:
            train = [it for it in survey.groups[g] if not is_test_question(it.question)]
            if train:
                added[g] = self.add_group(g, train)
        return added

    @property
    def groups(self) -> dict[str, GroupContext]:
        """The named groups held, name -> context (a copy)."""
        with self._table_lock:
            return dict(self._groups)

    def group(self, name: str) -> GroupContext:
        with self._table_lock:
            found = self._groups.get(name)
        if found is None:
            held = sorted(self.groups)
            raise KeyError(
                f"no group {name!r}; held: {held[:20]}{' ...' if len(held) > 20 else ''}"
            )
        return found

    def resolve(self, group: str | GroupContext | Sequence[SurveyItem]) -> GroupContext:
        """A held group's name, a GroupContext, or items to embed as an anonymous context."""
        if isinstance(group, str):
            return self.group(group)
        if isinstance(group, GroupContext):
            return group
        return self.context(group)

    # -- scoring ---------------------------------------------------------------------------------

    def score_batch(
        self,
        group: str | GroupContext | Sequence[SurveyItem],
        questions: Sequence[tuple[str, Sequence[str]]],
        *,
        disk_cache: bool = True,
    ) -> list[np.ndarray]:
        """The group's predicted distribution over each question's answers, in one model pass.

        Targets never see each other, so batching does not change any prediction."""
        ctx = self.resolve(group)
        if not questions:
            return []
        targets = []
        for i, pair in enumerate(questions):
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise InputError(f"questions[{i}]: a (question, answers) pair is needed")
            question = check_question(pair[0], f"questions[{i}].question")
            answers = check_answers(pair[1], f"questions[{i}].answers")
            # the distribution of a target is never read by the model
            targets.append(
                SurveyItem(question, tuple(answers), np.full(len(answers), 1.0 / len(answers)))
            )
        embedded = self._embed_items(targets, disk_cache)
        with self._lock:
            preds = predict_targets(self.model, list(ctx.items), embedded)
        return [np.asarray(p, dtype=np.float64) / float(np.sum(p)) for p in preds]

    def score(
        self,
        group: str | GroupContext | Sequence[SurveyItem],
        question: str,
        answers: Sequence[str],
    ) -> np.ndarray:
        """Probabilities over `answers` (the options of `question`) for the group; sums to 1."""
        return self.score_batch(group, [(question, answers)])[0]

    def rewards(
        self,
        group: str | GroupContext | Sequence[SurveyItem],
        question: str,
        answers: Sequence[str],
        kind: RewardKind = "logprob",
    ) -> np.ndarray:
        """One reward per answer (see the module docstring for the kinds)."""
        return to_rewards(self.score(group, question, answers), kind)


def to_rewards(probs: np.ndarray, kind: RewardKind = "logprob") -> np.ndarray:
    """Probabilities -> rewards: ln(max(p, PROB_FLOOR)) for "logprob", p for "prob"."""
    p = np.asarray(probs, dtype=np.float64)
    if kind == "logprob":
        return np.log(np.maximum(p, PROB_FLOOR))
    if kind == "prob":
        return p
    raise InputError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")


def unmatched_reward(kind: RewardKind) -> float:
    """The reward of a completion that maps to no option: the lowest reward there is."""
    return LOG_FLOOR if kind == "logprob" else 0.0


# ------------------------------------------------------------------------------------------------
# free-text completions -> options

MatchRule = Literal["exact", "choice", "label_conflict", "contains", "similar", "none"]


@dataclass(frozen=True)
class OptionMatch:
    """Which option a completion picks (None: none) and by which rule."""

    index: int | None
    rule: MatchRule


_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def _norm(text: str) -> str:
    """Case-folded, whitespace runs collapsed, typographic quotes made plain."""
    return " ".join(text.casefold().translate(_QUOTES).split())


_CHOICE = re.compile(
    r"""^(?:(?:the\s+|my\s+)?(?P<prefix>answer|option|choice)\b\s*(?:is\b\s*)?[:\-]?\s*)?
        (?:
            [(\[]\s*(?P<b>[a-z]|\d{1,2})\s*[)\]]        # (b)  [B]  (2)
          | (?P<d>[a-z]|\d{1,2})\s*[).:](?=\s|$)        # b)  B.  2:  (not "e.g.", "2.5")
          | (?P<w>[a-z]|\d{1,2})(?=\s|$)               # B  2  (see _choice_index)
        )""",
    re.VERBOSE,
)


def _choice_index(norm: str, options: Sequence[str]) -> tuple[int, str] | None:
    """(option index, the text after the label) for a completion starting with a choice label."""
    m = _CHOICE.match(norm)
    if m is None:
        return None
    label = m.group("b") or m.group("d")
    rest = norm[m.end() :].lstrip(" .:)-")
    if label is None:
        # a bare label counts only when it is the whole completion or follows "Answer"/"Option"
        # ("A lot of ...", "I think ..." are not choices)
        label = m.group("w")
        if m.group("prefix") is None and rest.strip(" .!"):
            return None
    if label.isdigit():
        for i, opt in enumerate(options):  # a number that is an option's own text names it
            if _norm(opt) == label:
                return i, rest
        index = int(label) - 1
    else:
        index = ord(label) - ord("a")
    return (index, rest) if 0 <= index < len(options) else None


def _leading_option(text: str, options: Sequence[str]) -> int | None:
    """The longest option whose text `text` starts with, as whole words."""
    best: tuple[int, int] | None = None  # (-length, index)
    for i, opt in enumerate(options):
        o = _norm(opt)
        if o and re.match(rf"{re.escape(o)}(?!\w)", text) and (best is None or -len(o) < best[0]):
            best = (-len(o), i)
    return None if best is None else best[1]


def _contains_index(norm: str, options: Sequence[str]) -> int | None:
    best: tuple[int, int, int] | None = None  # (-length, position, index)
    for i, opt in enumerate(options):
        o = _norm(opt)
        if not o:
            continue
        m = re.search(rf"(?<!\w){re.escape(o)}(?!\w)", norm)
        if m is not None:
            key = (-len(o), m.start(), i)
            if best is None or key < best:
                best = key
    return None if best is None else best[2]


def map_completion(
    completion: str,
    options: Sequence[str],
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> OptionMatch:
    """The option a free-text completion picks (rules in the module docstring).

    `embed` (texts -> vectors) is used for the last rule, cosine similarity; without it, a
    completion no earlier rule maps maps to none."""
    if not options:
        raise InputError("map_completion: no options")
    norm = _norm(completion)
    if not norm:
        return OptionMatch(None, "none")
    normed = [_norm(o) for o in options]
    if norm in normed:
        return OptionMatch(normed.index(norm), "exact")
    choice = _choice_index(norm, options)
    if choice is not None:
        label, rest = choice
        stated = _leading_option(rest, options)
        if stated is not None and stated != label:
            return OptionMatch(stated, "label_conflict")
        return OptionMatch(label, "choice")
    contained = _contains_index(norm, options)
    if contained is not None:
        return OptionMatch(contained, "contains")
    if embed is None:
        return OptionMatch(None, "none")
    # a bounded prefix, lone surrogates replaced: the tokenizer refuses them (a TypeError)
    text = completion.strip()[:MAX_EMBED_COMPLETION_CHARS]
    text = text.encode("utf-8", "replace").decode("utf-8")
    vectors = np.asarray(embed([text, *options]), dtype=np.float64)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = unit[1:] @ unit[0]
    return OptionMatch(int(np.argmax(sims)), "similar")


# ------------------------------------------------------------------------------------------------
# TRL-style reward function


def _text_of(value: Any, role: str, where: str = "value") -> str:
    """A plain string, or the content of the last `role` message of a conversation (TRL's
    conversational format: a list of {"role", "content"} dicts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        for message in reversed(value):
            if isinstance(message, Mapping) and message.get("role") == role:
                return str(message.get("content", ""))
        if value and isinstance(value[-1], Mapping):
            return str(value[-1].get("content", ""))
    raise InputError(
        f"{where}: expected a string or a list of chat messages, got {type(value).__name__}"
    )


class GroupRewardFunction:
    """``(prompts, completions, **kwargs) -> list[float]``: the reward of each completion is the
    group's predicted (log-)probability of the option it picks (see `map_completion`).

    The question and options of a prompt come from `question_options[prompt]` (a conversational
    prompt is keyed by its last user message), else from the per-sample ``question`` and
    ``options`` columns TRL passes as keyword arguments. Mapping and scoring are batched: every
    distinct question is scored once per call.
    """

    def __init__(
        self,
        model: RewardModel,
        group: str | GroupContext | Sequence[SurveyItem],
        question_options: Mapping[str, tuple[str, Sequence[str]]] | None = None,
        *,
        kind: RewardKind = "logprob",
    ) -> None:
        to_rewards(np.ones(1), kind)  # validates kind
        self.model = model
        self.context = model.resolve(group)
        self.question_options = {
            key: (
                check_question(q, f"question_options[{key!r:.60}] question"),
                check_answers(o, f"question_options[{key!r:.60}] options"),
            )
            for key, (q, o) in dict(question_options or {}).items()
        }
        self.kind = kind
        self.__name__ = f"group_reward_{self.context.name or 'inline'}"  # TRL logs it
        self.last_matches: list[OptionMatch] = []

    def _question_for(
        self, i: int, prompt: Any, kwargs: Mapping[str, Any]
    ) -> tuple[str, list[str]]:
        key = _text_of(prompt, "user", f"prompts[{i}]")
        found = self.question_options.get(key)
        if found is not None:
            return found[0], list(found[1])
        questions, options = kwargs.get("question"), kwargs.get("options")
        if questions is not None and options is not None:
            # columns from a dataset: checked here, before mapping, so that a bad row is named
            # (a string of options would otherwise be split into letters)
            for column, values in (("question", questions), ("options", options)):
                if isinstance(values, str) or not isinstance(values, Sequence) or i >= len(values):
                    raise InputError(f"{column} column: no row {i} (one per prompt is needed)")
            return (
                check_question(questions[i], f"question column, row {i}"),
                check_answers(options[i], f"options column, row {i}"),
            )
        raise KeyError(
            f"prompt {i} ({key[:60]!r}) is not in question_options and no question/options "
            "columns were passed"
        )

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        asked = [self._question_for(i, p, kwargs) for i, p in enumerate(prompts)]

        def embed(texts: Sequence[str]) -> np.ndarray:
            # the completion is one-off: kept neither on disk nor in memory (nor are its bytes)
            completion = self.model.embed_texts(texts[:1], disk_cache=False, remember=False)
            return np.concatenate([completion, self.model.embed_texts(texts[1:], disk_cache=False)])

        matches = [
            map_completion(_text_of(c, "assistant", f"completions[{i}]"), options, embed)
            for i, (c, (_, options)) in enumerate(zip(completions, asked, strict=True))
        ]
        distinct = list(dict.fromkeys((q, tuple(o)) for q, o in asked))
        probs = dict(zip(distinct, self.model.score_batch(self.context, distinct), strict=True))
        self.last_matches = matches
        out = []
        for (q, options), m in zip(asked, matches, strict=True):
            if m.index is None:
                out.append(unmatched_reward(self.kind))
            else:
                out.append(float(to_rewards(probs[(q, tuple(options))], self.kind)[m.index]))
        return out


def make_reward_fn(
    model: RewardModel,
    group: str | GroupContext | Sequence[SurveyItem],
    question_options: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    *,
    kind: RewardKind = "logprob",
) -> GroupRewardFunction:
    """A TRL-style reward function for one group: see `GroupRewardFunction`."""
    return GroupRewardFunction(model, group, question_options, kind=kind)
