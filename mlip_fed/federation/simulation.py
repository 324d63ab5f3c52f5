"""Run ``flwr run`` safely and decide success from what the ServerApp wrote.

Three Flower behaviours make a naive ``flwr run .`` unsafe (Flower 1.42, observed):
the local SuperLink starts detached on fixed ports and outlives the run (a second job attaches to
it, in the first one's environment); it installs ``[project].dependencies`` into a fresh env per run
unless told not to; and ``flwr run`` exits 0 even when the ServerApp crashed or every site failed.
So every run here gets its own ``FLWR_HOME`` and free loopback ports, runtime installs are off,
the SuperLink we started is stopped by PID afterwards, and the exit status comes from
``results.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from mlip_fed.federation.report import RESULTS_NAME
from mlip_fed.federation.superlink_tree import stop_superlink
from mlip_fed.federation.watchdog import start_watchdog, stop_watchdog


@dataclass
class SimulationResult:
    returncode: int  # flwr run's own exit status (0 even when the run failed)
    results: dict[str, Any] | None
    output_dir: Path
    log_path: Path
    seconds: float
    #: The run was stopped by SIGINT (Ctrl-C) or SIGTERM to the launcher: the tree is down, the last completed
    #: round's checkpoint and the sites' ledgers are kept, and ``federation.resume=true`` continues it.
    interrupted: bool = False

    @property
    def completed_rounds(self) -> int:
        return int((self.results or {}).get("completed_rounds", 0))

    @property
    def ok(self) -> bool:
        """A run succeeded when the ServerApp finished and aggregated at least one round."""
        return not self.interrupted and bool(
            self.results and self.results.get("status") == "completed" and self.results.get("aggregated_rounds", 0) > 0
        )

    def failure_reason(self) -> str:
        if self.interrupted:
            return f"interrupted after round {self.completed_rounds}; see {self.log_path}"
        if self.results is None:
            return (
                f"no {RESULTS_NAME} in {self.output_dir}: the ServerApp did not start or crashed; see {self.log_path}"
            )
        status = self.results.get("status")
        if status != "completed":
            failures = self.results.get("failures", [])
            return f"run status {status!r} after {self.results.get('completed_rounds')} round(s), {len(failures)} site failure(s); see {self.log_path}"
        return "no round aggregated any site update"


class SimulationInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped ``run_flwr_simulation``; raised after the whole tree is down.

    A KeyboardInterrupt, so a loop of runs (the benchmarks) still stops at Ctrl-C; ``result`` (``interrupted=True``)
    says how far the run got, for ``resume_hint``."""

    def __init__(self, result: SimulationResult) -> None:
        super().__init__(result.failure_reason())
        self.result = result


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Ray's prefix on a worker's or actor's output: ``(pid=123)``, ``(ClientAppActor pid=123)``.
_RAY_PREFIX = re.compile(r"^\((?:\w+ )?pid=\d+(?:, ip=[\d.]+)?\)\s*")
#: Flower, Ray and flwr CLI lines that say nothing about the federation (shown with ``verbose``).
_CHATTER = re.compile(
    r"(?:DEBUG|INFO)\s*:"  # Flower's console handler, below WARNING
    r"|\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(?:DEBUG|INFO):"  # flwr records repeated by a root handler (opacus_logging)
    r"|\[\w+\.cc\s*:\s*\d+\] RAW:"  # absl lock tracing from Ray workers
    r"|Flower configuration not found|Starting local SuperLink|Using SuperLink:|Successfully started run"
    r"|Successfully installed \S+ to "  # flwr installing the FAB into FLWR_HOME (not a dependency install)
    # Benign Flower warnings: we always pass num-supernodes; actors are terminated at every normal end of a run.
    r"|WARNING\s*:\s*(?:Since flwr 1\.32, default simulated SuperNodes|Manually terminating ClientAppActor)"
)
#: A Python warning raised inside Ray or Flower; the line after it is the source line (``  warnings.warn(``).
_LIBRARY_WARNING = re.compile(r"\S*/site-packages/(?:ray|flwr)/\S+\.py:\d+: \w*Warning:")


class ConsoleFilter:
    """What of ``flwr run --stream``'s output reaches the console.

    Not ``verbose``: Flower's DEBUG/INFO lines, its CLI's start-up lines, Ray's lock tracing and Ray/Flower library
    warnings are left out; the project's lines (progress table, ``[server]``, ``[site_k]``), Flower warnings and
    errors, and tracebacks stay. Not ``colour`` (the console is no terminal): ANSI colour codes are removed."""

    def __init__(self, verbose: bool = False, colour: bool = True) -> None:
        self.verbose = verbose
        self.colour = colour
        self._skip_source_line = False
        self._shown_any = False  # blank lines before the first line shown are the dropped start-up lines' spacing

    def __call__(self, line: str) -> str | None:
        plain = _ANSI.sub("", line)
        if not self.verbose:
            skip_source, self._skip_source_line = self._skip_source_line, False
            body = _RAY_PREFIX.sub("", plain)
            if skip_source and body.startswith("  "):
                return None
            if _LIBRARY_WARNING.match(body):
                self._skip_source_line = True
                return None
            if _CHATTER.match(body) or (not self._shown_any and not body.strip()):
                return None
            self._shown_any = True
        return line if self.colour else plain


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def free_port() -> int:
    """A currently free loopback TCP port (bound and released; good enough for tests on one host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def simulation_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # flwr run spawns `flower-superlink` from PATH
    env.update(
        {
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "FLWR_HOME": str(flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # on Linux this makes Ray bind 127.0.0.1, not the host's interface
            "RAY_DEDUP_LOGS": "0",  # Ray folds the sites' similar lines into "[repeated Nx]": keep every site's own
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def write_run_config(path: Path, experiment: str, overrides: Sequence[str], output_dir: Path, num_rounds: int) -> Path:
    """Run config as a TOML file: no shell or Flower k=v quoting to get wrong for overrides with spaces."""
    import shlex

    import tomli_w

    data = {
        "experiment": experiment,
        "overrides": " ".join(shlex.quote(o) for o in overrides),
        "output-dir": str(output_dir),
        "num-server-rounds": int(num_rounds),
    }
    path.write_bytes(tomli_w.dumps(data).encode("utf-8"))
    return path


def federation_config(num_supernodes: int, num_cpus_per_client: int, num_gpus_per_client: float = 0.0) -> str:
    """``flwr run --federation-config``: Flower's ``client-resources-num-cpus`` / ``-num-gpus`` become the Ray backend's
    ``client_resources`` (``flwr/simulation/app.py``). Flower's default is 0 GPUs per ClientApp, and Ray then hides
    every GPU from it (``CUDA_VISIBLE_DEVICES=""``): a GPU run must ask for a share. A fraction (0.5) packs that many
    ClientApps onto one GPU."""
    if num_gpus_per_client < 0:
        raise ValueError(f"GPUs per site must be >= 0, got {num_gpus_per_client}")
    return (
        f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={int(num_cpus_per_client)} "
        f"client-resources-num-gpus={float(num_gpus_per_client)!r}"
    )


def check_gpu_request(train_device: str, num_gpus_per_client: float, host_gpus: int) -> tuple[str | None, str | None]:
    """(error, warning) for a simulation's GPU request, decided before any process starts.

    Errors: the experiment needs a GPU (``train.device=cuda``, e.g. ``train=gpu``) but the sites get none; sites are
    given GPUs the host does not have (Ray would wait forever to place them). Warning: ``train.device=auto`` with 0
    GPUs per site on a host that has GPUs (every site silently trains on its CPU)."""
    if num_gpus_per_client < 0:
        return f"--gpus-per-site must be >= 0, got {num_gpus_per_client}", None
    if train_device == "cuda" and num_gpus_per_client == 0:
        return (
            "train.device='cuda' (e.g. train=gpu) but --gpus-per-site is 0: Flower gives each simulated site no GPU "
            "and Ray hides them all (CUDA_VISIBLE_DEVICES=''); pass --gpus-per-site 1, or a fraction such as 0.5 to "
            "put two sites on one GPU",
            None,
        )
    if num_gpus_per_client > 0 and num_gpus_per_client > host_gpus:
        return (
            f"--gpus-per-site {num_gpus_per_client:g} but this host has {host_gpus} visible GPU(s): Ray could never "
            "place a site; use --gpus-per-site 0 (CPU) or a value <= the GPU count",
            None,
        )
    if train_device == "auto" and num_gpus_per_client == 0 and host_gpus > 0:
        return None, (
            f"this host has {host_gpus} GPU(s) but --gpus-per-site is 0: with train.device=auto every site trains on "
            "its CPU; pass --gpus-per-site 1 (or a fraction) to train on the GPU"
        )
    return None, None


def run_flwr_simulation(
    app_dir: Path,
    *,
    output_dir: Path,
    num_supernodes: int,
    experiment: str = "synth_cpu",
    overrides: Sequence[str] = (),
    num_rounds: int = 0,
    num_cpus_per_client: int = 1,
    num_gpus_per_client: float = 0.0,
    timeout_s: float = 1800.0,
    stream: TextIO | None = None,
    keep_flwr_home: bool = False,
    flwr_home: Path | None = None,
    verbose: bool = False,
) -> SimulationResult:
    """``flwr run <app_dir>`` on a private local SuperLink; success is read from results.json.

    ``stream`` receives the run's output live (the progress table); everything also goes to
    ``<output_dir>/flwr_run.log``. ``flwr_home`` (default: a fresh temp dir, removed afterwards) lets a
    caller stop this run's SuperLink from outside with ``stop_superlink(flwr_home)``. ``num_gpus_per_client`` is each
    ClientApp's GPU share (0: no GPU, see ``federation_config``). ``stream`` gets the project's own lines only (the
    progress table, ``[server]``/``[site]`` lines, warnings, errors) unless ``verbose``, and no ANSI colour codes
    unless it is a terminal (``ConsoleFilter``); the log file gets everything, unchanged.

    Ctrl-C or SIGTERM: the SuperLink, SuperExec, simulation process and Ray are stopped by PID within seconds, the
    completed rounds' checkpoints (and the sites' ledgers) stay on disk, and ``SimulationInterrupted`` is raised.
    If this process is killed outright, a watchdog process (``mlip_fed.federation.watchdog``) stops the tree.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    own_home = flwr_home is None
    flwr_home = Path(tempfile.mkdtemp(prefix="flwr_home_")) if flwr_home is None else Path(flwr_home).resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "flwr_run.log"
    # Each ClientApp gets ``num_cpus_per_client`` Ray CPUs: torch must not spawn more threads than that
    # (an explicit train.num_threads in ``overrides`` comes later and wins).
    overrides = [f"train.num_threads={num_cpus_per_client}", *overrides]
    run_config = write_run_config(flwr_home / "run_config.toml", experiment, overrides, output_dir, num_rounds)
    env = simulation_env(flwr_home, free_port(), free_port())
    flwr = shutil.which("flwr", path=env["PATH"])
    if flwr is None:
        raise FileNotFoundError(f"no `flwr` executable next to {sys.executable} or on PATH")
    cmd = [
        flwr,
        "run",
        str(Path(app_dir).resolve()),
        "--stream",
        "--run-config",
        str(run_config),
        "--federation-config",
        federation_config(num_supernodes, num_cpus_per_client, num_gpus_per_client),
    ]
    start = time.perf_counter()
    started_at = time.time()
    returncode = -1
    interrupted = False
    watchdog = None
    proc: subprocess.Popen | None = None
    restore_sigterm = _sigterm_as_interrupt()
    try:
        with log_path.open("w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                cmd, cwd=str(app_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            # The SuperLink that flwr run starts is detached and has no --parent-pid: if this process is killed
            # outright, the watchdog stops the tree (mlip_fed/federation/watchdog.py).
            watchdog = start_watchdog(flwr_home, [proc.pid], remove_home=own_home and not keep_flwr_home)
            assert proc.stdout is not None
            deadline = time.monotonic() + timeout_s
            console = ConsoleFilter(verbose=verbose, colour=_is_terminal(stream))
            for line in proc.stdout:
                log.write(line)
                shown = console(line) if stream is not None else None
                if stream is not None and shown is not None:
                    stream.write(shown)
                    stream.flush()
                if time.monotonic() > deadline:
                    proc.terminate()
                    log.write(f"\n[simulation] timed out after {timeout_s:.0f} s\n")
                    break
            returncode = proc.wait(timeout=60)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see _sigterm_as_interrupt): stop the tree below, then report
        interrupted = True
    finally:
        # A second Ctrl-C must not cut the teardown short and leave half the tree running.
        with _signals_ignored():
            if interrupted:
                with log_path.open("a", encoding="utf-8") as log:
                    log.write("\n[simulation] interrupted: stopping the SuperLink, SuperExec, simulation and Ray\n")
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            stop_superlink(flwr_home, timeout_s=INTERRUPT_GRACE_S if interrupted else 20.0)
            if watchdog is not None:
                stop_watchdog(watchdog)
            if own_home and not keep_flwr_home:
                shutil.rmtree(flwr_home, ignore_errors=True)
        restore_sigterm()
    results_file = output_dir / RESULTS_NAME
    fresh = results_file.is_file() and results_file.stat().st_mtime >= started_at  # not a previous run's file
    results = json.loads(results_file.read_text()) if fresh else None
    result = SimulationResult(returncode, results, output_dir, log_path, time.perf_counter() - start, interrupted)
    if interrupted:
        raise SimulationInterrupted(result)
    return result


#: SIGTERM-to-SIGKILL grace for an interrupted run: whoever pressed Ctrl-C wants it down within seconds, and the
#: checkpoint of the last completed round is already on disk.
INTERRUPT_GRACE_S = 5.0


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Treat SIGTERM to the launcher like Ctrl-C (KeyboardInterrupt); returns the function that undoes it.

    Only the main thread can set handlers: elsewhere this is a no-op (the watchdog still covers a killed launcher)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the duration (main thread only): the teardown runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def resume_hint(
    program: str, argv: Sequence[str], result: SimulationResult, command: Sequence[str] | None = None
) -> str:
    """What to tell the user after an interrupt: where the run stopped and the command that continues it
    (``command``, default ``[program]``, then ``argv`` with ``federation.resume=true``)."""
    import shlex

    args = [a for a in argv if not a.startswith("federation.resume=")]
    line = shlex.join([*(command or [program]), *args, "federation.resume=true"])
    done = result.completed_rounds
    kept = (
        f"round {done}'s checkpoint is kept in {result.output_dir / 'checkpoints'}"
        if done
        else "no round had completed"
    )
    return f"{program}: interrupted after round {done}; {kept}. Resume with:\n  {line}"


def run_in_process(
    experiment: str, overrides: Sequence[str], output_dir: Path, *, central: bool = False, quiet: bool = True
) -> dict[str, Any]:
    """A federation in one process, without Flower: coordinator and site runtimes called directly.

    Same maths, same trainer, same checkpoints and results.json as ``flwr run``; the benchmarks use it
    to compare learning (federated vs centralized) without paying Ray/SuperLink start-up per
    configuration. ``central=True`` trains one 'site' on the pooled data: the centralized baseline.

    Evaluation defaults to the server's, on the pooled held-out split (``federation.server_evaluation=true``,
    ``site_evaluation=false``): the one yardstick shared by the federated and the centralized run. ``overrides`` may
    switch the sites' own evaluation on; each site is then called directly.
    """
    from mlip_fed import pipeline
    from mlip_fed.federation.coordinator import coordinator_from_run
    from mlip_fed.federation.payload import RoundRequest, SiteEvaluation, SiteFailure, format_site_error
    from mlip_fed.federation.run_config import experiment_from_run_config
    from mlip_fed.federation.site import SiteRuntime

    defaults = ["federation.server_evaluation=true", "federation.site_evaluation=false"]
    run = experiment_from_run_config(
        {
            "experiment": experiment,
            "overrides": " ".join([*defaults, *overrides]),
            "output-dir": str(Path(output_dir).resolve()),
        }
    )
    log = (lambda line: None) if quiet else print
    indices: list[int | None] = [None] if central else list(range(run.cfg.data.synthetic.num_sites))
    sites: list[SiteRuntime] = []

    def evaluate_sites(request: RoundRequest) -> tuple[list[SiteEvaluation], list[SiteFailure]]:
        done, failed = [], []
        for k, site in enumerate(sites):
            try:
                done.append(site.evaluate_round(request))
            except Exception as err:  # named and left out, as over Flower
                failed.append(SiteFailure(request.server_round, site.site_id, k, format_site_error(site.site_id, err)))
        return done, failed

    coordinator = coordinator_from_run(run, log=log, site_evaluator=evaluate_sites)
    sites.extend(SiteRuntime(run.cfg, k, run.output_dir / "sites" / f"site_{k}", log=log) for k in indices)
    coordinator.start()
    t0 = time.perf_counter()
    for server_round in coordinator.remaining_rounds():
        request = coordinator.round_request(server_round)
        updates = [site.train_round(request) for site in sites]
        coordinator.complete_round(server_round, updates, [], num_sampled=len(sites))
    summary = coordinator.finish()
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["peak_rss_gib"] = pipeline.peak_rss_gib()
    return summary
