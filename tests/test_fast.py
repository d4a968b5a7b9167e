"""backends/fast/: the folded WaveGlow equals the original, and FastEngine / the `fast` backend reproduce it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from waveglow_lib.backends import available_backends, get_backend
from waveglow_lib.backends.fast import FastEngine, FastWaveGlow, auto_engine, fold_waveglow
from waveglow_lib.backends.fast import auto as fast_auto
from waveglow_lib.backends.fast import cache as fast_cache
from waveglow_lib.backends.fast import engine as fast_engine
from waveglow_lib.errors import BackendError
from waveglow_lib.hardware import CpuMeter, cpu_jiffies, int8_api, native_bf16, native_int8, usable_cpus
from waveglow_lib.metrics import MAX_LOG_MEL_DISTANCE, MIN_SNR_DB
from waveglow_lib.model import WaveGlow

from support import TINY, snr_db, tiny_waveglow


def patch_native(monkeypatch, amx: bool = False, **native: bool) -> None:
    """Pretend the CPU has (or lacks) native int8 / bf16 (and AMX-BF16, which puts bf16 first): the auto
    policy and the engine both ask."""
    monkeypatch.setattr(fast_auto, "cpu_flags", lambda: {"avx512f", "amx_bf16"} if amx else {"avx512f"})
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
    expected = ("int8" if native_int8() else "bf16") if precision == "int8" else "bf16"
    if expected == "bf16" and not native_bf16():
        expected = "fp32"
    for block_frames in (None, 7):  # the precision's default (one block here), and several with a short last
        engine = FastEngine(model, precision, block_frames=block_frames)
        audio = engine.run(mel, z)
        assert engine.precision == expected
        assert engine.block_frames == (block_frames or fast_engine.BLOCK_FRAMES[expected])
        if expected == "fp32":
            assert snr_db(reference, audio) > 100
        else:  # rounding (bf16) or quantisation (int8): close, but not fp32-exact
            assert 25 < snr_db(reference, audio) < 90


def test_int8_activations_keep_zeros_exact_and_refuse_non_finite():
    """The int8 engine quantises each activation once (mel, residual stream, gate): zeros — the padding
    and the gaps between packed utterances — must stay exactly zero, values round to within half a step,
    and an inf/NaN is a clear error, not a garbage scale."""
    x = torch.cat([torch.zeros(3, 8), torch.linspace(-2.5, 7.0, 40).view(5, 8)])
    q = fast_engine.quantize_u8(x)
    restored = (q.data.float() - q.zero_point) * q.scale
    assert q.data.dtype == torch.uint8 and torch.equal(restored[:3], torch.zeros(3, 8))
    assert (restored - x).abs().max() <= q.scale / 2 + 1e-6 and q.scale == pytest.approx(9.5 / 255)
    gate = torch.tanh(torch.linspace(-6, 6, 64)).view(8, 8)  # −gate lies in (−1, 1): the fixed scale holds it
    g = fast_engine.quantize_u8(gate, fast_engine.GATE_SCALE, 128)
    assert ((g.data.float() - 128) * g.scale - gate).abs().max() <= fast_engine.GATE_SCALE / 2 + 1e-6
    with pytest.raises(ValueError, match="not finite"):
        fast_engine.quantize_u8(torch.tensor([[0.0, float("nan")]]))


def test_quantize_int8_is_torch_per_channel_quantisation_bit_for_bit():
    """The engine's vectorised quantiser must give what torch.quantize_per_channel gives (the cache stores
    its output, and oneDNN packs it), for float32 and bfloat16 weights, ties and all-zero channels."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(70, 33, generator=gen) * 0.3
    weight[5, :] = torch.arange(33) / 254.0  # halves of a quantisation step: round half to even
    weight[:, 3] = 0.0  # an all-zero output channel
    for w in (weight, weight.bfloat16()):
        q, scales = fast_engine.quantize_int8(w)
        expected = torch.quantize_per_channel(w.t().float(), scales, torch.zeros(33, dtype=torch.long), 0,
                                              torch.qint8).int_repr()
        assert q.dtype == torch.int8 and q.shape == (33, 70) and torch.equal(q, expected)
        assert torch.equal(q[3], torch.zeros(70, dtype=torch.int8))


def test_int8_gemm_adds_onto_its_output_in_the_kernel():
    """oneDNN's sum post-op: accumulate(out, x) must equal out + x @ W (+ bias) computed apart, into the
    same memory (the engine relies on it for the taps, the residual and the skip sum)."""
    if not int8_api():
        pytest.skip("this torch build has no oneDNN int8 GEMM")
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 40, generator=gen) * 0.1, torch.randn(40, generator=gen)
    q, scales = fast_engine.quantize_int8(weight)
    gemm = fast_engine._Int8Gemm(q, scales, bias)
    x = fast_engine.quantize_u8(torch.randn(33, 24, generator=gen))
    apart = gemm(x)
    dequantised = ((x.data.float() - x.zero_point) * x.scale) @ (q.float() * scales.float()[:, None]).t() + bias
    assert torch.allclose(apart, dequantised, atol=1e-4)
    base = torch.randn(33, 40, generator=gen)
    out = base.clone()
    assert gemm.accumulate(out, x).data_ptr() == out.data_ptr()
    assert torch.allclose(out, base + apart, atol=1e-5)


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
    if not int8_api():
        pytest.skip("this torch build has no oneDNN int8 GEMM")
    patch_native(monkeypatch, int8=True)
    monkeypatch.setattr(fast_auto, "INT8_MIN_CHANNELS", 16)
    engine, record = auto_engine(tiny_model(seed=6), threads=1)
    assert engine.precision == record["precision"] == "int8" and list(record["tried"]) == ["int8"]
    assert record["snr_db"] >= MIN_SNR_DB and record["log_mel_distance"] <= MAX_LOG_MEL_DISTANCE
    monkeypatch.setattr(fast_auto, "INT8_MIN_CHANNELS", 17)
    _, record = auto_engine(tiny_model(seed=6), threads=1)
    assert "int8" not in record["tried"] and "int8 not faster for 16 WN channels" in record["reason"]


@pytest.mark.parametrize("bf16_passes", [True, False])
def test_auto_puts_bf16_before_int8_on_amx(monkeypatch, bf16_passes):
    """With AMX-BF16, bf16 is tried first and kept when it passes the gate (int8 is then never built); when it
    fails, int8 is tried next. Elsewhere int8 comes first. (The AMX flag is set here, so that both orders are
    checked on any CPU; the measurements behind the order are in docs/benchmarks.md.)"""
    if not int8_api():
        pytest.skip("this torch build has no oneDNN int8 GEMM")
    assert fast_auto.precision_order({"amx_bf16", "amx_int8"}) == ("bf16", "int8")
    assert fast_auto.precision_order({"avx512_vnni", "avx512_bf16"}) == ("int8", "bf16")
    patch_native(monkeypatch, amx=True, int8=True, bf16=True)
    monkeypatch.setattr(fast_auto, "INT8_MIN_CHANNELS", 16)
    real_quality = fast_auto.probe_quality
    built = []

    def quality(engine, probe):
        built.append(engine.precision)
        result = real_quality(engine, probe)
        return {**result, "snr_db": -1.0} if engine.precision == "bf16" and not bf16_passes else result

    monkeypatch.setattr(fast_auto, "probe_quality", quality)
    engine, record = auto_engine(tiny_model(seed=6), threads=1)
    if bf16_passes:
        assert built == ["bf16"] and engine.precision == record["precision"] == "bf16"
        assert "AMX-BF16: bf16 before int8" in record["reason"]
    else:
        assert built == ["bf16", "int8"] and engine.precision == record["precision"] == "int8"
        assert "bf16 failed the quality gate" in record["reason"]


def test_auto_without_native_int8_or_bf16_runs_fp32(monkeypatch):
    patch_native(monkeypatch, int8=False, bf16=False)
    engine, record = auto_engine(tiny_model(seed=6), threads=1)
    assert engine.precision == record["precision"] == "fp32" and record["tried"] == {}
    assert "no int8 dot products" in record["reason"] and "no native bf16" in record["reason"]


@pytest.mark.parametrize("broken", [("int8",), ("int8", "bf16")])
def test_auto_rejects_a_precision_that_breaks_the_audio(monkeypatch, broken):
    """The gate itself: an engine whose output is wrecked (loud noise added) is not kept; the next one is."""
    if not int8_api():
        pytest.skip("this torch build has no oneDNN int8 GEMM")
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


# --- the engine cache -------------------------------------------------------------------------------------
def cached_backend(model, cache_dir, precision="fp32"):
    return get_backend("fast", model=model, precision=precision, threads=1, cache_dir=cache_dir)


def test_cache_hit_gives_the_same_engine_without_building(tmp_path, monkeypatch):
    model = tiny_model(seed=7)
    mel, z = inputs(model, batch=2, frames=14)
    first = cached_backend(model, tmp_path)
    assert first.cache_events == ["built"] and "engine from cache" not in first.description
    entries = list((tmp_path / "fast").glob("engine-*"))
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert len(list(entries[0].glob("flow*.safetensors"))) == model.config.n_flows
    # a hit must not fold or quantise anything: building is made to fail
    monkeypatch.setattr(fast_cache, "flow_arrays", lambda *a: pytest.fail("rebuilt on a cache hit"))
    second = cached_backend(model, tmp_path)
    assert second.cache_events == ["hit"] and "engine from cache" in second.description
    assert np.array_equal(first.run(mel, z), second.run(mel, z))  # bit for bit


def test_cache_int8_entry_repacks_to_the_same_engine(tmp_path):
    if not int8_api():
        pytest.skip("this torch build has no oneDNN int8 GEMM")
    model = tiny_model(seed=7)
    mel, z = inputs(model, batch=1, frames=14)
    cache = fast_cache.EngineCache(tmp_path)
    built = cache.engine(model, "int8", threads=1)
    hit = cache.engine(model, "int8", threads=1)
    assert cache.events == ["built", "hit"] and built.precision == hit.precision
    tensors = list((cache.engine_dir(model, built.precision)).glob("flow00.safetensors"))
    assert tensors and tensors[0].read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # safetensors, not a pickle
    # written by the cache's own writer, read back by the safetensors library: the flow's tensors exactly
    stored, expected = load_safetensors(tensors[0]), fast_engine.flow_arrays(model, 0, built.precision)
    assert sorted(stored) == sorted(expected)
    assert all(stored[k].dtype == expected[k].dtype and torch.equal(stored[k], expected[k]) for k in expected)
    assert np.array_equal(built.run(mel, z), hit.run(mel, z))


def test_cache_full_disk_while_storing_builds_and_leaves_nothing(tmp_path, monkeypatch):
    """Flows are written on a writer thread while the next is built: a write failing there (disk full)
    must neither fail the load nor leave a half-written entry or its temporary folder."""
    model = tiny_model(seed=7)
    mel, z = inputs(model, batch=1, frames=14)
    honest_write = fast_cache._write_flow

    def full_disk(path, tensors):
        if path.name == "flow01.safetensors":
            path.write_bytes(b"\0" * 1000)  # part written, then the disk is full
            raise OSError(28, "No space left on device")
        return honest_write(path, tensors)

    monkeypatch.setattr(fast_cache, "_write_flow", full_disk)
    cache = fast_cache.EngineCache(tmp_path)
    engine = cache.engine(model, "fp32", threads=1)
    assert cache.events == ["built"]
    assert snr_db(model.infer(mel, 1.0, z), engine.run(mel, z)) > 100
    assert [p.name for p in (tmp_path / "fast").iterdir()] == []  # no entry, no temporary folder
    monkeypatch.undo()
    again = fast_cache.EngineCache(tmp_path)
    again.engine(model, "fp32", threads=1)
    assert again.events == ["built"] and len(list((tmp_path / "fast").glob("engine-*"))) == 1


def test_cache_key_follows_precision_fingerprint_and_machine(tmp_path, monkeypatch):
    model, other = tiny_model(seed=7), tiny_model(seed=8)
    cache = fast_cache.EngineCache(tmp_path)
    dirs = {cache.engine_dir(model, "fp32"), cache.engine_dir(model, "bf16"), cache.engine_dir(other, "fp32")}
    assert len(dirs) == 3
    monkeypatch.setattr(fast_cache, "cpu_signature", lambda: {"cpu": "another", "flags": [], "capability": "x"})
    assert fast_cache.EngineCache(tmp_path).engine_dir(model, "fp32") not in dirs
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert fast_cache.EngineCache(tmp_path).engine_dir(model, "fp32") not in dirs


def test_cache_stale_or_corrupt_entries_are_rebuilt(tmp_path):
    model = tiny_model(seed=7)
    mel, z = inputs(model, batch=1, frames=14)
    reference = cached_backend(model, tmp_path).run(mel, z)
    entry = next((tmp_path / "fast").glob("engine-*"))
    flow = entry / "flow01.safetensors"

    def reload(expected: str):
        backend = cached_backend(model, tmp_path)
        assert backend.cache_events[0].startswith(expected), backend.cache_events
        assert np.array_equal(backend.run(mel, z), reference)

    data = bytearray(flow.read_bytes())  # one flipped bit in a weight: the sha256 catches it
    data[-5] ^= 0x10
    flow.write_bytes(bytes(data))
    reload("rebuilt: unreadable")
    reload("hit")  # the rebuilt entry replaced the corrupt one
    flow.write_bytes(flow.read_bytes()[:100])  # truncated
    reload("rebuilt: unreadable")
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["torch"] = "0.0.1"  # written by another version under this key
    (entry / "meta.json").write_text(json.dumps(meta))
    reload("rebuilt: stale")
    (entry / "meta.json").write_text("{not json")
    reload("rebuilt: meta.json unreadable")
    (entry / "flow02.safetensors").unlink()
    meta = json.loads((entry / "meta.json").read_text())
    del meta["files"]["flow03.safetensors"]
    (entry / "meta.json").write_text(json.dumps(meta))
    reload("rebuilt: incomplete")
    reload("hit")
    assert not list((tmp_path / "fast").glob(".engine-*"))  # no temporary folders left behind


def rehash(entry, name: str, data: bytes) -> None:
    """Put `data` into the entry's file `name` and rewrite meta.json's sha256 to match: what anyone who can
    write to the cache can do (the MAC is what they cannot redo)."""
    (entry / name).write_bytes(data)
    meta = json.loads((entry / "meta.json").read_text())
    meta["files"][name] = hashlib.sha256(data).hexdigest()
    (entry / "meta.json").write_text(json.dumps(meta))


def test_cache_entry_rehashed_to_foreign_or_corrupt_files_is_rebuilt_not_used(tmp_path):
    model, other = tiny_model(seed=7), tiny_model(seed=8)
    mel, z = inputs(model, batch=1, frames=14)
    reference = cached_backend(model, tmp_path).run(mel, z)
    cached_backend(other, tmp_path)
    cache = fast_cache.EngineCache(tmp_path)
    entry, foreign = cache.engine_dir(model, "fp32"), cache.engine_dir(other, "fp32")

    def reload(expected: str):
        backend = cached_backend(model, tmp_path)
        assert backend.cache_events[0].startswith(expected), backend.cache_events
        assert np.array_equal(backend.run(mel, z), reference)  # this model's audio, never the planted one

    rehash(entry, "flow01.safetensors", (foreign / "flow01.safetensors").read_bytes())  # another model's flow
    with pytest.warns(RuntimeWarning, match="not proven"):
        reload("rebuilt: not proven")
    reload("hit")  # the rebuilt entry replaced it, and proves itself
    data = bytearray((entry / "flow03.safetensors").read_bytes())
    data[-7] ^= 0x40  # a corrupt weight, rehashed
    rehash(entry, "flow03.safetensors", bytes(data))
    with pytest.warns(RuntimeWarning, match="not proven"):
        reload("rebuilt: not proven")
    for name in ("flow00.safetensors", "flow01.safetensors"):  # every file of the other entry, rehashed
        rehash(entry, name, (foreign / name).read_bytes())
    meta = json.loads((entry / "meta.json").read_text())
    del meta["mac"]  # an entry without its proof
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(RuntimeWarning, match="not proven"):
        reload("rebuilt: not proven")


def test_cache_entry_or_verdict_written_with_another_secret_is_a_miss(tmp_path):
    model = tiny_model(seed=7)
    mel, z = inputs(model, batch=1, frames=14)
    first, second = tmp_path / "mine", tmp_path / "theirs"
    reference = cached_backend(model, first).run(mel, z)
    cached_backend(model, second)  # another cache: its own secret
    shutil.rmtree(second / "fast")
    shutil.copytree(first / "fast", second / "fast")  # the entry, as another cache (or user) wrote it
    with pytest.warns(RuntimeWarning, match="not proven"):
        backend = cached_backend(model, second)
    assert backend.cache_events[0].startswith("rebuilt: not proven") and np.array_equal(backend.run(mel, z), reference)
    assert cached_backend(model, second).cache_events == ["hit"]
    assert (first / "secret.key").read_bytes() != (second / "secret.key").read_bytes()
    (first / "secret.key").unlink()  # a new secret is made: every entry written with the old one is a miss
    with pytest.warns(RuntimeWarning, match="not proven"):
        assert cached_backend(model, first).cache_events[0].startswith("rebuilt: not proven")
    # auto's verdict too: one written with another secret chooses nothing
    get_backend("fast", model=model, precision="auto", threads=1, cache_dir=first)
    verdict = next((first / "fast").glob("probe-*.json"))
    shutil.copy(verdict, second / "fast" / verdict.name)
    with pytest.warns(RuntimeWarning, match="not proven"):
        again = get_backend("fast", model=model, precision="auto", threads=1, cache_dir=second)
    assert again.probe["cached"] is False


def test_cache_secret_is_made_private_and_refused_when_it_is_not(tmp_path, monkeypatch):
    model = tiny_model(seed=7)
    previous = os.umask(0)  # the secret is 0600 whatever the umask
    try:
        cached_backend(model, tmp_path)
    finally:
        os.umask(previous)
    secret = tmp_path / "secret.key"
    info = secret.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 32

    def refused(match: str):
        with pytest.raises(BackendError, match=match) as caught:
            cached_backend(model, tmp_path)
        assert "\n" not in str(caught.value) and str(secret) in str(caught.value)

    secret.chmod(0o640)
    refused("others may read or write it .mode 0640")
    secret.chmod(0o600)
    assert cached_backend(model, tmp_path).cache_events == ["hit"]
    # another owner: simulated (chown needs root), the check compares the file's uid with ours
    monkeypatch.setattr(os, "geteuid", lambda: info.st_uid + 1)
    refused("belongs to uid")
    monkeypatch.undo()
    known = tmp_path / "known"
    known.write_bytes(b"k" * 32)
    known.chmod(0o600)
    secret.rename(tmp_path / "kept")
    secret.symlink_to(known)  # a key whose bytes someone else knows, through a link
    refused("symbolic link")
    secret.unlink()
    os.link(known, secret)  # or through a hard link
    refused("hard links")
    secret.unlink()
    secret.mkdir()
    refused("not a regular file")
    secret.rmdir()
    secret.write_bytes(b"short")
    secret.chmod(0o600)
    refused("5 bytes, not 32")


def test_cache_off_and_unwritable_cache_still_build(tmp_path):
    model = tiny_model(seed=7)
    off = get_backend("fast", model=model, precision="fp32", threads=1, cache_dir="off")
    assert off.cache_events == [] and not (tmp_path / "fast").exists()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # the cache folder cannot be created: built without it
    backend = cached_backend(model, blocked / "cache")
    assert backend.cache_events == ["built"]
    mel, z = inputs(model, batch=1, frames=10)
    assert snr_db(model.infer(mel, 1.0, z), backend.run(mel, z)) > 100


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(fast_cache.CACHE_ENV, str(tmp_path / "c"))
    assert fast_cache.default_cache_dir() == tmp_path / "c" == fast_cache.resolve_cache_dir("")
    monkeypatch.delenv(fast_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fast_cache.default_cache_dir() == tmp_path / "xdg" / "waveglow-workflow"
    assert fast_cache.resolve_cache_dir("off") is None and fast_cache.resolve_cache_dir(tmp_path) == tmp_path


def test_auto_verdict_is_cached_and_a_corrupt_verdict_reprobes(tmp_path, monkeypatch):
    model = tiny_model(seed=6)
    first = get_backend("fast", model=model, precision="auto", threads=1, cache_dir=tmp_path)
    assert first.probe["cached"] is False
    probed = []
    honest = fast_auto.probe_quality
    monkeypatch.setattr(fast_auto, "probe_quality", lambda *a: probed.append(1) or honest(*a))
    second = get_backend("fast", model=model, precision="auto", threads=1, cache_dir=tmp_path)
    assert second.probe["cached"] is True and not probed and "verdict cached" in second.description
    assert second.precision == first.precision and second.probe["reason"] == first.probe["reason"]
    verdict = next((tmp_path / "fast").glob("probe-*.json"))
    verdict.write_text('{"key": {}, "record": {"precision": "int8"}}')  # not this model's key: not trusted
    third = get_backend("fast", model=model, precision="auto", threads=1, cache_dir=tmp_path)
    assert third.probe["cached"] is False and probed and third.precision == first.precision
    verdict.write_text("garbage")
    assert get_backend("fast", model=model, precision="auto", threads=1, cache_dir=tmp_path).probe["cached"] is False


# --- threads per run --------------------------------------------------------------------------------------
def test_thread_choice_is_the_free_cores_within_the_cap():
    choose = fast_engine.choose_threads
    assert choose(2, 0.0) == 2  # idle: every core
    assert choose(2, 1.0) == 1  # one core taken by another process: one thread, no shared barrier
    assert choose(2, 0.3) == 2 and choose(2, 0.6) == 1
    assert choose(2, 5.0) == 1  # heavily shared: never below one
    assert choose(8, 2.0) == 6 and choose(8, 2.0, limit=4) == 4
    assert choose(4, 0.0, limit=16) == 4  # never more than the usable cores
    assert choose(2, -1.0) == 2


def test_engine_threads_per_run_follow_the_meter(monkeypatch):
    model = tiny_model(seed=3)
    mel, z = inputs(model, batch=3, frames=9)
    engine = FastEngine(model, "fp32", threads=2)
    reference = FastEngine(model, "fp32", threads=1).run(mel, z)
    monkeypatch.setattr(fast_engine, "usable_cpus", lambda: 2)
    for busy, expected in ((0.0, 2), (1.0, 1)):
        monkeypatch.setattr(engine._meter, "others_busy", lambda busy=busy: busy)
        assert np.array_equal(engine.run(mel, z), reference) and engine.last_threads == expected
    fixed = FastEngine(model, "fp32", threads=2, adaptive=False)
    monkeypatch.setattr(fixed._meter, "others_busy", lambda: pytest.fail("measured with adaptive=False"))
    outer = torch.get_num_threads()
    torch.set_num_threads(3)  # the caller's setting, which no run may leave changed
    try:
        fixed.run(mel, z)
        assert fixed.last_threads == 2 and torch.get_num_threads() == 3
        monkeypatch.setattr(fixed, "_run_packed", lambda prepared: 1 / 0)  # a run that fails half way
        with pytest.raises(ZeroDivisionError):
            fixed.run(mel, z)
        assert torch.get_num_threads() == 3  # restored by the `finally`, exception or not
    finally:
        torch.set_num_threads(outer)


def test_cpu_jiffies_and_meter():
    stat = ("cpu  10 0 10 100 0 0 0 0 0 0\n"
            "cpu0 4 1 5 50 2 0 0 3 0 0\n"
            "cpu1 6 0 5 50 0 0 0 0 0 0\n"
            "intr 1 2 3\n")
    assert cpu_jiffies(stat) == (13 + 11, 65 + 61)  # steal (3) is busy, iowait (2) is not
    assert cpu_jiffies(stat, {1}) == (11, 61)
    assert cpu_jiffies(stat, {0}, count_nice=False) == (12, 65)  # a niced job's tick left out
    value = CpuMeter(window=0.01).others_busy()
    assert 0.0 <= value <= usable_cpus()


def test_meter_measures_since_its_previous_call_when_that_was_recent(monkeypatch):
    """Back to back, the meter measures over the time since its previous call (the run just done) and
    sleeps no window; after more than `max_age`, or on the first call, it sleeps one fresh window."""
    import waveglow_lib.hardware as hardware

    tick = os.sysconf("SC_CLK_TCK")
    # (busy ticks of all processes, this process's CPU seconds, monotonic seconds, usable cores)
    samples = iter([(0, 0.0, 100.0, 2), (tick // 20, 0.0, 100.05, 2),  # first call: others 1 core in the window
                    (tick // 20 + 5 * tick, 4.0, 104.05, 2),            # 4 s later: we used 4 of the 5 busy core-s
                    (6 * tick, 5.0, 124.05, 2), (6 * tick, 5.0, 124.10, 2)])  # 20 s later: stale, idle window
    monkeypatch.setattr(hardware.CpuMeter, "_sample", staticmethod(lambda: next(samples)))
    slept = []
    monkeypatch.setattr(hardware.time, "sleep", slept.append)
    meter = hardware.CpuMeter(window=0.05, reuse=0.0, max_age=10.0)
    assert meter.others_busy() == pytest.approx(1.0) and slept == [0.05]
    assert meter.others_busy() == pytest.approx(0.25) and slept == [0.05]  # (5 − 4) core-s over 4 s, no sleep
    assert meter.others_busy() == pytest.approx(0.0) and slept == [0.05, 0.05]


def test_batches_run_unpadded_and_equal_each_utterance_alone(monkeypatch):
    """vocode hands the fast backend the utterances at their own lengths: nothing padded is computed, and
    the batch's audio equals each utterance run alone (batch 1) within the documented bound (bit for bit
    where the GEMM library keeps each row's summation order, not on MKL's AVX2 path)."""
    from waveglow_lib.batching import vocode

    model = tiny_model(seed=9)
    backend = get_backend("fast", model=model, precision="fp32", threads=2, cache_dir="off")
    generator = torch.Generator().manual_seed(2)
    lengths = (17, 5, 11)
    mels = [(torch.randn(80, n, generator=generator) - 5).numpy() for n in lengths]
    noises = [torch.randn(8, n * 32, generator=generator).numpy() for n in lengths]
    monkeypatch.setattr(backend, "_run", lambda *a: pytest.fail("a padded batch was run"))
    for busy in (0.0, 1.0):  # several utterances on 2 threads, and all on one
        monkeypatch.setattr(backend.engine._meter, "others_busy", lambda busy=busy: busy)
        audio, stats = vocode(backend, mels, noises, 0.6, model.config)
        assert [a.shape[0] for a in audio] == [n * 256 for n in lengths] and stats["tail_frames"] == 0
        for mel, noise, out in zip(mels, noises, audio):
            alone = backend.engine.run(mel[None], 0.6 * noise[None])[0]
            assert snr_db(alone, out) >= fast_engine.PACKED_MIN_SNR_DB["fp32"]
            assert snr_db(model.infer(torch.from_numpy(mel)[None], 1.0, torch.from_numpy(0.6 * noise)[None])[0], out) > 100
    with pytest.raises(Exception, match="z must be"):
        backend.run_utterances(mels, [n[:, :-1] for n in noises])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_packed_utterances_equal_each_run_alone(precision):
    """A batch runs end to end in sequences of up to `pack_frames` frames, zero frames between utterances:
    whichever way they are packed, no tap reaches a neighbour, and each one's audio is the same as alone
    within the precision's documented bound (a tap reaching a neighbour would cost far more than that)."""
    bound = fast_engine.PACKED_MIN_SNR_DB[precision]
    model = tiny_model(seed=5)
    engine = FastEngine(model, precision, threads=2, adaptive=False)
    generator = torch.Generator().manual_seed(3)
    lengths = (13, 30, 4, 9)
    mels = [(torch.randn(80, n, generator=generator) - 5).numpy() for n in lengths]
    noises = [0.6 * torch.randn(8, n * 32, generator=generator).numpy() for n in lengths]
    alone = [engine.run(m[None], z[None])[0] for m, z in zip(mels, noises)]
    assert engine.gap_frames * engine.steps >= engine.pad  # the gap covers the WN's reach
    for pack_frames in (1024, 30, 1):  # all in one sequence; [30] [13, 9, 4]; each alone
        engine.pack_frames = pack_frames
        packed = engine.run_utterances(mels, noises)
        assert [a.shape[0] for a in packed] == [n * 256 for n in lengths]
        for together, single in zip(packed, alone):
            assert snr_db(single, together) >= bound


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "auto"])
def test_chunked_streamed_and_batched_equal_one_shot_on_every_precision(precision):
    """Issue 36: a chunk of a stream is a sequence of its own, so any scale taken from the sequence (int8's
    were, 38 dB) makes chunked synthesis differ from one-shot. On every precision, `auto` included, on the
    tests' model and on the demo model (48 channels: `auto` tries int8 there), the audio in chunks (a whole
    mel, and frames arriving one piece at a time) and in a batch of two equals one-shot synthesis."""
    from waveglow_lib.batching import utterance_noise, vocode_chunked, vocode_stream
    from waveglow_lib.checkpoint import load_waveglow
    for model in (tiny_model(seed=6), load_waveglow(None)):
        config = model.config
        backend = get_backend("fast", model=model, precision=precision, threads=2, cache_dir="off")
        generator = torch.Generator().manual_seed(4)
        mels = [(torch.randn(80, n, generator=generator) - 5).numpy() for n in (150, 70)]
        noises = [utterance_noise(config, mel.shape[1], 1234, f"u{i}") for i, mel in enumerate(mels)]
        whole = [backend.run(mel[None], 0.6 * noise[None])[0] for mel, noise in zip(mels, noises)]
        chunked = vocode_chunked(backend, mels[0], noises[0], 0.6, config, 64)
        pieces = (mels[0][:, f:f + 7] for f in range(0, mels[0].shape[1], 7))  # a TTS producing frames
        streamed = np.concatenate(list(vocode_stream(pieces, backend, config, sigma=0.6, noise=noises[0],
                                                     chunk_frames=40)))
        batched = backend.run_utterances(mels, [0.6 * noise for noise in noises])
        where = f"{backend.precision} ({precision}), {config.n_channels} channels"
        assert snr_db(whole[0], chunked) >= 100, where
        assert snr_db(whole[0], streamed) >= 100, where
        packed_bound = fast_engine.PACKED_MIN_SNR_DB[backend.precision]  # bf16 without AMX: 90 (see there)
        assert all(snr_db(w, b) >= packed_bound for w, b in zip(whole, batched)), where


def test_int8_scales_are_calibrated_once_and_saturate_beyond_their_range():
    """int8 quantises with ranges calibrated on the probe (`FastEngine.calibrate`, every one holding 0,
    widened past what the probe showed): an engine given those ranges runs bit for bit as the calibrated
    one; ranges that do not fit the model are refused; a value beyond a range saturates, not wraps."""
    if not native_int8():
        pytest.skip("no native int8 on this CPU")
    model = tiny_model(seed=2)
    engine = FastEngine(model, "int8", threads=1)
    ranges = engine.activations
    assert len(ranges["x"]) == model.config.n_flows and all(len(f) == model.config.n_layers for f in ranges["x"])
    assert all(lo < 0.0 < hi for lo, hi in [ranges["mel"], *(r for f in ranges["x"] for r in f)])
    mel, z = inputs(model, batch=1, frames=20)
    flows = [fast_engine.flow_arrays(model, k, "int8") for k in range(model.config.n_flows)]
    again = FastEngine(model, "int8", threads=1, flows=flows, activations=json.loads(json.dumps(ranges)))
    assert again.activations == ranges and np.array_equal(engine.run(mel, z), again.run(mel, z))
    with pytest.raises(ValueError, match="do not fit"):
        again.set_activations({"mel": ranges["mel"], "x": ranges["x"][:-1]})
    scale, zero_point = fast_engine.u8_params(-1.0, 1.0)
    q = fast_engine.quantize_u8(torch.tensor([[-5.0, 0.0, 5.0]]), scale, zero_point)
    assert q.data.tolist() == [[0, zero_point, 255]]


def test_importing_the_package_leaves_openmps_wait_policy_alone():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads. The package does not force one (PASSIVE cost a
    quarter of the idle batch-1 speed; on a shared machine the engine runs one thread per free core), and a
    policy the user sets reaches OpenMP untouched."""
    import os
    import subprocess
    import sys

    code = "import waveglow_lib, torch, os; print(os.environ.get('OMP_WAIT_POLICY', '<unset>'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "<unset>"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"


def test_a_cached_flow_is_proven_as_loaded_and_owns_its_memory(tmp_path):
    """A flow file is loaded by the safetensors library (which maps the file) and its sha256 computed over
    the tensors copied out: they pass when the file is the one written, are refused when its bytes differ,
    and do not change (or crash) when the file is rewritten or truncated after the load."""
    from pathlib import Path

    path = Path(tmp_path) / "flow00.safetensors"
    tensors = {"b.weight": torch.randn(300, 7).bfloat16(), "a.q": torch.randint(-128, 127, (64,), dtype=torch.int8),
               "c": torch.randn(5, 5)}
    sha = fast_cache._write_flow(path, tensors)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()  # the digest is the file's own
    loaded = fast_cache._read_flow(path, sha, fast_engine.LoadTimes())
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="sha256 differs"):
        fast_cache._read_flow(path, "0" * 64, fast_engine.LoadTimes())
    kept = loaded["c"].clone()
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes inf, in place
    with open(path, "r+b") as handle:
        handle.write(data)
    assert torch.equal(loaded["c"], kept)
    with pytest.raises(ValueError, match="sha256 differs"):
        fast_cache._read_flow(path, sha, fast_engine.LoadTimes())
    os.truncate(path, 16)
    assert torch.equal(loaded["c"], kept)


@pytest.mark.parametrize("n_flows, workers", [(1, 2), (2, 2), (5, 2), (3, 1)])
def test_cached_flows_come_back_in_order_on_any_number_of_readers(tmp_path, n_flows, workers):
    """A cache hit reads flows on `workers` threads, ahead of the one being built: every flow comes back
    once, in order, also when the model has fewer flows than there are readers."""
    from pathlib import Path

    folder, files = Path(tmp_path), {}
    for k in range(n_flows):
        name = f"flow{k:02d}.safetensors"
        files[name] = fast_cache._write_flow(folder / name, {"x": torch.full((3,), float(k))})
    flows = list(fast_cache.EngineCache(folder)._read_flows(folder, files, fast_engine.LoadTimes(), workers))
    assert [int(t["x"][0]) for t in flows] == list(range(n_flows))
