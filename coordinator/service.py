"""Running a coordinator: its configuration, the engine and server wired together, live progress,
and the final checkpoint and results."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import resource
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from coordinator.rounds import RoundEngine
from coordinator.server import (
    DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    DEFAULT_MAX_CONCURRENT_UPLOADS,
    limit_malloc_arenas,
    start_server,
)
from coordinator.settings import MAX_COUNT, MAX_DURATION_S, RoundSettings
from coordinator.state import CheckpointError
from pluralfed import protocol
from pluralfed.auth import AllowList, RevocationWatch
from pluralfed.checkpoint import META_FILE, WEIGHTS_FILE, save_checkpoint
from pluralfed.config import ConfigValueError, check_finite_number, check_whole_number
from pluralfed.embeddings import make_encoder
from pluralfed.errors import InputError, signal_exit_code
from pluralfed.fsutil import atomic_write_bytes, atomic_write_json, owner_hint
from pluralfed.metrics import SetReport
from pluralfed.model import DEFAULT_MEMBERS, GPOConfig
from pluralfed.report import print_reports
from pluralfed.tensorfiles import numpy_to_state_dict, state_dict_to_numpy
from pluralfed.tls import TlsFiles, resolve_tls_files
from pluralfed.training import build_model
from pluralfed.transport import (
    DEFAULT_UPLOAD_CHUNK_BYTES,
    SERVER_STREAM_WINDOW_BYTES,
    check_chunk_bytes,
    check_window_bytes,
)
from pluralfed.wire import DEFAULT_CHUNK_BYTES

log = logging.getLogger("pluralfed.coordinator")

MAX_WORKERS = 10_000  # RPC threads
# exit code of a coordinator that could not write its state folder (a full disk): not 1, a stop
# a resume continues from, nor 2, a refused input; the log's last line names the file
EXIT_CANNOT_WRITE = 3


def _refuse(key: str, message: str) -> ConfigValueError:
    return ConfigValueError(key, message, "coordinator config")


def _check_int(key: str, value: object, low: int, high: int) -> None:
    check_whole_number(key, value, low, high, "coordinator config")


def _check_float(
    key: str, value: object, low: float, high: float, *, low_open: bool = False
) -> None:
    check_finite_number(key, value, low, high, low_open=low_open, what="coordinator config")


def _check_listen(address: object) -> None:
    if not isinstance(address, str):
        raise _refuse("listen", f"listen must be host:port, got {address!r}")
    if address.startswith("unix:"):
        if len(address) > len("unix:"):
            return
        raise _refuse("listen", "listen 'unix:' names no socket path (unix:/path/to/socket)")
    host, _, port = address.rpartition(":")
    if (
        not host
        or not (port.isascii() and port.isdigit())  # isdigit() alone passes "²" and "７"
        or not 0 <= int(port) <= 65535
        or address.strip() != address
    ):
        raise _refuse(
            "listen", f"listen must be host:port with a port in 0..65535, got {address!r}"
        )


@dataclass
class CoordinatorConfig:
    """All coordinator settings (TOML keys; `[tls] dir` is tls_dir). Defaults follow PROTOCOL.md."""

    listen: str = "0.0.0.0:7443"
    state_dir: Path = Path("runs/coordinator")
    allow_list_file: Path | None = None  # default: the config file's own [allow_list] table
    tls_dir: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_crl: Path | None = None  # the CA's revocation list (`pluralfed certs revoke`)
    insecure: bool = False
    encoder: str = "all-MiniLM-L6-v2"
    # rounds
    rounds: int = protocol.FEDERATED_ROUNDS
    min_nodes: int = 1
    min_updates: int = 1
    round_timeout_s: float = 300.0
    eval_timeout_s: float = 300.0
    eval_every: int = protocol.EVAL_EVERY
    eval_at_start: bool = False
    local_steps: int = protocol.LOCAL_STEPS
    learning_rate: float = protocol.LEARNING_RATE
    embedding_noise: float = 0.0
    context_range: tuple[int, int] = protocol.CONTEXT_RANGE
    target_range: tuple[int, int] = protocol.TARGET_RANGE
    max_context: int = protocol.EVAL_MAX_CONTEXT
    weighting: str = "examples"
    fairness_q: float = 0.0
    server_optimizer: str = "fedavg"
    local_optimizer: str = protocol.LOCAL_OPTIMIZER
    server_lr: float | None = None
    norm_bound: float | None = None
    seed: int = 0
    session_timeout_s: float = 60.0
    heartbeat_interval_s: float = 5.0
    quorum_timeout_s: float | None = None
    evaluate_only: tuple[str, ...] | None = None  # held-out groups: they may only evaluate
    # model
    d_model: int = 128
    mlp_layers: int = 4
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.0
    members: int = DEFAULT_MEMBERS
    memory_weight: float = GPOConfig.memory_weight
    memory_shrinkage: float = GPOConfig.memory_shrinkage
    memory_temperature: float = GPOConfig.memory_temperature
    # service
    max_workers: int | None = None  # RPC threads; None: rpc_threads_for(the allow-list)
    max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS  # memory: O(this), not O(nodes)
    upload_chunk_bytes: int = DEFAULT_UPLOAD_CHUNK_BYTES  # memory: O(this x nodes)
    max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS  # memory: O(this)
    download_chunk_bytes: int = DEFAULT_CHUNK_BYTES  # memory: O(this x concurrent downloads)
    upload_window_bytes: int = SERVER_STREAM_WINDOW_BYTES  # memory: O(this x nodes); speed far off
    # keep answering after the last round so nodes hear SHUTDOWN: longer than a node's longest
    # reconnect back-off (backoff_max_s 15 s, with jitter up to 22.5 s)
    linger_s: float = 30.0

    def __post_init__(self) -> None:
        """Refuse each value no run could use, naming its key, when the config is loaded: the
        protocol could not carry it, every node would refuse it, or the run would break later
        (a NaN timeout, a seed out of uint64). The rounds' settings, checks across keys
        included, are checked by RoundSettings itself, here as for settings made in code; the
        model's by GPOConfig."""
        for key in ("upload_chunk_bytes", "download_chunk_bytes"):
            try:
                check_chunk_bytes(getattr(self, key), key)
            except ValueError as err:
                raise _refuse(key, str(err)) from None
        try:
            check_window_bytes(self.upload_window_bytes)
        except ValueError as err:
            raise _refuse("upload_window_bytes", str(err)) from None
        _check_listen(self.listen)
        if not isinstance(self.encoder, str) or not self.encoder.strip():
            raise _refuse("encoder", f"encoder must name a text encoder, got {self.encoder!r}")
        if self.max_workers is not None:
            _check_int("max_workers", self.max_workers, 1, MAX_WORKERS)
        for key, low, high in (
            ("max_concurrent_uploads", 0, MAX_COUNT),
            ("max_concurrent_downloads", 0, MAX_COUNT),
        ):
            _check_int(key, getattr(self, key), low, high)
        _check_float("linger_s", self.linger_s, 0.0, MAX_DURATION_S)  # 0: leave at once
        try:  # the round settings check themselves, the same whether from a config or code
            self.round_settings()
        except ConfigValueError as err:
            raise ConfigValueError(
                err.key, err.message, "coordinator config", related=err.keys[1:]
            ) from None

    def round_settings(self) -> RoundSettings:
        """The settings of the rounds; raises ConfigValueError naming the field."""
        fields = RoundSettings.__dataclass_fields__
        return RoundSettings(**{k: v for k, v in asdict(self).items() if k in fields})

    def tls_files(self) -> TlsFiles | None:
        if self.insecure:
            return None
        return resolve_tls_files(
            "coordinator", self.tls_dir, self.tls_ca, self.tls_cert, self.tls_key
        )

    def revocations(self, tls: TlsFiles | None) -> RevocationWatch | None:
        """The revocation list to enforce, verified against the CA the coordinator trusts."""
        if self.tls_crl is None:
            return None
        if tls is None:
            raise InputError(
                "coordinator config: tls_crl is set but insecure = true: without TLS there "
                "are no certificates to revoke"
            )
        return RevocationWatch(self.tls_crl, tls.ca)


def rpc_threads_for(nodes: int) -> int:
    """RPC threads enough for `nodes` connected nodes: each holds one in its long poll, and a
    transfer or a heartbeat needs another. With fewer, polls take every thread, heartbeats
    queue behind them and sessions expire (64 threads and 128 nodes: no round ever ran)."""
    return min(MAX_WORKERS, max(64, 2 * nodes + 32))


def model_config(cfg: CoordinatorConfig, embed_dim: int) -> GPOConfig:
    try:
        return GPOConfig(
            embed_dim=embed_dim,
            d_model=cfg.d_model,
            mlp_layers=cfg.mlp_layers,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            d_ff=cfg.d_ff,
            dropout=cfg.dropout,
            members=cfg.members,
            memory_weight=cfg.memory_weight,
            memory_shrinkage=cfg.memory_shrinkage,
            memory_temperature=cfg.memory_temperature,
        )
    except ValueError as err:
        raise InputError(f"coordinator config: {err}") from err


def check_roles(cfg: CoordinatorConfig, allow_list: AllowList) -> None:
    """Every evaluate-only group must be one the allow-list admits (a typo would otherwise let
    the held-out group train after all), and enough groups must be left to train to make the
    quorum (min_nodes), or the run would wait for ever."""
    if cfg.evaluate_only is None:
        return
    unknown = sorted(set(cfg.evaluate_only) - allow_list.node_names)
    if unknown:
        raise _refuse(
            "evaluate_only",
            f"evaluate_only names {unknown}, which the allow-list does not admit (it admits "
            f"{sorted(allow_list.node_names)})",
        )
    trainers = allow_list.node_names - set(cfg.evaluate_only)
    if len(trainers) < cfg.min_nodes:
        raise ConfigValueError(
            "evaluate_only",
            f"evaluate_only leaves {len(trainers)} allow-listed group(s) to train, fewer than "
            f"min_nodes ({cfg.min_nodes}): no round could ever start",
            "coordinator config",
            related=("min_nodes",),
        )


def run_coordinator(cfg: CoordinatorConfig, allow_list: AllowList, console: Console) -> int:
    """Run (or resume) the federation to its end: 0 when every round and the final evaluation
    are done, 128 + the signal's number (SIGTERM 143, SIGINT 130) when a signal stopped it
    before, 1 when it stopped before for want of a quorum (a resume goes on from the last
    checkpoint either way), EXIT_CANNOT_WRITE when the state folder could not be written
    (state.json keeps the last checkpoint, so a restart with room on the disk resumes from
    it)."""
    settings = cfg.round_settings()
    check_roles(cfg, allow_list)
    tls = cfg.tls_files()
    if tls is not None:  # checked before the state folder is touched: a bad file starts no run
        tls.server_credentials()
    revocations = cfg.revocations(tls)
    made_folder = not cfg.state_dir.exists()  # by this start: gone again if it cannot listen
    state_lock = lock_state_dir(cfg.state_dir)  # held until this process ends
    engines: list[RoundEngine] = []

    def leave_no_stray_folder() -> None:
        """A start that fails before it made the run (a typo'd --state-dir or encoder, a busy
        port) leaves no folder it made, and lets go of the lock."""
        if made_folder and not engines:
            with contextlib.suppress(OSError):
                (cfg.state_dir / "coordinator.lock").unlink()
                cfg.state_dir.rmdir()
        state_lock.close()

    try:  # the encoder loads here (its dimension is the model's input size)
        encoder = make_encoder(cfg.encoder)
        gpo = model_config(cfg, encoder.dim)
    except BaseException:
        leave_no_stray_folder()
        raise
    started = time.time()

    def open_run() -> RoundEngine:
        """The run, made or resumed once the port is bound: a start that cannot listen leaves
        the state folder as it found it."""
        engine = RoundEngine(
            settings,
            state_dict_to_numpy(build_model(gpo, cfg.seed).state_dict()),
            cfg.state_dir,
            encoder.identity,
            gpo.to_dict(),
        )
        engine.allowed_trainers = allow_list.node_names - set(cfg.evaluate_only or ())
        engines.append(engine)
        return engine

    limit_malloc_arenas()  # a process setting, before the RPC threads start
    try:
        server, port = start_server(
            open_run,
            cfg.listen,
            tls,
            allow_list,
            max_workers=_rpc_threads(cfg, allow_list),
            upload_slots=cfg.max_concurrent_uploads,
            upload_chunk_bytes=cfg.upload_chunk_bytes,
            download_slots=cfg.max_concurrent_downloads,
            download_chunk_bytes=cfg.download_chunk_bytes,
            revocations=revocations,
            upload_window_bytes=cfg.upload_window_bytes,
        )
    except CheckpointError as err:
        state_lock.close()
        return _cannot_write(cfg.state_dir, err)
    except BaseException:
        leave_no_stray_folder()
        raise
    engine = engines[0]
    # where local launchers (and operators using port 0) find the bound port
    try:
        atomic_write_bytes(cfg.state_dir / "coordinator.port", f"{port}\n".encode())
    except OSError as err:  # a folder of that name, a full disk: a traceback before
        server.stop(grace=None).wait()
        state_lock.close()
        return _cannot_write(cfg.state_dir, err)
    console.print(
        f"coordinator run {engine.run_id} on port {port}: {settings.rounds} rounds, quorum "
        f"{settings.min_nodes}, {len(allow_list)} nodes allowed, state in {cfg.state_dir}"
    )
    _log_roles(cfg)
    stopping, signals, failed = _drive(engine)
    if failed:
        server.stop(grace=2.0).wait()
        state_lock.close()
        return _cannot_write(cfg.state_dir, failed[0])
    if engine.done:
        try:
            _finish(engine, cfg, gpo, encoder.identity, started, console)
        except (CheckpointError, OSError) as err:
            server.stop(grace=2.0).wait()
            state_lock.close()
            return _cannot_write(cfg.state_dir, err)
        _linger(engine, cfg.linger_s, stopping)
    server.stop(grace=2.0).wait()
    state_lock.close()
    if engine.done:
        return 0  # also when a signal cut the linger short: the run is complete
    return signal_exit_code(signals[0]) if signals else 1


def _cannot_write(state_dir: Path, err: BaseException) -> int:
    """One line saying which write failed and how to go on; EXIT_CANNOT_WRITE."""
    log.error(
        "stopping: cannot write the run's state in %s (%s); state.json still holds the last "
        "checkpoint: make room or fix the folder, then start the coordinator again to resume",
        state_dir,
        err,
    )
    return EXIT_CANNOT_WRITE


def _finish(
    engine: RoundEngine,
    cfg: CoordinatorConfig,
    gpo: GPOConfig,
    encoder_identity: str,
    started: float,
    console: Console,
) -> None:
    """final/ and results.json of a finished run: written for a new final evaluation, and
    written again for a run finished before this start whose files are missing or older than
    its final evaluation (a coordinator killed between saving that evaluation and writing
    them). Never says they exist when they do not."""
    if engine.finished_at_start and not engine.evaluated_again:
        stale = _stale_outputs(engine, cfg.state_dir)
        if not stale:
            console.print(  # nothing new: final/ and results.json stay as the run left them
                f"run {engine.run_id} had finished: {engine.state.completed_rounds} rounds; "
                f"model in {cfg.state_dir / 'final'}, results in {cfg.state_dir / 'results.json'}"
            )
            return
        log.warning(
            "%s: %s of the finished run missing or older than its final evaluation (the "
            "coordinator stopped before writing them): writing them now",
            cfg.state_dir,
            " and ".join(stale),
        )
        final = _write_final(engine, cfg, gpo, encoder_identity, started, console, again=True)
        console.print(
            f"run {engine.run_id} had finished: {engine.state.completed_rounds} rounds; model "
            f"written again to {final}, results to {cfg.state_dir / 'results.json'}"
        )
        return
    final = _write_final(engine, cfg, gpo, encoder_identity, started, console)
    console.print(
        f"federation finished: {engine.state.completed_rounds} rounds; model in {final}, "
        f"metrics in {cfg.state_dir / 'metrics.jsonl'}"
    )


def _stale_outputs(engine: RoundEngine, state_dir: Path) -> list[str]:
    """Which of final/ and results.json are missing, or (results.json) not of this run's
    final evaluation as state.json holds it."""
    stale = []
    final = state_dir / "final"
    if not ((final / WEIGHTS_FILE).is_file() and (final / META_FILE).is_file()):
        stale.append("final/")
    try:
        results = json.loads((state_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply
        results = None
    if (
        not isinstance(results, dict)
        or results.get("run_id") != engine.run_id
        or results.get("final_evaluation") != engine.final_evaluation()
    ):
        stale.append("results.json")
    return stale


def lock_state_dir(state_dir: Path) -> TextIO:
    """Take the state folder for this process (an exclusive lock on its `coordinator.lock`,
    released when the process ends). A second coordinator on the same folder would resume the
    same run and delete the first one's upload spools before anything else failed."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = (state_dir / "coordinator.lock").open("a+", encoding="utf-8")
    except OSError as err:  # a folder mounted into a container is the usual case
        raise InputError(
            f"cannot use the state folder {state_dir}: {err.strerror or err} "
            f"({owner_hint(state_dir)})"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise InputError(
            f"{state_dir} is in use by another coordinator (pid {holder}); stop it first, or "
            "give this one another state folder"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _rpc_threads(cfg: CoordinatorConfig, allow_list: AllowList) -> int:
    """The configured RPC threads, or enough for the allow-list; warns when too few."""
    workers = cfg.max_workers or rpc_threads_for(len(allow_list))
    if workers < len(allow_list) + 8:
        log.warning(
            "max_workers = %d RPC threads for %d allow-listed nodes: each connected node holds "
            "one in its long poll, so with most of them connected heartbeats wait and sessions "
            "expire; leave max_workers unset (%d for these nodes)",
            workers,
            len(allow_list),
            rpc_threads_for(len(allow_list)),
        )
    return workers


def _log_roles(cfg: CoordinatorConfig) -> None:
    if cfg.evaluate_only is None:
        log.info("roles: each node's Join says whether it trains (evaluate_only is not set)")
    elif not cfg.evaluate_only:
        log.info("roles: every allow-listed group trains (evaluate_only is empty)")
    else:
        log.info(
            "roles: %s only evaluate, every other allow-listed group trains",
            ", ".join(sorted(cfg.evaluate_only)),
        )


def _drive(engine: RoundEngine) -> tuple[threading.Event, list[int], list[Exception]]:
    """Run the rounds on their own thread until done or stopped by SIGINT/SIGTERM (the main
    thread stays free to take the signal). Returns the event a signal sets, the signals
    received (the exit code says the first), and the error that ended the rounds if the state
    could not be written (the caller reports it, not the thread's traceback)."""
    stopping = threading.Event()
    signals: list[int] = []
    failed: list[Exception] = []

    def rounds() -> None:
        try:
            engine.run()
        except (CheckpointError, OSError) as err:
            failed.append(err)
            engine.stop()

    def on_signal(signum: int, _frame: object) -> None:
        task = engine.open_task()
        # (said only when one is open: it was said while waiting for a quorum too)
        abandoned = f"; {task} is abandoned (a resume retries it)" if task else ""
        log.warning("signal %d: stopping%s", signum, abandoned)
        signals.append(signum)
        stopping.set()
        engine.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    driver = threading.Thread(target=rounds, name="rounds", daemon=True)
    driver.start()
    while driver.is_alive():
        driver.join(0.5)
    return stopping, signals, failed


def _write_final(
    engine: RoundEngine,
    cfg: CoordinatorConfig,
    gpo: GPOConfig,
    encoder_identity: str,
    started: float,
    console: Console,
    again: bool = False,
) -> Path:
    """The finished run's model (`final/`, a checkpoint `pluralfed evaluate` and the reward
    service load) and `results.json`; prints the final evaluation. Returns the model's folder.
    `again`: the run finished before this process (which only writes what is missing), so its
    time and memory are the earlier results.json's, or unknown (wall_seconds then spans its
    rounds)."""
    final = cfg.state_dir / "final"
    model = build_model(gpo, cfg.seed)
    model.load_state_dict(numpy_to_state_dict(engine.state.weights))
    try:  # a full disk's OSError names no file
        save_checkpoint(
            final,
            model,
            encoder_identity,
            {
                "mode": "federated",
                "run_id": engine.run_id,
                "rounds": engine.state.completed_rounds,
                "training_groups": sorted(engine.state.history.participants),
                "settings": asdict(engine.settings),
            },
        )
    except OSError as err:
        raise CheckpointError(f"cannot write {final}: {err}") from err
    last = engine.final_evaluation()
    results: dict[str, Any] = {
        "run_id": engine.run_id,
        "rounds": engine.state.completed_rounds,
        "wall_seconds": time.time() - started,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_evaluation": last,
        "evaluations": list(engine.state.evaluations.records()),
    }
    if engine.evaluated_again:  # the run's own time and memory, not this re-evaluation's
        results.update(_run_figures(cfg.state_dir / "results.json"))
        results["evaluated_again_at"] = time.time()
    elif again:
        figures = _run_figures(cfg.state_dir / "results.json")
        results["wall_seconds"] = figures.get("wall_seconds", _rounds_seconds(engine))
        results["peak_rss_mib"] = figures.get("peak_rss_mib")  # None: not known any more
        results["written_again_at"] = time.time()
    try:
        atomic_write_json(cfg.state_dir / "results.json", results)
    except OSError as err:
        raise CheckpointError(f"cannot write {cfg.state_dir / 'results.json'}: {err}") from err
    if last:
        print_reports({n: SetReport.from_dict(r) for n, r in last["reports"].items()}, console)
    return final


def _rounds_seconds(engine: RoundEngine) -> float:
    """From the start of the run's first round to the end of its last, with the final
    evaluation: the run's time as far as state.json tells it."""
    first, last = engine.state.history.first, engine.state.history.last
    if first is None or last is None:
        return 0.0
    final = engine.final_evaluation()
    try:  # records are checked only for what the engine reads: these may lack
        tail = float(final.get("seconds", 0.0)) if final else 0.0
        return (
            float(last["finished_at"])
            - float(first["finished_at"])
            + float(first["seconds"])
            + tail
        )
    except (KeyError, TypeError, ValueError):
        return 0.0


def _run_figures(path: Path) -> dict[str, float]:
    """wall_seconds and peak_rss_mib of the results.json the run wrote when it finished (none if
    it cannot be read: the re-evaluation's own figures then stand)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply
        return {}
    if not isinstance(earlier, dict):
        return {}
    return {
        k: float(earlier[k])
        for k in ("wall_seconds", "peak_rss_mib")
        if isinstance(earlier.get(k), int | float) and not isinstance(earlier.get(k), bool)
    }


def _linger(engine: RoundEngine, linger_s: float, stopping: threading.Event) -> None:
    """Keep serving SHUTDOWN for up to linger_s so that every node of the run hears the end,
    also one not connected right now (between reconnects, or its session expired), which would
    otherwise retry for ever; and let connected ones finish (fetch the final model, leave).
    Ends earlier once every group of the run has been told and no node is connected."""
    until = time.monotonic() + linger_s
    unaware = engine.unaware_of_end()
    if unaware and linger_s > 0:
        log.info("serving the run's end for up to %.0f s, until %s hear it", linger_s, unaware)
    while (
        (unaware or engine.live_sessions()) and time.monotonic() < until and not stopping.is_set()
    ):
        time.sleep(0.2)
        unaware = engine.unaware_of_end()
    if unaware and not stopping.is_set():
        log.warning(
            "%s did not hear the run's end within linger_s (%.0f s): their nodes retry until "
            "stopped by hand",
            unaware,
            linger_s,
        )


def dump_config(cfg: CoordinatorConfig, allow_list: AllowList | None = None) -> str:
    """The settings as JSON; with `allow_list`, its table too (node id -> group), which is as
    much the federation's setup as any setting and was the one thing not shown."""
    settings: dict[str, Any] = asdict(cfg)
    if allow_list is not None:
        settings["allow_list"] = dict(sorted(allow_list.as_dict().items()))
    return json.dumps(settings, indent=2, default=str)
