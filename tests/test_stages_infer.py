"""Infer stage: deterministic per-utterance noise, true batching (= unbatched per utterance), every
backend on the same noise, resume after a crash, and bad inputs (each a clear error naming the file)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from support import SHORT_IDS, TINY_PIPELINE, install_fake_ais_bench, snr_db
from waveglow_lib.backends import get_backend
from waveglow_lib.io import read_bin, sha256_bytes
from waveglow_lib.batching import Utterance, make_batch, plan_batches, utterance_noise
from waveglow_lib.stages.infer import infer

FRAMES = {"LJ001-0002": 125, "LJ001-0006": 281, "LJ001-0008": 99}


def outputs(out_dir) -> dict[str, np.ndarray]:
    return {u: read_bin(out_dir / f"{u}_out.bin", (FRAMES[u] * 256,)) for u in SHORT_IDS}


@pytest.fixture(scope="module")
def unbatched(preprocessed_run, tiny_model, tmp_path_factory):
    """Reference run: torch backend, batch 1."""
    cfg = preprocessed_run(tmp_path_factory.mktemp("ref"), with_onnx=True)
    result = infer(cfg, model=tiny_model())
    assert sorted(result["written"]) == sorted(SHORT_IDS)
    return cfg, outputs(cfg.run_dir / "out")


def test_utterance_noise_is_deterministic_and_distinct():
    a = utterance_noise(TINY_PIPELINE, 10, 1234, "LJ001-0001")
    assert a.shape == (8, 320) and a.dtype == np.float32
    assert np.array_equal(a, utterance_noise(TINY_PIPELINE, 10, 1234, "LJ001-0001"))
    assert not np.allclose(a, utterance_noise(TINY_PIPELINE, 10, 1234, "LJ001-0002"))
    assert not np.allclose(a, utterance_noise(TINY_PIPELINE, 10, 1235, "LJ001-0001"))
    assert abs(float(a.std()) - 1.0) < 0.1


def test_batches_group_by_length_and_pad():
    utts = [Utterance(i, n, None) for i, n in [("a", 5), ("b", 9), ("c", 7), ("d", 2)]]
    assert [[u.id for u in b] for b in plan_batches(utts, 2)] == [["b", "c"], ["a", "d"]]
    mels = [np.ones((80, 3), np.float32), np.ones((80, 2), np.float32)]
    noises = [np.ones((8, 96), np.float32), np.ones((8, 64), np.float32)]
    mel, z = make_batch(mels, noises, 0.5, length=4, rows=3)
    assert mel.shape == (3, 80, 4) and z.shape == (3, 8, 128)
    assert mel[1, 0, 2] == pytest.approx(np.log(1e-5)) and mel[1, 0, 1] == 1.0 and mel[2].max() < -11
    assert z[0, 0, 95] == 0.5 and z[0, 0, 96] == 0.0 and z[1, 0, 64] == 0.0


def test_batched_equals_unbatched_per_utterance(preprocessed_run, tiny_model, tmp_path, unbatched):
    _, reference = unbatched
    cfg = preprocessed_run(tmp_path, batch_size=3)
    result = infer(cfg, model=tiny_model())
    timings = json.loads((cfg.run_dir / "out" / "timings.json").read_text())["items"]
    assert {item["batch_items"] for item in timings.values()} == {3}
    assert {item["padded_frames"] for item in timings.values()} == {281}
    assert all(item["exact"] for item in timings.values()) and timings["LJ001-0008"]["tail_frames"] == 8
    batched = outputs(cfg.run_dir / "out")
    plain = infer(cfg.with_overrides(exact_batching=False), model=tiny_model(), out_dir=tmp_path / "plain")
    padded_only = outputs(tmp_path / "plain")
    for utt_id in SHORT_IDS:
        assert snr_db(reference[utt_id], batched[utt_id]) >= 100, utt_id  # equal up to float rounding
        assert np.array_equal(batched[utt_id][:-96], padded_only[utt_id][:-96])  # only the tail is redone
    for utt_id in ("LJ001-0002", "LJ001-0008"):  # padded: plain padding changes their last samples
        assert snr_db(reference[utt_id], padded_only[utt_id]) < 100, utt_id
    assert result["real_time_factor"] > 0 and len(plain["written"]) == 3


def test_tail_window_of_the_official_model():
    from waveglow_lib.config import ModelConfig

    assert ModelConfig().receptive_field() == 12 * 255  # 12 flows, dilations 1..128, kernel 3
    assert ModelConfig().tail_window() == (195, 3060 * 8)  # (2·3060 + 96 steps) / 32 steps per frame
    assert TINY_PIPELINE.tail_window() == (4, 96)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_every_backend_gets_the_same_noise(tmp_path, unbatched, backend):
    cfg, reference = unbatched
    cfg = cfg.with_overrides(backend=backend, batch_size=2)
    out_dir = tmp_path / backend
    result = infer(cfg, out_dir=out_dir)  # its backend from the run folder's onnx/
    assert result["backend"].startswith(backend)
    for utt_id, audio in outputs(out_dir).items():
        assert snr_db(reference[utt_id], audio) >= 50, (backend, utt_id)


def test_auto_runs_fast_and_records_the_precision_it_chose(tmp_path, unbatched):
    cfg, reference = unbatched
    cfg = cfg.with_overrides(backend="auto", precision="auto")
    out_dir = tmp_path / "auto"
    result = infer(cfg, out_dir=out_dir)
    assert result["backend"].startswith("fast")
    settings = json.loads((out_dir / "timings.json").read_text())["settings"]
    probe = settings["precision_probe"]
    assert settings["precision_used"] == probe["precision"] in ("int8", "bf16", "fp32") and probe["reason"]
    floor = 100 if probe["precision"] == "fp32" else 25  # int8/bf16 passed the gate (≥ 20 dB) on speech
    for utt_id, audio in outputs(out_dir).items():
        assert snr_db(reference[utt_id], audio) >= floor, utt_id


class CrashAfter:
    """Wraps a backend; raises after `n` batches (a crash in the middle of a run)."""

    def __init__(self, backend, n):
        self.backend, self.n, self.calls = backend, n, 0
        self.name, self.fixed_batch, self.gear_lengths = backend.name, None, None

    def pad_length(self, frames):
        return frames

    def run(self, mel, z):
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.backend.run(mel, z)


def test_resume_after_crash_writes_nothing_twice_and_loses_nothing(preprocessed_run, tiny_model, tmp_path, unbatched):
    _, reference = unbatched
    cfg = preprocessed_run(tmp_path)
    backend = get_backend("torch", model=tiny_model())
    with pytest.raises(RuntimeError, match="simulated crash"):
        infer(cfg, backend=CrashAfter(backend, 2))
    out = cfg.run_dir / "out"
    done = sorted(p.name for p in out.glob("*_out.bin"))
    assert len(done) == 2 and not list(out.glob(".*tmp"))
    stamps = {name: (out / name).stat().st_mtime_ns for name in done}
    timings = json.loads((out / "timings.json").read_text())
    assert sorted(f"{k}_out.bin" for k in timings["items"]) == done

    second = CrashAfter(backend, 99)
    result = infer(cfg, backend=second)
    assert second.calls == 1 and len(result["written"]) == 1 and sorted(result["skipped"]) == [n[:-8] for n in done]
    assert {name: (out / name).stat().st_mtime_ns for name in done} == stamps  # not rewritten
    for utt_id, audio in outputs(out).items():
        assert snr_db(reference[utt_id], audio) >= 100, utt_id  # same as an uninterrupted run
    assert len(json.loads((out / "timings.json").read_text())["items"]) == 3


def test_changed_settings_are_not_mixed_into_old_outputs(preprocessed_run, tiny_model, tmp_path, unbatched):
    cfg = preprocessed_run(tmp_path)
    infer(cfg, model=tiny_model())
    with pytest.raises(ValueError, match=r"other settings \(sigma: 0.6 -> 0.8\).*force"):
        infer(cfg.with_overrides(sigma=0.8), model=tiny_model())
    before = read_bin(cfg.run_dir / "out" / "LJ001-0008_out.bin", (99 * 256,))
    result = infer(cfg.with_overrides(sigma=0.8), model=tiny_model(), force=True)
    assert len(result["written"]) == 3
    after = read_bin(cfg.run_dir / "out" / "LJ001-0008_out.bin", (99 * 256,))
    assert not np.allclose(before, after)


def test_om_backend_through_the_stage_pads_to_gears_and_batch(preprocessed_run, tmp_path, unbatched, monkeypatch):
    """Contract test: FakeInferSession (support.py) stands in for ais_bench's InferSession (no NPU
    here); it computes with the tiny torch model, so the stage's gear/batch padding is what is tested."""
    FakeInferSession = install_fake_ais_bench(monkeypatch)
    _, reference = unbatched
    cfg = preprocessed_run(tmp_path, backend="om", device="npu:0", batch_size=2, with_onnx=True)
    (cfg.run_dir / "om").mkdir()
    (cfg.run_dir / "om" / "waveglow.om").write_bytes(b"om")
    # gears as convert writes them for batch 2: two buckets plus the tail window (4 frames here)
    (cfg.run_dir / "om" / "waveglow.gears.json").write_text('{"batch": 2, "mel_lengths": [4, 128, 300]}')
    infer(cfg)
    session = FakeInferSession.instances[-1]
    assert [c[0] for c in session.calls] == [(2, 80, 300), (2, 80, 4), (2, 80, 128), (2, 80, 4)]
    assert session.released == "finalize"
    timings = json.loads((cfg.run_dir / "out" / "timings.json").read_text())["items"]
    assert timings["LJ001-0006"]["batch_device_ms"] == 1.5 + 3.0  # the fake's times of the batch's 2 calls
    for utt_id, audio in outputs(cfg.run_dir / "out").items():
        assert snr_db(reference[utt_id], audio) >= 100, utt_id
    # without the window gear the tails cannot be redone: recorded as not exact, still close
    (cfg.run_dir / "om" / "waveglow.gears.json").write_text('{"batch": 2, "mel_lengths": [128, 300]}')
    infer(cfg, out_dir=tmp_path / "no_window_gear")
    timings = json.loads((tmp_path / "no_window_gear" / "timings.json").read_text())["items"]
    assert [u for u in SHORT_IDS if not timings[u]["exact"]] == list(SHORT_IDS)
    for utt_id, audio in outputs(tmp_path / "no_window_gear").items():
        assert snr_db(reference[utt_id], audio) >= 50, utt_id


# --- bad input -------------------------------------------------------------------------------------
def test_missing_manifest(preprocessed_run, tiny_model, tmp_path):
    cfg = preprocessed_run(tmp_path)
    (cfg.run_dir / "mel" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="mel/manifest.json: manifest not found"):
        infer(cfg, model=tiny_model())


def test_bin_size_disagrees_with_manifest(preprocessed_run, tiny_model, tmp_path):
    cfg = preprocessed_run(tmp_path)
    bad = cfg.run_dir / "mel" / "LJ001-0006.bin"
    bad.write_bytes(bad.read_bytes()[:-4])
    with pytest.raises(ValueError, match=f"{bad}: .* bytes, but manifest shape \\[80, 281\\]"):
        infer(cfg, model=tiny_model())
    assert not (cfg.run_dir / "out").exists()  # checked before anything is written


def test_wrong_channel_count(preprocessed_run, tiny_model, tmp_path):
    cfg = preprocessed_run(tmp_path)
    path = cfg.run_dir / "mel" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["items"][0]["shape"] = [40, 250]
    manifest["items"][0]["mel_frames"] = 250
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"LJ001-0002.bin: mel has shape \[40, 250\].*\[80, T\]"):
        infer(cfg, model=tiny_model())


def test_nan_mel_stops_with_the_file_name_and_keeps_finished_outputs(preprocessed_run, tiny_model, tmp_path):
    cfg = preprocessed_run(tmp_path)
    bad = cfg.run_dir / "mel" / "LJ001-0002.bin"  # 125 frames: second in longest-first order
    mel = np.fromfile(bad, dtype="<f4")
    mel[7] = np.nan
    mel.tofile(bad)
    manifest_path = cfg.run_dir / "mel" / "manifest.json"  # a manifest that lists the NaN mel by its hash
    manifest = json.loads(manifest_path.read_text())
    for item in manifest["items"]:
        if item["id"] == "LJ001-0002":
            item["sha256"] = sha256_bytes(bad.read_bytes())
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{bad}: mel has 1 NaN/Inf"):
        infer(cfg, model=tiny_model())
    assert sorted(p.name for p in (cfg.run_dir / "out").glob("*.bin")) == ["LJ001-0006_out.bin"]
