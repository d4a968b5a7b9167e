"""Preprocess stage on the demo corpus: the guide's files, the manifest, skipping finished and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from support import memory_by_size
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


def test_preprocess_memory_is_bounded_by_a_block_not_by_the_wav(tmp_path):
    """A 4x longer wav costs no more memory: the wav is read, and its mel computed and written, block by
    block (peak RSS and traced allocations of two lengths, in one fresh interpreter)."""
    setup = f"""
import shutil
from pathlib import Path
import numpy as np
from scipy.io import wavfile
from waveglow_lib.config import WorkflowConfig
from waveglow_lib.stages.preprocess import preprocess
root = Path({str(tmp_path)!r})
for seconds in (2, 20, 80):  # the wavs first: making them is not what is measured
    corpus = root / f"corpus{{seconds}}" / "wavs"
    corpus.mkdir(parents=True)
    noise = np.random.default_rng(seconds).standard_normal(seconds * 22050) * 3000
    wavfile.write(corpus / "long.wav", 22050, noise.astype(np.int16))
    del noise
def work(seconds):
    preprocess(WorkflowConfig(name=f"r{{seconds}}", runs_dir=str(root / "runs"),
                              corpus=str(root / f"corpus{{seconds}}")))
"""
    short, long = memory_by_size(setup, [20, 80], warm=2)
    # before: the whole wav in float64 and its STFT frames, about 80 bytes per sample (140 MiB more at 80 s)
    assert long["rss_growth"] < 1.3 * short["rss_growth"] + 16 * 2**20, (short, long)
