"""The one configuration schema (docs/architecture.md, invariant 2).

Hydra composes YAML into a plain dict; these pydantic models validate it. A site's own YAML and
Flower's ``run_config`` overrides end up here too, so a bad value fails at start-up with the
field, the value and the reason, wherever it came from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlip_fed.eval.config import EvalConfig
from mlip_fed.model.config import ModelConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names each bad field, value and reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: SynthCXR difficulty tiers; kept equal to ``mlip_fed.data.synthetic.findings.DIFFICULTY_NAMES`` (tested), spelled out here so
#: reading a config never imports the generator.
SynthDifficulty = Literal["standard", "cpu"]


class SyntheticDataConfig(_Strict):
    """SynthCXR federation generated on first use (built-in benchmark, no downloads)."""

    num_sites: int = Field(default=3, ge=1, le=1000)
    studies_per_site: int = Field(default=300, ge=4)
    seed: int = 0
    dirichlet_alpha: float | None = Field(default=None, gt=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    #: How visible findings are (``mlip_fed.data.synthetic.findings.DIFFICULTY_TIERS``): ``standard`` (raw-pixel calibrated)
    #: or ``cpu`` (learnable by the CPU default tower at 64² in minutes). Same studies, reports and labels in both.
    difficulty: SynthDifficulty = "standard"


class DataConfig(_Strict):
    """Where a run's image–report pairs come from and how they are shaped."""

    source: Literal["synthetic", "manifest", "mimic", "chexpert"] = "synthetic"
    #: Root folder: generated SynthCXR lives here (``site_<k>/manifest.csv``); for ``mimic`` the dataset root.
    root: Path = Path("runs/data/synthcxr")
    #: CSV manifest (``source=manifest``) or CheXpert CSV (``source=chexpert``).
    manifest: Path | None = None
    reports_root: Path | None = None
    image_size: int = Field(default=64, ge=16, le=1024)
    #: Loader worker processes decoding and augmenting studies (0: in the training process). The GPU config uses
    #: several: MONAI augmentation at 224² costs tens of ms per study on one core (docs/performance.md).
    num_workers: int = Field(default=0, ge=0, le=64)
    #: Keep the workers (and their per-record caches of the deterministic transform head) alive between epochs and
    #: rounds; augmentation stays seeded per (epoch, worker), so resuming mid-epoch is exact either way.
    persistent_workers: bool = True
    #: Batches each worker prepares ahead.
    prefetch_factor: int = Field(default=2, ge=1, le=64)
    #: Page-locked batches, so the copy to the GPU is asynchronous: None = when training on CUDA.
    pin_memory: bool | None = None
    #: Run the random augmentation (crop, rotation, intensity jitter) batched on the training device
    #: (``data.device_augment.DeviceAugment``) instead of per study in the loader, which then only resizes and pads:
    #: same distributions, far fewer CPU cores per GPU (docs/performance.md). On in configs/train/gpu.yaml.
    augment_on_device: bool = False
    synthetic: SyntheticDataConfig = SyntheticDataConfig()

    @model_validator(mode="after")
    def _source_needs_path(self) -> DataConfig:
        if self.source in ("manifest", "chexpert") and self.manifest is None:
            raise ValueError(f"data.source={self.source!r} needs data.manifest (path to the CSV)")
        return self


class TrainConfig(_Strict):
    """The local trainer: the same settings centrally and at every site."""

    epochs: int = Field(default=1, ge=0)
    #: Stop after this many optimiser steps in total (None: run all epochs).
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=2)
    grad_accum_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-4, gt=0, le=1)
    min_lr: float = Field(default=1e-6, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    #: Fraction of all steps spent in linear warm-up before the cosine decay (MGCA: 0.4).
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(default=5.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Mixed precision: "auto" = bf16 autocast on a GPU, fp32 on a CPU; "bf16" = bf16 autocast on either (CPU autocast
    #: supports it; slower than fp32 on CPUs without bf16 instructions); "off" = fp32.
    amp: Literal["auto", "off", "bf16"] = "auto"
    num_threads: int | None = Field(default=None, ge=1)
    seed: int = 0
    log_every: int = Field(default=10, ge=1)
    #: A loss above this (or NaN/inf) stops the run and names the objective.
    loss_explode_threshold: float = Field(default=1e4, gt=0)
    progress_bar: bool = True
    tensorboard: bool = False
    #: Continue from ``<output_dir>/checkpoint.pt`` when it exists (refused if the model config differs).
    resume: bool = True
    #: Save a resumable checkpoint every this many optimiser steps (and at every epoch end).
    checkpoint_every_steps: int = Field(default=200, ge=1)
    #: Convolution weights and image batches in channels-last (NHWC) memory: what cuDNN's bf16 tensor-core kernels
    #: want (on in configs/train/gpu.yaml); numerically the same convolution, only the layout differs.
    channels_last: bool = False
    #: ``torch.compile`` the towers and the fusion head (``mlip_fed.train.trainer.compile_towers``). Off by default:
    #: the first steps pay the compilation, and it is refused with a DP mechanism (Opacus' per-sample hooks).
    compile: bool = False
    #: Text-tower attention: "eager" (the maps come from the attention op itself) or "sdpa" (PyTorch's fused kernel;
    #: the last layer's [CLS] attention is recomputed for the word weights). The fusion head always uses SDPA.
    attention: Literal["eager", "sdpa"] = "eager"

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must not exceed train.lr={self.lr}")
        return self


class PrivacyPolicy(_Strict):
    """A site's own privacy policy. The server may ask for training; it can never loosen this."""

    mechanism: Literal["none", "bucketed", "decomposable"] = "none"
    #: Total record-level budget over every round and run this site will ever join.
    epsilon_budget: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    noise_multiplier: float | None = Field(default=None, gt=0)
    min_noise_multiplier: float = Field(default=0.0, ge=0)
    clipping_norm: float = Field(default=1.0, gt=0)
    num_buckets: int = Field(default=8, ge=1)
    #: Which upper bound is this site's epsilon (budget checks, refusals, reports): ``max`` of RDP and PRV (the
    #: conservative default), ``rdp`` (PRV never computed in a round), or ``prv`` (tighter; RDP when PRV fails).
    #: sigma is calibrated with RDP in every case (conservative for ``prv``).
    accountant: Literal["max", "rdp", "prv"] = "max"
    privacy_unit: Literal["patient", "record"] = "patient"
    #: Noise on released prototype sums and counts (units of the unit-norm bound).
    prototype_noise_multiplier: float = Field(default=4.0, gt=0)
    release_prototypes: bool = True
    #: Categories whose NOISY count is below this are suppressed in a DP prototype release.
    prototype_count_threshold: float = Field(default=5.0, ge=0)
    #: Public cap on the distinct positive categories one privacy unit adds to the bank (a unit's records are
    #: averaged per category first, so it adds at most 1 per category row and count): the release's sensitivity.
    prototype_contribution_bound: int = Field(default=14, ge=1)
    #: Noise hardening (docs/privacy.md "Randomness"): reseed the noise generator from OS entropy for every tensor and
    #: use Opacus' floating-point mitigation (sum of 4 draws / 2). The noise is secret either way.
    secure_mode: bool = True
    #: DEBUG ONLY. Derive the noise, Poisson sample and dropout from (seed, site, run id, round): reproducible, and
    #: therefore NOT PRIVATE against the server, which knows those values. Warned every round, marked in the ledger.
    insecure_reproducible_noise: bool = False
    #: Whether this site answers evaluation requests (metrics of the global model on its own test split). Those
    #: metrics are computed on private data and no accountant charges them, so under a DP mechanism the default
    #: (None) is to refuse; ``true`` releases them outside epsilon (said in the site's log every time), ``false``
    #: refuses them also without DP.
    release_evaluation: bool | None = None

    @property
    def evaluation_released(self) -> bool:
        """The effective switch: explicit, else on without DP and off under DP."""
        if self.release_evaluation is not None:
            return self.release_evaluation
        return self.mechanism == "none"

    @model_validator(mode="after")
    def _dp_needs_budget(self) -> PrivacyPolicy:
        if self.mechanism != "none" and self.epsilon_budget is None:
            raise ValueError(f"privacy.mechanism={self.mechanism!r} needs privacy.epsilon_budget")
        if self.noise_multiplier is not None and self.noise_multiplier < self.min_noise_multiplier:
            raise ValueError(
                f"privacy.noise_multiplier={self.noise_multiplier} is below the site's "
                f"privacy.min_noise_multiplier={self.min_noise_multiplier}"
            )
        return self


class FederationConfig(_Strict):
    """Server-side federation settings."""

    num_rounds: int = Field(default=3, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    min_train_nodes: int = Field(default=2, ge=1)
    min_available_nodes: int = Field(default=2, ge=1)
    proximal_mu: float = Field(default=0.01, ge=0)
    server_lr: float = Field(default=1e-2, gt=0)
    local_epochs: int = Field(default=1, ge=1)
    #: A category with fewer pooled members than this keeps its previous prototype.
    bank_min_count: int = Field(default=5, ge=1)
    round_timeout_s: float = Field(default=3600.0, gt=0)
    #: Evaluate the global model at round 0, every this many rounds (0: no intermediate round) and at the last.
    evaluate_every: int = Field(default=1, ge=0)
    #: Each site scores the global model on its own test split and returns metrics with counts (``@app.evaluate``,
    #: ``federation/site_evaluation.py``); the server aggregates them. Where the labelled data is: at the hospitals.
    site_evaluation: bool = True
    #: The server also evaluates on a set it holds itself (``data.*`` of the server's experiment): simulations, or a
    #: public test set. Off by default: a deployed server holds no patient data, and this would read whatever its
    #: data config names.
    server_evaluation: bool = False
    #: Studies of a site's train split its linear probe is fitted on (a seeded subset when the split is larger): one
    #: evaluation costs one encoder pass over these plus the test split.
    site_evaluation_max_train: int = Field(default=2000, ge=10)
    resume: bool = False
    #: Client-level DP (DP-FedAvg, ``federation/client_dp.py``): clip each site's update to the norm, average with
    #: equal weights, add server-side Gaussian noise; reported apart from the sites' sample-level epsilon.
    client_dp: bool = False
    #: z: noise std on the update sum in units of the clipping norm. Required when client_dp is on.
    client_dp_noise_multiplier: float | None = Field(default=None, gt=0)
    #: S: L2 bound on one site's whole update (theta_site - theta_global). Required when client_dp is on.
    client_dp_clipping_norm: float | None = Field(default=None, gt=0)
    #: delta_c of the client-level epsilon (unit: one site).
    client_dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    #: DEBUG ONLY. Client-DP noise and site sampling from ``seed`` and the round instead of the server's OS entropy:
    #: reproducible, and NOT PRIVATE against anyone who knows the config (the sites do). Warned every round.
    client_dp_insecure_reproducible_noise: bool = False
    #: SecAgg+ (``server/secagg.py``): the server learns only the sum over sites of weights, bank sums and counts.
    secure_aggregation: bool = False
    #: Neighbours each site secret-shares its keys with (itself included); Flower needs > 2.
    secagg_num_shares: int = Field(default=3, ge=3)
    #: Shares needed to unmask; a round survives ``num_shares - threshold`` drop-outs among a site's neighbours.
    secagg_reconstruction_threshold: int = Field(default=2, ge=2)
    #: Public upper bound on one site's ``num_examples``: scales the masked values into SecAgg+'s clipping range.
    #: Keep it near the largest site: the averaged weights carry ~1e-6 * secagg_max_examples / num_examples error.
    secagg_max_examples: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _secure_aggregation_can_run(self) -> FederationConfig:
        if not self.secure_aggregation:
            return self
        if self.client_dp:
            raise ValueError(
                "federation.secure_aggregation=true with client_dp=true: client-level DP clips each site's update at "
                "the server, which under SecAgg+ never sees one; use one or the other"
            )
        if self.secagg_reconstruction_threshold >= self.secagg_num_shares:
            raise ValueError(
                f"federation.secagg_reconstruction_threshold={self.secagg_reconstruction_threshold} must be below "
                f"secagg_num_shares={self.secagg_num_shares} (Flower's SecAgg+ rule)"
            )
        if self.secagg_reconstruction_threshold > self.min_train_nodes:
            raise ValueError(
                f"federation.secagg_reconstruction_threshold={self.secagg_reconstruction_threshold} exceeds "
                f"min_train_nodes={self.min_train_nodes}: a round with that few sites could never be unmasked"
            )
        if self.transport_dtype != "float32":
            raise ValueError(
                f"federation.transport_dtype={self.transport_dtype!r} with secure_aggregation=true: SecAgg+ quantizes "
                "the upload itself and the secure path sends float32; leave transport_dtype=float32"
            )
        return self

    #: Wire dtype of floating weights and bank tensors (``mlip_wire/codec.py``), both directions; restored to float32 on
    #: arrival. float16/bfloat16 halve the bytes per round; integer tensors (counts, flags) always travel as they are.
    transport_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class ExperimentConfig(_Strict):
    """Everything one run needs; ``mlip-pretrain`` and the Flower apps all build this."""

    name: str = "synth_cpu"
    output_dir: Path = Path("runs/synth_cpu")
    seed: int = 0
    #: Encoders, projection and the five objectives (``model.objectives``).
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    privacy: PrivacyPolicy = PrivacyPolicy()
    federation: FederationConfig = FederationConfig()

    @model_validator(mode="after")
    def _one_image_size(self) -> ExperimentConfig:
        if self.model.image.image_size != self.data.image_size:
            raise ValueError(
                f"model.image.image_size={self.model.image.image_size} differs from "
                f"data.image_size={self.data.image_size}; the encoder must see the size the data is resized to"
            )
        if self.train.compile and self.privacy.mechanism != "none":
            raise ValueError(
                f"train.compile=true with privacy.mechanism={self.privacy.mechanism!r}: the DP engine's per-sample "
                "gradient hooks are not compiled; set train.compile=false"
            )
        return self


def validate_experiment(raw: dict[str, Any], origin: str = "config") -> ExperimentConfig:
    """Validate a composed config dict; raise ConfigError naming every bad field, value and reason."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} invalid setting(s):"]
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        value = item.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {field} = {shown}: {item['msg']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- a deployed site (issue 5)
#: A site id travels in logs, file names and error messages: keep it to a safe, readable alphabet.
SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: A FAB's SHA-256, as Flower computes it over the .fab file (``flwr build``, ``flwr run``).
FAB_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")


class SiteResources(_Strict):
    """What the hospital lets one ClientApp use; every message runs in a fresh process, so this is per process."""

    #: torch intra-op threads per ClientApp process (None: torch's default, usually every core).
    num_threads: int | None = Field(default=None, ge=1, le=1024)


class SiteConfig(_Strict):
    """One hospital's ``site.yaml``: who it is, where the SuperLink is, its keys, its data and its own privacy.

    The server names the experiment (model, objectives, schedule); the site alone decides what data it
    trains on, on which device, and under which privacy policy (docs/architecture.md, invariant 3). Paths are
    resolved against the YAML file's folder by ``mlip_fed.deploy.site_config.load_site_config``.
    """

    site_id: str = Field(pattern=SITE_ID_PATTERN)
    #: SuperLink Fleet API as ``host:port`` (no URL scheme).
    superlink: str
    #: PEM CA certificate that signed the SuperLink's certificate (TLS is not optional for a hospital).
    root_certificates: Path
    #: The site's EC private key in OpenSSH format (``mlip-certs site``); its ``.pub`` is registered on the SuperLink.
    auth_private_key: Path
    auth_public_key: Path | None = None
    data: DataConfig
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resources: SiteResources = SiteResources()
    #: Which GPU a site uses is the SuperNode's environment (CUDA_VISIBLE_DEVICES), not this file.
    #: Checkpoints, bank history and the privacy ledger live here; it must outlive every run.
    state_dir: Path
    privacy: PrivacyPolicy = PrivacyPolicy()
    #: This site's copy of the server's ``model.image.pretrained_path`` (file, model folder or cached hub id), used
    #: here instead of the server's path. Same checkpoint: the model is built and the weights checked before the
    #: site's data loads; the global weights replace the tower's from round 1 on.
    image_weights: str | None = None
    #: This site's copy of the server's ``model.text.checkpoint_dir`` (model folder or cached hub id). It also brings
    #: the tokenizer, which the server never sends, so it must be the very same model and tokenizer.
    text_weights: str | None = None
    #: The SuperNode's own ClientAppIo/runtime API port on 127.0.0.1 (two sites on one host need different ones).
    runtime_port: int = Field(default=9094, ge=1, le=65535)
    #: Reconnection policy when the SuperLink is unreachable; after it the launcher exits non-zero.
    max_retries: int = Field(default=10, ge=0)
    max_wait_time_s: float = Field(default=300.0, gt=0)
    #: The only Flower apps (FABs) this site runs: SHA-256 of each FAB file, as ``mlip-certs fab-hash`` prints it.
    #: Any other FAB the server sends is refused before any of its code runs (``mlip_fed.deploy.fab_guard``);
    #: empty = the site refuses to join (``mlip-client`` exits 2).
    approved_fab_hashes: list[str] = Field(default_factory=list)

    @field_validator("approved_fab_hashes")
    @classmethod
    def _fab_hashes(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            digest = item.strip().lower()
            if not FAB_HASH_PATTERN.fullmatch(digest):
                raise ValueError(
                    f"{item!r} is not a FAB hash: expected 64 hex digits (the SHA-256 `mlip-certs fab-hash` prints)"
                )
            out.append(digest)
        return list(dict.fromkeys(out))

    @field_validator("superlink")
    @classmethod
    def _superlink_address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or "://" in value or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port (e.g. superlink.hospital.org:9092), without a URL scheme")
        return value

    @field_validator("data")
    @classmethod
    def _site_data(cls, value: DataConfig) -> DataConfig:
        if value.source == "synthetic":
            raise ValueError(
                "data.source='synthetic' is the simulation benchmark; a site trains on its own data: "
                "use 'manifest' (CSV, e.g. from mlip-data synth) or 'mimic'"
            )
        if value.source == "chexpert":
            raise ValueError("data.source='chexpert' has no reports; a site needs image-report pairs")
        return value
