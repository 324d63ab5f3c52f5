"""Load a hospital's ``site.yaml`` into ``SiteConfig`` and check its data without touching the network.

Every problem is reported before anything starts, naming the file, the field, the value and the
reason: a typo found by ``mlip-client --check`` costs a minute; one found in round 3 costs a run.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mlip_fed.config import ConfigError, ExperimentConfig, SiteConfig, format_validation_error
from mlip_fed.data.records import SkipReport, StudyRecord
from mlip_fed.hf_cache import WeightsNotFound, looks_like_hub_id, resolve_weights_location
from mlip_fed.model.config import ModelConfig

#: Path fields of the site YAML, resolved against the YAML's folder (a site config is usually moved with its files).
_TOP_PATHS = ("root_certificates", "auth_private_key", "auth_public_key", "state_dir")
_DATA_PATHS = ("root", "manifest", "reports_root")
#: A local path (resolved like the above) or a hub id (``org/name``, looked up in the local Hugging Face cache).
_WEIGHT_FIELDS = ("image_weights", "text_weights")


def load_site_config(path: str | Path) -> SiteConfig:
    """Parse, validate and resolve ``path``; raise ConfigError naming the file, field, value and reason."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: site config not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of site settings, got {type(raw).__name__}")
    raw = _resolve_paths(raw, path.parent)
    try:
        site = SiteConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    problems = _file_problems(site)
    if problems:
        raise ConfigError("\n".join([f"{path}: {len(problems)} invalid setting(s):", *problems]))
    return site


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value:
            candidate = Path(value).expanduser()
            return str(candidate if candidate.is_absolute() else (base / candidate).resolve())
        return value

    def resolve_weights(value: Any) -> Any:
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return value
        local = (base / Path(value).expanduser()).resolve()
        return str(local) if local.exists() or not looks_like_hub_id(value) else value

    out = {
        k: (resolve(v) if k in _TOP_PATHS else resolve_weights(v) if k in _WEIGHT_FIELDS else v) for k, v in raw.items()
    }
    if isinstance(out.get("data"), dict):
        out["data"] = {k: (resolve(v) if k in _DATA_PATHS else v) for k, v in out["data"].items()}
    return out


def _file_problems(site: SiteConfig) -> list[str]:
    """What pydantic cannot see: files that must exist, and a private key others can read."""
    problems = []
    for name in ("root_certificates", "auth_private_key", "auth_public_key"):
        value = getattr(site, name)
        if value is not None and not Path(value).is_file():
            problems.append(f"  {name} = {str(value)!r}: file not found")
    key = site.auth_private_key
    if key.is_file() and key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(key.stat().st_mode)
        problems.append(
            f"  auth_private_key = {str(key)!r}: permissions {mode:04o} let other users read the site's key; "
            f"run chmod 600 {key}"
        )
    data = site.data
    if data.source == "manifest" and data.manifest is not None and not Path(data.manifest).is_file():
        problems.append(f"  data.manifest = {str(data.manifest)!r}: file not found")
    if data.source == "mimic" and not Path(data.root).is_dir():
        problems.append(f"  data.root = {str(data.root)!r}: folder not found (MIMIC-CXR-JPG root)")
    if site.state_dir.exists() and not site.state_dir.is_dir():
        problems.append(f"  state_dir = {str(site.state_dir)!r}: exists and is not a folder")
    for name in _WEIGHT_FIELDS:
        value = getattr(site, name)
        if value is not None:
            try:
                resolve_weights_location(value, field=name)
            except WeightsNotFound as err:
                problems.append(f"  {err}")
    return problems


def site_experiment(site: SiteConfig, cfg: ExperimentConfig) -> ExperimentConfig:
    """The server's experiment as this site runs it: the site's data, device, threads and privacy policy win.

    The server chooses the model and the schedule; it cannot choose the site's data or loosen its
    policy (docs/architecture.md, invariant 3), so those fields come from the site YAML only. Where the model's
    pretrained weights live at this site may differ too (``site_model``). The data's image
    size must match the server's model, which is checked here rather than in round 1.
    """
    data = site.data
    if data.image_size != cfg.data.image_size:
        raise ConfigError(
            f"site {site.site_id}: data.image_size={data.image_size} differs from the server's experiment "
            f"data.image_size={cfg.data.image_size}; set data.image_size: {cfg.data.image_size} in the site YAML"
        )
    train = cfg.train.model_copy(update={"device": site.device, "num_threads": site.resources.num_threads})
    # The server's output_dir is a path on the server; everything this site writes goes to its state_dir.
    update = {"data": data, "privacy": site.privacy, "train": train, "output_dir": site.state_dir}
    return cfg.model_copy(update=update | {"model": site_model(site, cfg)})


def site_model(site: SiteConfig, cfg: ExperimentConfig) -> ModelConfig:
    """The server's model config with this site's own weight locations (``image_weights``, ``text_weights``).

    Only a path the server's experiment uses can be overridden: a site's text checkpoint under a server that
    trains its text tower from scratch would build another architecture and fail in round 1.
    """
    model = cfg.model
    overrides = (
        ("image_weights", "image", "pretrained_path", site.image_weights),
        ("text_weights", "text", "checkpoint_dir", site.text_weights),
    )
    for name, tower, key, value in overrides:
        if value is None:
            continue
        if getattr(getattr(model, tower), key) is None:
            raise ConfigError(
                f"site {site.site_id}: {name}={value!r} but the server's experiment sets no model.{tower}.{key} "
                f"(the {tower} tower starts from scratch); remove {name} from the site YAML"
            )
        part = getattr(model, tower).model_copy(update={key: value})
        model = model.model_copy(update={tower: part})
    return model


# ---------------------------------------------------------------------------- --check
@dataclass
class SiteDataCheck:
    """What ``mlip-client --check`` found: studies per split, patients, and skips by reason."""

    splits: dict[str, int] = field(default_factory=dict)
    patients: int = 0
    skips: SkipReport = field(default_factory=SkipReport)

    @property
    def train(self) -> int:
        return self.splits.get("train", 0)

    def summary(self) -> str:
        splits = ", ".join(f"{k}={v}" for k, v in sorted(self.splits.items())) or "none"
        return "\n".join(
            [f"studies: {sum(self.splits.values())} ({splits}), patients: {self.patients}", self.skips.summary()]
        )


def check_site_data(site: SiteConfig, decode: bool = True) -> SiteDataCheck:
    """Load every study with the project's readers (and decode each image once), as training would."""
    from mlip_fed.data.dataset import validate_records

    records: list[StudyRecord]
    data = site.data
    if data.source == "manifest":
        from mlip_fed.data.manifest import read_manifest

        assert data.manifest is not None
        records, report = read_manifest(data.manifest)
    elif data.source == "mimic":
        from mlip_fed.data.mimic import read_mimic

        records, report = read_mimic(data.root, reports_root=data.reports_root)
    else:  # SiteConfig refuses the others
        raise ConfigError(f"data.source={data.source!r}: no site reader")
    if decode:
        records, decoded = validate_records(records)
        report.merge(decoded)
        report.loaded = len(records)
    result = SiteDataCheck(skips=report, patients=len({r.patient_id for r in records}))
    for record in records:
        result.splits[record.split] = result.splits.get(record.split, 0) + 1
    return result
