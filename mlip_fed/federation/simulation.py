"""Run ``flwr run`` safely and decide success from what the ServerApp wrote.

Three Flower behaviours make a naive ``flwr run .`` unsafe (reference/flower-1.42.md §6, §14):
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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from mlip_fed.federation.report import RESULTS_NAME


@dataclass
class SimulationResult:
    returncode: int  # flwr run's own exit status (0 even when the run failed)
    results: dict[str, Any] | None
    output_dir: Path
    log_path: Path
    seconds: float

    @property
    def ok(self) -> bool:
        """A run succeeded when the ServerApp finished and aggregated at least one round."""
        return bool(
            self.results and self.results.get("status") == "completed" and self.results.get("aggregated_rounds", 0) > 0
        )

    def failure_reason(self) -> str:
        if self.results is None:
            return (
                f"no {RESULTS_NAME} in {self.output_dir}: the ServerApp did not start or crashed; see {self.log_path}"
            )
        status = self.results.get("status")
        if status != "completed":
            failures = self.results.get("failures", [])
            return f"run status {status!r} after {self.results.get('completed_rounds')} round(s), {len(failures)} site failure(s); see {self.log_path}"
        return "no round aggregated any site update"


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
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray binds 127.0.0.1 (reference §7)
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


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of ``flower-superlink`` processes started with this exact FLWR_HOME (ours, and only ours)."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"flower-superlink" not in cmdline:
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return pids


def superlink_tree_rss_bytes(flwr_home: Path) -> int:
    """Resident memory of the SuperLink started under ``flwr_home`` and everything below it (ServerApp, Ray,
    ClientApps): what a simulation really costs, which the calling process's own RSS does not show."""
    total = 0
    for root in superlink_pids(flwr_home):
        for pid in [root, *descendants(root)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:  # the process ended between listing and reading
                continue
    return total


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first discovered breadth-first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def stop_superlink(flwr_home: Path, timeout_s: float = 20.0) -> list[int]:
    """Stop our SuperLink and everything it started (SuperExec, the simulation process, Ray), by PID.

    The simulation process runs the ServerApp with an in-process grid: it does not die with the
    SuperLink, so the whole tree is signalled (SIGTERM, then SIGKILL after ``timeout_s``).
    """
    roots = superlink_pids(Path(flwr_home))
    pids = [p for root in roots for p in [*reversed(descendants(root)), root]]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


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
) -> SimulationResult:
    """``flwr run <app_dir>`` on a private local SuperLink; success is read from results.json.

    ``stream`` receives the run's output live (the progress table); everything also goes to
    ``<output_dir>/flwr_run.log``. ``flwr_home`` (default: a fresh temp dir, removed afterwards) lets a
    caller stop this run's SuperLink from outside with ``stop_superlink(flwr_home)``. ``num_gpus_per_client`` is each
    ClientApp's GPU share (0: no GPU, see ``federation_config``).
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
    try:
        with log_path.open("w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                cmd, cwd=str(app_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            try:
                assert proc.stdout is not None
                deadline = time.monotonic() + timeout_s
                for line in proc.stdout:
                    log.write(line)
                    if stream is not None:
                        stream.write(line)
                        stream.flush()
                    if time.monotonic() > deadline:
                        proc.terminate()
                        log.write(f"\n[simulation] timed out after {timeout_s:.0f} s\n")
                        break
                returncode = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        stop_superlink(flwr_home)
        if own_home and not keep_flwr_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
    results_file = output_dir / RESULTS_NAME
    fresh = results_file.is_file() and results_file.stat().st_mtime >= started_at  # not a previous run's file
    results = json.loads(results_file.read_text()) if fresh else None
    return SimulationResult(returncode, results, output_dir, log_path, time.perf_counter() - start)


def run_in_process(
    experiment: str, overrides: Sequence[str], output_dir: Path, *, central: bool = False, quiet: bool = True
) -> dict[str, Any]:
    """A federation in one process, without Flower: coordinator and site runtimes called directly.

    Same maths, same trainer, same checkpoints and results.json as ``flwr run``; the benchmarks use it
    to compare learning (federated vs centralized) without paying Ray/SuperLink start-up per
    configuration. ``central=True`` trains one 'site' on the pooled data: the centralized baseline.
    """
    from mlip_fed import pipeline
    from mlip_fed.federation.coordinator import coordinator_from_run
    from mlip_fed.federation.run_config import experiment_from_run_config
    from mlip_fed.federation.site import SiteRuntime

    run = experiment_from_run_config(
        {"experiment": experiment, "overrides": " ".join(overrides), "output-dir": str(Path(output_dir).resolve())}
    )
    log = (lambda line: None) if quiet else print
    coordinator = coordinator_from_run(run, log=log)
    indices: list[int | None] = [None] if central else list(range(run.cfg.data.synthetic.num_sites))
    sites = [SiteRuntime(run.cfg, k, run.output_dir / "sites" / f"site_{k}", log=log) for k in indices]
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
