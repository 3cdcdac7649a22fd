"""The GPO preference predictor (Group Preference Optimization), in one readable file.

An *episode* is one group's few-shot task: some context questions whose answer distributions are
known, and some target questions to predict. Every answer option of every question is one token:
its text embedding concatenated with the group's probability for that option (0 for targets).
An input MLP lifts tokens to d_model; a transformer encoder without positional encoding (a set,
not a sequence) lets every token attend to the context tokens only, so a target's prediction
depends on the context and never on the other targets. A head gives a mean and a log-std per
option; the predicted distribution of a question is the softmax of its options' means.

Tokens are packed: an episode is the flat list of all options of all its questions (no padding
per question, so a question with 18 options does not widen the others), episodes padded to the
longest. Shapes: B episodes, T tokens, E embedding dims; `segment` numbers each token's question
across the batch so the softmax runs within questions.

Context memory (optional, `memory_weight` > 0; no trained parameters). The transformer learns a
question-level average: trained on questions it sees again and again, it memorises them and learns
to ignore the context (context gain ~0; bench/copy_probe.py). So a prediction is also mixed with
what the group itself answered: for a target question, its context questions with the very same
options (matched by text, in any order), weighted by softmax(cosine of question embeddings / temperature), give a memory
distribution; the mix weight grows with how many such questions the context has,
weight * n / (n + shrinkage), so a group with little matching context keeps the transformer's
prediction (the idea of kNN-LM, Khandelwal et al. 2020, with the group's context as datastore).
Only `predict` uses it; training and the loss see the transformer alone.

Ensemble (optional, `members` > 1). Trained again from another random start, the network predicts
noticeably differently for questions it has not seen; averaging the distributions of a few
independently initialised copies (each trained on its own loss, all on the same episodes; FedAvg
averages each copy's own weights) removes much of that variance (README, "Results").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pluralfed.config import check_finite_number, check_whole_number
from pluralfed.errors import InputError

MAX_MEMBERS = 16
# Size limits of GPOConfig, generous for real use (the default network is ~0.7M parameters per
# member) yet far below what would exhaust memory: a config alone, read from a file or a message,
# must not be able to make a node or the coordinator allocate terabytes.
MAX_EMBED_DIM = 16_384
MAX_D_MODEL = 8_192
MAX_D_FF = 32_768
MAX_LAYERS = 64
MAX_PARAMETERS = 1_000_000_000  # all members together: 4 GB of float32 per copy of the weights
# cosine similarities / temperature must stay finite in float32 for the memory softmax
MIN_MEMORY_TEMPERATURE = 1e-6
# The product's default ensemble size (coordinator config, `pluralfed train`): on PROTOCOL.md's
# held-out groups it beat the single network on alignment, worst group and FI over 3 seeds
# (README, "Results"). GPOConfig's own default stays 1, the paper's network, so that configs
# written before `members` existed still describe their weights.
DEFAULT_MEMBERS = 3


@dataclass(frozen=True)
class GPOConfig:
    embed_dim: int = 384  # follows the text encoder
    d_model: int = 128
    mlp_layers: int = 4
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.0
    # independently initialised copies of the network whose predictions are averaged (a deep
    # ensemble, Lakshminarayanan et al. 2017); each trains on its own loss. 1 = the paper's model
    members: int = 1
    min_log_std: float = -7.0  # keeps the Gaussian NLL finite when a prediction is very sure
    # context memory at prediction time (see the module docstring); 0 = the paper's model alone
    memory_weight: float = 0.0
    memory_shrinkage: float = 1.0
    memory_temperature: float = 0.1

    def __post_init__(self) -> None:
        """Refuse a config that cannot describe a working network, whatever its source (the
        coordinator's settings, a checkpoint's model.json, a Join reply, command-line flags):
        torch would fail late with an unhelpful error, build a degenerate model silently, or
        allocate whatever a huge width asks for; a NaN memory setting makes predictions NaN."""
        for name, low, high in _INT_LIMITS:
            check_whole_number(name, getattr(self, name), low, high, what=None)
        if self.d_model % self.n_heads:
            raise InputError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        for name in _FLOAT_FIELDS:
            check_finite_number(name, getattr(self, name), what=None)
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.memory_weight <= 1.0:
            raise InputError(f"memory_weight must be in [0, 1], got {self.memory_weight}")
        if self.memory_shrinkage < 0.0:
            raise InputError(f"memory_shrinkage must be >= 0, got {self.memory_shrinkage}")
        if self.memory_temperature < MIN_MEMORY_TEMPERATURE:
            raise InputError(
                f"memory_temperature must be > 0 (at least {MIN_MEMORY_TEMPERATURE:g}), got "
                f"{self.memory_temperature}"
            )
        if self.num_parameters() > MAX_PARAMETERS:
            raise InputError(
                f"the model would have {self.num_parameters():,} parameters, more than "
                f"{MAX_PARAMETERS:,}: lower d_model, d_ff, n_layers, mlp_layers or members"
            )

    def num_parameters(self) -> int:
        """Parameters of GPO(self), computed without building it (the size cap is checked
        before any allocation)."""
        d, f = self.d_model, self.d_ff
        input_mlp = (self.embed_dim + 1) * d + d + (self.mlp_layers - 1) * (d * d + d)
        # qkv + proj + two LayerNorms + feed-forward
        block = (3 * d * d + 3 * d) + (d * d + d) + 4 * d + (d * f + f) + (f * d + d)
        head = 2 * d + 2
        return self.members * (input_mlp + self.n_layers * block + head)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPOConfig:
        """The config a JSON object describes (InputError if it is not one, or names unknown
        fields, or a value is refused)."""
        if not isinstance(raw, dict):
            raise InputError(f"model config must be a JSON object, got {type(raw).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise InputError(f"unknown GPO config fields: {sorted(unknown)}")
        return cls(**raw)


# (field, lowest, highest) of GPOConfig's whole-number fields
_INT_LIMITS = (
    ("embed_dim", 1, MAX_EMBED_DIM),
    ("d_model", 1, MAX_D_MODEL),
    ("mlp_layers", 1, MAX_LAYERS),
    ("n_layers", 1, MAX_LAYERS),
    ("n_heads", 1, MAX_D_MODEL),
    ("d_ff", 1, MAX_D_FF),
    ("members", 1, MAX_MEMBERS),
)
_FLOAT_FIELDS = (
    "dropout",
    "min_log_std",
    "memory_weight",
    "memory_shrinkage",
    "memory_temperature",
)


@dataclass
class EpisodeBatch:
    """A padded batch of packed episodes; built by pluralfed.episodes, consumed by GPO."""

    embeddings: torch.Tensor  # (B, T, E) float32
    probs: torch.Tensor  # (B, T) the group's probability of each option (0 at padding)
    token_mask: torch.Tensor  # (B, T) bool: a real option token
    is_context: torch.Tensor  # (B, T) bool: an option of a context question (probs shown)
    is_target: torch.Tensor  # (B, T) bool: an option of a target question (predicted, scored)
    segment: torch.Tensor  # (B, T) long: the token's question across the batch; padding -> last
    num_segments: int  # questions in the batch + 1 (the padding segment)
    question_slices: list[list[tuple[int, int]]]  # per episode: token range of each question
    # per episode and question: its option texts, in token order (the context memory matches them)
    question_options: list[list[tuple[str, ...]]]


class SelfAttention(nn.Module):
    """Multi-head attention where each query sees only the keys allowed by a (B, T) key mask."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_allowed: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        mask = key_allowed[:, None, None, :]  # (B, 1, 1, T): True = may attend
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Post-norm encoder layer, as torch.nn.TransformerEncoderLayer (ReLU feed-forward)."""

    def __init__(self, cfg: GPOConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_ff, cfg.d_model),
        )
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_allowed: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, key_allowed)))
        return self.norm2(x + self.drop(self.ff(x)))


class Member(nn.Module):
    """The paper's network: input MLP, encoder blocks, and a (mean, log-std) head per option."""

    def __init__(self, cfg: GPOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.embed_dim + 1  # embedding ++ probability
        for _ in range(cfg.mlp_layers - 1):
            layers += [nn.Linear(width, cfg.d_model), nn.ReLU()]
            width = cfg.d_model
        layers.append(nn.Linear(width, cfg.d_model))
        self.input_mlp = nn.Sequential(*layers)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, 2)  # mean, log-std

    def forward(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-option (mean, log_std), each (B, T). Target probabilities are never read."""
        shown = batch.probs * batch.is_context  # targets' probabilities are hidden
        tokens = torch.cat([batch.embeddings, shown[..., None]], dim=-1)
        key_allowed = batch.token_mask & batch.is_context
        x = self.input_mlp(tokens)
        for block in self.blocks:
            x = block(x, key_allowed)
        mean, log_std = self.head(x).unbind(-1)
        return mean, log_std.clamp(min=self.cfg.min_log_std)


class GPO(nn.Module):
    """`cfg.members` independently initialised copies of the network (1 = the paper's model)."""

    def __init__(self, cfg: GPOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(Member(cfg) for _ in range(cfg.members))

    def forward(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's per-option (mean, log_std), each (members, B, T)."""
        outputs = [member(batch) for member in self.members]
        return (
            torch.stack([mean for mean, _ in outputs]),
            torch.stack([log_std for _, log_std in outputs]),
        )

    def predict(self, batch: EpisodeBatch) -> torch.Tensor:
        """Predicted probability of every option within its question, (B, T); 0 at padding.
        The members' distributions are averaged (a deep ensemble)."""
        means, _ = self(batch)
        pred = torch.stack([question_softmax(mean, batch) for mean in means]).mean(0)
        if self.cfg.memory_weight > 0:
            memory, matches = context_memory(batch, self.cfg.memory_temperature)
            # no match: no mix (clamped so that shrinkage 0 does not make it 0/0)
            mix = (
                self.cfg.memory_weight
                * matches
                / (matches + self.cfg.memory_shrinkage).clamp(min=1e-12)
            )
            pred = (1 - mix) * pred + mix * memory
        return pred

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def upgrade_state_dict(tensors: dict[str, Any]) -> dict[str, Any]:
    """Weights saved before `members` existed (one network, its tensors at the top level) are
    member 0 of a one-member GPO."""
    if any(name.startswith("members.") for name in tensors):
        return tensors
    return {f"members.0.{name}": value for name, value in tensors.items()}


def question_softmax(logits: torch.Tensor, batch: EpisodeBatch) -> torch.Tensor:
    """Softmax of `logits` (B, T) within each question (segment); 0 at padding tokens."""
    flat = logits.reshape(-1)
    seg = batch.segment.reshape(-1)
    n = batch.num_segments
    top = torch.full((n,), float("-inf"), dtype=flat.dtype).scatter_reduce(
        0, seg, flat.detach(), reduce="amax", include_self=True
    )
    ex = torch.exp(flat - top[seg])
    total = torch.zeros(n, dtype=flat.dtype).scatter_add(0, seg, ex)
    return (ex / total[seg]).view_as(logits) * batch.token_mask


def context_memory(batch: EpisodeBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For every target option: the similarity-weighted mean of the group's probability for the
    same option text in context questions with the same set of options (in any order), and how
    many such questions there are; both (B, T), 0 where a question has no match (and at context
    and padding tokens)."""
    memory = torch.zeros_like(batch.probs)
    matches = torch.zeros_like(batch.probs)
    for b, (slices, options) in enumerate(
        zip(batch.question_slices, batch.question_options, strict=True)
    ):
        by_options: dict[frozenset[str], list[int]] = {}
        for q, (start, _) in enumerate(slices):
            if batch.is_context[b, start] and len(set(options[q])) == len(options[q]):
                by_options.setdefault(frozenset(options[q]), []).append(q)
        vectors = F.normalize(
            torch.stack([batch.embeddings[b, start:end].mean(0) for start, end in slices]), dim=-1
        )
        for q, (start, end) in enumerate(slices):
            same = by_options.get(frozenset(options[q]), [])
            if not batch.is_target[b, start] or not same or len(set(options[q])) != end - start:
                continue
            weights = torch.softmax(vectors[same] @ vectors[q] / temperature, dim=0)
            answers = torch.stack(
                [
                    batch.probs[b, [slices[c][0] + options[c].index(o) for o in options[q]]]
                    for c in same
                ]
            )
            memory[b, start:end] = weights @ answers
            matches[b, start:end] = len(same)
    return memory, matches


def gpo_loss(mean: torch.Tensor, log_std: torch.Tensor, batch: EpisodeBatch) -> torch.Tensor:
    """Gaussian NLL of the true probabilities under N(softmax(mean within question), exp(log_std)),
    averaged over the options of target questions. With a leading members dimension (GPO's
    output), the members' losses are summed: each member trains as if alone (a deep ensemble),
    never on the ensemble's average."""
    if mean.dim() == 3:
        if mean.shape != log_std.shape:
            raise ValueError(f"mean {list(mean.shape)} and log_std {list(log_std.shape)} differ")
        return torch.stack(
            [gpo_loss(m, s, batch) for m, s in zip(mean, log_std, strict=True)]
        ).sum()
    pred = question_softmax(mean, batch)
    scored = batch.token_mask & batch.is_target
    nll = log_std + 0.5 * ((batch.probs - pred) / log_std.exp()) ** 2 + 0.5 * math.log(2 * math.pi)
    n = scored.sum()
    if n == 0:
        raise ValueError("the batch has no target options to score")
    return (nll * scored).sum() / n
