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
from waveglow_lib.convert import convert_openvino
from waveglow_lib.cli import main
from waveglow_lib.errors import ConfigError, ManifestError
from waveglow_lib.io import write_bin
from waveglow_lib.stages import convert, export, infer, postprocess, preprocess, vocode
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


# --- every file by its content: inputs refused or redone, outputs checked before they are skipped ----------
def put_back_mtime(path, before) -> None:
    """The old modification time back on `path` (os.utime moves the ctime, which a user cannot set)."""
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def test_preprocess_redoes_the_mel_of_a_wav_replaced_with_its_old_size_and_mtime(make_cfg, short_corpus, tmp_path):
    corpus = shutil.copytree(short_corpus, tmp_path / "corpus")
    cfg = make_cfg(tmp_path / "runs", corpus=str(corpus), limit=0)
    preprocess(cfg)
    mel = cfg.layout.mel_dir / "LJ001-0008.bin"
    old_mel = mel.read_bytes()
    wav = corpus / "wavs" / "LJ001-0008.wav"
    before = wav.stat()
    rate, samples = wavfile.read(wav)
    wavfile.write(wav, rate, (-samples).astype(samples.dtype)[::-1].copy())  # other audio, same size
    put_back_mtime(wav, before)
    assert wav.stat().st_size == before.st_size
    again = preprocess(cfg)
    assert again["computed"] == 1 and again["reused"] == 2
    assert list(again["redone"]) == ["LJ001-0008"] and str(wav) in again["redone"]["LJ001-0008"]
    assert mel.read_bytes() != old_mel
    assert preprocess(cfg)["computed"] == 0  # and then reused: the new content is the recorded one


def test_preprocess_redoes_a_mel_file_changed_in_place(preprocessed_run, tmp_path, capsys):
    cfg = preprocessed_run(tmp_path / "runs")
    mel = cfg.layout.mel_dir / "LJ001-0006.bin"
    good = mel.read_bytes()
    before = mel.stat()
    mel.write_bytes(good[::-1])  # same size, other numbers
    put_back_mtime(mel, before)
    result = preprocess(cfg)
    assert result["computed"] == 1 and list(result["redone"]) == ["LJ001-0006"]
    assert f"{mel}: its content differs from its record" in capsys.readouterr().err
    assert mel.read_bytes() == good


def swap_onnx_weights(path) -> None:
    """Rewrite the graph at `path` as a valid graph of the same shape with other weights (record untouched)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    for tensor in proto.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.size > 16:
            tensor.CopyFrom(numpy_helper.from_array((values * 1.5).astype(np.float32), tensor.name))
            break
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def test_infer_refuses_an_onnx_replaced_beside_its_untouched_record(preprocessed_run, tmp_path, capsys):
    cfg = preprocessed_run(tmp_path / "runs", backend="onnxruntime")
    assert export(cfg)["noise_input"]["status"] == "exported"
    graph = cfg.layout.onnx
    record = graph.with_suffix(".json")
    record_before = record.read_bytes()
    swap_onnx_weights(graph)
    argv = ["infer", "--runs-dir", str(cfg.runs_dir), "--name", cfg.name, "--checkpoint", cfg.checkpoint,
            "--backend", "onnxruntime"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{graph}: its content differs from its record" in err and "export stage" in err, err
    assert not list(cfg.layout.out_dir.glob("*_out.bin"))  # nothing vocoded with the foreign graph
    assert record.read_bytes() == record_before
    export_result = export(cfg)["noise_input"]  # export sees it too, and makes the graph again
    assert export_result["status"] == "exported" and str(graph) in export_result["reason"]
    assert main(argv) == 0


def test_infer_refuses_an_openvino_ir_whose_weights_changed(preprocessed_run, tmp_path, capsys):
    cfg = preprocessed_run(tmp_path / "runs", with_onnx=True, backend="openvino")
    assert convert(cfg, targets=("openvino",))["openvino"]["status"] == "converted"
    weights = cfg.layout.openvino_ir.with_suffix(".bin")
    other = tmp_path / "other" / "waveglow.onnx"  # the same graph with other weights, as an IR
    other.parent.mkdir()
    shutil.copy(cfg.layout.onnx, other)
    swap_onnx_weights(other)
    convert_openvino(other, other.with_suffix(".xml"))
    before = weights.stat()
    weights.write_bytes(other.with_suffix(".bin").read_bytes())  # beside the untouched .xml and record
    put_back_mtime(weights, before)
    assert weights.stat().st_size == before.st_size
    argv = ["infer", "--runs-dir", str(cfg.runs_dir), "--name", cfg.name, "--checkpoint", cfg.checkpoint,
            "--backend", "openvino"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{weights}: its content differs from its record" in err and "convert stage" in err, err
    again = convert(cfg, targets=("openvino",))["openvino"]  # convert makes the IR again, naming the file
    assert again["status"] == "converted" and str(weights) in again["reason"]
    assert main(argv) == 0


def test_vocode_redoes_wavs_cut_short_replaced_or_linked(preprocessed_run, tmp_path, capsys):
    cfg = preprocessed_run(tmp_path / "runs")
    mels = cfg.layout.mel_dir
    vocode(cfg, mels)
    folder = cfg.layout.vocode_dir
    good = wavs(folder)
    cut, swapped, linked = (folder / f"{utt_id}_syn.wav" for utt_id in SHORT_IDS)
    cut.write_bytes(good[cut.name][: len(good[cut.name]) // 2])
    swapped.write_bytes(good[linked.name])  # another utterance's wav
    elsewhere = tmp_path / "elsewhere.wav"
    elsewhere.write_bytes(good[linked.name])
    linked.unlink()
    linked.symlink_to(elsewhere)  # the same bytes, but not the file that was written
    capsys.readouterr()
    again = vocode(cfg, mels)
    assert sorted(again["written"]) == sorted(SHORT_IDS) and again["skipped"] == []
    assert sorted(again["redone"]) == sorted(SHORT_IDS)
    err = capsys.readouterr().err
    for path, why in ((cut, "bytes, its record"), (swapped, "bytes, its record"), (linked, "symbolic link")):
        assert f"{path}: it" in err and why in again["redone"][path.name.removesuffix("_syn.wav")], err
    assert not linked.is_symlink() and wavs(folder) == good
    assert vocode(cfg, mels)["written"] == []


def test_vocode_redoes_a_wav_changed_in_place_with_its_old_mtime(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    vocode(cfg, cfg.layout.mel_dir)
    wav = cfg.layout.vocode_dir / "LJ001-0002_syn.wav"
    good = wav.read_bytes()
    before = wav.stat()
    wav.write_bytes(good[:44] + bytes(len(good) - 44))  # silence, the same size
    put_back_mtime(wav, before)
    again = vocode(cfg, cfg.layout.mel_dir)
    assert again["written"] == ["LJ001-0002"] and "content differs" in again["redone"]["LJ001-0002"]
    assert wav.read_bytes() == good


def test_infer_and_postprocess_redo_outputs_that_no_longer_match(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    infer(cfg)
    postprocess(cfg)
    raw = cfg.layout.out_dir / "LJ001-0006_out.bin"
    good_raw = raw.read_bytes()
    before = raw.stat()
    raw.write_bytes(bytes(len(good_raw)))  # the right size for its frames: only the content tells
    put_back_mtime(raw, before)
    wav = cfg.layout.wav_dir / "LJ001-0002_syn.wav"
    good_wav = wav.read_bytes()
    wav.write_bytes(good_wav[: len(good_wav) // 2])
    again = infer(cfg)
    assert again["written"] == ["LJ001-0006"] and list(again["redone"]) == ["LJ001-0006"]
    assert raw.read_bytes() == good_raw
    after = postprocess(cfg)
    assert after["written"] == ["LJ001-0002"] and list(after["redone"]) == ["LJ001-0002"]
    assert wav.read_bytes() == good_wav


def test_a_rerun_reads_no_file_again_once_its_hash_is_kept(preprocessed_run, tmp_path, monkeypatch):
    """The cost: a file whose device, inode, size, mtime and ctime are as cached is not read to be hashed."""
    import waveglow_lib.stamps as stamps_module

    cfg = preprocessed_run(tmp_path / "runs")
    vocode(cfg, cfg.layout.mel_dir)
    monkeypatch.setattr(stamps_module, "RACY_NS", 0)  # no file here changes within the clock's tick any more
    vocode(cfg, cfg.layout.mel_dir)  # hashes read once more, now trusted
    stamps_module._open.clear()  # a new process: what it knows comes from the cache file
    reads = []
    real = stamps_module.sha256_file
    monkeypatch.setattr(stamps_module, "sha256_file", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    assert vocode(cfg, cfg.layout.mel_dir)["written"] == []
    assert reads == []
    wav = cfg.layout.vocode_dir / "LJ001-0008_syn.wav"
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns))  # a touch: the ctime moves, read again
    assert vocode(cfg, cfg.layout.mel_dir)["written"] == [] and [str(p) for p in reads] == [str(wav)]


def test_an_output_that_became_a_folder_is_named_not_a_traceback(preprocessed_run, tmp_path, capsys):
    cfg = preprocessed_run(tmp_path / "runs")
    infer(cfg)
    raw = cfg.layout.out_dir / "LJ001-0006_out.bin"
    raw.unlink()
    raw.mkdir()
    argv = ["infer", "--runs-dir", str(cfg.runs_dir), "--name", cfg.name, "--checkpoint", cfg.checkpoint,
            "--backend", "torch"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{raw}: it is not a regular file; made again" in err and f"{raw}: could not write (a folder" in err, err
    assert "Traceback" not in err


def test_infer_refuses_a_mel_changed_since_preprocess(preprocessed_run, tmp_path):
    """A mel edited in place (same size, its mtime put back) is not vocoded under the manifest's hash of
    another: infer names it and the stage that makes it again."""
    cfg = preprocessed_run(tmp_path / "runs")
    mel = cfg.layout.mel_dir / "LJ001-0002.bin"
    before = mel.stat()
    mel.write_bytes(mel.read_bytes()[::-1])
    put_back_mtime(mel, before)
    with pytest.raises(ManifestError, match=f"{mel}: its content differs from its record.*preprocess stage"):
        infer(cfg)
    assert not cfg.layout.out_dir.exists() or not list(cfg.layout.out_dir.glob("*_out.bin"))
    assert preprocess(cfg)["computed"] == 1
    assert sorted(infer(cfg)["written"]) == sorted(SHORT_IDS)


def test_a_model_edited_through_data_gets_a_new_fingerprint(tiny_model):
    """`p.data.copy_(...)` bumps no version counter: a memo keyed on them kept the old fingerprint, and the
    edited model's outputs were skipped as current."""
    from waveglow_lib.stamps import fingerprint_of

    model = tiny_model()
    before = fingerprint_of(model)
    weight = next(model.parameters())
    weight.data.copy_(weight.data + 1.0)
    assert fingerprint_of(model) == model_fingerprint(model) != before
