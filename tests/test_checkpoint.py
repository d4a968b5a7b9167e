"""Checkpoint formats, the allow-listed unpickler, and clear errors for bad files."""
import os
import pickle
import sys
import zipfile

import pytest
import torch

from waveglow_lib.checkpoint import CheckpointError, load_waveglow, read_stft_config, save_waveglow
from waveglow_lib.config import ModelConfig

from support import TINY, make_reference, snr_db


def _audio(model, frames=7):
    mel = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(0)) - 4
    z = torch.randn(model.noise_shape(1, frames), generator=torch.Generator().manual_seed(1))
    return model.infer(mel, 0.6, z=z)


@pytest.fixture
def nvidia_pt(tmp_path):
    path = tmp_path / "waveglow_tiny.pt"
    reference = make_reference("glow", seed=9, save_to=path)
    return path, reference


def test_loads_without_glow_module(nvidia_pt):
    path, _ = nvidia_pt
    assert "glow" not in sys.modules
    model = load_waveglow(path)
    assert "glow" not in sys.modules
    assert model.config == ModelConfig(**TINY)
    assert not model.training


@pytest.mark.parametrize("layout", ["glow", "glow_old"])
def test_legacy_torch_format_loads(tmp_path, layout):
    path = tmp_path / "legacy.pt"
    make_reference(layout, seed=2, save_to=path, legacy_format=True)
    assert not zipfile.is_zipfile(path)
    model = load_waveglow(path)
    assert model.config.layout == layout


def test_all_formats_give_identical_audio(nvidia_pt, tmp_path):
    path, reference = nvidia_pt
    official = load_waveglow(path)
    expected = _audio(official)

    # DeepLearningExamples style: weight-normed state dict under DataParallel's "module." prefix + config
    cfg = dict(TINY)
    wn_config = {k: cfg.pop(k) for k in ("n_layers", "n_channels", "kernel_size")}
    dle = tmp_path / "dle.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
                "config": {**cfg, "WN_config": wn_config, "sigma": 1.0}}, dle)
    bare = tmp_path / "bare.pth"
    torch.save(reference.state_dict(), bare)
    ours = save_waveglow(official, tmp_path / "ours.safetensors")
    ours_gz = save_waveglow(official, tmp_path / "ours.safetensors.gz")

    for other in (dle, bare, ours, ours_gz):
        audio = _audio(load_waveglow(other))
        assert torch.equal(audio, expected), other.name


def test_fp16_storage_round_trips_within_fp16(nvidia_pt, tmp_path):
    path, _ = nvidia_pt
    model = load_waveglow(path)
    half = load_waveglow(save_waveglow(model, tmp_path / "half.safetensors", dtype=torch.float16))
    assert half.upsample.weight.dtype == torch.float32
    assert snr_db(_audio(model), _audio(half)) > 30


def test_stft_config_travels_with_our_format(nvidia_pt, tmp_path):
    from waveglow_lib.config import STFTConfig

    model = load_waveglow(nvidia_pt[0])
    path = save_waveglow(model, tmp_path / "m.safetensors", stft=STFTConfig(mel_fmax=7600.0))
    assert read_stft_config(path).mel_fmax == 7600.0
    assert read_stft_config(nvidia_pt[0]) == STFTConfig()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"refused .*(posix|os)\.system"):
        load_waveglow(path)
    assert not (tmp_path / "pwned_marker").exists()

    raw = tmp_path / "evil_raw.pt"  # a plain (non-torch) pickle stream
    raw.write_bytes(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        load_waveglow(raw)
    assert not (tmp_path / "pwned_marker").exists()


def test_truncated_file(nvidia_pt, tmp_path):
    data = nvidia_pt[0].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_waveglow(cut)
    ours = save_waveglow(load_waveglow(nvidia_pt[0]), tmp_path / "ours.safetensors")
    ours.write_bytes(ours.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_waveglow(ours)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"RIFF....WAVEfmt not a model", "not a WaveGlow checkpoint"),
])
def test_foreign_files(tmp_path, content, message):
    path = tmp_path / "foreign.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_waveglow(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_waveglow(tmp_path / "nope.pt")


def test_wrong_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="does not look like WaveGlow"):
        load_waveglow(path)
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "net": "x"}, other)
    with pytest.raises(CheckpointError, match="not a WaveGlow checkpoint"):
        load_waveglow(other)


def test_config_inconsistent_with_weights(nvidia_pt):
    with pytest.raises(CheckpointError, match="n_mel_channels=40.*needs"):
        load_waveglow(nvidia_pt[0], config={"n_mel_channels": 40})
    with pytest.raises(CheckpointError, match="n_channels=32"):
        load_waveglow(nvidia_pt[0], config=ModelConfig(**{**TINY, "n_channels": 32}))
    with pytest.raises(CheckpointError, match="unknown WaveGlow config keys: bogus"):
        load_waveglow(nvidia_pt[0], config={"bogus": 1})


def test_demo_model_loads():
    from waveglow_lib.assets.train_demo_model import DEMO_TRAIN_CONFIG

    model = load_waveglow()
    assert model.config == DEMO_TRAIN_CONFIG.model_config()
    # every learned layer does work (NVIDIA initialises WN.end to zero: training moved it); the upsampler
    # is the fixed per-band interpolation (no bias, nothing across bands)
    for name, param in model.named_parameters():
        if not name.startswith("upsample."):
            assert param.abs().max() > 0, name
    weight = model.upsample.weight
    assert model.upsample.bias.abs().max() == 0 and weight.diagonal(dim1=0, dim2=1).abs().max() > 0
    across = weight.detach().clone()
    across.diagonal(dim1=0, dim2=1).zero_()
    assert across.abs().max() == 0
    audio = _audio(model, frames=20)
    assert torch.isfinite(audio).all() and 0.001 < audio.std() < 0.9


def test_the_demo_models_card_is_the_bundled_models_and_the_default_runs():
    """The report shows the card next to the default run's scores: both must be of this file and these settings."""
    import json
    from pathlib import Path

    from waveglow_lib.config import DEMO_MODEL_CARD, DEMO_MODEL_PATH, WorkflowConfig

    card = json.loads(DEMO_MODEL_CARD.read_text())
    demo = WorkflowConfig.from_yaml(Path(__file__).parents[1] / "params" / "demo.yaml")
    assert card["bytes"] == DEMO_MODEL_PATH.stat().st_size
    assert (card["eval"]["sigma"], card["eval"]["seed"]) == (demo.sigma, demo.seed)


@pytest.mark.e2e
def test_demo_model_is_trained():
    from waveglow_lib.assets.train_demo_model import vocode_corpus

    pytest.importorskip("pystoi")
    pytest.importorskip("pesq")
    model = load_waveglow()
    # trained, not just loadable: the demo utterances come back intelligible to a degree an untrained
    # model of this shape does not reach (its mean STOI: 0.37; README: the learning curve)
    scores = vocode_corpus(model)
    assert sum(s["stoi"] for s in scores.values()) / len(scores) > 0.5


def test_pickles_from_old_torch_with_thnn_backend_load(tmp_path, monkeypatch):
    """torch < 1.4 pickled every module's `_backend` as a call of torch.nn.backends.thnn._get_thnn_function_backend."""
    import types

    thnn = types.ModuleType("torch.nn.backends.thnn")

    def _get_thnn_function_backend():
        return None

    _get_thnn_function_backend.__module__ = thnn.__name__
    _get_thnn_function_backend.__qualname__ = "_get_thnn_function_backend"
    thnn._get_thnn_function_backend = _get_thnn_function_backend

    class Backend:
        def __reduce__(self):
            return (_get_thnn_function_backend, ())

    def add_backend(model):
        for module in model.modules():
            module.__dict__["_backend"] = Backend()

    path = tmp_path / "old_torch.pt"
    monkeypatch.setitem(sys.modules, thnn.__name__, thnn)
    reference = make_reference("glow", seed=12, save_to=path, legacy_format=True, before_save=add_backend)
    monkeypatch.delitem(sys.modules, thnn.__name__)
    model = load_waveglow(path)
    mel = torch.randn(1, 80, 5) - 4
    z = torch.randn(model.noise_shape(1, 5))
    with torch.no_grad():
        expected = reference.infer(mel, 1.0, noise=z)
    assert snr_db(expected, model.infer(mel, 1.0, z=z)) > 80
