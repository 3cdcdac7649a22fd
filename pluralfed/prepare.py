"""From a data file to embedded, split groups: the one path every training and evaluation job takes."""

from __future__ import annotations

from collections.abc import Sequence

from pluralfed.data import SurveyData, unknown_groups_message
from pluralfed.embeddings import TextEncoder, embed_items
from pluralfed.episodes import GroupSplit, split_group
from pluralfed.errors import InputError
from pluralfed.protocol import HELD_OUT_GROUPS, TRAINING_GROUPS


def embed_groups(
    data: SurveyData, groups: Sequence[str], encoder: TextEncoder
) -> dict[str, GroupSplit]:
    """Embed every option of the named groups in one batched job and split each per PROTOCOL.md."""
    unknown = [g for g in groups if g not in data.groups]
    if unknown:
        # with the closest names, as the loaders say it (a typo'd --groups listed 20 others)
        raise InputError(unknown_groups_message(data.source, unknown, sorted(data.groups)))
    items = [it for g in groups for it in data.groups[g]]
    vectors = embed_items(items, encoder)
    out: dict[str, GroupSplit] = {}
    start = 0
    for g in groups:
        n = len(data.groups[g])
        out[g] = split_group(g, data.groups[g], vectors[start : start + n])
        start += n
    return out


def default_groups(data: SurveyData) -> tuple[list[str], list[str]]:
    """(training, held-out) groups: PROTOCOL.md's when the data has them all, else every group trains."""
    if all(g in data.groups for g in (*TRAINING_GROUPS, *HELD_OUT_GROUPS)):
        return list(TRAINING_GROUPS), list(HELD_OUT_GROUPS)
    return sorted(data.groups), []
