"""Resume stamps: a stage reuses an output only when the model that made it (its content fingerprint), the
settings that shaped it and its source are the ones of this run (`waveglow_lib.stamps`).

The hostile case throughout: the checkpoint file is replaced, at the same path, by another model of the
same size, and its old modification time is put back (os.utime) — what a copy tool that keeps times, or
a careful prankster, does. Nothing keyed on the path, size and mtime may notice; every stage must.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from scipy.io import wavfile

from support import SHORT_IDS
from waveglow_lib.checkpoint import model_fingerprint, save_waveglow
from waveglow_lib.cli import main
from waveglow_lib.errors import ConfigError
from waveglow_lib.io import write_bin
from waveglow_lib.stages import infer, postprocess, preprocess, vocode
from waveglow_lib.stamps import CACHE_NAME, is_current, model_stamp, stage_stamp

FRAMES = {"LJ001-0002": 125, "LJ001-0006": 281, "LJ001-0008": 99}


@pytest.fixture
def checkpoint(tmp_path, tiny_model):
    """A checkpoint of its own (seed-0 tiny model) that the test may replace."""
    return save_waveglow(tiny_model(seed=0), tmp_path / "model" / "waveglow.safetensors")


def replace_keeping_size_and_mtime(path, model, in_place: bool = False) -> None:
    """Put `model` at `path` (a new file renamed over it, or the bytes rewritten in place), same size,
    and the old modification time back."""
    before = path.stat()
    if in_place:
        data = save_waveglow(model, path.with_name("staging.safetensors")).read_bytes()
        with open(path, "r+b") as handle:
            handle.write(data)
    else:
        save_waveglow(model, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert (after.st_ino == before.st_ino) == in_place


def wavs(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*_syn.wav"))}


def outs(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*_out.bin"))}


@pytest.mark.parametrize("in_place", [False, True], ids=["renamed-over", "rewritten-in-place"])
def test_the_fingerprint_follows_the_content_not_the_path_size_and_mtime(make_cfg, checkpoint, tiny_model,
                                                                          tmp_path, in_place):
    cfg = make_cfg(tmp_path / "runs", checkpoint=str(checkpoint))
    assert model_stamp(cfg) == model_fingerprint(tiny_model(seed=0))
    assert (cfg.run_dir / CACHE_NAME).is_file()  # cached beside the run
    replace_keeping_size_and_mtime(checkpoint, tiny_model(seed=1), in_place=in_place)
    assert model_stamp(cfg) == model_fingerprint(tiny_model(seed=1))


def test_a_stamp_is_current_only_when_every_part_matches(make_cfg, tiny_model, tmp_path):
    cfg = make_cfg(tmp_path / "runs")
    stamp = stage_stamp(cfg, {"sigma": 0.6}, model=tiny_model(), source_sha256="ab")
    assert stamp == {"model": model_fingerprint(tiny_model()), "sigma": 0.6, "source_sha256": "ab"}
    assert is_current({**stamp, "batch_size": 4}, stamp)  # what does not shape the output is not compared
    for key, other in (("model", "0" * 16), ("sigma", 0.8), ("source_sha256", "cd")):
        assert not is_current({**stamp, key: other}, stamp), key
    assert not is_current({k: v for k, v in stamp.items() if k != "model"}, stamp)
    assert not is_current(None, stamp) and not is_current("garbage", stamp)


def test_vocode_redoes_wavs_of_a_replaced_checkpoint(preprocessed_run, checkpoint, tiny_model, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs", checkpoint=str(checkpoint))
    mels = cfg.layout.mel_dir
    assert sorted(vocode(cfg, mels)["written"]) == sorted(SHORT_IDS)
    old = wavs(cfg.layout.vocode_dir)
    # the same model at another path is the same model: nothing redone
    copy = shutil.copy2(checkpoint, tmp_path / "copy.safetensors")
    assert vocode(cfg.with_overrides(checkpoint=str(copy)), mels)["written"] == []
    replace_keeping_size_and_mtime(checkpoint, tiny_model(seed=1))
    again = vocode(cfg, mels)
    assert sorted(again["written"]) == sorted(SHORT_IDS) and again["skipped"] == []
    new = wavs(cfg.layout.vocode_dir)
    assert new != old
    reference = preprocessed_run(tmp_path / "reference", checkpoint=str(checkpoint))
    vocode(reference, reference.layout.mel_dir, model=tiny_model(seed=1))
    assert new == wavs(reference.layout.vocode_dir)  # exactly what the new model makes


def test_infer_refuses_outputs_of_a_replaced_checkpoint_naming_it(preprocessed_run, checkpoint, tiny_model,
                                                                  tmp_path):
    cfg = preprocessed_run(tmp_path / "runs", checkpoint=str(checkpoint))
    assert sorted(infer(cfg)["written"]) == sorted(SHORT_IDS)
    old = outs(cfg.layout.out_dir)
    replace_keeping_size_and_mtime(checkpoint, tiny_model(seed=1))
    with pytest.raises(ConfigError, match=rf"other settings \(model: .*the checkpoint {checkpoint} is another "
                                          r"model than the one they were made with.*force"):
        infer(cfg)
    assert outs(cfg.layout.out_dir) == old  # nothing mixed in
    assert sorted(infer(cfg, force=True)["written"]) == sorted(SHORT_IDS)
    reference = preprocessed_run(tmp_path / "reference", checkpoint=str(checkpoint))
    infer(reference, model=tiny_model(seed=1))
    assert outs(cfg.layout.out_dir) == outs(reference.layout.out_dir) != old


def test_infer_redoes_an_utterance_whose_mel_was_made_again(make_cfg, short_corpus, tmp_path):
    """The source's hash: a wav edited in place (same length) gets a new mel from preprocess, and infer
    makes its audio again (the old output has the right size, so only the hash can tell)."""
    corpus = shutil.copytree(short_corpus, tmp_path / "corpus")
    cfg = make_cfg(tmp_path / "runs", corpus=str(corpus), limit=0)
    preprocess(cfg)
    assert sorted(infer(cfg)["written"]) == sorted(SHORT_IDS)
    old = outs(cfg.layout.out_dir)
    wav = corpus / "wavs" / "LJ001-0008.wav"
    rate, samples = wavfile.read(wav)
    wavfile.write(wav, rate, (samples // 2).astype(samples.dtype))  # quieter: the same length, another mel
    assert preprocess(cfg)["computed"] == 1
    again = infer(cfg)
    assert again["written"] == ["LJ001-0008"] and sorted(again["skipped"]) == ["LJ001-0002", "LJ001-0006"]
    new = outs(cfg.layout.out_dir)
    assert new["LJ001-0008_out.bin"] != old["LJ001-0008_out.bin"]
    assert {k: v for k, v in new.items() if "0008" not in k} == {k: v for k, v in old.items() if "0008" not in k}
    assert infer(cfg)["written"] == []


def test_postprocess_redoes_denoised_wavs_of_a_replaced_checkpoint(preprocessed_run, checkpoint, tiny_model,
                                                                   tmp_path):
    """The denoiser subtracts the model's own bias spectrum: its wavs follow the model."""
    cfg = preprocessed_run(tmp_path / "runs", checkpoint=str(checkpoint), denoiser_strength=0.5)
    for i, utt_id in enumerate(SHORT_IDS):
        n = FRAMES[utt_id] * 256
        audio = 0.5 * np.sin(np.arange(n) * 0.01 * (i + 1)).astype(np.float32)
        write_bin(cfg.layout.out_dir / f"{utt_id}_out.bin", audio)
    assert sorted(postprocess(cfg)["written"]) == sorted(SHORT_IDS)
    old = wavs(cfg.layout.wav_dir)
    assert postprocess(cfg)["written"] == []
    replace_keeping_size_and_mtime(checkpoint, tiny_model(seed=1))
    again = postprocess(cfg)
    assert sorted(again["written"]) == sorted(SHORT_IDS)
    assert wavs(cfg.layout.wav_dir) != old
    reference = preprocessed_run(tmp_path / "reference", checkpoint=str(checkpoint), denoiser_strength=0.5)
    shutil.copytree(cfg.layout.out_dir, reference.layout.out_dir)
    postprocess(reference, model=tiny_model(seed=1))
    assert wavs(cfg.layout.wav_dir) == wavs(reference.layout.wav_dir)  # exactly the new model's denoiser


def test_run_all_names_a_replaced_checkpoint_and_force_recovers(short_corpus, checkpoint, tiny_model, tmp_path,
                                                               capsys):
    def run_all(runs, *extra):
        return main(["run-all", "--runs-dir", str(runs), "--name", "r", "--checkpoint", str(checkpoint),
                     "--corpus", str(short_corpus), "--limit", "2", "--backend", "onnxruntime",
                     "--targets", "onnxruntime", *extra])

    assert run_all(tmp_path / "runs") == 0
    capsys.readouterr()
    old = wavs(tmp_path / "runs" / "r" / "wav")
    replace_keeping_size_and_mtime(checkpoint, tiny_model(seed=1))
    assert run_all(tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert f"the checkpoint {checkpoint} is another model than the one they were made with" in err, err
    assert "export" not in err, err  # the ONNX was re-exported from the new model: not the cause
    assert run_all(tmp_path / "runs", "--force") == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["infer"]["written"]) == 2 and len(summary["postprocess"]["written"]) == 2
    assert run_all(tmp_path / "fresh") == 0  # a run that only ever saw the new model
    capsys.readouterr()
    assert wavs(tmp_path / "runs" / "r" / "wav") == wavs(tmp_path / "fresh" / "r" / "wav") != old
