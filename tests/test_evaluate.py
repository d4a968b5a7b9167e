"""waveglow_lib.metrics (and evaluate's run-level pieces) on synthetic signals: each metric against a value worked out by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from waveglow_lib import evaluate, metrics
from support import tiny_waveglow
from waveglow_lib.config import ModelConfig, STFTConfig, WorkflowConfig

SR = 22050


def speechlike(seconds: float = 1.5, seed: int = 0) -> np.ndarray:
    """A vowel-like signal: harmonics of a gliding pitch under a syllable-rate envelope (STOI/PESQ need
    something that looks like speech to them)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 25))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 3.0 * t)) ** 2
    x = x * envelope + 0.002 * rng.standard_normal(t.size)
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def test_snr_db_matches_the_noise_added():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50_000)
    noise = rng.standard_normal(50_000)
    noise *= np.sqrt(np.sum(x ** 2) / np.sum(noise ** 2)) / 10 ** (30 / 20)   # exactly 30 dB
    assert metrics.snr_db(x, x + noise) == pytest.approx(30.0, abs=1e-9)
    # common length: the longer signal's tail is ignored
    assert metrics.snr_db(x, np.concatenate([x + noise, np.ones(100)])) == pytest.approx(30.0, abs=1e-9)
    assert metrics.snr_db(x, x) == metrics.SNR_CAP_DB
    with pytest.raises(ValueError, match="all zeros"):
        metrics.snr_db(np.zeros(10), np.ones(10))
    with pytest.raises(ValueError, match="1-D"):
        metrics.snr_db(np.zeros((2, 10)), np.ones(10))


def test_log_mel_distance_of_a_gain_is_its_log():
    rng = np.random.default_rng(2)
    mel = rng.uniform(-5, 1, size=(80, 40))
    assert metrics.log_mel_distance(mel, mel) == 0.0
    assert metrics.log_mel_distance(mel, mel + math.log(2.0)) == pytest.approx(math.log(2.0))
    # the common frames only
    assert metrics.log_mel_distance(mel, np.concatenate([mel, mel + 7], axis=1)) == 0.0
    with pytest.raises(ValueError, match="same n_mel"):
        metrics.log_mel_distance(mel, mel[:40])


def test_mcd_matches_a_direct_dct_and_ignores_level():
    rng = np.random.default_rng(3)
    a = rng.uniform(-6, 0, size=(80, 30))
    b = a + rng.normal(0, 0.3, size=a.shape)
    # independent computation: the orthonormal DCT-II written out as a matrix
    n = np.arange(80)
    basis = np.sqrt(2 / 80) * np.cos(np.pi * (n[None, :] + 0.5) * np.arange(80)[:, None] / 80)
    basis[0] /= np.sqrt(2)
    diff = (basis @ a - basis @ b)[1:14]
    expected = np.mean(10 / np.log(10) * np.sqrt(2 * np.sum(diff ** 2, axis=0)))
    assert metrics.mel_cepstral_distortion(a, b) == pytest.approx(expected, rel=1e-10)
    assert metrics.mel_cepstral_distortion(a, a) == 0.0
    # a gain moves every band by the same log amount: only c_0 changes, and MCD leaves c_0 out
    assert metrics.mel_cepstral_distortion(a, a + 1.5) == pytest.approx(0.0, abs=1e-9)
    assert metrics.mel_cepstral_distortion(a, b) > 1.0
    with pytest.raises(ValueError, match="n_coeffs"):
        metrics.mel_cepstrum(a, 80)


def test_quality_metrics_rank_clean_above_noisy():
    clean = speechlike()
    rng = np.random.default_rng(4)
    noisy = clean + 0.05 * rng.standard_normal(clean.size).astype(np.float32)
    same = metrics.quality_metrics(clean, clean, SR)
    bad = metrics.quality_metrics(clean, noisy, SR)
    assert same["log_mel_distance"] == pytest.approx(0.0, abs=1e-6)
    assert same["mcd_db"] == pytest.approx(0.0, abs=1e-4)
    assert same["seconds"] == pytest.approx(clean.size / SR)
    assert same["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert same["pesq"] > 4.0
    assert bad["log_mel_distance"] > 0.1 and bad["mcd_db"] > 1.0
    assert bad["stoi"] < same["stoi"] - 0.05
    assert bad["pesq"] < same["pesq"] - 1.0
    assert same["notes"] == [] and bad["notes"] == []
    with pytest.raises(ValueError, match="STOI could not score"):   # too short for pystoi
        metrics.stoi_score(np.ones(100), np.ones(100), SR)


def test_pesq_resamples_to_16k(monkeypatch):
    """Contract test of the call into `pesq` (a fake that records what it is given)."""
    import pesq as real_pesq

    seen = {}

    def fake(rate, ref, deg, mode):
        seen.update(rate=rate, n=len(ref), m=len(deg), mode=mode)
        return 3.0

    monkeypatch.setattr(real_pesq, "pesq", fake)
    assert metrics.pesq_score(np.ones(22050), np.ones(30000), 22050) == 3.0
    assert seen == {"rate": 16000, "n": 16000, "m": 16000, "mode": "wb"}


def test_missing_optional_package_is_a_note_not_a_failure(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pystoi", None)   # makes `import pystoi` fail
    with pytest.raises(ImportError, match="pip install pystoi"):
        metrics.stoi_score(np.ones(100), np.ones(100), SR)
    result = metrics.quality_metrics(speechlike(1.0), speechlike(1.0, seed=5), SR)
    assert result["stoi"] is None
    assert any("pystoi" in note for note in result["notes"])
    assert result["pesq"] is not None


def test_parity_table():
    rng = np.random.default_rng(6)
    ref = [rng.standard_normal(1000), rng.standard_normal(500)]
    close = [r + 1e-3 * rng.standard_normal(r.size) for r in ref]
    rows = {row["backend"]: row for row in metrics.parity_table({"torch": ref, "onnxruntime": close}, "torch")}
    assert rows["torch"]["snr_db_min"] == metrics.SNR_CAP_DB and rows["torch"]["max_abs_diff"] == 0.0
    assert 55 < rows["onnxruntime"]["snr_db_min"] < 65
    assert rows["onnxruntime"]["utterances"] == 2
    with pytest.raises(ValueError, match="reference backend"):
        metrics.parity_table({"onnxruntime": close}, "torch")
    with pytest.raises(ValueError, match="1 outputs"):
        metrics.parity_table({"torch": ref, "x": close[:1]}, "torch")


def test_round_trip_gives_the_audio_back():
    model = tiny_waveglow(ModelConfig(n_flows=4, n_layers=2, n_channels=16, n_early_every=2))
    result = evaluate.round_trip(model, speechlike(0.5), STFTConfig())
    assert result["audio"].size % 256 == 0 and result["audio"].size == result["reconstructed"].size
    assert result["snr_db"] > 60.0
    assert result["log_mel_distance"] < 1e-2


def test_collect_metrics_writes_plain_json(tmp_path):
    cfg = WorkflowConfig(name="t", runs_dir=str(tmp_path))
    utterances = [
        {"id": "a", "log_mel_distance": 1.0, "mcd_db": 10.0, "stoi": 0.5, "pesq": None},
        {"id": "b", "log_mel_distance": 3.0, "mcd_db": 20.0, "stoi": float("nan"), "pesq": None},
    ]
    rt = {"snr_db": 80.0, "audio": np.zeros(4), "seconds": 1.0}
    record = evaluate.collect_metrics(cfg, utterances=utterances, parity=[{"backend": "torch", "snr_db_min": 200.0}],
                                round_trip=rt, extra={"throughput": {"1": 2.0}})
    on_disk = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert on_disk == record
    assert record["summary"]["log_mel_distance"] == 2.0 and record["summary"]["mcd_db"] == 15.0
    assert record["summary"]["pesq"] is None and record["summary"]["stoi"] == 0.5
    assert record["utterances"][1]["stoi"] is None      # NaN is not JSON
    assert record["round_trip"] == {"snr_db": 80.0, "seconds": 1.0}
    assert record["throughput"] == {"1": 2.0}
