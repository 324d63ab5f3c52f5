"""Site YAML: validation names field, value and reason; paths resolve against the YAML; --check counts data."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mlip_fed.cli.client import main as client_main
from mlip_fed.config import ConfigError, ExperimentConfig
from mlip_fed.deploy.certs import write_ca, write_site_keys
from mlip_fed.deploy.site_config import check_site_data, load_site_config, site_experiment
from mlip_fed.deploy.supernode import NODE_CONFIG_KEY, supernode_command


def _manifest(folder: Path) -> Path:
    """Three studies: two decodable images and one missing file (skipped, with its reason)."""
    rows = []
    for k in range(3):
        image = folder / "img" / f"{k}.png"
        if k < 2:
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16), 40 * k, dtype=np.uint8)).save(image)
        rows.append(
            {
                "image_path": str(image),
                "patient_id": f"p{k}",
                "study_id": f"s{k}",
                "report_text": "No acute cardiopulmonary process.",
                "split": "train",
            }
        )
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def site_dir(tmp_path: Path) -> Path:
    certs = tmp_path / "certs"
    write_ca(certs)
    write_site_keys(certs, "hospital_a")
    _manifest(tmp_path / "data")
    body = {
        "site_id": "hospital_a",
        "superlink": "127.0.0.1:9092",
        "root_certificates": "certs/ca.crt",
        "auth_private_key": "certs/sites/hospital_a.key",
        "data": {"source": "manifest", "manifest": "data/manifest.csv"},
        "state_dir": "state",
        "privacy": {"mechanism": "none"},
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(body))
    return tmp_path


def _rewrite(site_dir: Path, **changes: object) -> Path:
    path = site_dir / "site.yaml"
    body = yaml.safe_load(path.read_text())
    body.update(changes)
    path.write_text(yaml.safe_dump(body))
    return path


def test_paths_resolve_against_the_yaml_folder(site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    site = load_site_config(site_dir / "site.yaml")
    assert site.root_certificates == site_dir / "certs" / "ca.crt"
    assert site.data.manifest == site_dir / "data" / "manifest.csv"
    assert site.state_dir == site_dir / "state"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"superlink": "https://link:9092"}, "superlink = 'https://link:9092'"),
        ({"site_id": "bad id!"}, "site_id = 'bad id!'"),
        ({"device": "tpu"}, "device = 'tpu'"),
        ({"privacy": {"mechanism": "bucketed"}}, "needs privacy.epsilon_budget"),
        ({"data": {"source": "synthetic"}}, "trains on its own data"),
        ({"root_certificates": "certs/nope.crt"}, "root_certificates"),
        ({"data": {"source": "manifest", "manifest": "data/missing.csv"}}, "data.manifest"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_values_name_field_value_and_reason(site_dir: Path, change: dict, needle: str) -> None:
    path = _rewrite(site_dir, **change)
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_readable_private_key_is_refused(site_dir: Path) -> None:
    os.chmod(site_dir / "certs" / "sites" / "hospital_a.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_site_config(site_dir / "site.yaml")


def test_check_counts_and_skips(site_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    found = check_site_data(load_site_config(site_dir / "site.yaml"))
    assert found.splits == {"train": 2}
    assert found.patients == 2
    assert found.skips.total_skipped == 1
    assert client_main(["--site-config", str(site_dir / "site.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "studies: 2 (train=2)" in out and "skipped: 1" in out


def test_check_bad_config_exits_2_before_anything(site_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _rewrite(site_dir, max_retries=-1)
    assert client_main(["--site-config", str(path), "--check"]) == 2
    assert "max_retries = -1" in capsys.readouterr().err


def test_supernode_command_has_tls_auth_and_node_config(site_dir: Path) -> None:
    path = site_dir / "site.yaml"
    site = load_site_config(path)
    cmd = supernode_command(site, path, executable="flower-supernode")
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert flags["--superlink"] == "127.0.0.1:9092"
    assert flags["--root-certificates"] == str(site_dir / "certs" / "ca.crt")
    assert flags["--auth-supernode-private-key"] == str(site_dir / "certs" / "sites" / "hospital_a.key")
    assert flags["--node-config"] == f"{NODE_CONFIG_KEY}='{path.resolve()}'"
    assert flags["--max-retries"] == "10" and "--insecure" not in cmd


def test_site_policy_and_data_override_the_server(site_dir: Path) -> None:
    site = load_site_config(site_dir / "site.yaml")
    server = ExperimentConfig.model_validate(
        {"privacy": {"mechanism": "bucketed", "epsilon_budget": 99.0}, "train": {"device": "cuda"}}
    )
    cfg = site_experiment(site, server)
    assert cfg.privacy.mechanism == "none" and cfg.data.source == "manifest" and cfg.train.device == "auto"
    bigger = ExperimentConfig.model_validate({"data": {"image_size": 128}, "model": {"image": {"image_size": 128}}})
    with pytest.raises(ConfigError, match="data.image_size=64"):
        site_experiment(site, bigger)


def test_joining_needs_an_approved_fab(site_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No approved_fab_hashes: --check says so, and joining is refused before any process starts."""
    path = site_dir / "site.yaml"
    assert client_main(["--site-config", str(path), "--check"]) == 0
    assert "approved FABs: none (joining is refused" in capsys.readouterr().out
    assert client_main(["--site-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "approved_fab_hashes is empty" in err and "mlip-certs fab-hash" in err
    assert not (site_dir / "state").exists()  # nothing started, nothing written
    with pytest.raises(ConfigError, match="approved_fab_hashes"):
        load_site_config(_rewrite(site_dir, approved_fab_hashes=["not-a-hash"]))
