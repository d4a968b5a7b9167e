"""backends/fast/: the folded WaveGlow equals the original, and FastEngine / the `fast` backend reproduce it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from waveglow_lib.backends import available_backends, get_backend
from waveglow_lib.config import ModelConfig
from waveglow_lib.backends.fast import FastEngine, FastWaveGlow, auto_engine, fold_waveglow
from waveglow_lib.backends.fast import auto as fast_auto
from waveglow_lib.backends.fast import engine as fast_engine
from waveglow_lib.hardware import native_bf16, native_int8
from waveglow_lib.metrics import MAX_LOG_MEL_DISTANCE, MIN_SNR_DB
from waveglow_lib.model import WaveGlow

from support import TINY, snr_db, tiny_waveglow


def patch_native(monkeypatch, **native: bool) -> None:
    """Pretend the CPU has (or lacks) native int8 / bf16: the auto policy and the engine both ask."""
    for kind, value in native.items():
        for module in (fast_auto, fast_engine):
            monkeypatch.setattr(module, f"native_{kind}", lambda value=value: value)


def tiny_model(layout: str = "glow", seed: int = 0) -> WaveGlow:
    return tiny_waveglow(TINY, seed=seed, layout=layout)


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


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_engine_reduced_precision_is_close_or_falls_back(precision):
    model = tiny_model(seed=4)
    mel, z = inputs(model, batch=2, frames=30)
    reference = model.infer(mel, 1.0, z).numpy()
    engine = FastEngine(model, precision)
    audio = engine.run(mel, z)
    expected = ("int8" if native_int8() else "bf16") if precision == "int8" else "bf16"
    if expected == "bf16" and not native_bf16():
        expected = "fp32"
    assert engine.precision == expected
    if expected == "fp32":
        assert snr_db(reference, audio) > 100
    else:  # rounding (bf16) or quantisation (int8): close, but not fp32-exact
        assert 25 < snr_db(reference, audio) < 90


def test_engine_rejects_bad_settings_and_shapes():
    model = tiny_model()
    with pytest.raises(ValueError, match="precision"):
        FastEngine(model, "fp16")
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
def test_auto_keeps_the_fastest_native_precision_that_passes_the_probe():
    model = tiny_model(seed=6)
    engine, record = auto_engine(model, threads=1)
    expected = "bf16" if native_bf16() else "fp32"  # int8 is not tried for 16 WN channels: not faster there
    assert engine.precision == record["precision"] == expected
    if expected != "fp32":
        assert record["finite"] and record["snr_db"] >= MIN_SNR_DB
        assert 0 < record["log_mel_distance"] <= MAX_LOG_MEL_DISTANCE  # reduced precision shows, within the gate
        assert list(record["tried"]) == [expected]
    backend = get_backend("fast", model=model, precision="auto", threads=1)
    assert backend.precision == record["precision"] and backend.probe["precision"] == record["precision"]
    assert "auto:" in backend.description


def test_auto_tries_int8_first_where_it_pays(monkeypatch):
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no oneDNN quantized engine")
    patch_native(monkeypatch, int8=True)
    monkeypatch.setattr(fast_auto, "INT8_MIN_CHANNELS", 16)
    engine, record = auto_engine(tiny_model(seed=6), threads=1)
    assert engine.precision == record["precision"] == "int8" and list(record["tried"]) == ["int8"]
    assert record["snr_db"] >= MIN_SNR_DB and record["log_mel_distance"] <= MAX_LOG_MEL_DISTANCE
    monkeypatch.setattr(fast_auto, "INT8_MIN_CHANNELS", 17)
    _, record = auto_engine(tiny_model(seed=6), threads=1)
    assert "int8" not in record["tried"] and "int8 not faster for 16 WN channels" in record["reason"]


def test_auto_without_native_int8_or_bf16_runs_fp32(monkeypatch):
    patch_native(monkeypatch, int8=False, bf16=False)
    engine, record = auto_engine(tiny_model(seed=6), threads=1)
    assert engine.precision == record["precision"] == "fp32" and record["tried"] == {}
    assert "no int8 dot products" in record["reason"] and "no native bf16" in record["reason"]


@pytest.mark.parametrize("broken", [("int8",), ("int8", "bf16")])
def test_auto_rejects_a_precision_that_breaks_the_audio(monkeypatch, broken):
    """The gate itself: an engine whose output is wrecked (loud noise added) is not kept; the next one is."""
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no oneDNN quantized engine")
    # on a CPU without them, these run emulated: slow, same math
    patch_native(monkeypatch, int8=True, bf16=True)
    monkeypatch.setattr(fast_auto, "INT8_MIN_CHANNELS", 0)  # tried for the tiny model too
    honest_run = FastEngine.run

    def wrecked(self, mel, z):
        audio = honest_run(self, mel, z)
        if self.precision not in broken:
            return audio
        return audio + np.random.default_rng(0).normal(0.0, 3.0 * audio.std() + 1e-3, audio.shape).astype(np.float32)

    monkeypatch.setattr(FastEngine, "run", wrecked)
    model = tiny_model(seed=6)
    engine, record = auto_engine(model, threads=1)
    expected = "bf16" if broken == ("int8",) else "fp32"
    assert engine.precision == record["precision"] == expected
    assert "int8 failed the quality gate" in record["reason"]
    assert all(record["tried"][p]["snr_db"] < MIN_SNR_DB for p in broken)
    mel, z = inputs(model, batch=1, frames=12)  # the engine kept is an honest one
    assert snr_db(model.infer(mel, 1.0, z), engine.run(mel, z)) > (100 if expected == "fp32" else 25)
