"""Mels from elsewhere: reading .npy/.pt/.bin, layouts, the safe loader, and the format check.

The wrong formats are made from the demo corpus's real mels (preprocess's own output) with the formulas
librosa uses (power_to_db, amplitude_to_db), written in numpy; `test_numpy_formulas_match_librosa` checks
that equivalence where librosa is installed.
"""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch

from waveglow_lib import mel_input
from waveglow_lib.audio import load_wav, mel_spectrogram
from waveglow_lib.config import DEMO_CORPUS_DIR
from waveglow_lib.errors import CheckpointError, MelError
from waveglow_lib.io import read_bin
from waveglow_lib.mel_input import check_mel_format, convert_mel, list_mels, read_mel, save_mel
from waveglow_lib.layout import load_manifest
from waveglow_lib.stages.preprocess import preprocess

LN_FLOOR = math.log(1e-5)


@pytest.fixture(scope="module")
def demo_mels(tmp_path_factory, make_cfg) -> dict:
    """{id: (mel, .bin path)} for every demo-corpus utterance, as the preprocess stage writes them."""
    cfg = make_cfg(tmp_path_factory.mktemp("runs"), limit=0)
    preprocess(cfg)
    mel_dir = cfg.run_dir / "mel"
    items = load_manifest(mel_dir)["items"]
    assert len(items) == 10
    return {item["id"]: (read_bin(mel_dir / item["bin"], tuple(item["shape"])), mel_dir / item["bin"])
            for item in items}


# --- the wrong formats, librosa's formulas in numpy ----------------------------------------------

def power_to_db(power, ref=1.0, amin=1e-10, top_db=80.0):
    db = 10.0 * np.log10(np.maximum(amin, power)) - 10.0 * np.log10(np.maximum(amin, ref))
    return np.maximum(db, db.max() - top_db) if top_db is not None else db


def amplitude_to_db(magnitude, ref=1.0, amin=1e-5, top_db=80.0):
    return power_to_db(np.square(magnitude), ref=ref ** 2, amin=amin ** 2, top_db=top_db)


def minmax(mel, low, high):
    return low + (high - low) * (mel - mel.min()) / (mel.max() - mel.min())


WRONG_FORMATS = {  # name: (ln mel -> wrong format, expected label, conversion offered)
    "log10": (lambda m: m / math.log(10), mel_input.LOG10, "log10"),
    "log10_eps_1e-10": (lambda m: np.log10(np.maximum(1e-10, np.exp(m))), mel_input.LOG10, "log10"),
    "amplitude_to_db": (lambda m: amplitude_to_db(np.exp(m)), mel_input.DB, "db_amplitude"),
    "power_to_db": (lambda m: power_to_db(np.exp(2 * m)), mel_input.DB, "db_amplitude"),
    "power_to_db_no_top_db": (lambda m: power_to_db(np.exp(2 * m), top_db=None), mel_input.DB, "db_amplitude"),
    "power_to_db_ref_max": (lambda m: power_to_db(np.exp(2 * m), ref=np.exp(2 * m).max()), mel_input.DB, None),
    "amplitude_to_db_ref_max": (lambda m: amplitude_to_db(np.exp(m), ref=np.exp(m).max()), mel_input.DB, None),
    "minmax_0_1": (lambda m: minmax(m, 0.0, 1.0), mel_input.MINMAX_01, None),
    "minmax_-1_1": (lambda m: minmax(m, -1.0, 1.0), mel_input.MINMAX_11, None),
    "dataset_minmax_-1_1": (lambda m: 2 * np.clip((m - LN_FLOOR) / (4 - LN_FLOOR), 0, 1) - 1,
                            mel_input.MINMAX_11, None),
    "standardised": (lambda m: (m - m.mean()) / m.std(), mel_input.NORMALISED, None),
    "symmetric_-4_4": (lambda m: np.clip(8 * (amplitude_to_db(np.exp(m), top_db=None) - 20 + 100) / 100 - 4, -4, 4),
                       mel_input.NORMALISED, None),
    "linear_magnitude": (lambda m: np.exp(m), mel_input.LINEAR_MAGNITUDE, "magnitude"),
    "linear_power": (lambda m: np.exp(2 * m), mel_input.LINEAR_POWER, "power"),
    "int16_scale_audio": (lambda m: m + math.log(32768), mel_input.UNSCALED_AUDIO, None),
    "ln_power": (lambda m: 2 * m, mel_input.LN_POWER, None),
}


def test_every_demo_mel_from_preprocess_passes(demo_mels):
    for utt_id, (mel, bin_path) in demo_mels.items():
        verdict = check_mel_format(mel, bin_path)
        assert verdict.ok and verdict.looks_like == mel_input.NATURAL_LOG, verdict.message(bin_path)
        assert verdict.conversion is None
        assert np.array_equal(read_mel(bin_path), mel)


def test_realistic_right_mels_pass(demo_mels):
    """Quieter audio, TTS-like jitter (unclamped, dipping below the floor), silence, very short excerpts."""
    rng = np.random.default_rng(0)
    for mel, _ in demo_mels.values():
        middle = mel.shape[1] // 2
        variants = {
            "quiet (-26 dB)": np.maximum(mel - 3.0, LN_FLOOR),
            "jittered like a TTS output": mel + rng.normal(0.0, 0.3, mel.shape),
            "smoothed, no exact floor": np.maximum(mel, -11.0) + rng.normal(0.0, 0.15, mel.shape) - 0.2,
            "silence": np.full((80, 20), LN_FLOOR, dtype=np.float32),
            "3 frames": mel[:, middle: middle + 3],
            "1 frame": mel[:, middle: middle + 1],
        }
        for name, variant in variants.items():
            verdict = check_mel_format(variant.astype(np.float32), name)
            assert verdict.ok, verdict.message(name)


@pytest.mark.parametrize("name", sorted(WRONG_FORMATS))
def test_each_wrong_format_of_each_demo_mel_is_rejected_with_its_label(demo_mels, name):
    transform, label, conversion = WRONG_FORMATS[name]
    for utt_id, (mel, _) in demo_mels.items():
        wrong = transform(mel.astype(np.float64)).astype(np.float32)
        verdict = check_mel_format(wrong, utt_id)
        assert not verdict.ok and verdict.looks_like == label, f"{utt_id} {name}: {verdict.message(utt_id)}"
        assert verdict.conversion == conversion


@pytest.mark.parametrize("name", ["log10", "power_to_db", "minmax_0_1", "linear_power", "standardised"])
def test_reading_a_wrong_format_names_the_file_and_the_format(demo_mels, tmp_path, name):
    transform, label, conversion = WRONG_FORMATS[name]
    mel = demo_mels["LJ001-0002"][0]
    path = save_mel(tmp_path / "tts_LJ001-0002.npy", transform(mel.astype(np.float64)))
    with pytest.raises(MelError, match=r"tts_LJ001-0002\.npy") as caught:
        read_mel(path)
    assert label in str(caught.value) and caught.value.path == path
    if conversion:
        assert f"convert='{conversion}'" in str(caught.value)
    assert read_mel(path, check=False).shape == mel.shape  # the check is what refuses it


@pytest.mark.parametrize("snr_db", [40, 20])
def test_noisy_recordings_pass_and_their_log10_does_not(demo_mels, snr_db):
    """Speech over white noise: no pauses reach the floor, so the range shrinks towards log10's."""
    rng = np.random.default_rng(snr_db)
    for utt_id, (_, bin_path) in demo_mels.items():
        audio, _ = load_wav(DEMO_CORPUS_DIR / "wavs" / f"{utt_id}.wav")
        noise = rng.standard_normal(audio.size) * np.sqrt(np.mean(audio ** 2)) * 10 ** (-snr_db / 20)
        mel = mel_spectrogram(np.clip(audio + noise, -1, 1).astype(np.float32))
        for frames in (16, 48, mel.shape[1]):  # excerpts from the middle, and the whole utterance
            start = (mel.shape[1] - frames) // 2
            excerpt = mel[:, start: start + frames]
            verdict = check_mel_format(excerpt, utt_id)
            assert verdict.ok, f"{frames} frames: {verdict.message()}"
            assert check_mel_format(excerpt / math.log(10)).looks_like == mel_input.LOG10, f"{utt_id} {frames}"


def test_a_quiet_log10_mel_is_still_log10(demo_mels):
    """-26 dB audio: its log10 mel spans [-5, -1] — a range a natural-log mel could have, but not its floor."""
    for mel, _ in demo_mels.values():
        quiet = np.maximum(mel - 3.0, LN_FLOOR)
        assert check_mel_format(quiet / math.log(10)).looks_like == mel_input.LOG10


def test_shape_problems_are_named(demo_mels):
    mel = demo_mels["LJ001-0001"][0]
    assert check_mel_format(mel.T).looks_like == mel_input.TRANSPOSED
    assert check_mel_format(np.zeros((128, 40)) - 5).looks_like == mel_input.WRONG_BANDS
    assert check_mel_format(mel[None]).looks_like == mel_input.WRONG_SHAPE
    bad = mel.copy()
    bad[3, 7] = np.nan
    assert check_mel_format(bad).looks_like == mel_input.NON_FINITE


# --- files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".npy", ".pt", ".bin"])
def test_round_trips_equal_preprocess_exactly(demo_mels, tmp_path, suffix):
    for utt_id, (mel, _) in demo_mels.items():
        path = save_mel(tmp_path / f"{utt_id}{suffix}", mel)
        back = read_mel(path)
        assert back.dtype == np.float32 and np.array_equal(back, mel)
    assert [utt_id for utt_id, _ in list_mels(tmp_path)] == sorted(demo_mels)


def test_guide_bin_and_txt_are_validated(demo_mels, tmp_path):
    mel, bin_path = demo_mels["LJ001-0003"]
    assert mel_input.mel_sample_count(bin_path) is not None
    cut = tmp_path / "cut.bin"
    cut.write_bytes(bin_path.read_bytes()[:-6])
    with pytest.raises(MelError, match=r"cut\.bin: .*not a whole number of float32 frames"):
        read_mel(cut)
    short = save_mel(tmp_path / "short.bin", mel[:, :-1])  # one frame fewer than its .txt says
    (tmp_path / "short.txt").write_text(bin_path.with_suffix(".txt").read_text())
    with pytest.raises(MelError, match=r"short\.bin: .*short\.txt says"):
        read_mel(short)
    (tmp_path / "short.txt").unlink()  # without the .txt the frame count comes from the size alone
    assert np.array_equal(read_mel(short), mel[:, :-1])


def test_layouts_and_batch_axis(demo_mels, tmp_path):
    mel = demo_mels["LJ001-0004"][0]
    for name, array in {"tf": mel.T, "b": mel[None], "btf": mel.T[None]}.items():
        assert np.array_equal(read_mel(save_mel(tmp_path / f"{name}.npy", array)), mel)
    torch.save(torch.from_numpy(mel.T.copy())[None], tmp_path / "btf.pt")
    assert np.array_equal(read_mel(tmp_path / "btf.pt"), mel)
    time_first_bin = save_mel(tmp_path / "tf.bin", mel.T)  # raw bytes have no shape: say so
    assert np.array_equal(read_mel(time_first_bin, layout="time_first"), mel)
    with pytest.raises(MelError, match=r"tf\.bin: .*layout='time_first'"):
        read_mel(time_first_bin)  # read as [80, T], its rows cycle through the bands

    square = mel[:, :80]
    path = save_mel(tmp_path / "square.npy", square)
    with pytest.raises(MelError, match=r"square\.npy: .*ambiguous"):
        read_mel(path)
    assert np.array_equal(read_mel(path, layout="mel_first"), square)
    assert np.array_equal(read_mel(path, layout="time_first"), square.T)
    with pytest.raises(MelError, match=r"wide\.npy: .*no axis of 80 mel bands"):
        read_mel(save_mel(tmp_path / "wide.npy", np.zeros((128, 30)) - 5))
    with pytest.raises(MelError, match=r"batch\.npy: shape \(2, 80, "):
        read_mel(save_mel(tmp_path / "batch.npy", np.stack([mel, mel])))


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pt_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned_marker"
    evil = tmp_path / "evil.pt"
    torch.save({"mel": torch.zeros(80, 5), "x": _Exploit(marker)}, evil)
    with pytest.raises((MelError, CheckpointError), match=r"evil\.pt: .*refused .*(posix|os)\.system"):
        read_mel(evil)
    raw = tmp_path / "evil_raw.pt"  # a plain pickle stream, not torch's zip
    raw.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    with pytest.raises((MelError, CheckpointError), match=r"evil_raw\.pt"):
        read_mel(raw)
    assert not marker.exists()

    inert = tmp_path / "not_a_tensor.pt"  # allow-listed but not a tensor: still no mel
    torch.save({"epoch": 3, "name": "x"}, inert)
    with pytest.raises(MelError, match=r"not_a_tensor\.pt: expected a tensor"):
        read_mel(inert)


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MelError, match=r"objects\.npy: not a plain numeric"):
        read_mel(path)


def test_npy_with_a_header_cut_short_is_one_line(tmp_path):
    """A header numpy cannot parse (old-style headers go through tokenize, which raises TokenError on an
    unclosed bracket) is a MelError naming the file, not a traceback."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (80, 3".ljust(63) + b"\n"
    path = tmp_path / "bad_header.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(12))
    with pytest.raises(MelError, match=r"bad_header\.npy: not a plain numeric \.npy array"):
        read_mel(path)


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".bin"])
def test_nan_mel_is_refused_with_the_files_name(demo_mels, tmp_path, suffix):
    mel = demo_mels["LJ001-0005"][0].copy()
    mel[10, 20] = np.nan
    mel[11, 21] = np.inf
    path = save_mel(tmp_path / f"broken_tts_output{suffix}", mel)
    with pytest.raises(MelError, match=rf"broken_tts_output\{suffix}: the mel contains 2 NaN/Inf"):
        read_mel(path, check=False)


# --- conversions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, conversion, tolerance", [
    ("log10", "log10", 1e-5),
    ("amplitude_to_db", "db_amplitude", 1e-5),   # top_db=80 lifts only values 80 dB below the peak
    ("power_to_db_no_top_db", "db_power", 1e-5),
    ("linear_magnitude", "magnitude", 1e-5),
    ("linear_power", "power", 1e-5),
])
def test_conversions_give_back_the_original(demo_mels, tmp_path, name, conversion, tolerance):
    transform = WRONG_FORMATS[name][0]
    for utt_id, (mel, _) in demo_mels.items():
        path = save_mel(tmp_path / f"{utt_id}.npy", transform(mel.astype(np.float64)))
        back = read_mel(path, convert=conversion)
        floor = mel.max() - 80 * math.log(10) / 20 if name == "amplitude_to_db" else LN_FLOOR
        expected = np.maximum(mel, floor)
        assert np.max(np.abs(back - expected)) <= tolerance, utt_id


def test_conversion_is_never_silent_nor_blind(demo_mels, tmp_path):
    mel = demo_mels["LJ001-0006"][0]
    right = save_mel(tmp_path / "right.npy", mel)
    with pytest.raises(MelError, match=r"right\.npy: convert='log10' was asked for, but the mel looks like "
                                       "natural-log magnitude"):
        read_mel(right, convert="log10")  # converting a mel that was already right is caught
    log10 = save_mel(tmp_path / "log10.npy", mel / math.log(10))
    with pytest.raises(MelError, match=r"log10\.npy: convert='db_power' was asked for, but .* log10"):
        read_mel(log10, convert="db_power")
    power = np.exp(2 * mel.astype(np.float64))
    peak = save_mel(tmp_path / "peak.npy", power_to_db(power, ref=power.max()))
    with pytest.raises(MelError, match=r"peak\.npy: .*exactly 0 dB"):
        read_mel(peak, convert="db_power")
    with pytest.raises(MelError, match="convert must be one of"):
        read_mel(right, convert="mystery")
    assert np.array_equal(convert_mel(mel / math.log(10), "log10"),
                          read_mel(save_mel(tmp_path / "l10.npy", mel / math.log(10)), convert="log10"))


# --- folders ----------------------------------------------------------------------------------------

def test_list_mels(tmp_path, demo_mels):
    mel = demo_mels["LJ001-0007"][0]
    for name in ("b.pt", "a.npy", "c.bin"):
        save_mel(tmp_path / name, mel)
    (tmp_path / "c.txt").write_text("123\n")
    (tmp_path / "notes.md").write_text("ignored")
    save_mel(tmp_path / ".partial.npy", mel)  # hidden: ignored
    assert list_mels(tmp_path) == [("a", tmp_path / "a.npy"), ("b", tmp_path / "b.pt"), ("c", tmp_path / "c.bin")]
    assert list_mels(tmp_path / "b.pt") == [("b", tmp_path / "b.pt")]
    save_mel(tmp_path / "a.pt", mel)
    with pytest.raises(MelError, match="two mels for utterance 'a'"):
        list_mels(tmp_path)
    odd = tmp_path / "odd"
    odd.mkdir()
    save_mel(odd / "-rf.npy", mel)
    with pytest.raises(MelError, match="not usable as an utterance id"):
        list_mels(odd)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MelError, match="no mel files"):
        list_mels(empty)
    with pytest.raises(MelError, match="no such mel file or folder"):
        list_mels(tmp_path / "missing")


def test_numpy_formulas_match_librosa(demo_mels):
    """Contract check of this file's formulas against librosa itself (skipped where it is not installed)."""
    librosa = pytest.importorskip("librosa")
    mel = demo_mels["LJ001-0008"][0].astype(np.float64)
    magnitude, power = np.exp(mel), np.exp(2 * mel)
    np.testing.assert_allclose(power_to_db(power), librosa.power_to_db(power), atol=1e-9)
    np.testing.assert_allclose(power_to_db(power, ref=power.max()), librosa.power_to_db(power, ref=np.max),
                               atol=1e-9)
    np.testing.assert_allclose(amplitude_to_db(magnitude), librosa.amplitude_to_db(magnitude), atol=1e-9)
    np.testing.assert_allclose(power_to_db(power, top_db=None), librosa.power_to_db(power, top_db=None), atol=1e-9)


# --- reading by blocks ------------------------------------------------------------------------------

BLOCK_CASES = {  # file name → (how it is written from a [80, T] mel, read_mel's options)
    "c.npy": (lambda p, m: np.save(p, m), {}),
    "fortran.npy": (lambda p, m: np.save(p, np.asfortranarray(m)), {}),
    "time_first.npy": (lambda p, m: np.save(p, m.T.copy()), {}),
    "time_first_fortran.npy": (lambda p, m: np.save(p, m.T), {}),
    "batch_float64.npy": (lambda p, m: np.save(p, m[None].astype(np.float64)), {}),
    "guide.bin": (lambda p, m: save_mel(p, m), {}),
    "time_first.bin": (lambda p, m: m.T.astype("<f4").tofile(p), {"layout": "time_first"}),
    "tensor.pt": (lambda p, m: save_mel(p, m), {}),
    "log10.npy": (lambda p, m: np.save(p, m / math.log(10)), {"convert": "log10"}),
}


@pytest.mark.parametrize("name", BLOCK_CASES)
def test_open_mel_reads_read_mels_values_by_blocks(demo_mels, tmp_path, name):
    mel = next(iter(demo_mels.values()))[0]
    write, options = BLOCK_CASES[name]
    write(tmp_path / name, mel)
    whole = read_mel(tmp_path / name, **options)
    blocks = mel_input.open_mel(tmp_path / name, **options)
    assert blocks.shape == whole.shape
    frames = whole.shape[1]
    assert np.array_equal(np.concatenate([blocks[:, a:a + 37] for a in range(0, frames, 37)], axis=1), whole)
    assert np.array_equal(np.asarray(blocks), whole)
    assert np.array_equal(pickle.loads(pickle.dumps(blocks))[:, 5:9], whole[:, 5:9])


def test_open_mel_refuses_what_read_mel_refuses(demo_mels, tmp_path):
    mel = next(iter(demo_mels.values()))[0].copy()
    mel[3, -1] = np.nan  # in the last block only
    np.save(tmp_path / "nan.npy", mel)
    with pytest.raises(MelError, match=r"nan\.npy: the mel contains 1 NaN/Inf"):
        mel_input.open_mel(tmp_path / "nan.npy")
    np.save(tmp_path / "db.npy", mel[:, :-1] * 20 / math.log(10))
    with pytest.raises(MelError, match=r"db\.npy: this mel looks like dB"):
        mel_input.open_mel(tmp_path / "db.npy")
