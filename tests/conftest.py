"""Shared fixtures: the shipped sample models and their calibration data."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `sample_models` is importable as in the README's commands


@pytest.fixture
def cnn_paths():
    return {
        "model": SAMPLES / "digits_cnn.safetensors",
        "arch": "sample_models.digits_cnn:build",
        "data": SAMPLES / "digits_cnn.calib.safetensors",
        "heldout": SAMPLES / "digits_cnn.heldout.safetensors",
    }


@pytest.fixture
def transformer_paths():
    return {
        "model": SAMPLES / "digits_transformer.safetensors",
        "arch": "sample_models.digits_transformer:build",
        "data": SAMPLES / "digits_transformer.calib.safetensors",
        "heldout": SAMPLES / "digits_transformer.heldout.safetensors",
    }


@pytest.fixture
def scan_routes(monkeypatch):
    """Record, per activation a calibration offers the one-pass route, whether that route answered
    (``candidates.scanned_candidates``); the list fills as calibrations run."""
    from octavcal import candidates

    taken = []
    original = candidates.scanned_candidates

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr("octavcal.calibrator.scanned_candidates", spy)
    return taken
