"""fast.py: the folded WaveGlow equals the original, and FastEngine / the `fast` backend reproduce it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from waveglow_lib.backends import available_backends, get_backend
from waveglow_lib.config import ModelConfig
from waveglow_lib import fast
from waveglow_lib.evaluate import MAX_LOG_MEL_DISTANCE, MIN_SNR_DB
from waveglow_lib.fast import FastEngine, FastWaveGlow, auto_engine, fold_waveglow, native_bf16
from waveglow_lib.model import WaveGlow

from conftest import TINY, randomise_, snr_db


def tiny_model(layout: str = "glow", seed: int = 0) -> WaveGlow:
    torch.manual_seed(seed)
    model = randomise_(WaveGlow(ModelConfig(**{**TINY, "layout": layout})), seed=seed)
    model.refresh_inverses()
    return model.eval()


def inputs(model: WaveGlow, batch: int = 3, frames: int = 23, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, 80, frames, generator=generator) - 5.0
    z = 0.6 * torch.randn(model.noise_shape(batch, frames), generator=generator)
    return mel, z


@pytest.mark.parametrize("layout", ["glow", "glow_old"])
def test_folded_model_reproduces_waveglow(layout):
    model = tiny_model(layout)
    fast = fold_waveglow(model)
    assert isinstance(fast, FastWaveGlow) and not hasattr(fast, "upsample")
    mel, z = inputs(model)
    reference = model.infer(mel, 1.0, z)
    audio = fast.infer(mel, 1.0, z)
    assert audio.shape == reference.shape
    assert snr_db(reference, audio) > 100  # the same function, only rounding differs
    # the folded model keeps WaveGlow's inverse pass too
    assert snr_db(model.noise_from_audio(mel, reference), fast.noise_from_audio(mel, reference)) > 90


@pytest.mark.parametrize("layout", ["glow", "glow_old"])
@pytest.mark.parametrize("threads", [1, 2])
def test_engine_fp32_matches_reference_for_any_batch_and_block(layout, threads):
    model = tiny_model(layout, seed=3)
    mel, z = inputs(model, batch=3, frames=21)  # 3 utterances on 2 threads: 2 in parallel + 1 left over
    reference = model.infer(mel, 1.0, z).numpy()
    for block_frames in (4, 128):  # several blocks per layer, and one
        audio = FastEngine(model, "fp32", block_frames=block_frames, threads=threads).run(mel.numpy(), z.numpy())
        assert audio.dtype == np.float32 and audio.shape == reference.shape
        assert min(snr_db(reference[i], audio[i]) for i in range(3)) > 100


def test_engine_bf16_is_close_or_falls_back_to_fp32():
    model = tiny_model(seed=4)
    mel, z = inputs(model, batch=2, frames=30)
    reference = model.infer(mel, 1.0, z).numpy()
    engine = FastEngine(model, "bf16")
    audio = engine.run(mel, z)
    if native_bf16():
        assert engine.precision == "bf16"
        assert 30 < snr_db(reference, audio) < 90  # bf16 rounding: close, but not fp32-exact
    else:
        assert engine.precision == "fp32" and snr_db(reference, audio) > 100


def test_engine_rejects_bad_settings_and_shapes():
    model = tiny_model()
    with pytest.raises(ValueError, match="precision"):
        FastEngine(model, "int8")
    with pytest.raises(ValueError, match="block_frames"):
        FastEngine(model, "fp32", block_frames=0)
    mel, z = inputs(model, batch=1, frames=10)
    with pytest.raises(ValueError, match="do not fit"):
        FastEngine(model, "fp32").run(mel, z[:, :, :-1])


def test_fast_backend_through_get_backend():
    model = tiny_model(seed=5)
    mel, z = inputs(model, batch=2, frames=12)
    backend = get_backend("fast", model=model, precision="fp32", threads=1)
    audio = backend.run(mel.numpy(), z.numpy())
    assert backend.name == "fast" and "fp32" in backend.description
    assert snr_db(model.infer(mel, 1.0, z), audio) > 100
    backend.close()
    assert available_backends()["fast"][0]
    with pytest.raises(Exception, match="needs the model"):
        get_backend("fast")
    with pytest.raises(Exception, match="precision"):
        get_backend("fast", model=model, precision="fp16")


# --- precision: auto --------------------------------------------------------------------------------------
def test_auto_keeps_bf16_only_with_native_bf16_and_a_passing_probe():
    model = tiny_model(seed=6)
    engine, record = auto_engine(model, threads=1)
    if native_bf16():
        assert engine.precision == record["precision"] == "bf16"
        assert record["finite"] and record["snr_db"] >= MIN_SNR_DB
        assert 0 < record["log_mel_distance"] <= MAX_LOG_MEL_DISTANCE  # bf16 rounding shows, within the gate
    else:
        assert engine.precision == record["precision"] == "fp32" and "no native bf16" in record["reason"]
    backend = get_backend("fast", model=model, precision="auto", threads=1)
    assert backend.precision == record["precision"] and backend.probe["precision"] == record["precision"]
    assert "auto:" in backend.description


def test_auto_without_native_bf16_runs_fp32(monkeypatch):
    monkeypatch.setattr(fast, "native_bf16", lambda: False)
    engine, record = auto_engine(tiny_model(seed=6), threads=1)
    assert engine.precision == "fp32" and record == {"precision": "fp32", "reason": record["reason"]}
    assert "no native bf16" in record["reason"]


def test_auto_rejects_a_bf16_path_that_breaks_the_audio(monkeypatch):
    """The gate itself: a bf16 engine whose output is wrecked (loud noise added) must not be kept."""
    monkeypatch.setattr(fast, "native_bf16", lambda: True)  # on a CPU without it, bf16 runs emulated: slow, same math
    honest_run = FastEngine.run

    def broken_bf16(self, mel, z):
        audio = honest_run(self, mel, z)
        if self.precision != "bf16":
            return audio
        return audio + np.random.default_rng(0).normal(0.0, 3.0 * audio.std() + 1e-3, audio.shape).astype(np.float32)

    monkeypatch.setattr(FastEngine, "run", broken_bf16)
    model = tiny_model(seed=6)
    engine, record = auto_engine(model, threads=1)
    assert engine.precision == record["precision"] == "fp32"
    assert record["reason"].startswith("bf16 failed") and record["snr_db"] < MIN_SNR_DB
    mel, z = inputs(model, batch=1, frames=12)  # the engine kept is the honest fp32 one
    assert snr_db(model.infer(mel, 1.0, z), engine.run(mel, z)) > 100
