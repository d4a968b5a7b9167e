"""Preprocess stage on the demo corpus: the guide's files, the manifest, skipping finished and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from waveglow_lib.audio import load_wav, mel_spectrogram
from waveglow_lib.config import DEMO_CORPUS_DIR
from waveglow_lib.io import read_bin
from waveglow_lib.stages.preprocess import ManifestError, list_wavs, load_manifest, preprocess


def test_demo_corpus_like_the_guide(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path, limit=3)
    result = preprocess(cfg)
    mel_dir = cfg.run_dir / "mel"
    manifest = load_manifest(mel_dir)
    ids = [item["id"] for item in manifest["items"]]
    assert ids == ["LJ001-0001", "LJ001-0002", "LJ001-0003"] and result["computed"] == 3
    for item in manifest["items"]:
        audio, _ = load_wav(item["wav"])
        mel = read_bin(mel_dir / f"{item['id']}.bin", tuple(item["shape"]))
        assert item["shape"] == [80, 1 + audio.size // 256] == [80, item["mel_frames"]]
        assert np.array_equal(mel, mel_spectrogram(audio))
        assert (mel_dir / f"{item['id']}.txt").read_text().strip() == str(audio.size) == str(item["samples"])
        assert item["dtype"] == "float32" and len(item["sha256"]) == 64
    again = preprocess(cfg)
    assert again["reused"] == 3 and again["computed"] == 0


def test_limit_zero_means_all_in_file_order():
    assert [p.stem for p in list_wavs(DEMO_CORPUS_DIR, 0)] == [f"LJ001-{i:04d}" for i in range(1, 11)]
    assert len(list_wavs(DEMO_CORPUS_DIR, 2)) == 2


def test_corrupt_and_silent_inputs_are_reported_and_skipped(make_cfg, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "wavs").mkdir(parents=True)
    shutil.copy2(DEMO_CORPUS_DIR / "wavs" / "LJ001-0008.wav", corpus / "wavs")
    (corpus / "wavs" / "LJ001-0001.wav").write_bytes(b"RIFF\x00\x00garbage")
    from scipy.io import wavfile

    wavfile.write(corpus / "wavs" / "LJ001-0002.wav", 22050, np.zeros(5000, np.int16))
    wavfile.write(corpus / "wavs" / "LJ001-0003.wav", 16000, np.ones(5000, np.int16) * 1000)
    cfg = make_cfg(tmp_path / "runs", corpus=str(corpus), limit=0)
    result = preprocess(cfg)
    assert result["items"] == 1
    reasons = {s["wav"].rsplit("/", 1)[1]: s["reason"] for s in result["skipped"]}
    assert "not a readable WAV" in reasons["LJ001-0001.wav"] and "LJ001-0001.wav" in reasons["LJ001-0001.wav"]
    assert "silent" in reasons["LJ001-0002.wav"]
    assert "16000 Hz" in reasons["LJ001-0003.wav"] and "resample" in reasons["LJ001-0003.wav"]
    manifest = json.loads((cfg.run_dir / "mel" / "manifest.json").read_text())
    assert [i["id"] for i in manifest["items"]] == ["LJ001-0008"] and len(manifest["skipped"]) == 3
    fixed = preprocess(cfg.with_overrides(resample=True))  # a settings change recomputes everything
    assert fixed["items"] == 2 and fixed["computed"] == 2


def test_missing_corpus_and_manifest(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: corpus folder not found"):
        preprocess(make_cfg(tmp_path, corpus=str(tmp_path / "nowhere")))
    with pytest.raises(ManifestError, match="manifest.json: manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        load_manifest(tmp_path)
