"""Trust, round 5 (issue 38): a run folder no other user can block or empty, file stamps that cannot be
rewritten beside the file, a Ray start that leaks nothing, a corpus with no usable audio refused by train,
and refusals that give the right advice.

The tests that need another user run a process as uid 4242 with `setpriv` (root only; skipped otherwise).
"""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from waveglow_lib.errors import RunFolderError
from waveglow_lib.runlock import LOCK_NAME, read_holder, run_folder_lock

REPO = Path(__file__).resolve().parents[1]
STRANGER = 4242
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="runs a process as another user (setpriv, as root)")


def as_stranger(code: str, *args: str) -> subprocess.Popen:
    """`python -c code args` as uid/gid 4242 (no other groups), printing its first line when ready."""
    command = ["setpriv", f"--reuid={STRANGER}", f"--regid={STRANGER}", "--clear-groups",
               sys.executable, "-c", code, *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    return process


def open_folder(path: Path) -> Path:
    """A folder others may read and enter (as run folders usually are: mode 0755 under umask 022)."""
    path.mkdir(parents=True, exist_ok=True)
    for part in [path, *path.parents]:
        if part == Path("/"):
            break
        part.chmod(part.stat().st_mode | 0o005)
    return path


# a reader of the lock file (no write access) holding LOCK_EX on it: Linux allows flock on an O_RDONLY fd
GRAB = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("held", flush=True)
    time.sleep(120)
""")


# --- 1. the lock: nobody else can take it ----------------------------------------------------------
def test_the_lock_file_is_private_and_a_wider_one_is_narrowed(tmp_path):
    run = tmp_path / "run"
    with run_folder_lock(run):
        assert stat.S_IMODE((run / LOCK_NAME).stat().st_mode) == 0o600
    # a lock file an older version left readable (0644, its holder killed) is made 0600 before it is locked
    (run / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "h", "command": "old"}))
    (run / LOCK_NAME).chmod(0o644)
    with run_folder_lock(run) as info:
        assert stat.S_IMODE((run / LOCK_NAME).stat().st_mode) == 0o600
        assert info["took_over"]["pid"] == 999999


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o757])
def test_a_run_folder_every_user_may_write_to_is_refused(tmp_path, mode):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(mode)
    with pytest.raises(RunFolderError, match=rf"{run}: every user may write to this run folder \(mode "
                                             rf"{mode:04o}\).*chmod o-w {run}"):
        with run_folder_lock(run):
            pass
    assert not (run / LOCK_NAME).exists()


@needs_root
def test_another_user_holding_a_readable_lock_file_cannot_block_its_owner(tmp_path, capsys):
    """The DoS of issue 38: a run killed by an older version left `.lock` (0644) naming a dead pid; another
    user opened it read-only and holds LOCK_EX. The owner's next command replaces it (saying who held it)
    rather than being refused "in use by pid <dead> ... wait for it to finish" for as long as they like."""
    run = open_folder(tmp_path / "runs" / "f1")
    lock = run / LOCK_NAME
    lock.write_text(json.dumps({"pid": 999999, "host": os.uname().nodename, "command": "infer", "token": "0" * 16}))
    lock.chmod(0o644)
    stranger = as_stranger(GRAB, str(lock))
    try:
        assert stranger.stdout.readline().strip() == "held", stranger.stderr.read()
        with run_folder_lock(run, command="mine") as info:
            assert read_holder(run)["command"] == "mine" and info["pid"] == os.getpid()
            assert stat.S_IMODE(lock.stat().st_mode) == 0o600 and lock.stat().st_uid == os.geteuid()
        err = capsys.readouterr().err
        assert f"was held by pid {stranger.pid} of user uid {STRANGER}, not by a run of yours" in err
        # and it cannot open the new one at all
        again = as_stranger(GRAB, str(lock))
        lock.touch()
        with run_folder_lock(run):
            _, err = again.communicate(timeout=60)
            assert again.returncode != 0 and "Permission denied" in err
    finally:
        stranger.kill()
        stranger.wait()


@needs_root
def test_a_lock_file_another_user_made_is_theirs_while_held_and_replaced_when_not(tmp_path, capsys):
    run = open_folder(tmp_path / "runs" / "shared")
    lock = run / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "forged"}))
    os.chown(lock, STRANGER, STRANGER)
    lock.chmod(0o644)
    stranger = as_stranger(GRAB, str(lock))
    try:
        assert stranger.stdout.readline().strip() == "held", stranger.stderr.read()
        with pytest.raises(RunFolderError, match=rf"{run}: run folder is in use by user uid {STRANGER} "
                                                 rf"\(pid {stranger.pid}: "):
            with run_folder_lock(run):
                pass
    finally:
        stranger.kill()
        stranger.wait()
    with run_folder_lock(run) as info:  # nobody holds it now: removed, and ours made
        assert lock.stat().st_uid == os.geteuid() and "took_over" not in info
    assert f"removed a lock file of user uid {STRANGER} that no process held" in capsys.readouterr().err


FORKING_HOLDER = textwrap.dedent("""
    import os, sys, time
    from waveglow_lib.runlock import run_folder_lock
    with run_folder_lock(sys.argv[1], command="infer (the parent)"):
        child = os.fork()  # without exec: the child inherits the locked descriptor
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
        time.sleep(120)
""")


def test_a_dead_holder_is_named_dead_and_the_live_process_holding_its_lock_is_named(tmp_path):
    """The record names pid P; P was killed but a process it forked still holds the flock: the refusal says
    that P is no longer running and names the process that holds the lock, not "wait for pid P"."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env=ENV)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        with pytest.raises(RunFolderError) as refused:
            with run_folder_lock(run):
                pass
        said = str(refused.value)
        assert f"its recorded holder, pid {holder.pid} " in said and "is no longer running" in said
        assert f"the lock is held by pid {child} of user " in said and "end those processes" in said
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the child is reaped by init; then the lock is free and taken over
        try:
            with run_folder_lock(run) as info:
                assert info["took_over"]["pid"] == holder.pid
            break
        except RunFolderError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


SLOW_RUN_ALL = textwrap.dedent("""
    import sys, time
    import waveglow_lib.stages as stages
    from waveglow_lib import cli
    from waveglow_lib.io import atomic_stream

    def slow_preprocess(cfg, **kwargs):  # a long first stage, half-way through writing an output
        with atomic_stream(cfg.run_dir / "mel" / "LJ001-0001.bin") as out:
            out.write(bytes(4096))
            out.flush()
            print("writing", flush=True)
            time.sleep(120)

    stages.preprocess = slow_preprocess  # run_all calls its package's name
    sys.exit(cli.main(["run-all", "--runs-dir", sys.argv[1], "--name", "t", "--checkpoint", sys.argv[2]]))
""")


def test_sigterm_of_run_all_releases_the_lock_and_removes_temp_files(tmp_path, tiny_checkpoint):
    """`run-all` under SIGTERM exited 143 leaving `.lock` and the half-written output's temp file: now it
    unwinds as Ctrl-C does (issue 38)."""
    runs = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN_ALL, str(runs), str(tiny_checkpoint)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    assert process.stdout.readline().strip() == "writing"
    assert (runs / "t" / LOCK_NAME).exists() and list((runs / "t" / "mel").glob(".*.tmp"))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "terminated (SIGTERM); finished outputs are kept, re-run to continue" in err
    assert not (runs / "t" / LOCK_NAME).exists()
    assert not list((runs / "t" / "mel").iterdir())


# --- 3. the file stamps prove their entries ----------------------------------------------------------
def forge_entry(cache_file: Path, path: Path, sha256: str) -> None:
    """What issue 38's attacker did: the entry of `path` given the file's new stat and the old sha256
    (a `checked_ns` long past, so the racy-clean rule does not catch it)."""
    from waveglow_lib.stamps import _stat_key

    cache = json.loads(cache_file.read_text())
    name = str(path.resolve())
    entry = dict(cache[name])
    entry.update(stat=_stat_key(path.stat()), checked_ns=path.stat().st_ctime_ns + 10**12, sha256=sha256)
    cache[name] = entry
    cache_file.write_text(json.dumps(cache))


def test_a_forged_file_stamp_does_not_hide_a_swapped_output(preprocessed_run, tmp_path, monkeypatch):
    """Swap an output and rewrite its `.file_stamps.json` entry (new stat, old sha256): the rerun used to
    skip it and keep the wrong audio; the entry's MAC (this user's secret) no longer matches, the content
    is hashed, and the output is made again."""
    import waveglow_lib.stamps as stamps_module
    from waveglow_lib.stages import vocode
    from waveglow_lib.stamps import CACHE_NAME

    cfg = preprocessed_run(tmp_path / "runs")
    monkeypatch.setattr(stamps_module, "RACY_NS", 0)
    vocode(cfg, cfg.layout.mel_dir)
    vocode(cfg, cfg.layout.mel_dir)  # the hashes kept, trusted from now on
    wav = cfg.layout.vocode_dir / "LJ001-0002_syn.wav"
    good = wav.read_bytes()
    old_sha = json.loads((cfg.run_dir / CACHE_NAME).read_text())[str(wav.resolve())]["sha256"]
    wav.write_bytes(good[:44] + bytes(len(good) - 44))  # silence, the same size
    forge_entry(cfg.run_dir / CACHE_NAME, wav, old_sha)
    stamps_module._open.clear()  # a new process: what it knows comes from the cache file
    again = vocode(cfg, cfg.layout.mel_dir)
    assert again["written"] == ["LJ001-0002"] and "content differs" in again["redone"]["LJ001-0002"]
    assert wav.read_bytes() == good


def test_file_stamps_are_proven_with_the_users_secret_and_nothing_is_cached_without_one(tmp_path, monkeypatch):
    import waveglow_lib.stamps as stamps_module
    from waveglow_lib.io import sha256_file
    from waveglow_lib.userkey import SECRET_NAME

    monkeypatch.setattr(stamps_module, "RACY_NS", 0)
    data = tmp_path / "data.bin"
    data.write_bytes(b"a" * 100)
    cache = tmp_path / "stamps.json"
    stamps = stamps_module.FileStamps(cache)
    truth = sha256_file(data)
    assert stamps.sha256(data) == truth
    stamps.save()
    entry = json.loads(cache.read_text())[str(data.resolve())]
    assert len(entry["mac"]) == 64
    # an entry copied from a run made with another secret (another user's, another machine's) is not trusted
    monkeypatch.setattr(stamps_module, "_secret", [b"k" * 32])
    data.write_bytes(b"b" * 100)
    forge_entry(cache, data, truth)
    assert stamps_module.FileStamps(cache).sha256(data) == sha256_file(data) != truth
    # no secret can be kept (a read-only home, a refused key): every check reads the content
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    (key_dir / SECRET_NAME).write_bytes(b"x" * 32)
    (key_dir / SECRET_NAME).chmod(0o644)  # readable by others: refused
    monkeypatch.setenv("WAVEGLOW_CACHE_DIR", str(key_dir))
    monkeypatch.setattr(stamps_module, "_secret", [])
    reads = []
    monkeypatch.setattr(stamps_module, "sha256_file", lambda *a, **k: reads.append(1) or sha256_file(*a, **k))
    fresh = stamps_module.FileStamps(tmp_path / "other.json")
    assert fresh.sha256(data) == fresh.sha256(data) == sha256_file(data) and len(reads) == 2
    assert stamps_module._secret == [None]


# --- 4. a Ray start that failed leaves nothing running ------------------------------------------------
def test_a_ray_start_that_timed_out_is_stopped_before_the_next_try():
    """Contract test (Ray's start mocked by real processes): each attempt starts a "head" (a process with a
    child of its own, as the GCS and raylet have workers) and times out the way Ray does; before the next
    try the attempt's processes are ended and `stop` (ray.shutdown) is called; the start that works keeps its."""
    pytest.importorskip("ray")
    import psutil

    from waveglow_lib.engines.ray import with_startup_retries

    heads, stops, workers = [], [], []

    def start():
        head = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        workers.append(int(head.stdout.readline()))
        heads.append(head)
        if len(heads) < 3:
            raise Exception("The current node timed out during startup.")  # noqa: TRY002 (what Ray raises)
        return head

    try:
        kept = with_startup_retries(start, stop=lambda: stops.append(len(heads)))
        assert kept is heads[2] and stops == [1, 2]
        for failed in heads[:2]:
            assert failed.wait(timeout=10) is not None  # ended (and reaped here)
        mine = psutil.Process().children(recursive=True)
        assert {p.pid for p in mine} >= {heads[2].pid} and all(p.pid not in (h.pid for h in heads[:2]) for p in mine)
        assert not any(psutil.pid_exists(pid) for pid in workers[:2])  # the failed heads' own children too
        assert psutil.pid_exists(workers[2])
    finally:
        for head in heads:
            for child in psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []:
                child.kill()
            head.kill()
            head.wait()
    # the last failure is raised, after its processes are ended too
    heads.clear()
    with pytest.raises(Exception, match="timed out during startup"):
        with_startup_retries(lambda: start() if len(heads) < 1 else None, tries=1)
    assert heads[0].wait(timeout=10) is not None


# --- 5. no usable audio: train refuses it, by preprocess's rule --------------------------------------
def write_wavs(folder: Path, signals: dict) -> Path:
    import numpy as np
    import soundfile

    (folder / "wavs").mkdir(parents=True)
    for name, samples in signals.items():
        subtype = "FLOAT" if np.asarray(samples).dtype == np.float32 else "PCM_16"
        soundfile.write(folder / "wavs" / f"{name}.wav", samples, 22050, subtype=subtype)
    return folder


@pytest.mark.parametrize("kind", ["silent", "huge"])
def test_train_refuses_a_corpus_with_no_usable_audio(tmp_path, kind, capsys):
    """An all-silent corpus trained on zeros and exited 0; 1e30-valued floats were clipped into square waves.
    Both are refused before a step is taken, naming the files, with preprocess's rule (`WavStream.unusable`)."""
    import numpy as np

    from waveglow_lib.cli import main as cli_main
    from waveglow_lib.config import WorkflowConfig
    from waveglow_lib.stages import preprocess
    from waveglow_lib.train import TrainConfig

    value = np.zeros(8000, np.int16) if kind == "silent" else np.full(8000, 1e30, np.float32)
    corpus = write_wavs(tmp_path / "corpus", {f"u{i}": value for i in range(3)})
    params = tmp_path / "train.yaml"
    params.write_text(json.dumps(TrainConfig(out_dir=str(tmp_path / "out"), corpus=str(corpus), segment_length=1024,
                                             batch_size=2, max_steps=2, validate_every=0, n_validation=0,
                                             model={"n_flows": 2, "n_group": 4, "n_early_every": 1,
                                                    "n_early_size": 2, "n_layers": 2, "n_channels": 8,
                                                    "kernel_size": 3}).to_dict()))
    assert cli_main(["train", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    expected = "silent (peak 0.00e+00)" if kind == "silent" else "float samples peak at 1e+30, far beyond full scale"
    assert "3 of 3 wav(s) hold no usable audio: u0.wav (" in err and expected in err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # preprocess skips each of them with the same words (and, none left, refuses the corpus)
    from waveglow_lib.errors import AudioError

    cfg = WorkflowConfig(runs_dir=str(tmp_path / "runs"), name="p", corpus=str(corpus), limit=0)
    with pytest.raises(AudioError, match=f"none of 3 wav.s. could be used: .*u0.wav: {re.escape(expected)}"):
        preprocess(cfg)


# --- 6. refusals with the right advice -------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 80), (80, 0), (0, 0), (1, 0, 80)])
def test_a_mel_with_no_frames_is_told_so_not_to_transpose(shape):
    import numpy as np

    from waveglow_lib.service import BadRequest, decode_mel

    body = __import__("io").BytesIO()
    np.save(body, np.zeros(shape, np.float32))
    with pytest.raises(BadRequest) as refused:
        decode_mel(body.getvalue(), "application/octet-stream")
    assert refused.value.status == 422 and "the mel has no frames" in str(refused.value)
    assert "transpose" not in str(refused.value)


@pytest.mark.parametrize("value", [0.0, 3e38, -3e38, 1.0, -4.0])
def test_a_constant_mel_is_not_told_to_try_a_conversion(value):
    import numpy as np

    from waveglow_lib.mel_input import CONSTANT, check_mel_format

    verdict = check_mel_format(np.full((80, 50), value, np.float32), "m.npy")
    assert not verdict.ok and verdict.looks_like == CONSTANT and verdict.conversion is None
    assert "convert=" not in verdict.message() and "every value is" in verdict.message()
    # silence at the ln(1e-5) floor is the model's format, one number throughout or not
    assert check_mel_format(np.full((80, 50), np.log(1e-5), np.float32)).ok


def test_an_npy_with_a_negative_dimension_is_named_not_counted_in_negative_bytes(tmp_path):
    import numpy as np

    from waveglow_lib.errors import MelError
    from waveglow_lib.mel_input import read_mel

    path = tmp_path / "m.npy"
    np.save(path, np.zeros((80, 5), np.float32))
    data = path.read_bytes().replace(b"(80, 5)", b"(80, -5)", 1)
    path.write_bytes(data)
    with pytest.raises(MelError, match=r"shape \(80, -5\), with a negative dimension") as refused:
        read_mel(path)
    assert "-1600 bytes" not in str(refused.value) and "bytes" not in str(refused.value)


def test_a_json_integer_of_4301_digits_gets_a_clear_refusal():
    from waveglow_lib.service import BadRequest, decode_mel

    body = b'{"mel": [[' + b"9" * 4301 + b"]]}"
    with pytest.raises(BadRequest) as refused:
        decode_mel(body, "application/json")
    said = str(refused.value)
    assert refused.value.status == 422 and "mel[0][0] is an integer of 4301 digits, outside float32's range" in said
    assert "set_int_max_str_digits" not in said


@pytest.mark.e2e
def test_a_real_ray_start_that_times_out_leaves_no_process(monkeypatch):
    """A real `ray.init` whose node never registers (Ray's GCS lookup made to fail, as on a machine too loaded
    for Ray's fixed 30 s): it times out after starting the GCS and its helpers; on c28fb2a those stayed for
    the process's life (8 processes, 761 MB measured), now none is left. Takes Ray's 30 s wait."""
    ray = pytest.importorskip("ray")
    import psutil
    import ray._private.services as services

    from waveglow_lib.engines.ray import LOCAL_RAY_ENV, with_startup_retries

    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    for key, value in LOCAL_RAY_ENV.items():
        monkeypatch.setenv(key, value)
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    def never_registers(*args, **kwargs):
        raise RuntimeError("node info not available")

    monkeypatch.setattr(services, "get_node", never_registers)
    with pytest.raises(Exception, match="timed out during startup"):
        with_startup_retries(lambda: ray.init(num_cpus=1, include_dashboard=False, configure_logging=False),
                             tries=1, stop=ray.shutdown)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, [(p.pid, p.name()) for p in left]
    assert not ray.is_initialized()
