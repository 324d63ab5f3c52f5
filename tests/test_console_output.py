"""What a simulation prints on the console: the project's lines by default, Flower/Ray chatter only with --verbose,
no ANSI codes off a terminal; Opacus leaves no root log handler; the DP engine does not repeat torch's full-backward-
hook warning every step. All offline and in seconds."""

from __future__ import annotations

import io
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mlip_fed.federation.simulation import ConsoleFilter, _is_terminal
from mlip_fed.model.objectives.global_itc import soft_target_itc_loss
from mlip_fed.model.outputs import LossOutput
from mlip_fed.privacy.buckets import bucket_ids
from mlip_fed.privacy.opacus_logging import OPACUS_DATEFMT, OPACUS_FORMAT, drop_opacus_root_handler

# Lines as `flwr run --stream` relays them from a Flower 1.42 simulation (flwr_run.log of a smoke run).
STREAM = [
    "\n",
    "Flower configuration not found. Created default configuration at /tmp/flwr_home_x/config.toml\n",
    "Starting local SuperLink on 127.0.0.1:57143...\n",
    "Using SuperLink: local (127.0.0.1:57143)\n",
    "Successfully started run 12500660681578558825\n",
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `12500660681578558825`\n",
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
    "\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>\n",
    "Successfully installed mlip-fed to /tmp/flwr_home_x/apps/mlipfed.mlip-fed.0.1.0.6fd86492.\n",
    "12/07/2026 17:16:41:DEBUG:Initialising: RayBackend\n",
    "/x/.venv/lib/python3.11/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions\n",
    "  warnings.warn(\n",
    "\x1b[36m(pid=17537)\x1b[0m [mutex.cc : 452] RAW: Lock returning 0x55ec03c5f8f0   @ 0x7f4731198752\n",
    "[server] smoke: 6 round(s), strategy fedavg, output /tmp/run\n",
    "round   sites     loss   AUROC    R@5  seconds failures\n",
    "    1     2/2  16.5957  0.0000 0.2857     29.9        0\n",
    "\x1b[36m(ClientAppActor pid=17625)\x1b[0m [site_1] round 2: cannot read checkpoint\n",
    "\x1b[36m(ClientAppActor pid=17625)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor\n",
    "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: boom\n",
    "Traceback (most recent call last):\n",
    '  File "server/app.py", line 1, in main\n',
    "[server] completed: 6/6 rounds aggregated, 0 site failure(s); results in /tmp/run\n",
]


def _shown(console: ConsoleFilter) -> list[str]:
    return [out for line in STREAM if (out := console(line)) is not None]


def test_default_console_keeps_the_projects_lines_and_drops_the_chatter() -> None:
    shown = _shown(ConsoleFilter(colour=False))
    assert shown == [
        "[server] smoke: 6 round(s), strategy fedavg, output /tmp/run\n",
        "round   sites     loss   AUROC    R@5  seconds failures\n",
        "    1     2/2  16.5957  0.0000 0.2857     29.9        0\n",
        "(ClientAppActor pid=17625) [site_1] round 2: cannot read checkpoint\n",
        "ERROR :     ServerApp thread raised an exception: boom\n",
        "Traceback (most recent call last):\n",
        '  File "server/app.py", line 1, in main\n',  # a traceback's source lines are not a warning's
        "[server] completed: 6/6 rounds aggregated, 0 site failure(s); results in /tmp/run\n",
    ]
    assert not any("\x1b" in line for line in shown)


def test_verbose_shows_everything_and_colour_only_on_a_terminal() -> None:
    assert _shown(ConsoleFilter(verbose=True, colour=True)) == STREAM
    plain = _shown(ConsoleFilter(verbose=True, colour=False))
    assert len(plain) == len(STREAM) and not any("\x1b" in line for line in plain)
    assert not _is_terminal(io.StringIO()) and not _is_terminal(None)


def test_importing_opacus_leaves_no_root_handler() -> None:
    import mlip_fed.privacy.accountant  # noqa: F401  (imports opacus)
    import mlip_fed.privacy.engine  # noqa: F401

    def opacus_like(handler: logging.Handler) -> bool:
        fmt = handler.formatter
        return fmt is not None and fmt._fmt == OPACUS_FORMAT and fmt.datefmt == OPACUS_DATEFMT

    root = logging.getLogger()
    assert not any(opacus_like(h) for h in root.handlers)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(OPACUS_FORMAT, OPACUS_DATEFMT))
    root.addHandler(handler)
    try:
        assert drop_opacus_root_handler() == [handler] and handler not in root.handlers
    finally:
        root.removeHandler(handler)


class _Towers(nn.Module):
    """Linear towers on data tensors: the first layers' inputs need no gradient, as an encoder's stem."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(6, 4)

    def forward(self, batch: dict) -> LossOutput:
        v = F.normalize(self.image(batch["image"]), dim=1)
        t = F.normalize(self.text(batch["text"]), dim=1)
        loss = soft_target_itc_loss(v, t, 0.1, group_ids=batch.get("group_ids"))
        return LossOutput(total=loss, parts={"itc": loss})


def test_dp_step_does_not_warn_about_full_backward_hooks() -> None:
    from mlip_fed.privacy.engine import BucketedClippingGradient

    torch.set_num_threads(1)
    model = _Towers()
    engine = BucketedClippingGradient(model, noise_multiplier=1.0, clipping_norm=1.0, num_buckets=4, seed=1)
    patients = [f"p{i // 2}" for i in range(8)]
    batch = {"image": torch.randn(8, 6), "text": torch.randn(8, 6), "patient_id": patients}
    batch["group_ids"] = bucket_ids(patients, 4)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                engine(model, batch, loss_scale=1.0)
    finally:
        engine.close()
    assert not [w for w in caught if "Full backward hook" in str(w.message)]
    assert all(p.grad is not None for p in model.parameters())
