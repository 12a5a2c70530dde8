"""Domain gate: acquisition features with known answers, routing, and an engine that runs each CT through the
expert the gate picks (the shipped model as the parent expert, a site expert that never sees a lesion)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from liverlesionai import domain_gate
from liverlesionai.engine import LiverLesionEngine
from liverlesionai.errors import ModelFileError
from liverlesionai.model_io import load_model, save_model
from liverlesionai.phantom import generate_phantom_ct


def _ball(shape, radius):
    k, j, i = np.indices(shape)
    c = np.array(shape) / 2
    return (k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2 < radius ** 2


def test_acquisition_features_measure_the_liver_median_and_noise():
    rng = np.random.default_rng(0)
    liver = _ball((40, 64, 64), 18)
    # a smooth enhancement gradient across the liver (texture) barely moves the noise estimate
    hu = 70 + 0.3 * np.arange(64)[None, None, :] + rng.normal(0, 15, liver.shape)
    hu[~liver] = -100  # fat: outside the measured interior
    f = domain_gate.acquisition_features(hu.astype(np.float32), liver, spacing_mm=1.25)
    assert f["liver_median_hu"] == pytest.approx(70 + 0.3 * 31.5, abs=1.0)
    assert f["liver_noise_hu"] == pytest.approx(15, rel=0.05)
    assert domain_gate.acquisition_features(hu, _ball(liver.shape, 5), 1.25) is None  # too little liver


def test_gate_routes_to_the_likelier_acquisition_and_defaults_to_the_parent():
    site = [{"liver_median_hu": 65, "liver_noise_hu": 30}, {"liver_median_hu": 75, "liver_noise_hu": 33}]
    parent = [{"liver_median_hu": h, "liver_noise_hu": n} for h, n in ((95, 8), (110, 12), (125, 15), (100, 20))]
    gate = domain_gate.fit_gate(site + [None], parent)  # an exported case without a measurable liver: left out
    assert gate["site"]["cases"] == 2 and gate["parent"]["cases"] == 4
    assert gate["site"]["std"] == [domain_gate.MIN_SPREAD["liver_median_hu"], domain_gate.MIN_SPREAD["liver_noise_hu"]]
    assert domain_gate.route(gate, {"liver_median_hu": 70, "liver_noise_hu": 28}) == "site"
    assert domain_gate.route(gate, {"liver_median_hu": 112, "liver_noise_hu": 10}) == "parent"  # the real case
    assert domain_gate.route(gate, None) == domain_gate.route(None, site[0]) == "parent"
    assert domain_gate.fit_gate([None], parent) is None and domain_gate.fit_gate(site, []) is None
    assert domain_gate.separates([True, True, False], [False] * 4)
    assert not domain_gate.separates([True, True], [False, True, False])  # an original case to the site expert
    assert not domain_gate.separates([True, False], [False] * 4)  # half the exported cases to the parent's


def _gated(model_dir: Path, out: Path, gate: dict) -> Path:
    """``model_dir`` plus a site expert whose stage 2 never sees a lesion."""
    state, card = load_model(model_dir)
    site = {f"site.{k}": v.clone() for k, v in state.items() if k.startswith(("stage2.", "classifier."))}
    site["site.stage2.decoder.head.bias"] = torch.tensor([0.0, 20.0, -20.0, -20.0, -20.0])
    site["site.stage2.decoder.head.weight"] = torch.zeros_like(site["site.stage2.decoder.head.weight"])
    card["architecture"].update(domain_gate=gate, site_candidate_filter={"min_lesion_confidence": 0.0,
                                                                         "max_surface_fraction": 1.0})
    save_model(out, {**state, **site}, {k: v for k, v in card.items() if k != "weights_sha256"})
    return out


def test_engine_runs_each_ct_through_the_expert_the_gate_picks(shipped_model_dir, tmp_path):
    ct, _ = generate_phantom_ct(600_003, max_in_plane=128)
    parent = LiverLesionEngine(shipped_model_dir, device="cpu", precision="fp32")
    measured = parent.acquisition_features(ct)
    assert set(measured) == set(domain_gate.FEATURES)
    by_parent = parent.segment(ct)
    assert by_parent.expert == "parent" and by_parent.lesions

    here = {"mean": [measured[f] for f in domain_gate.FEATURES], "std": [10.0, 5.0], "cases": 4}
    far = {"mean": [measured["liver_median_hu"] + 200, measured["liver_noise_hu"] + 50], "std": [10.0, 5.0],
           "cases": 4}
    to_site = _gated(shipped_model_dir, tmp_path / "to_site", {"features": list(domain_gate.FEATURES),
                                                                  "site": here, "parent": far})
    to_parent = _gated(shipped_model_dir, tmp_path / "to_parent", {"features": list(domain_gate.FEATURES),
                                                                      "site": far, "parent": here})
    site_result = LiverLesionEngine(to_site, device="cpu", precision="fp32").segment(ct)
    assert site_result.expert == "site" and not site_result.lesions
    assert any(m.startswith("Fine-tuned networks used") for m in site_result.messages)
    parent_result = LiverLesionEngine(to_parent, device="cpu", precision="fp32").segment(ct)
    assert parent_result.expert == "parent"
    assert np.array_equal(parent_result.lesion_instances, by_parent.lesion_instances)
    assert [r.probabilities for r in parent_result.lesions] == [r.probabilities for r in by_parent.lesions]
    assert json.loads((to_site / "model_card.json").read_text())["architecture"]["domain_gate"]["site"] == here

    # a card with a gate but no site filter is a clear model error, not a KeyError
    state, card = load_model(to_site)
    del card["architecture"]["site_candidate_filter"]
    save_model(tmp_path / "broken", state, {k: v for k, v in card.items() if k != "weights_sha256"})
    with pytest.raises(ModelFileError, match="site_candidate_filter"):
        LiverLesionEngine(tmp_path / "broken", device="cpu")
