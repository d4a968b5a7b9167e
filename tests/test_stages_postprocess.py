"""Postprocess: int16 conversion without the guide's wrap-around, wav files, denoiser, skipping, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.io import wavfile

from support import SHORT_IDS
from waveglow_lib.audio import to_int16
from waveglow_lib.io import write_bin
from waveglow_lib.stages.postprocess import postprocess

FRAMES = {"LJ001-0002": 125, "LJ001-0006": 281, "LJ001-0008": 99}


def test_full_scale_does_not_wrap():
    audio = np.array([1.0, -1.0, 1.7, -3.0, 0.5, 0.0], np.float32)
    assert to_int16(audio).tolist() == [32767, -32767, 32767, -32767, 16384, 0]
    guide = (audio[:1] * 32768).astype("int16")  # WaveGlow_postprocess.py: audio * 32768 → int16
    assert guide[0] == -32768  # +1.0 wraps to the most negative value: why we clip and use 32767


@pytest.fixture
def run_with_outputs(preprocessed_run, tmp_path):
    """A run folder whose out/ holds known float32 audio (a sine) per utterance."""
    cfg = preprocessed_run(tmp_path)
    out = cfg.run_dir / "out"
    for i, utt_id in enumerate(SHORT_IDS):
        n = FRAMES[utt_id] * 256
        write_bin(out / f"{utt_id}_out.bin", 0.5 * np.sin(np.arange(n) * 0.01 * (i + 1)).astype(np.float32))
    return cfg


def test_wavs_like_the_guide_trimmed_to_the_source(run_with_outputs):
    cfg = run_with_outputs
    result = postprocess(cfg)
    assert sorted(result["written"]) == sorted(SHORT_IDS)
    manifest = json.loads((cfg.run_dir / "mel" / "manifest.json").read_text())
    for item in manifest["items"]:
        rate, data = wavfile.read(cfg.run_dir / "wav" / f"{item['id']}_syn.wav")
        raw = np.fromfile(cfg.run_dir / "out" / f"{item['id']}_out.bin", "<f4")
        assert rate == 22050 and data.dtype == np.int16 and data.size == item["samples"] < raw.size
        assert np.array_equal(data, to_int16(raw[: item["samples"]]))
    stamps = {p.name: p.stat().st_mtime_ns for p in (cfg.run_dir / "wav").glob("*.wav")}
    again = postprocess(cfg)
    assert sorted(again["skipped"]) == sorted(SHORT_IDS) and not again["written"]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (cfg.run_dir / "wav").glob("*.wav")}


def test_denoiser_strength_changes_the_audio_and_is_redone(tiny_model, run_with_outputs):
    cfg = run_with_outputs
    postprocess(cfg)
    _, plain = wavfile.read(cfg.run_dir / "wav" / "LJ001-0008_syn.wav")
    result = postprocess(cfg.with_overrides(denoiser_strength=0.5), model=tiny_model())
    assert len(result["written"]) == 3 and result["denoiser_strength"] == 0.5
    _, denoised = wavfile.read(cfg.run_dir / "wav" / "LJ001-0008_syn.wav")
    assert denoised.shape == plain.shape and not np.array_equal(denoised, plain)


def test_bad_outputs_are_named(run_with_outputs):
    cfg = run_with_outputs
    bad = cfg.run_dir / "out" / "LJ001-0006_out.bin"
    audio = np.fromfile(bad, "<f4")
    audio[3] = np.inf
    write_bin(bad, audio)
    with pytest.raises(ValueError, match=f"{bad}: audio contains NaN/Inf"):
        postprocess(cfg)
    assert (cfg.run_dir / "wav" / "LJ001-0002_syn.wav").is_file()  # finished before the bad one: kept
    write_bin(bad, audio[:-10])
    with pytest.raises(ValueError, match=f"{bad}: .* bytes, but shape"):
        postprocess(cfg)


def test_nothing_to_convert(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the infer stage first"):
        postprocess(cfg)
