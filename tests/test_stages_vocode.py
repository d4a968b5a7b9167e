"""The vocode stage and command: mels from elsewhere (.npy/.pt/.bin) → wavs, format-checked first,
resumable, chunked, and equal to the wav route's samples for mels our own preprocess made."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from support import SHORT_IDS, memory_by_size
from waveglow_lib.cli import main
from waveglow_lib.io import read_bin
from waveglow_lib.layout import load_manifest, mel_bin, out_bin, syn_wav
from waveglow_lib.mel_input import save_mel
from waveglow_lib.stages import infer, postprocess, vocode


@pytest.fixture(scope="module")
def wav_route(tmp_path_factory, preprocessed_run):
    """The wav route on the short demo utterances: preprocess → infer → postprocess (torch, tiny model)."""
    cfg = preprocessed_run(tmp_path_factory.mktemp("wav_route"))
    infer(cfg)
    postprocess(cfg)
    return cfg


def _mels_as(cfg, folder, suffix):
    """The run's preprocessed mels saved as `<id><suffix>` (stem = utterance id)."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in load_manifest(cfg.layout.mel_dir)["items"]:
        path = mel_bin(cfg.layout.mel_dir, item)
        if suffix == ".bin":  # the guide's layout, with its .txt sample count
            shutil.copy2(path, folder)
            shutil.copy2(path.with_suffix(".txt"), folder)
        else:
            save_mel(folder / f"{item['id']}{suffix}", read_bin(path, tuple(item["shape"])))
    return folder


def _wav(path):
    rate, data = wavfile.read(path)
    assert rate == 22050 and data.dtype == np.int16
    return data


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".bin"])
def test_mels_from_preprocess_give_the_wav_routes_samples(wav_route, tmp_path, suffix):
    mels = _mels_as(wav_route, tmp_path / "mels", suffix)
    cfg = wav_route.with_overrides(runs_dir=str(tmp_path / "runs"), vocode_out_bin=True)
    result = vocode(cfg, mels)
    assert sorted(result["written"]) == sorted(SHORT_IDS)
    for item in load_manifest(wav_route.layout.mel_dir)["items"]:
        expected = _wav(syn_wav(wav_route.layout.wav_dir, item["id"]))
        got = _wav(syn_wav(cfg.layout.vocode_dir, item["id"]))
        if suffix == ".bin":  # the .txt carries the sample count: the very same file contents
            assert np.array_equal(got, expected)
        else:  # a mel alone gives frames × 256 samples: only the tail beyond the source's length differs
            assert 0 <= got.size - expected.size < 256
            assert np.array_equal(got[: expected.size], expected)
        raw = read_bin(out_bin(cfg.layout.vocode_dir, item["id"]), (item["mel_frames"] * 256,))
        assert np.array_equal(raw, read_bin(out_bin(wav_route.layout.out_dir, item["id"]), raw.shape))


def test_vocode_command_on_a_mixed_folder_is_resumable_and_chunks(make_cfg, wav_route, tmp_path, capsys):
    mels = tmp_path / "mixed"
    mels.mkdir()
    items = load_manifest(wav_route.layout.mel_dir)["items"]
    for item, suffix in zip(items, (".npy", ".pt", ".bin")):
        source = _mels_as(wav_route, tmp_path / suffix.strip("."), suffix)
        for path in source.glob(f"{item['id']}.*"):
            shutil.copy2(path, mels)
    cfg = make_cfg(tmp_path / "runs", name="cli")
    argv = ["vocode", "--mels", str(mels), "--runs-dir", cfg.runs_dir, "--name", "cli", "--checkpoint", cfg.checkpoint,
            "--backend", "torch", "--chunk-frames", "40"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert sorted(first["written"]) == sorted(SHORT_IDS) and first["skipped"] == []
    record = json.loads((cfg.layout.vocode_dir / "vocode.json").read_text())
    assert all(entry["chunked"] and entry["exact"] for entry in record["items"].values())
    # chunked output equals the unchunked wav route (same noise)
    for item in items:
        expected = _wav(syn_wav(wav_route.layout.wav_dir, item["id"]))
        got = _wav(syn_wav(cfg.layout.vocode_dir, item["id"]))
        assert np.abs(got[: expected.size].astype(int) - expected.astype(int)).max() <= 1
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["written"] == [] and sorted(again["skipped"]) == sorted(SHORT_IDS)
    # another sigma makes other audio: redone, not skipped
    assert main(argv + ["--sigma", "0.5"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["written"]) == sorted(SHORT_IDS)


def test_a_wrong_format_is_refused_with_the_file_name_before_anything_is_vocoded(wav_route, make_cfg, tmp_path,
                                                                                  capsys):
    mels = _mels_as(wav_route, tmp_path / "mels", ".npy")
    item = load_manifest(wav_route.layout.mel_dir)["items"][0]
    natural = np.load(mels / f"{item['id']}.npy")
    save_mel(mels / "zz_decibels.npy", natural * 20.0 / math.log(10.0))  # amplitude_to_db of the same mel
    cfg = make_cfg(tmp_path / "runs", name="bad")
    argv = ["vocode", "--mels", str(mels), "--runs-dir", cfg.runs_dir, "--name", "bad", "--checkpoint", cfg.checkpoint,
            "--backend", "torch"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "zz_decibels.npy" in err and "dB" in err
    assert not cfg.layout.vocode_dir.exists()  # the good files before it were not vocoded either
    # the explicit conversion (asked for this file only: it refuses the folder's right mels) makes it vocodable
    argv[2] = str(mels / "zz_decibels.npy")
    assert main(argv + ["--mel-convert", "db_amplitude"]) == 0
    capsys.readouterr()
    converted = _wav(syn_wav(cfg.layout.vocode_dir, "zz_decibels"))
    assert converted.size == natural.shape[1] * 256


def test_a_nan_mel_is_refused_naming_its_file(make_cfg, tmp_path):
    from waveglow_lib.errors import MelError

    mel = np.full((80, 20), -5.0, dtype=np.float32)
    mel[3, 4] = np.nan
    save_mel(tmp_path / "broken.pt", mel)
    with pytest.raises(MelError, match="broken.pt"):
        vocode(make_cfg(tmp_path / "runs"), tmp_path / "broken.pt")


@pytest.mark.e2e
def test_the_vocode_notebook_runs_by_name(tmp_path, tiny_checkpoint):
    """`run --notebooks 06_vocode_mels.ipynb`: outside the default chain, runnable on its own."""
    from pathlib import Path

    from waveglow_lib.notebook.runner import NOTEBOOKS

    runs = tmp_path / "runs"
    params = Path(__file__).resolve().parent.parent / "params" / "ci.yaml"
    argv = ["run", "--params", str(params), "--notebooks", "06_vocode_mels.ipynb", "--no-report",
            "--set", f"runs_dir={runs}", "--set", "limit=2", "--set", f"checkpoint={tiny_checkpoint}",
            "--set", "backend=torch", "--name", "nb06"]
    assert main(argv) == 0
    assert "06_vocode_mels.ipynb" not in NOTEBOOKS
    assert len(list((runs / "nb06" / "vocode").glob("*_syn.wav"))) == 2
    assert (runs / "nb06" / "notebooks" / "06_vocode_mels.ipynb").is_file()


# --- long mels: memory as a chunk, written as vocoded, progress inside the utterance ----------------------

def _longest_as_npy(cfg, folder):
    item = max(load_manifest(cfg.layout.mel_dir)["items"], key=lambda i: i["mel_frames"])
    folder.mkdir(parents=True, exist_ok=True)
    save_mel(folder / f"{item['id']}.npy", read_bin(mel_bin(cfg.layout.mel_dir, item), tuple(item["shape"])))
    return item


class _RecordingBar:
    """Stands in for tqdm in the local engine: records each update."""
    updates: list = []

    def __init__(self, *args, total=None, **kwargs):
        self.total = total

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        _RecordingBar.updates.append(n)


def test_a_long_mel_is_written_as_it_is_vocoded_with_progress_inside_it(wav_route, tmp_path, monkeypatch):
    """Chunks of 40 frames: the bar moves chunk by chunk (counted in samples, shown in audio seconds), the
    wav is not at its name until it is complete, and it equals the unchunked wav (same noise)."""
    from waveglow_lib.audio import WavWriter
    from waveglow_lib.engines import local

    item = _longest_as_npy(wav_route, tmp_path / "mels")
    cfg = wav_route.with_overrides(runs_dir=str(tmp_path / "runs"), chunk_frames=40)
    target = syn_wav(cfg.layout.vocode_dir, item["id"])
    seen, real_write = [], WavWriter.write
    monkeypatch.setattr(WavWriter, "write", lambda self, audio: (seen.append(target.exists()), real_write(self, audio)))
    monkeypatch.setattr(local, "tqdm", _RecordingBar)
    _RecordingBar.updates = []
    assert vocode(cfg, tmp_path / "mels")["written"] == [item["id"]]
    assert len(seen) >= 5 and not any(seen) and target.is_file()
    assert len(_RecordingBar.updates) >= 5  # one utterance, several updates
    assert sum(_RecordingBar.updates) == item["mel_frames"] * 256  # samples (shown as seconds)
    whole = wav_route.with_overrides(runs_dir=str(tmp_path / "whole"), chunk_frames=0)
    vocode(whole, tmp_path / "mels")
    expected = _wav(syn_wav(whole.layout.vocode_dir, item["id"]))
    assert np.abs(_wav(target).astype(int) - expected.astype(int)).max() <= 1


def test_a_stream_that_fails_halfway_leaves_nothing(wav_route, tmp_path, monkeypatch):
    from waveglow_lib.audio import WavWriter

    item = _longest_as_npy(wav_route, tmp_path / "mels")
    cfg = wav_route.with_overrides(runs_dir=str(tmp_path / "runs"), chunk_frames=40, vocode_out_bin=True)
    calls, real_write = [], WavWriter.write

    def failing(self, audio):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(self, audio)

    monkeypatch.setattr(WavWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        vocode(cfg, tmp_path / "mels")
    left = [p.name for p in cfg.layout.vocode_dir.iterdir()]
    assert not [name for name in left if item["id"] in name], left  # no wav, no .bin, no temp file


def test_the_block_denoiser_equals_the_denoiser_on_the_whole(tiny_model):
    from waveglow_lib.denoiser import Denoiser
    from waveglow_lib.stages.vocode import BlockDenoiser

    denoiser = Denoiser.from_model(tiny_model())
    audio = (np.random.default_rng(6).standard_normal(256 * 90) * 0.2).astype(np.float32)
    blocks = BlockDenoiser(denoiser, 0.3)
    pieces = [blocks.push(piece) for piece in np.split(audio, [256 * 7, 256 * 30, 256 * 31, 256 * 70])]
    got = np.concatenate([*pieces, blocks.end()])
    assert np.abs(got - denoiser(audio, strength=0.3)).max() < 1e-5


def test_chunk_frames_is_bounded(make_cfg, wav_route, tmp_path, capsys):
    _longest_as_npy(wav_route, tmp_path / "mels")
    cfg = make_cfg(tmp_path / "runs")
    argv = ["vocode", "--mels", str(tmp_path / "mels"), "--runs-dir", cfg.runs_dir, "--checkpoint", cfg.checkpoint,
            "--chunk-frames", str(10**9)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "chunk_frames" in err and "16384" in err and len(err.splitlines()) == 1


def test_a_failed_allocation_is_one_line_naming_its_size(make_cfg, wav_route, tmp_path, capsys, monkeypatch):
    """Contract test: torch's DefaultCPUAllocator raises a RuntimeError with this message (mocked here)."""
    import waveglow_lib.jobs

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 1610612736 bytes.")

    monkeypatch.setattr(waveglow_lib.jobs, "vocode", refuse)
    _longest_as_npy(wav_route, tmp_path / "mels")
    cfg = make_cfg(tmp_path / "runs")
    argv = ["vocode", "--mels", str(tmp_path / "mels"), "--runs-dir", cfg.runs_dir, "--checkpoint", cfg.checkpoint,
            "--backend", "torch"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    # the last line (the progress bar's lines come before it), no traceback
    assert "out of memory: 1.50 GiB were asked for" in err.splitlines()[-1] and "Traceback" not in err


def test_vocode_memory_is_flat_in_the_mels_length(tmp_path):
    """A 4x longer mel costs no more memory (one fresh interpreter, two lengths): read by blocks, noise drawn
    per chunk, the wav written as chunks finish. Python/numpy allocations (tracemalloc) and peak RSS."""
    setup = f"""
from pathlib import Path
import numpy as np
from support import tiny_waveglow
from waveglow_lib.config import ModelConfig, WorkflowConfig
from waveglow_lib import mel_input
from waveglow_lib.stages import vocode
# the format check's sample and the NaN scan's block (bounded: 16384 and 2048 frames) are not measured here
mel_input.CHECK_FRAMES = mel_input.SCAN_FRAMES = 256
root = Path({str(tmp_path)!r})
model = tiny_waveglow(ModelConfig(n_flows=2, n_group=8, n_early_every=4, n_early_size=2, n_layers=1,
                                  n_channels=4, kernel_size=3))
for frames in (100, 600, 2400):
    np.save(root / f"m{{frames}}.npy", (np.random.default_rng(frames).standard_normal((80, frames)) * 2 - 5)
            .astype(np.float32))
def work(frames):
    cfg = WorkflowConfig(name=f"r{{frames}}", runs_dir=str(root / "runs"), backend="torch", precision="fp32",
                         chunk_frames=64)
    vocode(cfg, root / f"m{{frames}}.npy", model=model)
"""
    short, long = memory_by_size(setup, [600, 2400], warm=100)
    # before: the mel, its noise (1 KiB a frame) and its audio (1 KiB a frame, twice) held whole: 4x the peak
    assert long["traced_peak"] < 1.3 * short["traced_peak"] + 2**20, (short, long)
    # the process's peak RSS (torch's buffers included: a chunk's), as growth above the warmed-up baseline (the
    # imports alone hold ~500 MiB, which a 30 % margin on the absolute peak hid): measured alone the longer mel
    # grows it by < 3 MiB more, but on a loaded machine malloc's arenas add ~20 MiB of noise (32 → 55 MiB seen),
    # so the bound is preprocess's: a 4x longer mel may not cost 1.3x the growth plus 16 MiB
    assert long["rss_growth"] < 1.3 * short["rss_growth"] + 16 * 2**20, (short, long)


# --- the stdout pipe (issue 36): the wav's data chunk, as it is made ---------------------------------------
def _data_chunk(path) -> bytes:
    """The bytes of a RIFF/WAVE file's data chunk."""
    blob = path.read_bytes()
    at = 12
    while at + 8 <= len(blob):
        size = int.from_bytes(blob[at + 4: at + 8], "little")
        if blob[at: at + 4] == b"data":
            return blob[at + 8: at + 8 + size]
        at += 8 + size + (size & 1)
    raise AssertionError(f"{path}: no data chunk")


def _pipe_argv(cfg, mel_path, *extra):
    return [sys.executable, "-m", "waveglow_lib", "vocode", "--mels", str(mel_path), "--stdout",
            "--runs-dir", cfg.runs_dir, "--name", cfg.name, "--checkpoint", cfg.checkpoint,
            "--backend", cfg.backend, "--chunk-frames", str(cfg.chunk_frames),
            "--denoiser-strength", str(cfg.denoiser_strength), *extra]


@pytest.mark.parametrize("chunk_frames, denoise", [(40, 0.0), (40, 0.05), (0, 0.05)])
def test_vocode_stdout_is_the_wavs_data_chunk(wav_route, tmp_path, chunk_frames, denoise):
    """Real subprocesses: stdout holds exactly the bytes of the data chunk of the wav the `vocode` command
    writes for the same mel and settings (chunked or whole, denoised or not, the .bin's .txt length),
    nothing else; the format and rate are on stderr, and no file is written. (The command, not the stage
    in this process: the denoiser's float rounding follows the process's torch thread count.)"""
    item = load_manifest(wav_route.layout.mel_dir)["items"][0]
    mels = _mels_as(wav_route, tmp_path / "mels", ".bin")
    mel_path = mels / f"{item['id']}.bin"
    cfg = wav_route.with_overrides(runs_dir=str(tmp_path / "runs"), chunk_frames=chunk_frames,
                                   denoiser_strength=denoise)
    argv = _pipe_argv(cfg, mel_path)
    argv.remove("--stdout")
    # one torch thread in both processes, so both compute alike (fp32 rounding can follow the thread count, as
    # the denoiser's does; with the default threads a full `make test` once saw one int16 sample differ by 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    staged = subprocess.run(argv, capture_output=True, cwd=Path(__file__).parents[1], timeout=300, env=env)
    assert staged.returncode == 0, staged.stderr.decode()[-2000:]
    wav = syn_wav(cfg.layout.vocode_dir, item["id"])
    piped = cfg.with_overrides(name="piped")
    done = subprocess.run(_pipe_argv(piped, mel_path), capture_output=True, cwd=Path(__file__).parents[1],
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout == _data_chunk(wav)
    assert len(done.stdout) == 2 * item["samples"]  # the .txt length
    err = done.stderr.decode()
    assert "S16_LE" in err and "22050" in err and '"samples"' in err  # the summary went to stderr
    assert not piped.run_dir.exists() or not any(piped.run_dir.rglob("*.wav"))


def test_vocode_pipe_writes_chunk_by_chunk(wav_route, tmp_path):
    """In process: each chunk reaches the stream as it is made (one write per chunk), flushed."""
    from waveglow_lib.stages import vocode_pipe

    class Recording(io.BytesIO):
        writes: list = []

        def write(self, data):
            self.writes.append(len(data))
            return super().write(data)

    item = _longest_as_npy(wav_route, tmp_path / "mels")
    cfg = wav_route.with_overrides(runs_dir=str(tmp_path / "runs"), chunk_frames=40)
    out = Recording()
    summary = vocode_pipe(cfg, tmp_path / "mels" / f"{item['id']}.npy", out)
    chunks = math.ceil(item["mel_frames"] / 40)
    assert len(out.writes) == chunks and sum(out.writes) == 2 * item["mel_frames"] * 256
    assert summary["samples"] == item["mel_frames"] * 256 and summary["format"] == "s16le"
    vocode(cfg, tmp_path / "mels")
    assert out.getvalue() == _data_chunk(syn_wav(cfg.layout.vocode_dir, item["id"]))


def test_vocode_stdout_ends_quietly_when_the_reader_goes_away(wav_route, tmp_path):
    """The player quits after a few bytes (a mel long enough that the pipe's buffer fills first): exit 0, no
    traceback; and a folder of several mels is a one-line error, nothing on stdout."""
    item = max(load_manifest(wav_route.layout.mel_dir)["items"], key=lambda i: i["mel_frames"])
    mel = read_bin(mel_bin(wav_route.layout.mel_dir, item), tuple(item["shape"]))
    long_path = tmp_path / "long.npy"
    save_mel(long_path, np.concatenate([mel] * 4, axis=1))  # > 64 KiB of PCM: the writer blocks on a full pipe
    cfg = wav_route.with_overrides(runs_dir=str(tmp_path / "runs"), chunk_frames=40)
    proc = subprocess.Popen(_pipe_argv(cfg, long_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).parents[1])
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]

    several = subprocess.run(_pipe_argv(cfg, _mels_as(wav_route, tmp_path / "mels", ".npy")), capture_output=True,
                             cwd=Path(__file__).parents[1], timeout=300)
    assert several.returncode == 2 and several.stdout == b""
    assert "give one mel file" in several.stderr.decode()
