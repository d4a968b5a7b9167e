"""Hostile and careless inputs against the stages, each answered by one clear error naming its file (or
handled), with nothing written outside the run folder and finished outputs left intact.

Classes (issue 10): run-folder confinement, stale artefacts, one writer per run folder, errors that name
their file (JSON, full disk, out of memory, 1-sample wav, NaN weights), read-only and killed runs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from support import SHORT_IDS
from waveglow_lib import cli
from waveglow_lib.checkpoint import model_fingerprint, save_waveglow
from waveglow_lib.errors import (DataError, ManifestError, MelError, ResourceError, RunFolderError,
                                 SynthesisError)
from waveglow_lib.export import export_onnx
from waveglow_lib.io import atomic_write_bytes, read_json
from waveglow_lib.jobs import check_model_file
from waveglow_lib.layout import corpus_wav, load_manifest
from waveglow_lib.runlock import LOCK_NAME, read_holder, run_folder_lock
from waveglow_lib.stages import export, infer, postprocess, preprocess
from waveglow_lib.stages.convert import convert

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path, exclude: Path | None = None) -> dict[str, int]:
    """Every file under `folder` (but not under `exclude`) with its mtime: what a stage must not touch."""
    found = {}
    for path in folder.rglob("*"):
        if exclude is not None and path.is_relative_to(exclude):
            continue
        if path.is_file() or path.is_symlink():
            found[str(path.relative_to(folder))] = path.lstat().st_mtime_ns
    return found


def edit_manifest(cfg, change) -> Path:
    path = cfg.run_dir / "mel" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


# --- 2. confinement --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", ["../../../escaped", "/tmp/abs", "a/b", "..", ".hidden", "x\ny", 7])
def test_traversal_ids_are_refused_before_anything_is_written(preprocessed_run, tmp_path, bad_id):
    cfg = preprocessed_run(tmp_path / "runs")
    manifest = edit_manifest(cfg, lambda m: m["items"][0].update(id=bad_id))
    before = snapshot(tmp_path, exclude=cfg.run_dir)
    for stage in (infer, postprocess):
        with pytest.raises(ManifestError, match=f"{manifest}: utterance id") as caught:
            stage(cfg)
        assert caught.value.path == manifest
    assert snapshot(tmp_path, exclude=cfg.run_dir) == before
    assert not (cfg.run_dir / "out").exists() and not (cfg.run_dir / "wav").exists()


def test_mel_files_outside_the_mel_folder_are_not_read(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    outside = tmp_path / "secret.bin"
    shutil.copy2(cfg.run_dir / "mel" / f"{SHORT_IDS[0]}.bin", outside)
    manifest = edit_manifest(cfg, lambda m: m["items"][0].update(bin=str(outside)))
    with pytest.raises(ManifestError, match=f"{manifest}: item .* outside the mel folder"):
        infer(cfg)
    # a link inside mel/ pointing out of it: refused the same way
    edit_manifest(cfg, lambda m: m["items"][0].update(bin=f"{SHORT_IDS[0]}.bin"))
    link = cfg.run_dir / "mel" / f"{SHORT_IDS[0]}.bin"
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(ManifestError, match="outside the mel folder"):
        infer(cfg)
    assert not (cfg.run_dir / "out").exists()


@pytest.mark.parametrize("folder", ["out", "wav"])
def test_output_folders_linked_out_of_the_run_folder_are_refused(preprocessed_run, tmp_path, folder):
    cfg = preprocessed_run(tmp_path / "runs")
    if folder == "wav":  # postprocess needs infer's outputs first
        infer(cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cfg.run_dir / folder).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RunFolderError, match=f"{cfg.run_dir / folder}: .*outside {cfg.run_dir}"):
        (infer if folder == "out" else postprocess)(cfg)
    assert list(elsewhere.iterdir()) == []


def test_links_to_files_outside_are_neither_read_nor_written_through(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    infer(cfg)
    victim = tmp_path / "victim.bin"
    out = cfg.run_dir / "out" / f"{SHORT_IDS[0]}_out.bin"
    victim.write_bytes(out.read_bytes())
    out.unlink()
    out.symlink_to(victim)
    with pytest.raises(RunFolderError, match=f"{out}: an infer output resolves to {victim}, outside"):
        postprocess(cfg)
    before = victim.read_bytes()
    assert infer(cfg)["written"] == [SHORT_IDS[0]]  # a link is not a finished output: replaced by the file
    assert not out.is_symlink() and victim.read_bytes() == before


def test_an_out_dir_the_user_names_may_lie_anywhere(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    chosen = tmp_path / "chosen_out"
    result = infer(cfg, out_dir=chosen)
    assert sorted(result["written"]) == sorted(SHORT_IDS)
    assert sorted(p.name for p in chosen.glob("*_out.bin")) == sorted(f"{u}_out.bin" for u in SHORT_IDS)


def test_manifest_wav_paths_must_name_corpus_files(short_corpus, tmp_path):
    assert corpus_wav(short_corpus, short_corpus / "wavs" / "LJ001-0002.wav").name == "LJ001-0002.wav"
    for bad in ("/etc/passwd", short_corpus / "wavs" / ".." / ".." / "x.wav", tmp_path / "x.wav"):
        with pytest.raises(RunFolderError, match="outside the corpus folder"):
            corpus_wav(short_corpus, bad)


def test_a_planted_lock_link_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "victim.txt"
    target.write_text("keep")
    (run / LOCK_NAME).symlink_to(target)
    with pytest.raises(RunFolderError, match="symbolic link"):
        with run_folder_lock(run):
            pass
    assert target.read_text() == "keep"


@pytest.mark.parametrize("started", ["yesterday", [1], {"t": 1}, 1e300, True, None])
def test_a_lock_record_of_the_wrong_shape_still_names_its_holder(started):
    """The lock file is text anyone in the folder can write: a start time of the wrong type or out of the
    clock's range is shown as unknown, never a traceback in place of 'in use by ...'."""
    from waveglow_lib.runlock import _describe

    said = _describe({"pid": 7, "host": "h", "started": started, "command": "run"})
    assert said == "pid 7 on h since ? (command: run)"


def test_wav_names_that_cannot_be_ids_are_skipped(make_cfg, short_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(short_corpus, corpus)
    shutil.copy2(corpus / "wavs" / "LJ001-0002.wav", corpus / "wavs" / "bad name.wav")
    result = preprocess(make_cfg(tmp_path / "runs", corpus=str(corpus), limit=0))
    assert result["items"] == len(SHORT_IDS)
    assert [s["reason"] for s in result["skipped"]] == [
        f"{corpus / 'wavs' / 'bad name.wav'}: the name 'bad name' cannot be an utterance id "
        "(letters, digits, _ . - + # @)"]


# --- 3. stale artefacts ----------------------------------------------------------------------------
@pytest.fixture
def other_model_run(preprocessed_run, tiny_model, tmp_path):
    """A run of the seed-0 checkpoint whose onnx/ holds an export of another model (seed 1)."""
    cfg = preprocessed_run(tmp_path / "runs", backend="onnxruntime")
    export_onnx(tiny_model(seed=1), cfg.run_dir / "onnx" / "waveglow.onnx")
    return cfg


def test_infer_refuses_an_onnx_of_another_model(other_model_run, tiny_model):
    cfg = other_model_run
    onnx = cfg.run_dir / "onnx" / "waveglow.onnx"
    other = model_fingerprint(tiny_model(seed=1))
    with pytest.raises(RunFolderError, match=f"{onnx}: made from another model \\(fingerprint {other}\\)"
                                             ".*run the export stage again"):
        infer(cfg)
    assert not (cfg.run_dir / "out").exists()  # nothing vocoded, no timings.json claiming the checkpoint
    assert cli.main(["infer", "--name", "t", "--runs-dir", str(cfg.runs_dir), "--checkpoint", cfg.checkpoint,
                     "--backend", "onnxruntime"]) == 2


def test_export_redoes_a_stale_onnx_and_infer_then_runs(other_model_run, tiny_model):
    cfg = other_model_run
    result = export(cfg)["noise_input"]
    assert result["status"] == "exported"
    assert result["model_fingerprint"] == model_fingerprint(tiny_model(seed=0))
    assert sorted(infer(cfg)["written"]) == sorted(SHORT_IDS)
    assert export(cfg)["noise_input"]["status"] == "skipped (up to date)"
    assert "re-exported: opset" in export(cfg.with_overrides(opset=cfg.opset - 1))["noise_input"]["reason"]


def test_an_onnx_without_a_model_record_is_refused(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs", backend="onnxruntime", with_onnx=True)
    record = cfg.run_dir / "onnx" / "waveglow.json"
    info = json.loads(record.read_text())
    info.pop("model_fingerprint")
    record.write_text(json.dumps(info))
    with pytest.raises(RunFolderError, match="no record of the model it was made from; run the export stage"):
        infer(cfg)


def test_converted_graphs_follow_their_onnx(other_model_run, tiny_model):
    cfg = other_model_run
    optimized = cfg.run_dir / "onnx" / "waveglow_optimized.onnx"
    with pytest.raises(RunFolderError, match="exported from another model.*run the export stage"):
        convert(cfg, targets=("onnxruntime",))
    export(cfg)
    assert convert(cfg, targets=("onnxruntime",))["onnxruntime"]["status"] == "converted"
    assert convert(cfg, targets=("onnxruntime",))["onnxruntime"]["status"].startswith("skipped")
    # an optimised graph whose record names another model: infer refuses it, convert redoes it
    record = optimized.with_suffix(".json")
    record.write_text(json.dumps({"source": {"model": "0" * 16, "opset": 17, "variant": "noise_input"}}))
    with pytest.raises(RunFolderError, match=f"{optimized}: made from another model.*run the convert stage"):
        infer(cfg)
    again = convert(cfg, targets=("onnxruntime",))["onnxruntime"]
    assert again["status"] == "converted" and "model" in again["reason"]
    assert sorted(infer(cfg)["written"]) == sorted(SHORT_IDS)


def test_om_of_another_model_is_refused(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs", backend="om", with_onnx=True)
    om = cfg.run_dir / "om" / "waveglow.om"
    om.parent.mkdir()
    om.write_bytes(b"om")
    gears = om.with_name("waveglow.gears.json")
    gears.write_text(json.dumps({"batch": 1, "mel_lengths": [128], "source": {"model": "f" * 16}}))
    with pytest.raises(RunFolderError, match=f"{om}: made from another model \\(fingerprint f{{16}}\\)"):
        check_model_file(cfg, om)


def test_mels_of_other_stft_settings_are_refused(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    manifest = edit_manifest(cfg, lambda m: m["settings"]["stft"].update(mel_fmax=11025.0))
    with pytest.raises(MelError, match=f"{manifest}: the mels were made with other STFT settings.*mel_fmax: "
                                       "11025.0 vs 8000.0.*preprocess"):
        infer(cfg)


def test_fingerprint_is_cached_beside_the_run(make_cfg, tiny_checkpoint, tmp_path, tiny_model):
    from waveglow_lib.stamps import CACHE_NAME, model_stamp

    cfg = make_cfg(tmp_path / "runs")
    assert model_stamp(cfg) == model_fingerprint(tiny_model(seed=0))
    cache = json.loads((cfg.run_dir / CACHE_NAME).read_text())
    (entry,) = cache.values()
    assert entry["fingerprint"] == model_fingerprint(tiny_model(seed=0))
    # a different file at the same path (new size / mtime) is fingerprinted anew
    other = tmp_path / "other.safetensors"
    save_waveglow(tiny_model(seed=1), other)
    assert model_stamp(cfg.with_overrides(checkpoint=str(other))) == model_fingerprint(tiny_model(seed=1))


# --- 5. one writer ---------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from waveglow_lib.runlock import run_folder_lock
    with run_folder_lock(sys.argv[1], command="infer --sigma 0.8 (the other writer)"):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_second_writer_is_refused_with_the_holder_named(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cfg.run_dir)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        for stage in (preprocess, infer, postprocess):
            with pytest.raises(RunFolderError, match=f"{cfg.run_dir}: run folder is in use by pid {holder.pid} "
                                                     r".*\(command: infer --sigma 0.8 \(the other writer\)\)"):
                stage(cfg)
        assert not (cfg.run_dir / "out").exists()
        code = cli.main(["infer", "--name", "t", "--runs-dir", str(cfg.runs_dir), "--checkpoint", cfg.checkpoint])
        assert code == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # killed: its lock file stays, names a dead pid, and is taken over
    assert read_holder(cfg.run_dir)["pid"] == holder.pid
    with run_folder_lock(cfg.run_dir) as info:
        assert info["took_over"] == {"pid": holder.pid, "host": info["host"],
                                     "command": "infer --sigma 0.8 (the other writer)", "alive": False}
        assert sorted(infer(cfg)["written"]) == sorted(SHORT_IDS)  # re-entrant in one process
    assert not (cfg.run_dir / LOCK_NAME).exists()  # released


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from waveglow_lib.io import atomic_stream
    from waveglow_lib.runlock import run_folder_lock
    with run_folder_lock(sys.argv[1], command="vocode (the killed writer)"):
        with atomic_stream(Path(sys.argv[1]) / "vocode" / "long_syn.wav") as out:
            out.write(b"RIFF" + bytes(1000))
            out.flush()
            print("writing", flush=True)
            time.sleep(120)
""")


def test_a_killed_writers_temp_files_are_removed_when_its_lock_is_taken_over(tmp_path, capsys):
    """kill -9 during a long vocode left `.<id>_syn.wav.<token>.<random>.tmp` (as large as the audio so far) in
    the run folder for good: the next writer, which takes the dead holder's lock, removes exactly it: the
    files a user keeps in the run folder that merely look like temp files are never touched (issue 38)."""
    run_dir = tmp_path / "runs" / "t"
    (run_dir / "vocode").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "writing"
        token = read_holder(run_dir)["token"]
        (left,) = (run_dir / "vocode").glob(".long_syn.wav.*.tmp")
        assert f".{token}." in left.name  # the writer's temp name carries its lock's token
        (run_dir / "mynotes").mkdir()
        mine = [run_dir / "notes.tmp", run_dir / "mynotes" / ".draft.abcd1234.tmp", run_dir / ".plan.zzzz9999.tmp",
                run_dir / "vocode" / ".other.wav.abcd1234.tmp",  # another (older) writer's name: not this holder's
                run_dir / "mynotes" / f".x.wav.{token}.abcdefgh.tmp"]  # its token, but in a folder the user made
        for path in mine:
            path.write_text("mine")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_folder_lock(run_dir) as info:
        assert "took_over" in info
        assert not left.exists()
        assert [path.read_text() for path in mine] == ["mine"] * len(mine)
    assert f"removed 1 half-written file(s) a killed run left (e.g. {left.name})" in capsys.readouterr().err


def test_a_child_of_the_holder_may_write(tmp_path):
    """`run` holds the lock while its notebook kernels (child processes) run the stages."""
    child = ("import sys; from waveglow_lib.runlock import run_folder_lock\n"
             "with run_folder_lock(sys.argv[1]): print('ok')")
    with run_folder_lock(tmp_path / "run"):
        out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "run")], capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.stdout.strip() == "ok", out.stderr
        stranger = {k: v for k, v in os.environ.items() if k != "WAVEGLOW_RUN_LOCKS"}
        out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "run")], capture_output=True, text=True,
                             cwd=REPO, env={**stranger, "PYTHONPATH": str(REPO)})
        assert "run folder is in use by pid" in out.stderr


# --- 6/7. errors that name their file --------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON at line 1 column 2"), ("[1, 2]", "holds a JSON array"), ("\xff\xfe", None)])
def test_read_json_names_the_file_and_what_was_expected(tmp_path, text, expected):
    path = tmp_path / "timings.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=f"{path}: .*expected the timings") as caught:
        read_json(path, "the timings")
    assert caught.value.path == path
    if expected:
        assert expected in str(caught.value)


def test_a_corrupt_timings_file_is_named(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    infer(cfg)
    timings = cfg.run_dir / "out" / "timings.json"
    timings.write_text('{"settings": ')
    with pytest.raises(DataError, match=f"{timings}: not valid JSON.*infer stage's settings.*--force"):
        infer(cfg)
    assert sorted(infer(cfg, force=True)["written"]) == sorted(SHORT_IDS)


def test_corrupt_records_of_export_and_convert_are_named(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs", with_onnx=True)
    record = cfg.run_dir / "onnx" / "waveglow.json"
    record.write_text("{")
    with pytest.raises(DataError, match=f"{record}: not valid JSON.*export record"):
        convert(cfg, targets=("onnxruntime",))
    assert f"{record}: not valid JSON" in export(cfg)["noise_input"]["reason"]  # export rebuilds its own


def test_one_sample_wav_is_skipped_not_fatal(make_cfg, short_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(short_corpus, corpus)
    wavfile.write(corpus / "wavs" / "LJ001-0001.wav", 22050, np.array([1000], dtype=np.int16))
    result = preprocess(make_cfg(tmp_path / "runs", corpus=str(corpus), limit=0))
    assert result["items"] == len(SHORT_IDS)
    (skipped,) = result["skipped"]
    assert skipped["reason"].startswith(f"{corpus / 'wavs' / 'LJ001-0001.wav'}: 1 sample(s) is too short")


def test_nan_weights_are_blamed_on_the_checkpoint(preprocessed_run, tiny_model, tmp_path):
    import torch

    model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    cfg = preprocessed_run(tmp_path / "runs")
    with pytest.raises(SynthesisError, match=f"NaN/Inf audio from a finite mel; check the checkpoint "
                                             f"{cfg.checkpoint} .*precision"):
        infer(cfg, model=model)


def test_non_positive_sample_counts_are_refused(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    for bad in (-5, 0, 1.5, True):
        manifest = edit_manifest(cfg, lambda m: m["items"][1].update(samples=bad))
        with pytest.raises(ManifestError, match=f"{manifest}: item .*samples must be a positive integer"):
            load_manifest(cfg.run_dir / "mel")


def test_out_of_memory_while_writing_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "x_out.bin"
    atomic_write_bytes(path, b"old")

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(os, "fsync", no_memory)
    with pytest.raises(ResourceError, match=f"{path}: could not write \\(out of memory\\)"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and sorted(p.name for p in path.parent.iterdir()) == ["x_out.bin"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 450 KiB tmpfs (root only): a disk that fills up after two of the three outputs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a full disk) needs root; run the suite as root to test ENOSPC")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_names_the_file_and_keeps_finished_outputs(preprocessed_run, tmp_path, small_tmpfs):
    cfg = preprocessed_run(tmp_path / "runs")
    out = small_tmpfs / "out"
    with pytest.raises(ResourceError, match=f"{out}/.*: could not write \\(no space left on device\\); "
                                            "nothing was changed") as caught:
        infer(cfg, out_dir=out)
    assert caught.value.path.parent == out
    finished = {p.name: p.read_bytes() for p in out.glob("*_out.bin")}
    assert finished, "the first outputs fit: they must be kept"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written temp files
    # a bigger disk: the rerun resumes and leaves the finished outputs byte-identical
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    result = infer(cfg, out_dir=out)
    assert sorted(result["skipped"]) == sorted(name.removesuffix("_out.bin") for name in finished)
    assert all((out / name).read_bytes() == data for name, data in finished.items())


# --- read-only and killed runs ---------------------------------------------------------------------
def test_preprocess_on_a_finished_read_only_run(make_cfg, short_corpus, tmp_path):
    cfg = make_cfg(tmp_path / "runs", corpus=str(short_corpus), limit=0)
    preprocess(cfg)
    before = snapshot(cfg.run_dir)
    if os.geteuid() == 0:  # root writes through file modes: make the folder truly read-only
        done = subprocess.run(["mount", "--bind", "-o", "ro", str(cfg.run_dir), str(cfg.run_dir)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount read-only here: {done.stderr.strip()}")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cfg.run_dir)], check=False)
        release = ["umount", str(cfg.run_dir)]
    else:
        for path in [cfg.run_dir, *cfg.run_dir.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        release = None
    try:
        with pytest.raises(OSError):  # really read-only
            (cfg.run_dir / "probe").write_text("x")
        result = preprocess(cfg)
        assert result["reused"] == len(SHORT_IDS) and result["computed"] == 0
        assert snapshot(cfg.run_dir) == before
    finally:
        if release:
            subprocess.run(release, check=False)
        else:
            for path in [cfg.run_dir, *cfg.run_dir.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import waveglow_lib.stages.preprocess
    stage = sys.modules["waveglow_lib.stages.preprocess"]  # the package's `preprocess` is the function
    from waveglow_lib.config import WorkflowConfig
    real, calls = stage._write_mel, []  # one wav's mel, computed and written
    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 would, mid-batch
        return real(*args, **kwargs)
    stage._write_mel = dies_on_the_third
    stage.preprocess(WorkflowConfig(name="t", runs_dir=sys.argv[1], checkpoint=sys.argv[2], corpus=sys.argv[3],
                                    limit=0, backend="torch"))
""")


def test_a_killed_preprocess_resumes(make_cfg, tiny_checkpoint, tmp_path):
    from waveglow_lib.config import DEMO_CORPUS_DIR

    runs = tmp_path / "runs"
    killed = subprocess.run([sys.executable, "-c", KILLER, str(runs), str(tiny_checkpoint), str(DEMO_CORPUS_DIR)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    mel = runs / "t" / "mel"
    done = sorted(p.stem for p in mel.glob("*.bin"))
    assert len(done) == 2 and not (mel / "manifest.json").exists()  # killed before any manifest
    stamps = {name: (mel / f"{name}.bin").stat().st_mtime_ns for name in done}
    result = preprocess(make_cfg(runs, corpus=str(DEMO_CORPUS_DIR), limit=0))
    assert result["reused"] == 2 and result["computed"] == result["items"] - 2
    assert {name: (mel / f"{name}.bin").stat().st_mtime_ns for name in done} == stamps  # not recomputed
    assert [item["id"] for item in load_manifest(mel)["items"]][:2] == done
    assert not (mel / ".preprocess.jsonl").exists()
