"""WaveGlow parity with the reference algorithm (tests/reference), round trip, precision casts."""
import pytest
import torch

from waveglow_lib.checkpoint import load_waveglow
from waveglow_lib.model import WaveGlow

from support import TINY, make_reference, snr_db, tiny_waveglow


def _mel(batch=2, frames=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 80, frames, generator=g) * 2 - 5


@pytest.mark.parametrize("layout", ["glow", "glow_old"])
def test_infer_matches_reference(tmp_path, layout):
    path = tmp_path / "ref.pt"
    reference = make_reference(layout, seed=3, save_to=path)
    model = load_waveglow(path)
    assert model.config.layout == layout
    mel = _mel()
    z = torch.randn(model.noise_shape(2, 12), generator=torch.Generator().manual_seed(7))
    for sigma in (1.0, 0.6):
        with torch.no_grad():
            expected = reference.infer(mel, sigma=sigma, noise=z)
        got = model.infer(mel, sigma=sigma, z=z)
        assert got.shape == (2, 12 * 256)
        assert snr_db(expected, got) > 80, snr_db(expected, got)


def test_noise_from_audio_matches_reference_forward(tmp_path):
    path = tmp_path / "ref.pt"
    reference = make_reference("glow", seed=4, save_to=path)
    model = load_waveglow(path)
    mel = _mel(frames=10)
    audio = torch.randn(2, 10 * 256, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        nvidia_order = reference((mel, audio))  # [early k=2, early k=4, final]
    z = model.noise_from_audio(mel, audio)
    c = model.config
    n_rem, e = model.n_remaining_channels, c.n_early_size
    early = [nvidia_order[:, i * e:(i + 1) * e] for i in range(c.n_early_outputs)]
    expected = torch.cat([nvidia_order[:, c.n_early_outputs * e:]] + early[::-1], 1)
    assert expected.shape[1] == c.n_group and nvidia_order[:, c.n_early_outputs * e:].shape[1] == n_rem
    assert snr_db(expected, z) > 80


@pytest.mark.parametrize("layout", ["glow", "glow_old"])
def test_round_trip(tiny_config, layout):
    model = tiny_waveglow(TINY, seed=5, layout=layout)
    mel = _mel(frames=9)
    audio = torch.randn(2, 9 * 256 - 100, generator=torch.Generator().manual_seed(3)) * 0.3
    z = model.noise_from_audio(mel, audio)
    back = model.infer(mel, sigma=1.0, z=z)
    assert back.shape == (2, 9 * 256)
    assert snr_db(audio, back[:, : audio.shape[1]]) >= 60
    assert back[:, audio.shape[1]:].abs().max() < 1e-3  # the zero padding comes back too


def test_sigma_scales_all_noise_including_early(tiny_config):
    """sigma=0 must silence the early noise too (NVIDIA's guide patch forgot to scale it)."""
    model = WaveGlow(tiny_config).eval()
    mel = _mel(batch=1, frames=6)
    z = torch.randn(model.noise_shape(1, 6))
    z_early_only = z.clone()
    z_early_only[:, : model.n_remaining_channels] = 0
    zero = model.infer(mel, sigma=0.0, z=torch.zeros_like(z))
    assert torch.allclose(model.infer(mel, sigma=0.0, z=z_early_only), zero)
    assert not torch.allclose(model.infer(mel, sigma=0.5, z=z_early_only), zero)


def test_generator_makes_noise_reproducible(tiny_config):
    model = WaveGlow(tiny_config).eval()
    mel = _mel(batch=1, frames=5)
    a = model.infer(mel, 0.6, generator=torch.Generator().manual_seed(11))
    b = model.infer(mel, 0.6, generator=torch.Generator().manual_seed(11))
    c = model.infer(mel, 0.6, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_cast_runs_and_inverse_precomputed(tmp_path):
    path = tmp_path / "ref.pt"
    make_reference("glow", seed=6, save_to=path)
    model = load_waveglow(path)
    w = model.convinv[0].conv.weight.detach().squeeze(-1).double()
    eye = w @ model.convinv[0].W_inverse.squeeze(-1).double()
    assert torch.allclose(eye, torch.eye(w.shape[0], dtype=torch.float64), atol=1e-6)
    mel = _mel(batch=1, frames=8)
    z = torch.randn(model.noise_shape(1, 8))
    fp32 = model.infer(mel, 0.6, z=z)
    bf16 = model.to(torch.bfloat16).infer(mel.bfloat16(), 0.6, z=z).float()
    assert bf16.shape == fp32.shape and torch.isfinite(bf16).all()
    assert snr_db(fp32, bf16) > 15


@pytest.mark.parametrize("bad, message", [
    (torch.randn(1, 40, 5), "80"),
    (torch.randn(80, 5), "shape"),
    (torch.full((1, 80, 5), float("nan")), "NaN"),
])
def test_bad_mel_is_a_clear_error(tiny_config, bad, message):
    model = WaveGlow(tiny_config).eval()
    with pytest.raises(ValueError, match=message):
        model.infer(bad)


def test_wrong_noise_shape_is_rejected(tiny_config):
    model = WaveGlow(tiny_config).eval()
    with pytest.raises(ValueError, match="expected"):
        model.infer(_mel(batch=1, frames=4), z=torch.randn(1, 8, 10))
