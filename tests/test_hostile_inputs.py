"""Files we did not write in this process — params, mels, sample counts, cached engines and verdicts, a
training state — are checked for kind (a regular file) and size before they are read, and what they
declare is checked before anything is allocated: each hostile one is one clear error naming the file (or,
in the engine cache, a rebuilt entry and a warning), never a traceback, a hang or an exhausted memory.

Reads that would run until memory is gone (a link to /dev/zero) are run in a child process under an
address-space limit, so that a regression fails the test instead of the machine.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from waveglow_lib import cli
from waveglow_lib.backends import get_backend
from waveglow_lib.backends.fast import cache as fast_cache
from waveglow_lib.convert import _quote_arg
from waveglow_lib.errors import ManifestError, MelError, TrainingError
from waveglow_lib.layout import load_manifest
from waveglow_lib.mel_input import list_mels, read_mel, save_mel
from waveglow_lib.stages import preprocess
from waveglow_lib.train import STATE_FORMAT, STATE_VERSION, read_train_state

from support import TINY, tiny_waveglow

REPO = Path(__file__).resolve().parents[1]
#: the child's address space: torch and the tiny model fit (about 1 GiB), reading /dev/zero to the end does not
CHILD_ADDRESS_SPACE = 3 * 2**30


def run_limited(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (tests/ on its path) under CHILD_ADDRESS_SPACE."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, env=env, cwd=REPO)


def one_mel(preprocessed_mels: Path) -> np.ndarray:
    first = sorted(preprocessed_mels.glob("*.bin"))[0]
    return read_mel(first)


# --- params files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_params_file_that_is_not_a_regular_file_is_refused_unread(tmp_path, kind):
    if kind == "device":
        params = "/dev/zero"
    else:
        params = str(tmp_path / "params.yaml")
        os.mkfifo(params)  # no writer: opening it for reading would wait for ever
    done = run_limited(f"""
        import sys
        from waveglow_lib.cli import main
        sys.exit(main(["run", "--params", {params!r}]))
    """, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {params}: not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_an_oversized_params_file_is_refused_with_its_size(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("# padding\n" * 200_000 + "limit: 1\n")  # 2 MB: no parameter file is this big
    assert cli.main(["preprocess", "--params", str(params), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"error: {params}: refused: {params.stat().st_size} bytes" in err and "params file" in err
    assert not (tmp_path / "runs").exists()


# --- the fast engine cache --------------------------------------------------------------------------------
def test_cache_files_linked_to_a_device_are_not_read(tmp_path):
    """A flow file and the auto verdict replaced by links to /dev/zero: each is refused without reading (the
    child's peak memory grows by no more than a rebuild's), the entry is rebuilt and the probe rerun."""
    done = run_limited(f"""
        import json, resource, warnings
        from pathlib import Path
        from support import TINY, tiny_waveglow
        from waveglow_lib.backends.fast import auto_engine
        from waveglow_lib.backends.fast.cache import EngineCache
        root = Path({str(tmp_path)!r})
        model = tiny_waveglow(TINY, seed=7)
        engine, _ = auto_engine(model, EngineCache(root), threads=1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        cache = EngineCache(root)
        flow = cache.engine_dir(model, engine.precision) / "flow01.safetensors"
        verdict = next((root / "fast").glob("probe-*.json"))
        for path in (flow, verdict):
            path.unlink()
            path.symlink_to("/dev/zero")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, record = auto_engine(model, cache, threads=1)
        print(json.dumps({{"events": cache.events, "cached": record["cached"],
                          "warnings": [str(w.message) for w in caught],
                          "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                          "peak_before_mib": before}}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # nothing was read from /dev/zero: the rebuild costs what the first build did, not gigabytes (measured
    # against the same process's own peak, which depends on the machine's libraries)
    assert result["peak_mib"] - result["peak_before_mib"] < 512, result
    assert result["cached"] is False  # the linked verdict is a miss: probed again
    assert any(e.startswith("rebuilt:") and "flow01.safetensors" in e and "not a regular file" in e
               for e in result["events"]), result
    assert any("flow01.safetensors" in w for w in result["warnings"]), result
    assert any("probe-" in w and "not a regular file" in w for w in result["warnings"]), result


def test_a_corrupt_cache_entry_is_rebuilt_with_a_warning(tmp_path):
    model = tiny_waveglow(TINY, seed=7)
    fast_cache.EngineCache(tmp_path).engine(model, "fp32", threads=1)
    flow = next((tmp_path / "fast").glob("engine-*")) / "flow02.safetensors"
    data = bytearray(flow.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: its sha256 no longer matches meta.json's
    flow.write_bytes(bytes(data))
    cache = fast_cache.EngineCache(tmp_path)
    with pytest.warns(RuntimeWarning, match="flow02.safetensors.*sha256"):
        cache.engine(model, "fp32", threads=1)
    assert cache.events[0].startswith("rebuilt:")


def test_a_forged_auto_verdict_is_not_used(tmp_path):
    """A verdict edited after it was stored (another precision, another reason) no longer matches the
    MAC stored with it: a miss, with a warning, and the probe decides again."""
    model = tiny_waveglow(TINY, seed=6)
    honest = get_backend("fast", model=model, precision="auto", threads=1, cache_dir=tmp_path)
    verdict = next((tmp_path / "fast").glob("probe-*.json"))
    stored = json.loads(verdict.read_text())
    assert stored["key"] and stored["record"]["precision"] == honest.precision
    stored["record"]["reason"] = "forged: int8 passed"
    stored["record"]["precision"] = "int8" if honest.precision != "int8" else "fp32"
    verdict.write_text(json.dumps(stored))
    with pytest.warns(RuntimeWarning, match=f"{verdict.name}.*not proven.*MAC"):
        again = get_backend("fast", model=model, precision="auto", threads=1, cache_dir=tmp_path)
    assert again.probe["cached"] is False and "forged" not in again.description
    assert again.precision == honest.precision
    # the re-probed verdict replaced the forged one, and is trusted again (said in the description)
    third = get_backend("fast", model=model, precision="auto", threads=1, cache_dir=tmp_path)
    assert third.probe["cached"] is True and "verdict cached" in third.description


# --- mels and their sample counts -------------------------------------------------------------------------
def _npy_declaring(path: Path, shape: tuple[int, ...], payload: bytes = b"\0" * 64) -> Path:
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
        handle.write(payload)
    return path


def test_an_npy_declaring_more_than_it_holds_is_refused_before_allocating(tmp_path):
    path = _npy_declaring(tmp_path / "huge.npy", (80, 10**12))  # 320 TB declared, 64 bytes there
    with pytest.raises(MelError, match=r"huge\.npy: its header declares shape \(80, 1000000000000\)"):
        read_mel(path)


def test_an_npy_with_trailing_bytes_is_refused(tmp_path, preprocessed_mels):
    path = tmp_path / "a.npy"
    save_mel(path, one_mel(preprocessed_mels))
    with open(path, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(MelError, match=r"a\.npy: .*8 bytes more"):
        read_mel(path)


@pytest.mark.parametrize("count", ["²", "1" * 5000, "١٢٣"])
def test_sample_counts_that_are_not_ascii_digits_are_refused(tmp_path, preprocessed_mels, count):
    source = sorted(preprocessed_mels.glob("*.bin"))[0]
    shutil.copy2(source, tmp_path / "u.bin")
    (tmp_path / "u.txt").write_text(count + "\n", encoding="utf-8")
    with pytest.raises(MelError, match=r"u\.txt: "):
        read_mel(tmp_path / "u.bin")


def test_a_sample_count_that_is_a_fifo_is_refused(tmp_path, preprocessed_mels):
    source = sorted(preprocessed_mels.glob("*.bin"))[0]
    shutil.copy2(source, tmp_path / "u.bin")
    os.mkfifo(tmp_path / "u.txt")  # skipped in silence before, and a hang had it been opened
    with pytest.raises(MelError, match=r"u\.txt: not a regular file \(a FIFO\)"):
        read_mel(tmp_path / "u.bin")


def _hostile_entry(folder: Path, kind: str) -> str:
    """Put one hostile entry with a mel suffix into `folder`; returns its name."""
    if kind == "newline":
        name = "x\n.npy"  # `$` in a pattern matches before a trailing newline
        shutil.copy2(folder / "good.npy", folder / name)
    elif kind == "fifo":
        name = "pipe.npy"
        os.mkfifo(folder / name)
    elif kind == "device":
        name = "dev.npy"
        (folder / name).symlink_to("/dev/zero")
    elif kind == "folder":
        name = "folder.npy"
        (folder / name).mkdir()
    else:
        raise AssertionError(kind)
    return name


@pytest.mark.parametrize("kind", ["newline", "fifo", "device", "folder"])
def test_mel_folder_entries_that_cannot_be_mels_are_refused_by_name(tmp_path, preprocessed_mels, kind):
    folder = tmp_path / "mels"
    folder.mkdir()
    save_mel(folder / "good.npy", one_mel(preprocessed_mels))
    name = _hostile_entry(folder, kind)
    with pytest.raises(MelError, match="(not a regular file|not usable as an utterance id)") as caught:
        list_mels(folder)
    assert repr(name) in str(caught.value) or name in str(caught.value)
    assert "\n" not in str(caught.value)  # one line, whatever the name holds


@pytest.mark.parametrize("kind", ["npy_header", "sample_count", "fifo"])
def test_vocode_prints_the_hostile_files_name(tmp_path, preprocessed_mels, tiny_checkpoint, capsys, kind):
    folder = tmp_path / "mels"
    folder.mkdir()
    save_mel(folder / "good.npy", one_mel(preprocessed_mels))
    if kind == "npy_header":
        bad = _npy_declaring(folder / "bad.npy", (80, 10**12))
    elif kind == "sample_count":
        bad = folder / "bad.txt"
        shutil.copy2(sorted(preprocessed_mels.glob("*.bin"))[0], folder / "bad.bin")
        bad.write_text("²\n", encoding="utf-8")
    else:
        bad = folder / "bad.npy"
        os.mkfifo(bad)
    code = cli.main(["vocode", "--mels", str(folder), "--runs-dir", str(tmp_path / "runs"), "--name", "v",
                     "--checkpoint", str(tiny_checkpoint), "--backend", "torch"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {bad}: " in err, err


# --- corpus entries ---------------------------------------------------------------------------------------
def test_corpus_entries_named_wav_that_are_not_files_are_skipped_saying_what_they_are(short_corpus, make_cfg,
                                                                                       tmp_path):
    """A folder, a FIFO (never opened: that would block), a device and a link to nothing, each named `*.wav`:
    skipped, the reason saying what the entry is; the real wavs are processed."""
    corpus = tmp_path / "corpus"
    shutil.copytree(short_corpus, corpus)
    wavs = corpus / "wavs"
    (wavs / "a_folder.wav").mkdir()
    os.mkfifo(wavs / "a_fifo.wav")
    (wavs / "a_device.wav").symlink_to("/dev/zero")
    (wavs / "a_dangling.wav").symlink_to(tmp_path / "gone.wav")
    result = preprocess(make_cfg(tmp_path / "runs", corpus=str(corpus), limit=0))
    reasons = {Path(entry["wav"]).name: entry["reason"] for entry in result["skipped"]}
    assert reasons == {"a_folder.wav": f"{wavs / 'a_folder.wav'}: a folder, not a WAV file (left unread)",
                       "a_fifo.wav": f"{wavs / 'a_fifo.wav'}: a FIFO, not a WAV file (left unread)",
                       "a_device.wav": f"{wavs / 'a_device.wav'}: a character device, not a WAV file (left unread)",
                       "a_dangling.wav": f"{wavs / 'a_dangling.wav'}: a symbolic link to a missing file"}
    assert result["items"] == len(list(short_corpus.glob("wavs/*.wav")))


# --- run folders ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "unmakeable"])
def test_a_runs_dir_that_cannot_hold_run_folders_is_named(tmp_path, capsys, kind):
    if kind == "file":
        runs = tmp_path / "runs"
        runs.write_text("a file, not a folder")
    else:
        runs = Path("/proc/waveglow-no-such-folder/runs")  # not even root can make folders here
    code = cli.main(["preprocess", "--runs-dir", str(runs), "--name", "r", "--set", "limit=1"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {runs / 'r'}: cannot create the run folder" in err, err


# --- the training state -----------------------------------------------------------------------------------
def _state(path: Path, **changes) -> Path:
    info = {"version": STATE_VERSION, "step": 3, "param_groups": [], "model_config": {}, "train_config": {},
            "history": []}
    info.update(changes)
    path.write_bytes(save_safetensors({"rng.data": torch.zeros(1)}, metadata={STATE_FORMAT: json.dumps(info)}))
    return path


@pytest.mark.parametrize("changes, problem", [
    ({"step": -3}, "step"), ({"step": True}, "step"), ({"step": "3"}, "step"),
    ({"history": {}}, "history"), ({"param_groups": None}, "param_groups"), ({"model_config": []}, "model_config"),
])
def test_a_training_state_with_impossible_values_is_refused(tmp_path, changes, problem):
    path = _state(tmp_path / "train_state.safetensors", **changes)
    with pytest.raises(TrainingError, match=f"train_state.safetensors: .*{problem}"):
        read_train_state(path)


def test_a_sane_training_state_still_reads(tmp_path):
    tensors, info = read_train_state(_state(tmp_path / "train_state.safetensors"))
    assert info["step"] == 3 and list(tensors) == ["rng.data"]


def test_a_training_state_that_is_a_folder_is_named(tmp_path):
    path = tmp_path / "train_state.safetensors"
    path.mkdir()
    with pytest.raises(TrainingError, match="train_state.safetensors: not a regular file"):
        read_train_state(path)


# --- manifests and the atc script -------------------------------------------------------------------------
def test_a_manifest_id_ending_in_a_newline_is_refused(preprocessed_run, tmp_path):
    cfg = preprocessed_run(tmp_path / "runs")
    path = cfg.run_dir / "mel" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["items"][0]["id"] += "\n"  # `$` in the id pattern matches before a final newline
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"utterance id '.*\\n' is not a plain file name"):
        load_manifest(cfg.run_dir / "mel")


@pytest.mark.parametrize("field", ["id", "bin"])
def test_a_manifest_naming_an_utterance_or_a_mel_twice_is_refused(preprocessed_run, tmp_path, field):
    """A hand-edited manifest listing one utterance (or one mel) twice was vocoded, skipped and postprocessed
    twice under one name while the other utterance was left out in silence (rc 0)."""
    cfg = preprocessed_run(tmp_path / "runs")
    path = cfg.run_dir / "mel" / "manifest.json"
    manifest = json.loads(path.read_text())
    first, second = manifest["items"][:2]
    second[field] = first[field]
    path.write_text(json.dumps(manifest))
    named = {"id": "utterance id", "bin": "mel file"}[field]
    with pytest.raises(ManifestError, match=rf"manifest\.json: two items name the {named} '{re.escape(first[field])}'"):
        load_manifest(cfg.run_dir / "mel")


def test_a_manifest_that_is_a_fifo_is_named_as_such(tmp_path):
    os.mkfifo(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not a regular file \(a FIFO\)"):
        load_manifest(tmp_path)


def test_a_script_argument_ending_in_a_newline_is_quoted():
    assert _quote_arg("--output=om/x\n") == '--output="om/x\n"'  # unquoted, the newline ends the command
    assert _quote_arg("om/x\n") == '"om/x\n"'
