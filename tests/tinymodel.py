"""A small GPO and random embedded questions, for fast model and training tests."""

from __future__ import annotations

import numpy as np

from pluralfed.data import SurveyItem
from pluralfed.episodes import EmbeddedItem
from pluralfed.model import GPOConfig

DIM = 16
CFG = GPOConfig(embed_dim=DIM, d_model=32, n_layers=2, n_heads=4, d_ff=32)


def random_item(rng: np.random.Generator, k: int, name: str) -> EmbeddedItem:
    """A question `name` with k options o0..o{k-1}, random answers and random embeddings."""
    dist = rng.dirichlet(np.ones(k))
    emb = rng.normal(size=(k, DIM)).astype(np.float32)
    return EmbeddedItem(SurveyItem(name, tuple(f"o{i}" for i in range(k)), dist), emb)
