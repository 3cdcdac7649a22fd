"""Can the predictor route a context answer to its target? A diagnostic, printing figures.

    .venv/bin/python bench/copy_probe.py [--steps 900] [--lr 3e-4] [--layers 6]

Each episode's targets are copies of some of its context questions, whose answers the model sees
in the context. A model that reads its context copies them (alignment -> 1.0); one that ignores it
scores like a uniform guess (~0.72 with these Dirichlet(1) answers). Embeddings are random and
perfectly distinct, so only the architecture and its optimisation are tested, not the encoder
or the data. At the PROTOCOL settings this stays near 0.72: the reason the trained predictor's
context gain is ~0 (README, "Results").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pluralfed.data import SurveyItem
from pluralfed.episodes import EmbeddedItem, Episode, make_batch
from pluralfed.evaluation import predict_targets
from pluralfed.metrics import alignment_score
from pluralfed.model import GPOConfig, gpo_loss
from pluralfed.training import build_model


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--mlp-layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    dim = 384

    def item() -> EmbeddedItem:
        k = int(rng.integers(2, 6))
        dist = rng.dirichlet(np.ones(k))
        emb = (rng.normal(size=(k, dim)) * 0.25).astype(np.float32)
        return EmbeddedItem(SurveyItem("q", tuple(map(str, range(k))), dist), emb)

    def episode() -> Episode:
        context = [item() for _ in range(40)]
        return Episode(context, context[:20])

    cfg = GPOConfig(embed_dim=dim, n_layers=args.layers, mlp_layers=args.mlp_layers)
    model = build_model(cfg, args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    report_every = max(1, args.steps // 3)
    for step in range(1, args.steps + 1):
        batch = make_batch([episode()])
        mean, log_std = model(batch)
        loss = gpo_loss(mean, log_std, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % report_every == 0 or step == args.steps:
            held = [episode() for _ in range(5)]
            scores = [
                alignment_score(pred, t.item.distribution)
                for ep in held
                for pred, t in zip(
                    predict_targets(model, ep.context, ep.targets), ep.targets, strict=True
                )
            ]
            uniform = [
                alignment_score(np.full(t.num_options, 1 / t.num_options), t.item.distribution)
                for ep in held
                for t in ep.targets
            ]
            print(
                f"step {step:5d}  loss {float(loss.detach()):7.3f}  copy alignment "
                f"{np.mean(scores):.4f}  (uniform guess {np.mean(uniform):.4f}, perfect copy 1.0)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
