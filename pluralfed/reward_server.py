"""The reward model as a gRPC service (`pluralfed.v1.Reward`, protos/pluralfed/v1/reward.proto).

Security is the federation's: mutual TLS (`pluralfed.tls.TlsFiles`), and `pluralfed.auth`'s
`AuthInterceptor` maps each client certificate's identity to a name through an `AllowList`
(unknown identities: PERMISSION_DENIED; the health Check is exempt), and each client has at
most `max_calls_per_client` calls in flight.

Every field is validated before any work, and the first bad one is named in an INVALID_ARGUMENT
message. Calls are deadline-aware: the servicer estimates the work (tokens of the new texts to
embed, tokens for the model, from running averages of what earlier calls took) and refuses with
DEADLINE_EXCEEDED at once when the time left cannot cover it, and again between the embedding and
model steps; a call whose deadline passed while it queued is dropped the same way. Embedding
stops between encoder batches once the call is cancelled, its deadline has passed or it has held
the model longer than `max_call_s`, and every call, finished or not, teaches the estimate.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pluralfed.auth import MAX_EXEMPT_CALLS, AllowList, AuthInterceptor, RevocationWatch
from pluralfed.data import SurveyItem, is_blank, normalise_distribution
from pluralfed.embeddings import option_text
from pluralfed.errors import InputError, counted
from pluralfed.proto.pluralfed.v1 import reward_pb2 as pb
from pluralfed.proto.pluralfed.v1 import reward_pb2_grpc as pb_grpc
from pluralfed.reward import (
    DEFAULT_MAX_CALL_S,
    DEFAULT_MAX_WORKERS,
    MAX_CONTEXT_ITEMS,
    GroupContext,
    RewardKind,
    RewardModel,
    WorkStopped,
    estimated_tokens,
    to_rewards,
)
from pluralfed.tls import TlsFiles
from pluralfed.transport import EXCLUSIVE_PORT, bind_port, grpc_options

log = logging.getLogger("pluralfed.reward")

SERVICE_NAME = "pluralfed.v1.Reward"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_questions: int = 64
    max_answers: int = 32
    max_text_chars: int = 4096
    max_context_items: int = MAX_CONTEXT_ITEMS
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def to_proto(self) -> pb.RewardLimits:
        return pb.RewardLimits(
            max_questions=self.max_questions,
            max_answers=self.max_answers,
            max_text_chars=self.max_text_chars,
            max_context_items=self.max_context_items,
            max_message_bytes=self.max_message_bytes,
        )


class BadRequest(Exception):
    """A field of a request is invalid: `field` says which."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field = field_path


def _check_text(value: str, where: str, limit: int) -> str:
    if len(value) > limit:
        raise BadRequest(where, f"{len(value)} characters, at most {limit} allowed")
    if is_blank(value):
        raise BadRequest(where, "empty")
    return value


def _check_list(values: Sequence[str], where: str, limits: Limits) -> list[str]:
    if not values:
        raise BadRequest(where, "empty; give at least one")
    if len(values) > limits.max_answers:
        raise BadRequest(where, f"{len(values)} entries, at most {limits.max_answers} allowed")
    seen: dict[str, int] = {}
    for i, v in enumerate(values):
        _check_text(v, f"{where}[{i}]", limits.max_text_chars)
        if v in seen:
            raise BadRequest(f"{where}[{i}]", f"duplicate of {where}[{seen[v]}] ({v[:60]!r})")
        seen[v] = i
    return list(values)


def parse_context(msg: pb.RewardGroupContext, limits: Limits) -> list[SurveyItem]:
    """Validated SurveyItems from an inline group; BadRequest names the first bad field."""
    where = "group_context.items"
    if not msg.items:
        raise BadRequest(where, "empty; an inline group needs at least one context item")
    if len(msg.items) > limits.max_context_items:
        raise BadRequest(
            where, f"{len(msg.items)} items, at most {limits.max_context_items} allowed"
        )
    out = []
    for i, it in enumerate(msg.items):
        w = f"{where}[{i}]"
        question = _check_text(it.question, f"{w}.question", limits.max_text_chars)
        options = _check_list(it.options, f"{w}.options", limits)
        dist = np.asarray(it.distribution, dtype=np.float64)
        if dist.size != len(options):
            raise BadRequest(
                f"{w}.distribution",
                f"{counted(dist.size, 'value')} for {counted(len(options), 'option')}, need one each",
            )
        if not np.isfinite(dist).all():
            raise BadRequest(f"{w}.distribution", "values must be finite")
        if (dist < 0).any():
            raise BadRequest(f"{w}.distribution", "values must not be negative")
        normalised = normalise_distribution(dist)  # robust to a sum beyond float64
        if normalised is None:
            raise BadRequest(f"{w}.distribution", "all zero; not a distribution")
        out.append(SurveyItem(question, tuple(options), normalised))
    return out


def parse_questions(
    msgs: Sequence[pb.RewardQuestion], limits: Limits
) -> list[tuple[str, list[str]]]:
    if not msgs:
        raise BadRequest("questions", "empty; give at least one question to score")
    if len(msgs) > limits.max_questions:
        raise BadRequest(
            "questions", f"{len(msgs)} questions, at most {limits.max_questions} allowed"
        )
    return [
        (
            _check_text(q.question, f"questions[{i}].question", limits.max_text_chars),
            _check_list(q.answers, f"questions[{i}].answers", limits),
        )
        for i, q in enumerate(msgs)
    ]


_KINDS: dict[int, RewardKind] = {
    pb.REWARD_KIND_UNSPECIFIED: "logprob",
    pb.REWARD_KIND_LOG_PROBABILITY: "logprob",
    pb.REWARD_KIND_PROBABILITY: "prob",
}
_KIND_CODES = {"logprob": pb.REWARD_KIND_LOG_PROBABILITY, "prob": pb.REWARD_KIND_PROBABILITY}


@dataclass
class CostModel:
    """Running averages of seconds per embedded token (`reward.estimated_tokens`) and per model
    token, to tell whether a call can finish before its deadline. Starts from cautious CPU
    figures and learns from every call."""

    per_embed_token: float = 4e-4  # 10 ms for a short option text of 25 tokens
    per_token: float = 5e-5
    overhead: float = 1e-3
    alpha: float = 0.2
    # one call's figure counts as at most this many times the current estimate (or the starting
    # figure, if larger; see __post_init__): a call that
    # paid a one-off cost (loading the encoder, a page-in) must not make the server refuse
    # ordinary calls as too slow for the next many calls (walkthrough review, session 17); a
    # server that really became slower still gets there, by up to 1 + alpha x (this - 1) a call
    max_step: float = 4.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # the bound is taken from the larger of the estimate and these starting figures, so
        # calls that cost nothing (texts another call just embedded) cannot drive the estimate
        # down to where real costs take many calls to be learnt again
        self._floor_embed, self._floor_token = self.per_embed_token, self.per_token

    def estimate(self, embed_tokens: int, tokens: int) -> float:
        return self.overhead + embed_tokens * self.per_embed_token + tokens * self.per_token

    def observe(self, embed_tokens: int, embed_s: float, tokens: int, model_s: float) -> None:
        with self.lock:
            if embed_tokens:
                cap = max(self.per_embed_token, self._floor_embed) * self.max_step
                sample = min(embed_s / embed_tokens, cap)
                self.per_embed_token += self.alpha * (sample - self.per_embed_token)
            if tokens:
                cap = max(self.per_token, self._floor_token) * self.max_step
                sample = min(model_s / tokens, cap)
                self.per_token += self.alpha * (sample - self.per_token)


@dataclass
class Stats:
    calls: int = 0
    refused_invalid: int = 0
    refused_not_found: int = 0
    refused_deadline: int = 0
    questions: int = 0
    answers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


class RewardServicer(pb_grpc.RewardServicer):
    def __init__(
        self,
        model: RewardModel,
        limits: Limits | None = None,
        max_call_s: float = DEFAULT_MAX_CALL_S,
    ) -> None:
        if not (math.isfinite(max_call_s) and max_call_s > 0):
            raise InputError(f"max_call_s must be a positive number of seconds, got {max_call_s}")
        self.model = model
        self.limits = limits or Limits()
        self.max_call_s = max_call_s
        self.cost = CostModel()
        self.stats = Stats()

    def _within_call_limit(self, context: grpc.ServicerContext, need_s: float) -> None:
        if need_s > self.max_call_s:
            self.stats.add(refused_deadline=1)
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the call needs about {need_s:.0f} s of the model, more than this server's "
                f"{self.max_call_s:g} s per call: send fewer questions, answers or context "
                "items per call",
            )

    def _deadline(self, context: grpc.ServicerContext, need_s: float, stage: str) -> None:
        remaining = context.time_remaining()
        if remaining is None:
            return
        if remaining <= 0 or remaining < need_s:
            self.stats.add(refused_deadline=1)
            _abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline too close {stage}: {max(remaining, 0) * 1000:.0f} ms left, the work "
                f"needs about {need_s * 1000:.0f} ms",
            )

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreReply:
        self.stats.add(calls=1)
        limits = self.limits
        try:
            kind = _KINDS.get(request.reward_kind)
            if kind is None:
                raise BadRequest("reward_kind", f"unknown value {request.reward_kind}")
            which = request.WhichOneof("group")
            inline: list[SurveyItem] | None = None
            if which == "group_name":
                _check_text(request.group_name, "group_name", limits.max_text_chars)
            elif which == "group_context":
                inline = parse_context(request.group_context, limits)
            else:
                raise BadRequest("group", "set group_name or group_context")
            questions = parse_questions(request.questions, limits)
        except BadRequest as err:
            self.stats.add(refused_invalid=1)
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))

        ctx: GroupContext | None = None
        if inline is None:
            try:
                ctx = self.model.group(request.group_name)
            except KeyError:
                self.stats.add(refused_not_found=1)
                held = sorted(self.model.groups)
                _abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"group_name: no group {request.group_name[:200]!r} on this server; it holds "
                    f"{held[:50]}",
                )

        target_texts = [option_text(q, a) for q, answers in questions for a in answers]
        texts = list(target_texts)
        if inline is not None:
            texts += [option_text(it.question, o) for it in inline for o in it.options]
            context_tokens = sum(len(it.options) for it in inline)
        else:
            assert ctx is not None
            context_tokens = sum(len(e.item.options) for e in ctx.items)
        target_tokens = len(target_texts)
        tokens = context_tokens + target_tokens
        new_texts = self.model.uncached_texts(texts)
        new_tokens = estimated_tokens(new_texts)
        need_s = self.cost.estimate(new_tokens, tokens)
        self._within_call_limit(context, need_s)
        self._deadline(context, need_s, "to start")

        # the cost model learns from the time this call held the model, not the time it
        # queued behind other calls: waits counted as work refused every later call
        w0 = self.model.work_seconds()
        embed_s: float | None = None
        model_s: float | None = None
        over_limit = False

        def should_stop() -> str | None:
            nonlocal over_limit
            if not context.is_active():
                return "the call was cancelled"
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                return "the deadline passed while embedding"
            if self.model.work_seconds() - w0 > self.max_call_s:
                over_limit = True
                return f"the call held the model more than this server's {self.max_call_s:g} s"
            return None

        try:
            # a client's texts stay off the disk cache: any client could grow it without bound
            self.model.embed_texts(texts, disk_cache=False, should_stop=should_stop)
            embed_s = self.model.work_seconds() - w0
            self._deadline(context, self.cost.estimate(0, tokens), "after embedding")
            w1 = self.model.work_seconds()
            if inline is not None:  # its texts are in memory now
                ctx = self.model.context(inline, disk_cache=False)
            assert ctx is not None
            probs = self.model.score_batch(ctx, questions, disk_cache=False)
            model_s = self.model.work_seconds() - w1
        except WorkStopped as err:
            self.stats.add(refused_deadline=1)
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if over_limit
                else grpc.StatusCode.DEADLINE_EXCEEDED
            )
            _abort(context, code, f"stopped: {err}")
        except InputError as err:  # defence in depth: the validation above should catch all
            self.stats.add(refused_invalid=1)
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        finally:
            # learnt from a call cut off too (of the tokens it did embed): one that always ran
            # past its deadline taught nothing and was accepted again and again
            done = new_tokens - estimated_tokens(self.model.uncached_texts(new_texts))
            if embed_s is None:
                embed_s = self.model.work_seconds() - w0
            self.cost.observe(done, embed_s, tokens if model_s is not None else 0, model_s or 0.0)
        self._deadline(context, 0.0, "after scoring")

        reply = pb.ScoreReply(
            reward_kind=_KIND_CODES[kind],
            context_items=len(ctx.items),
            encoder_id=self.model.encoder_identity,
        )
        for p in probs:
            r = to_rewards(p, kind)
            reply.scores.add(
                probabilities=p.tolist(), rewards=r.tolist(), best_index=int(np.argmax(p))
            )
        self.stats.add(questions=len(questions), answers=target_tokens)
        return reply

    def Info(
        self, request: pb.RewardInfoRequest, context: grpc.ServicerContext
    ) -> pb.RewardInfoReply:
        reply = pb.RewardInfoReply(
            limits=self.limits.to_proto(),
            encoder_id=self.model.encoder_identity,
            model_metadata_json=json.dumps(self.model.metadata, sort_keys=True, default=str),
        )
        for name, ctx in sorted(self.model.groups.items()):
            reply.groups.add(name=name, context_items=len(ctx.items))
        return reply


def default_calls_per_client(max_workers: int) -> int:
    """Half the workers the exempt health Checks cannot hold (at least one): a client at its
    limit and a flood of Checks (from any certificate of the CA, even a revoked one) together
    still leave workers for the other clients (reward service review)."""
    return max(1, (max_workers - MAX_EXEMPT_CALLS) // 2)


def calls_per_client(max_workers: int, max_calls_per_client: int | None = None) -> int:
    """The per-client call limit for `max_workers` (default: `default_calls_per_client`), or an
    InputError when one client at it and the exempt health Checks could hold every worker."""
    if max_workers < 1:
        raise InputError(f"max_workers must be at least 1, got {max_workers}")
    per_client = (
        default_calls_per_client(max_workers)
        if max_calls_per_client is None
        else max_calls_per_client
    )
    if per_client < 1:
        raise InputError(f"max_calls_per_client must be at least 1, got {max_calls_per_client}")
    if per_client + MAX_EXEMPT_CALLS >= max_workers:
        raise InputError(
            f"max_workers {max_workers} is too few for max_calls_per_client {per_client}: one "
            f"client and the {MAX_EXEMPT_CALLS} health checks any certificate may hold would "
            f"take every worker; give at least {per_client + MAX_EXEMPT_CALLS + 1} workers or "
            "fewer calls per client"
        )
    return per_client


def start_reward_server(
    model: RewardModel,
    address: str,
    tls: TlsFiles,
    allow_list: AllowList,
    *,
    limits: Limits | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    revocations: RevocationWatch | None = None,
    max_call_s: float = DEFAULT_MAX_CALL_S,
    max_calls_per_client: int | None = None,
) -> tuple[grpc.Server, int, RewardServicer]:
    """Serve on `address` (host:port; port 0 picks one) with mutual TLS. Returns (server, port,
    servicer). At most `max_workers` calls run at once and 4x that wait; more get
    RESOURCE_EXHAUSTED. One client (one certificate identity) has at most
    `max_calls_per_client` calls in flight (default: `default_calls_per_client`), so a client
    that opens many calls cannot take every worker from the others, even with the health
    Checks any certificate may hold (at most auth.MAX_EXEMPT_CALLS; a setting that would let
    the two hold every worker is refused: `calls_per_client`); its next call is refused
    RESOURCE_EXHAUSTED at once. With `revocations`, certificates the CA revoked are refused. A
    call the cost model expects to need more than `max_call_s` seconds of the model is refused
    (RESOURCE_EXHAUSTED), deadline or not, and one that holds it longer is stopped between
    encoder batches."""
    limits = limits or Limits()
    per_client = calls_per_client(max_workers, max_calls_per_client)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward"),
        interceptors=[
            AuthInterceptor(allow_list, revocations=revocations, max_calls_per_node=per_client)
        ],
        options=[*grpc_options(limits.max_message_bytes), EXCLUSIVE_PORT],
        maximum_concurrent_rpcs=max_workers * 4,
    )
    servicer = RewardServicer(model, limits, max_call_s)
    pb_grpc.add_RewardServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind_port(server, address, tls.server_credentials())  # a busy port: said at once
    # the encoder loads on first use: load it now, so no client's call waits for it (or is
    # refused because the wait looked like the cost of its texts)
    model.warm_up()
    server.start()
    log.info(
        "reward service on %s (port %d, mutual TLS, %d groups, max message %d bytes, "
        "%d calls at once, %d per client)",
        address,
        port,
        len(model.groups),
        limits.max_message_bytes,
        max_workers,
        per_client,
    )
    return server, port, servicer


# ------------------------------------------------------------------------------------------------
# client side


def context_to_proto(items: Sequence[SurveyItem]) -> pb.RewardGroupContext:
    msg = pb.RewardGroupContext()
    for it in items:
        msg.items.add(
            question=it.question,
            options=list(it.options),
            distribution=[float(x) for x in it.distribution],
        )
    return msg


def score_request(
    group: str | Sequence[SurveyItem],
    questions: Sequence[tuple[str, Sequence[str]]],
    kind: RewardKind = "logprob",
) -> pb.ScoreRequest:
    """A ScoreRequest for a named group (str) or an inline context (items)."""
    req = pb.ScoreRequest(reward_kind=_KIND_CODES[kind])
    if isinstance(group, str):
        req.group_name = group
    else:
        req.group_context.CopyFrom(context_to_proto(group))
    for q, answers in questions:
        req.questions.add(question=q, answers=list(answers))
    return req


class RewardClient:
    """A mutual-TLS client of the reward service."""

    def __init__(
        self,
        target: str,
        tls: TlsFiles,
        *,
        server_name_override: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        from pluralfed.tls import secure_channel

        self.channel = secure_channel(
            target,
            tls,
            server_name_override=server_name_override,
            options=grpc_options(max_message_bytes),
        )
        self.stub = pb_grpc.RewardStub(self.channel)

    def score(
        self,
        group: str | Sequence[SurveyItem],
        questions: Sequence[tuple[str, Sequence[str]]],
        *,
        kind: RewardKind = "logprob",
        timeout: float | None = 30.0,
    ) -> pb.ScoreReply:
        reply: pb.ScoreReply = self.stub.Score(
            score_request(group, questions, kind), timeout=timeout
        )
        return reply

    def info(self, timeout: float | None = 10.0) -> pb.RewardInfoReply:
        reply: pb.RewardInfoReply = self.stub.Info(pb.RewardInfoRequest(), timeout=timeout)
        return reply

    def health(self, timeout: float | None = 5.0) -> bool:
        stub = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        reply = stub.Check(request, timeout=timeout)  # type: ignore[attr-defined]  # no stub
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probabilities(reply: pb.ScoreReply) -> list[np.ndarray]:
    return [np.asarray(s.probabilities, dtype=np.float64) for s in reply.scores]
