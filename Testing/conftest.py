"""Shared test fixtures: tiny random-weight models (tests never depend on the shipped model's quality)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # the machine is shared with a training run

# LIVERLESIONAI_TEST_MODEL points the "shipped model" tests at another model folder (e.g. a new build)
SHIPPED_MODEL = Path(os.environ.get("LIVERLESIONAI_TEST_MODEL") or
                     Path(__file__).resolve().parents[1] / "LiverLesionAI/Resources/Models/liverlesionai-v5.12")


def make_tiny_model(model_dir, seed: int = 0, liver_bias: float | None = None, lesion_bias: float | None = None,
                    version: str = "test", classifier_features: str = "descriptors", stage2_liver_bias: float = 0.0,
                    lesion_threshold: float | None = None) -> Path:
    """A complete, loadable LiverLesionAI model with small random networks.

    ``liver_bias`` shifts stage 1's liver logit (large negative: the model never finds a liver;
    large positive: everything is liver); ``lesion_bias`` shifts stage 2's lesion logits (and
    ``stage2_liver_bias`` its liver logit). These give
    deterministic behaviour ("no liver", "liver full of lesion") without a trained model.
    ``classifier_features="encoder"`` builds the classifier of models up to v4 (pooled encoder features).
    """
    from liverlesionai.model_io import save_model
    from liverlesionai.networks import CascadeConfig, LesionClassifierHead, UNet2p5D, UNetConfig

    torch.manual_seed(seed)
    feats = (4, 8, 16, 32)
    cfg = CascadeConfig(stage1=UNetConfig(in_channels=5, num_classes=2, features=feats, convs_per_stage=1),
                        stage2=UNetConfig(in_channels=4, num_classes=5, features=feats, convs_per_stage=1),
                        stage1_spacing=(6.0, 6.0, 6.0), stage2_spacing=(3.0, 3.0, 3.0), classifier_patch=16,
                        classifier_features=classifier_features, lesion_threshold=lesion_threshold)
    nets = {"stage1": UNet2p5D(cfg.stage1), "stage2": UNet2p5D(cfg.stage2),
            "classifier": LesionClassifierHead(cfg)}
    with torch.no_grad():
        if liver_bias is not None:
            nets["stage1"].decoder.head.bias[:] = torch.tensor([0.0, liver_bias])
            nets["stage1"].decoder.head.weight.zero_()
        if lesion_bias is not None:
            nets["stage2"].decoder.head.bias[:] = torch.tensor([0.0, stage2_liver_bias] + [lesion_bias] * 3)
            nets["stage2"].decoder.head.weight.zero_()
    state = {f"{prefix}.{k}": v for prefix, net in nets.items() for k, v in net.state_dict().items()}
    save_model(model_dir, state, {"name": "tiny test model", "architecture": cfg.to_dict(), "version": version})
    return Path(model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Random-weight model (behaviour tests only)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def no_liver_model_dir(tmp_path_factory) -> Path:
    """A model whose stage 1 never finds a liver."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "no-liver", liver_bias=-20.0)


@pytest.fixture(scope="session")
def all_lesion_model_dir(tmp_path_factory) -> Path:
    """A model that sees liver everywhere and lesion wherever stage 2 looks."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "all-lesion", liver_bias=20.0, lesion_bias=20.0)


@pytest.fixture(scope="session")
def all_lesion_encoder_model_dir(tmp_path_factory) -> Path:
    """As all_lesion_model_dir, with the classifier of models up to v4 (pooled encoder features)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "all-lesion-encoder", liver_bias=20.0,
                           lesion_bias=20.0, classifier_features="encoder")


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    if not (SHIPPED_MODEL / "model_card.json").is_file():
        pytest.skip(f"shipped model not present at {SHIPPED_MODEL}")
    return SHIPPED_MODEL
