"""SynthCXR difficulty tiers: ``cpu`` is deterministic, changes pixels only, and unknown tiers are refused.

``standard`` staying byte-identical to the generator before tiers existed is what the determinism tests
of ``tests/test_synthetic.py`` check, unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlip_fed.cli import data_synth
from mlip_fed.config import ConfigError, SynthDifficulty
from mlip_fed.config_compose import compose_experiment
from mlip_fed.data.synthetic.findings import (
    DIFFICULTY_NAMES,
    DIFFICULTY_TIERS,
    FINDING_SPECS,
    MASK_INDEX,
    difficulty_tier,
)
from mlip_fed.data.synthetic.render import render_study
from mlip_fed.data.synthetic.sampling import make_site_profiles, new_finding, sample_anatomy
from mlip_fed.data.synthetic.write import generate_federation

SITES, STUDIES = 2, 10


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cpu_tier_is_deterministic_and_changes_pixels_only(tmp_path: Path) -> None:
    cpu = generate_federation(tmp_path / "cpu", SITES, STUDIES, image_size=64, seed=3, difficulty="cpu")
    again = generate_federation(tmp_path / "again", SITES, STUDIES, image_size=64, seed=3, difficulty="cpu")
    standard = generate_federation(tmp_path / "std", SITES, STUDIES, image_size=64, seed=3)
    a, b, s = (_tree(m[0].parent.parent) for m in (cpu, again, standard))
    assert a == b and len(a) > 4 * SITES
    assert a.keys() == s.keys()
    # Same studies, reports and labels; different images.
    for k in range(SITES):
        assert cpu[k].read_bytes() == standard[k].read_bytes()
    images = [k for k in a if "/images/" in k]
    assert any(a[k] != s[k] for k in images)


def test_every_kind_draws_a_mask_in_the_cpu_tier_and_is_more_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tier also moves the body more (pose), which can push part of a finding out of the frame: compare extents
    # with the standard pose, so that only the finding scales are under test here.
    monkeypatch.setitem(DIFFICULTY_TIERS, "cpu", dataclasses.replace(DIFFICULTY_TIERS["cpu"], pose=1.0))
    profile = make_site_profiles(1, 0)[0]
    for size in (64, 224):
        for i, spec in enumerate(FINDING_SPECS):
            rng = np.random.default_rng(i)
            finding = new_finding(spec.kind, rng, hedge_rate=0.5)
            anatomy = sample_anatomy(rng)
            out = {
                tier: render_study(anatomy, (finding,), profile, "PA", size, np.random.default_rng(9), tier)
                for tier in DIFFICULTY_NAMES
            }
            for rendered in out.values():
                assert (rendered.label_mask == MASK_INDEX[spec.kind]).any()
            # A tier never shrinks a finding below its standard extent.
            assert out["cpu"].masks[spec.kind].sum() >= out["standard"].masks[spec.kind].sum()


def test_tier_table_covers_known_kinds_only() -> None:
    kinds = {spec.kind for spec in FINDING_SPECS}
    assert set(DIFFICULTY_TIERS["cpu"].findings) <= kinds
    assert DIFFICULTY_TIERS["standard"].findings == {}
    standard = DIFFICULTY_TIERS["standard"]
    assert (standard.noise, standard.blur, standard.texture, standard.pose) == (1.0, 1.0, 1.0, 1.0)
    assert tuple(typing.get_args(SynthDifficulty)) == DIFFICULTY_NAMES  # config schema and generator agree


def test_unknown_tier_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'nightmare'"):
        difficulty_tier("nightmare")
    with pytest.raises(ValueError, match="'nightmare'"):
        generate_federation(tmp_path / "x", 1, 4, image_size=64, seed=0, difficulty="nightmare")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match=r"data\.synthetic\.difficulty = 'nightmare'"):
        compose_experiment(["data.synthetic.difficulty=nightmare"])
    parser = argparse.ArgumentParser()
    data_synth.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--out", str(tmp_path), "--difficulty", "nightmare"])


def test_config_and_cli_select_the_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_experiment(["data.synthetic.difficulty=cpu"])
    assert cfg.data.synthetic.difficulty == "cpu" and str(cfg.data.root).endswith("_cpu")
    assert compose_experiment([]).data.synthetic.difficulty == "standard"
    parser = argparse.ArgumentParser()
    data_synth.register(parser.add_subparsers())
    argv = ["synth", "--out", str(tmp_path / "d"), "--sites", "1", "--studies-per-site", "4", "--difficulty", "cpu"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    written = np.asarray(Image.open(sorted((tmp_path / "d" / "site_0" / "images").glob("*.png"))[0]))
    expected = generate_federation(tmp_path / "e", 1, 4, image_size=64, seed=0, difficulty="cpu")
    first = sorted((expected[0].parent / "images").glob("*.png"))[0]
    assert np.array_equal(written, np.asarray(Image.open(first)))
    assert "wrote 1 site(s)" in capsys.readouterr().out
