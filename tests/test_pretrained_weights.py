"""Pretrained weights in the layouts people have: timm / torchvision ViT and ResNet, hub ids from the local cache.

Nothing is downloaded and neither timm nor torchvision is imported: the checkpoints are random tensors
under the exact key names and shapes those libraries use, for the tiny towers (values checked) and for
ViT-B/16 / ResNet-50 on the meta device (layout and shapes only, no memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from mlip_fed.config import ConfigError, ExperimentConfig
from mlip_fed.hf_cache import WeightsNotFound
from mlip_fed.model.config import ImageEncoderConfig, ModelConfig, TextEncoderConfig
from mlip_fed.model.image_encoder import ResNetImageEncoder, ViTImageEncoder, build_image_encoder
from mlip_fed.model.pretrained_weights import PretrainedWeightsError
from mlip_fed.model.weight_layouts import convert, detect_format

# ---------------------------------------------------------------------------- layouts, written out by hand


def timm_vit(depth: int, dim: int, mlp: int, patch: int, grid: int, classes: int = 10, **kw: object) -> dict:
    """timm ``VisionTransformer`` keys (``vit_base_patch16_224`` at depth 12, dim 768, mlp 3072, patch 16, grid 14)."""
    t = _maker(kw.get("device", "cpu"))
    state = {
        "cls_token": t(1, 1, dim),
        "pos_embed": t(1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": t(dim, 3, patch, patch),
        "patch_embed.proj.bias": t(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": t(dim),
            b + "norm1.bias": t(dim),
            b + "attn.qkv.weight": t(3 * dim, dim),
            b + "attn.qkv.bias": t(3 * dim),
            b + "attn.proj.weight": t(dim, dim),
            b + "attn.proj.bias": t(dim),
            b + "norm2.weight": t(dim),
            b + "norm2.bias": t(dim),
            b + "mlp.fc1.weight": t(mlp, dim),
            b + "mlp.fc1.bias": t(mlp),
            b + "mlp.fc2.weight": t(dim, mlp),
            b + "mlp.fc2.bias": t(dim),
        }
    return state | {"norm.weight": t(dim), "norm.bias": t(dim), "head.weight": t(classes, dim), "head.bias": t(classes)}


def torchvision_vit(
    depth: int, dim: int, mlp: int, patch: int, grid: int, old_names: bool = False, **kw: object
) -> dict:
    """torchvision ``VisionTransformer`` keys (``vit_b_16``); ``old_names``: the MLP as linear_1/linear_2 (< 0.13)."""
    t = _maker(kw.get("device", "cpu"))
    fc1, fc2 = ("linear_1", "linear_2") if old_names else ("0", "3")
    state = {
        "class_token": t(1, 1, dim),
        "conv_proj.weight": t(dim, 3, patch, patch),
        "conv_proj.bias": t(dim),
        "encoder.pos_embedding": t(1, 1 + grid * grid, dim),
    }
    for i in range(depth):
        b = f"encoder.layers.encoder_layer_{i}."
        state |= {
            b + "ln_1.weight": t(dim),
            b + "ln_1.bias": t(dim),
            b + "self_attention.in_proj_weight": t(3 * dim, dim),
            b + "self_attention.in_proj_bias": t(3 * dim),
            b + "self_attention.out_proj.weight": t(dim, dim),
            b + "self_attention.out_proj.bias": t(dim),
            b + "ln_2.weight": t(dim),
            b + "ln_2.bias": t(dim),
            b + f"mlp.{fc1}.weight": t(mlp, dim),
            b + f"mlp.{fc1}.bias": t(mlp),
            b + f"mlp.{fc2}.weight": t(dim, mlp),
            b + f"mlp.{fc2}.bias": t(dim),
        }
    return state | {
        "encoder.ln.weight": t(dim),
        "encoder.ln.bias": t(dim),
        "heads.head.weight": t(10, dim),
        "heads.head.bias": t(10),
    }


def torchvision_resnet(kind: str, layers: tuple[int, ...], planes: tuple[int, ...], **kw: object) -> dict:
    """torchvision ``ResNet`` keys (timm's resnet50 uses the same): ``resnet50`` = bottleneck, 3-4-6-3, 64..512."""
    t = _maker(kw.get("device", "cpu"))

    def bn(prefix: str, c: int) -> dict:
        return {
            f"{prefix}.weight": t(c),
            f"{prefix}.bias": t(c),
            f"{prefix}.running_mean": t(c),
            f"{prefix}.running_var": t(c).abs(),
            f"{prefix}.num_batches_tracked": torch.tensor(7),
        }

    expansion = 4 if kind == "bottleneck" else 1
    state = {"conv1.weight": t(planes[0], 3, 7, 7)} | bn("bn1", planes[0])
    in_planes = planes[0]
    for stage, (blocks, width) in enumerate(zip(layers, planes, strict=True), start=1):
        out = width * expansion
        for j in range(blocks):
            b = f"layer{stage}.{j}."
            cin = in_planes if j == 0 else out
            if kind == "bottleneck":
                state |= {b + "conv1.weight": t(width, cin, 1, 1)} | bn(b + "bn1", width)
                state |= {b + "conv2.weight": t(width, width, 3, 3)} | bn(b + "bn2", width)
                state |= {b + "conv3.weight": t(out, width, 1, 1)} | bn(b + "bn3", out)
            else:
                state |= {b + "conv1.weight": t(width, cin, 3, 3)} | bn(b + "bn1", width)
                state |= {b + "conv2.weight": t(width, width, 3, 3)} | bn(b + "bn2", width)
            if j == 0 and (stage > 1 or cin != out):
                state |= {b + "downsample.0.weight": t(out, cin, 1, 1)} | bn(b + "downsample.1", out)
        in_planes = out
    return state | {"fc.weight": t(10, in_planes), "fc.bias": t(10)}


def _maker(device: object):  # noqa: ANN202
    def make(*shape: int) -> Tensor:
        return torch.empty(shape, device="meta") if device == "meta" else torch.randn(shape)

    return make


TINY_VIT = {"depth": 4, "dim": 128, "mlp": 256, "patch": 8, "grid": 8}  # vit_tiny at 64x64
TINY_RESNET = ("basic", (1, 1, 1, 1), (16, 32, 64, 128))  # resnet_tiny


def _save(state: dict, path: Path) -> str:
    torch.save(state, path)
    return str(path)


# ---------------------------------------------------------------------------- values land where they belong
def test_timm_vit_lands_in_monai_vit(tmp_path: Path) -> None:
    src = timm_vit(**TINY_VIT)
    cfg = ImageEncoderConfig(arch="vit_tiny", qkv_bias=True, pretrained_path=_save(src, tmp_path / "vit.pth"))
    enc = build_image_encoder(cfg)
    got = enc.state_dict()
    # grey patch embedding = sum of the RGB kernels
    assert torch.allclose(
        got["vit.patch_embedding.patch_embeddings.weight"], src["patch_embed.proj.weight"].sum(1, True)
    )
    assert torch.equal(got["vit.patch_embedding.position_embeddings"], src["pos_embed"][:, 1:])
    # [CLS] gets its position folded in: the same first-block input as in timm
    assert torch.equal(got["cls.token"], src["cls_token"] + src["pos_embed"][:, :1])
    for timm_key, ours in [
        ("blocks.2.attn.qkv.weight", "vit.blocks.2.attn.qkv.weight"),
        ("blocks.2.attn.qkv.bias", "vit.blocks.2.attn.qkv.bias"),
        ("blocks.3.attn.proj.weight", "vit.blocks.3.attn.out_proj.weight"),
        ("blocks.0.mlp.fc1.weight", "vit.blocks.0.mlp.linear1.weight"),
        ("blocks.1.mlp.fc2.bias", "vit.blocks.1.mlp.linear2.bias"),
        ("blocks.1.norm2.weight", "vit.blocks.1.norm2.weight"),
        ("norm.bias", "vit.norm.bias"),
    ]:
        assert torch.equal(got[ours], src[timm_key]), ours
    report = enc.load_report
    assert report is not None and report.format == "timm, auto-detected"
    assert len(report.loaded) == len(got) and not report.missing and not report.unexpected
    assert sorted(report.dropped) == ["head.bias", "head.weight"] and report.fraction == 1.0
    assert enc(torch.randn(2, 1, 64, 64)).pooled.shape == (2, 128)


@pytest.mark.parametrize("old_names", [False, True])
def test_torchvision_vit_lands_in_monai_vit(tmp_path: Path, old_names: bool) -> None:
    src = torchvision_vit(**TINY_VIT, old_names=old_names)
    path = _save(src, tmp_path / "vit_b_16.pth")
    enc = build_image_encoder(ImageEncoderConfig(arch="vit_tiny", qkv_bias=True, pretrained_path=path))
    got = enc.state_dict()
    fc2 = "linear_2" if old_names else "3"
    layer = "encoder.layers.encoder_layer_3."
    assert torch.allclose(got["vit.patch_embedding.patch_embeddings.weight"], src["conv_proj.weight"].sum(1, True))
    assert torch.equal(got["cls.token"], src["class_token"] + src["encoder.pos_embedding"][:, :1])
    assert torch.equal(got["vit.blocks.3.attn.qkv.weight"], src[layer + "self_attention.in_proj_weight"])
    assert torch.equal(got["vit.blocks.3.attn.qkv.bias"], src[layer + "self_attention.in_proj_bias"])
    assert torch.equal(got["vit.blocks.3.mlp.linear2.weight"], src[layer + f"mlp.{fc2}.weight"])
    assert torch.equal(got["vit.norm.weight"], src["encoder.ln.weight"])
    assert enc.load_report is not None and enc.load_report.fraction == 1.0 and not enc.load_report.unexpected


@pytest.mark.parametrize("fmt", ["auto", "torchvision", "timm"])
def test_torchvision_resnet_lands_in_groupnorm_resnet(tmp_path: Path, fmt: str) -> None:
    src = torchvision_resnet(*TINY_RESNET)
    path = _save(src, tmp_path / "resnet.pth")
    enc = build_image_encoder(ImageEncoderConfig(arch="resnet_tiny", pretrained_path=path, pretrained_format=fmt))
    got = enc.state_dict()
    assert torch.allclose(got["conv1.weight"], src["conv1.weight"].sum(dim=1, keepdim=True))
    assert isinstance(enc.bn1, torch.nn.GroupNorm)
    # BatchNorm affine -> GroupNorm affine of the same layer
    for key in ("bn1.weight", "layer2.0.bn2.bias", "layer3.0.downsample.1.weight", "layer4.0.conv2.weight"):
        assert torch.equal(got[key], src[key]), key
    report = enc.load_report
    assert report is not None and report.fraction == 1.0 and not report.missing and not report.unexpected
    n_bn = sum(k.endswith("running_mean") for k in src)
    assert len(report.dropped) == 3 * n_bn + 2  # mean, var, count per BatchNorm, plus fc
    assert "running statistics dropped" in report.summary()


def test_native_round_trip_still_strict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = build_image_encoder(ImageEncoderConfig(arch="resnet_tiny"))
    path = _save({"state_dict": {f"module.{k}": v for k, v in enc.state_dict().items()}}, tmp_path / "own.pt")
    torch.manual_seed(1)
    again = build_image_encoder(ImageEncoderConfig(arch="resnet_tiny", pretrained_path=path))
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values(), strict=True))
    assert again.load_report is not None and again.load_report.format == "native, auto-detected"


def test_safetensors_file_and_model_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = torchvision_resnet(*TINY_RESNET)
    folder = tmp_path / "resnet_folder"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in src.items()}, str(folder / "model.safetensors"))
    enc = build_image_encoder(ImageEncoderConfig(arch="resnet_tiny", pretrained_path=str(folder)))
    assert torch.equal(enc.state_dict()["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])


# ---------------------------------------------------------------------------- position embeddings, patch size
def test_position_embeddings_resized_when_grid_differs(tmp_path: Path) -> None:
    src = timm_vit(**(TINY_VIT | {"grid": 4}))  # trained at 32x32, used at 64x64
    src["pos_embed"][:, 1:] = 0.25  # a constant field stays constant under bicubic resizing
    enc = build_image_encoder(
        ImageEncoderConfig(arch="vit_tiny", qkv_bias=True, pretrained_path=_save(src, tmp_path / "v.pth"))
    )
    pos = enc.state_dict()["vit.patch_embedding.position_embeddings"]
    assert pos.shape == (1, 64, 128) and torch.allclose(pos, torch.full_like(pos, 0.25), atol=1e-6)
    assert any("resized 4x4 -> 8x8" in note for note in enc.load_report.notes)


def test_patch_size_mismatch_refused_with_hint(tmp_path: Path) -> None:
    src = timm_vit(**(TINY_VIT | {"patch": 16, "grid": 4}))
    path = _save(src, tmp_path / "p16.pth")
    with pytest.raises(PretrainedWeightsError, match=r"p16\.pth does not fit .*patches are 16x16"):
        build_image_encoder(ImageEncoderConfig(arch="vit_tiny", qkv_bias=True, pretrained_path=path))


def test_qkv_bias_mismatch_strict_refused_partial_reported(tmp_path: Path) -> None:
    path = _save(timm_vit(**TINY_VIT), tmp_path / "v.pth")
    with pytest.raises(PretrainedWeightsError, match="qkv_bias=true"):
        build_image_encoder(ImageEncoderConfig(arch="vit_tiny", pretrained_path=path))
    enc = build_image_encoder(ImageEncoderConfig(arch="vit_tiny", pretrained_path=path, pretrained_strict=False))
    assert enc.load_report.fraction == 1.0 and len(enc.load_report.unexpected) == 4  # one qkv bias per block


# ---------------------------------------------------------------------------- refusing what does not fit
def test_unrelated_state_dict_refused_naming_file_and_fraction(tmp_path: Path) -> None:
    bert_like = {
        "embeddings.word_embeddings.weight": torch.randn(30, 8),
        "encoder.layer.0.output.dense.bias": torch.randn(8),
    }
    path = _save(bert_like, tmp_path / "not_an_image_model.bin")
    for strict in (True, False):
        with pytest.raises(PretrainedWeightsError, match=r"not_an_image_model\.bin: only 0\.0% .* \(0/\d+\) loaded"):
            build_image_encoder(ImageEncoderConfig(arch="vit_tiny", pretrained_path=path, pretrained_strict=strict))
    vit_into_resnet = _save(timm_vit(**TINY_VIT), tmp_path / "vit.pth")
    with pytest.raises(PretrainedWeightsError, match="holds a vit but model.image.arch=resnet_tiny"):
        build_image_encoder(ImageEncoderConfig(arch="resnet_tiny", pretrained_path=vit_into_resnet))


def test_partial_load_below_min_fraction_refused_above_accepted(tmp_path: Path) -> None:
    src = torchvision_resnet(*TINY_RESNET)
    kept = {k: v for k, v in src.items() if not k.startswith(("layer3.", "layer4."))}
    path = _save(kept, tmp_path / "half.pth")
    total = len(ResNetImageEncoder(ImageEncoderConfig(arch="resnet_tiny")).state_dict())
    missing = sum(1 for k in src if k.startswith(("layer3.", "layer4.")) and k.endswith(("weight", "bias")))
    pct = f"{(total - missing) / total:.1%}"
    cfg = ImageEncoderConfig(arch="resnet_tiny", pretrained_path=path, pretrained_strict=False)
    with pytest.raises(
        PretrainedWeightsError, match=rf"half\.pth: only {pct} .*below model.image.pretrained_min_loaded=90%"
    ):
        build_image_encoder(cfg)
    enc = build_image_encoder(cfg.model_copy(update={"pretrained_min_loaded": 0.4}))
    report = enc.load_report
    assert (len(report.loaded), len(report.missing), len(report.unexpected)) == (total - missing, missing, 0)
    assert report.total == total and all(k.startswith(("layer3.", "layer4.")) for k in report.missing)


def test_missing_file_never_downloaded(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFound, match="never downloaded"):
        build_image_encoder(ImageEncoderConfig(pretrained_path=str(tmp_path / "missing.pt")))


# ---------------------------------------------------------------------------- real sizes, layout only (meta device)
@pytest.mark.parametrize("layout", ["timm", "torchvision"])
def test_vit_b16_real_layout_maps_every_tensor(layout: str) -> None:
    cfg = ImageEncoderConfig(arch="vit_b16", image_size=224, patch_size=16, qkv_bias=True)
    with torch.device("meta"):
        target = {k: v.shape for k, v in ViTImageEncoder(cfg).state_dict().items()}
    make = timm_vit if layout == "timm" else torchvision_vit
    src = make(depth=12, dim=768, mlp=3072, patch=16, grid=14, device="meta")
    assert detect_format(src) == (layout, "vit")
    out = convert(src, layout, "vit", target)
    assert set(out.tensors) == set(target) and not out.unused
    assert all(tuple(out.tensors[k].shape) == tuple(s) for k, s in target.items())


def test_resnet50_real_layout_maps_every_tensor() -> None:
    cfg = ImageEncoderConfig(arch="resnet50", image_size=224)
    with torch.device("meta"):
        target = {k: v.shape for k, v in ResNetImageEncoder(cfg).state_dict().items()}
    src = torchvision_resnet("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), device="meta")
    assert detect_format(src) == ("torchvision", "resnet")
    out = convert(src, "torchvision", "resnet", target)
    assert set(out.tensors) == set(target) and not out.unused
    assert all(tuple(out.tensors[k].shape) == tuple(s) for k, s in target.items())
    assert len(out.dropped) == 3 * 53 + 2  # 53 BatchNorms in ResNet-50, plus fc


# ---------------------------------------------------------------------------- text: hub ids from the local cache
def _hub_model(hf_home: Path, repo_id: str, model: object, tokenizer: object) -> Path:
    """Save ``model`` and ``tokenizer`` into the hub cache layout ``huggingface_hub`` reads offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)  # type: ignore[attr-defined]
    tokenizer.save_pretrained(snapshot)  # type: ignore[attr-defined]
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture()
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def _tiny_text_models() -> dict[str, object]:
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    from mlip_fed.data.tokenizer import load_tokenizer

    vocab = len(load_tokenizer())
    small = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
    return {
        "bert": BertModel(BertConfig(vocab_size=vocab, pad_token_id=0, **small)),
        "distilbert": DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=3, n_heads=2, hidden_dim=64)),
        "roberta": RobertaModel(RobertaConfig(vocab_size=vocab, pad_token_id=0, max_position_embeddings=140, **small)),
    }


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
def test_text_hub_id_resolves_from_local_cache(hf_home: Path, kind: str) -> None:
    from mlip_fed.data.tokenizer import load_tokenizer
    from mlip_fed.model.text_encoder import TextEncoder

    torch.manual_seed(0)
    model = _tiny_text_models()[kind]
    _hub_model(hf_home, f"tiny-org/{kind}", model, load_tokenizer())
    cfg = TextEncoderConfig(checkpoint_dir=f"tiny-org/{kind}", checkpoint_layers=2, max_length=64)
    tokenizer = load_tokenizer(cfg.checkpoint_dir)
    encoder = TextEncoder(cfg, tokenizer)
    report = encoder.load_report
    assert report is not None and report.fraction == 1.0 and not report.missing
    assert str(hf_home) in report.source and any("first 2 of 3 layers" in n for n in report.notes)
    # the weights are the saved ones, truncated to two layers
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(encoder.bert.state_dict()[name], model.state_dict()[name])
    batch = tokenizer(["small left pleural effusion.", "no pneumothorax"], padding=True, return_tensors="pt")
    feats = encoder(batch["input_ids"], batch["attention_mask"])
    assert feats.tokens.shape[-1] == 32 and torch.isfinite(feats.pooled).all()


def test_mlip_model_from_hub_id_and_missing_hub_id(hf_home: Path) -> None:
    from mlip_fed.data.tokenizer import load_tokenizer
    from mlip_fed.pipeline import model_from_config

    _hub_model(hf_home, "tiny-org/bert", _tiny_text_models()["bert"], load_tokenizer())
    model = model_from_config(ModelConfig(text=TextEncoderConfig(checkpoint_dir="tiny-org/bert", max_length=64)))
    assert [r.tower for r in model.weight_reports] == ["text"]
    with pytest.raises(WeightsNotFound, match=rf"'nobody/absent-model'.*Hugging Face cache {hf_home / 'hub'}"):
        model_from_config(ModelConfig(text=TextEncoderConfig(checkpoint_dir="nobody/absent-model")))


def test_text_checkpoint_below_min_fraction_refused(hf_home: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    from mlip_fed.data.tokenizer import load_tokenizer
    from mlip_fed.model.text_encoder import TextEncoder

    # an MLM checkpoint with only its head and embeddings: the encoder layers come out random
    vocab = len(load_tokenizer())
    full = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    snapshot = _hub_model(hf_home, "tiny-org/headless", full, load_tokenizer())
    from safetensors.torch import load_file, save_file

    state = load_file(str(snapshot / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".layer." not in k}, str(snapshot / "model.safetensors"))
    cfg = TextEncoderConfig(checkpoint_dir="tiny-org/headless")
    with pytest.raises(PretrainedWeightsError, match=r"checkpoint_dir=tiny-org/headless .*only \d+\.\d% .*text tower"):
        TextEncoder(cfg, load_tokenizer(cfg.checkpoint_dir))


# ---------------------------------------------------------------------------- start-up order
def test_bad_weights_refused_before_any_data_is_read(
    tmp_path: Path, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlip_fed import pipeline
    from mlip_fed.federation.site import SiteRuntime
    from mlip_fed.train.run import run_pretraining

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was read before the weights were checked")

    monkeypatch.setattr(pipeline, "load_records", no_data)
    bad = _save({"unrelated.weight": torch.randn(3)}, tmp_path / "unrelated.pt")
    image = ExperimentConfig(output_dir=tmp_path / "run").model_copy(
        update={"model": ModelConfig(image=ImageEncoderConfig(pretrained_path=bad))}
    )
    text = ExperimentConfig(output_dir=tmp_path / "run").model_copy(
        update={"model": ModelConfig(text=TextEncoderConfig(checkpoint_dir="nobody/absent-model"))}
    )
    with pytest.raises(PretrainedWeightsError, match=r"unrelated\.pt: only 0\.0%"):
        run_pretraining(image, evaluate=False)
    with pytest.raises(WeightsNotFound, match="nobody/absent-model"):
        run_pretraining(text, evaluate=False)
    with pytest.raises(PretrainedWeightsError, match=r"unrelated\.pt"):
        SiteRuntime(image, 0, tmp_path / "site")


# ---------------------------------------------------------------------------- a site's own weight paths
def test_site_weights_override_and_check(tmp_path: Path, hf_home: Path) -> None:
    from mlip_fed.deploy.certs import write_ca, write_site_keys
    from mlip_fed.deploy.site_config import load_site_config, site_experiment

    certs = tmp_path / "certs"
    write_ca(certs)
    write_site_keys(certs, "hospital_a")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("image_path,report_text,patient_id,study_id\n")
    (tmp_path / "weights").mkdir()
    torch.save({}, tmp_path / "weights" / "resnet50.pth")
    body = {
        "site_id": "hospital_a",
        "superlink": "127.0.0.1:9092",
        "root_certificates": "certs/ca.crt",
        "auth_private_key": "certs/sites/hospital_a.key",
        "data": {"source": "manifest", "manifest": "data/manifest.csv"},
        "state_dir": "state",
        "image_weights": "weights/resnet50.pth",
        "text_weights": "nobody/absent-model",
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=r"text_weights='nobody/absent-model'.*Hugging Face cache"):
        load_site_config(path)
    from mlip_fed.data.tokenizer import load_tokenizer

    _hub_model(hf_home, "nobody/absent-model", _tiny_text_models()["bert"], load_tokenizer())
    site = load_site_config(path)
    assert site.image_weights == str(tmp_path / "weights" / "resnet50.pth")
    assert site.text_weights == "nobody/absent-model"  # a hub id stays a hub id
    server = ExperimentConfig().model_copy(
        update={
            "model": ModelConfig(
                image=ImageEncoderConfig(pretrained_path="/server/resnet50.pth"),
                text=TextEncoderConfig(checkpoint_dir="/server/bert"),
            )
        }
    )
    cfg = site_experiment(site, server)
    assert cfg.model.image.pretrained_path == site.image_weights
    assert cfg.model.text.checkpoint_dir == "nobody/absent-model"
    with pytest.raises(ConfigError, match="sets no model.text.checkpoint_dir"):
        site_experiment(
            site,
            ExperimentConfig().model_copy(
                update={"model": server.model.model_copy(update={"text": TextEncoderConfig()})}
            ),
        )


def test_config_fields_and_yaml_comments(tmp_path: Path) -> None:
    from mlip_fed.pipeline import check_resumable

    cfg = ImageEncoderConfig()
    assert (cfg.pretrained_format, cfg.pretrained_strict, cfg.pretrained_min_loaded) == ("auto", True, 0.9)
    with pytest.raises(ValueError):
        ImageEncoderConfig(pretrained_format="keras")
    root = Path(__file__).resolve().parents[1]
    for name in ("resnet50.yaml", "vit_b16.yaml"):
        text = (root / "configs" / "model" / name).read_text()
        assert "model.text.checkpoint_dir=" in text and "Point text.checkpoint_dir" not in text
    # a run saved before the new fields existed still resumes (they are at their defaults)
    saved = ExperimentConfig().model_dump(mode="json")
    del saved["model"]["image"]["pretrained_min_loaded"], saved["model"]["text"]["checkpoint_min_loaded"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resumable(tmp_path / "config.json", ExperimentConfig())


def _reference_timm_vit(state: dict, rgb: Tensor, heads: int, eps: float) -> Tensor:
    """timm's ViT forward written out (pre-norm blocks, fused qkv, exact GELU); token states after the final norm."""
    import torch.nn.functional as F

    patch = state["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(rgb, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]
    b, n, d = x.shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."

        def ln(t: Tensor, name: str, p: str = p) -> Tensor:
            return F.layer_norm(t, (d,), state[p + name + ".weight"], state[p + name + ".bias"], eps)

        qkv = F.linear(ln(x, "norm1"), state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(attn, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(ln(x, "norm2"), state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(hidden, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), state["norm.weight"], state["norm.bias"], eps)


def test_converted_timm_vit_computes_what_timm_computes(tmp_path: Path) -> None:
    """Same token states as timm's forward on the RGB image R=G=B=grey (LayerNorm eps set to MONAI's 1e-5)."""
    torch.manual_seed(0)
    src = {k: 0.05 * v for k, v in timm_vit(**TINY_VIT).items()}  # small weights: a well-conditioned forward
    for key in src:
        if key.endswith(("norm1.weight", "norm2.weight")) or key == "norm.weight":
            src[key] += 1.0
    enc = build_image_encoder(
        ImageEncoderConfig(
            arch="vit_tiny", qkv_bias=True, pooling="mean", pretrained_path=_save(src, tmp_path / "v.pth")
        )
    ).eval()
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ours = enc(grey).patches
        ref = _reference_timm_vit(src, grey.expand(-1, 3, -1, -1), heads=4, eps=1e-5)[:, 1:]
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
