"""Writes only where the user asked: run names are names, run folders are not links out of runs_dir,
and `train` does not write into a folder that is not a training folder unless forced."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from support import SHORT_IDS, TINY
from waveglow_lib.cli import main as cli_main
from waveglow_lib.config import WorkflowConfig
from waveglow_lib.errors import ConfigError, RunFolderError
from waveglow_lib.stages import convert, export, infer, postprocess, preprocess, vocode
from waveglow_lib.stages import train as train_stage
from waveglow_lib.stages.train import run_train
from waveglow_lib.train import HISTORY_NAME, MODEL_NAME, STATE_NAME, TrainConfig, train


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


# --- run names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "/tmp/x", ".", "..", "", "a/b", "a\\b", "a\x00b", "a\nb"])
def test_a_run_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="parameter 'name'"):
        WorkflowConfig(name=name, runs_dir=str(tmp_path / "runs"))
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps({"name": name}))  # JSON is YAML
    with pytest.raises(ConfigError, match="parameter 'name'"):
        WorkflowConfig.from_yaml(params)


@pytest.mark.parametrize("name", ["demo", "my run", "run.v2", "LJ-001_a", "..x", "x.."])
def test_plain_run_names_pass(tmp_path, name):
    assert WorkflowConfig(name=name, runs_dir=str(tmp_path)).run_dir == tmp_path / name


@pytest.mark.parametrize("command", ["preprocess", "vocode", "bench"])
def test_the_cli_writes_nothing_for_an_escaping_name(tmp_path, capsys, command):
    runs = tmp_path / "sub" / "runs"
    extra = {"vocode": ["--mels", str(tmp_path)], "bench": ["--quick", "--backends", "reference"]}.get(command, [])
    code = cli_main([command, "--runs-dir", str(runs), "--name", "../../escaped", *extra])
    assert code == 2 and "parameter 'name'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- a run folder that is a link ---------------------------------------------------------------------
def test_a_run_folder_linked_out_of_runs_dir_is_refused_like_a_linked_mel_folder(make_cfg, tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    runs.mkdir()
    elsewhere.mkdir()
    (runs / "t").symlink_to(elsewhere, target_is_directory=True)
    cfg = make_cfg(runs, limit=1)
    with pytest.raises(RunFolderError, match=f"{runs / 't'}: the run folder resolves to {elsewhere}, "
                                             f"outside {runs}.*runs_dir") as caught:
        preprocess(cfg)
    assert caught.value.path == runs / "t"
    assert list(elsewhere.iterdir()) == []
    # the same check as for mel/ inside the run folder (layout.inside): a link leading out is refused
    (runs / "t").unlink()
    (runs / "t").mkdir()
    (runs / "t" / "mel").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RunFolderError, match=f"{runs / 't' / 'mel'}: the mel folder resolves to .*outside"):
        preprocess(cfg)
    assert list(elsewhere.iterdir()) == []


def test_a_run_folder_linked_within_runs_dir_is_accepted(make_cfg, tmp_path):
    runs = tmp_path / "runs"
    (runs / "real").mkdir(parents=True)
    (runs / "t").symlink_to(runs / "real", target_is_directory=True)
    preprocess(make_cfg(runs, limit=1))
    assert (runs / "real" / "mel" / "manifest.json").is_file()


#: what each stage writes into its folder: the user's file of that name, in the folder the link points to
LINKED_OUTPUTS = {"vocode": f"{SHORT_IDS[0]}_syn.wav", "out": f"{SHORT_IDS[0]}_out.bin",
                  "wav": f"{SHORT_IDS[0]}_syn.wav", "onnx": "waveglow.onnx", "om": "waveglow.gears.json"}


@pytest.mark.parametrize("folder", sorted(LINKED_OUTPUTS))
def test_an_output_folder_linked_out_of_the_run_is_refused_and_the_users_file_kept(preprocessed_run, tmp_path,
                                                                                    folder):
    """runs/<name>/<folder> a link to a folder of the user's: the stage writing there is refused (layout's one
    check of the run's folders), naming the link and where it points; the user's file is untouched."""
    cfg = preprocessed_run(tmp_path / "runs", with_onnx=folder == "om")
    if folder == "wav":  # postprocess needs infer's outputs
        infer(cfg)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / LINKED_OUTPUTS[folder]).write_bytes(b"the user's own file")
    (cfg.run_dir / folder).symlink_to(mine, target_is_directory=True)
    run = {"vocode": lambda: vocode(cfg, cfg.run_dir / "mel"), "out": lambda: infer(cfg),
           "wav": lambda: postprocess(cfg), "onnx": lambda: export(cfg),
           "om": lambda: convert(cfg, targets=["atc"], run_atc=False)}[folder]
    link = re.escape(str(cfg.run_dir / folder))
    with pytest.raises(RunFolderError, match=f"^{link}: the .* resolves to {re.escape(str(mine))}, outside"):
        run()
    assert listing(mine) == {LINKED_OUTPUTS[folder]: b"the user's own file"}


def test_the_cli_refuses_a_linked_vocode_folder_in_one_line(preprocessed_run, tmp_path, capsys):
    cfg = preprocessed_run(tmp_path / "runs")
    mine = tmp_path / "mine"
    mine.mkdir()
    (cfg.run_dir / "vocode").symlink_to(mine, target_is_directory=True)
    code = cli_main(["vocode", "--runs-dir", cfg.runs_dir, "--name", cfg.name, "--checkpoint", cfg.checkpoint,
                     "--backend", "torch", "--mels", str(cfg.run_dir / "mel")])
    err = capsys.readouterr().err
    assert code == 2 and "the vocode folder resolves to" in err and "Traceback" not in err
    assert list(mine.iterdir()) == []


# --- train's out_dir ---------------------------------------------------------------------------------
def tiny_train(out_dir: Path, **changes) -> TrainConfig:
    settings = dict(out_dir=str(out_dir), model=dict(TINY), segment_length=1024, batch_size=2, max_steps=1,
                    log_every=1, checkpoint_every=1, validate_every=0, num_threads=1, seed=7)
    return TrainConfig(**{**settings, **changes})


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("params.yaml", HISTORY_NAME, MODEL_NAME, "notes.txt"):
        (folder / name).write_text(f"the user's {name}")
    return folder


def test_train_refuses_a_folder_that_is_not_a_training_folder(tmp_path):
    folder = user_folder(tmp_path)
    before = listing(folder)
    with pytest.raises(RunFolderError, match=f"{folder}: .*not a training folder.*--force") as caught:
        run_train(tiny_train(folder))
    assert caught.value.path == folder
    assert listing(folder) == before
    # a file where the folder should be
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="not a folder"):
        run_train(tiny_train(tmp_path / "file"))


def test_train_force_writes_into_any_folder_and_marks_it(tmp_path):
    folder = user_folder(tmp_path)
    result = run_train(tiny_train(folder), force=True)
    assert result["step"] == 1 and (folder / train_stage.TRAIN_MARKER).is_file()
    assert (folder / "notes.txt").read_text() == "the user's notes.txt"
    run_train(tiny_train(folder, max_steps=2))  # marked: a training folder from now on


@pytest.mark.parametrize("exists", [False, True])
def test_train_takes_a_missing_or_empty_folder_and_resumes_in_it(tmp_path, exists):
    folder = tmp_path / "new"
    if exists:
        folder.mkdir()
    assert run_train(tiny_train(folder))["step"] == 1
    assert (folder / train_stage.TRAIN_MARKER).is_file() and (folder / STATE_NAME).is_file()
    assert run_train(tiny_train(folder, max_steps=2))["step"] == 2  # resumed from step 1


def test_train_resumes_a_training_folder_of_an_earlier_version(tmp_path):
    folder = tmp_path / "old"
    train(tiny_train(folder))  # the loop alone writes no marker, like earlier versions
    (folder / "params.yaml").write_text("written by an earlier version")
    assert not (folder / train_stage.TRAIN_MARKER).exists()
    assert run_train(tiny_train(folder, max_steps=2))["step"] == 2
    assert (folder / train_stage.TRAIN_MARKER).is_file()


def test_cli_train_refuses_without_force_and_trains_with_it(tmp_path, capsys):
    folder = user_folder(tmp_path)
    params = tmp_path / "p.json"
    params.write_text(json.dumps(tiny_train(folder).to_dict()))
    assert cli_main(["train", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "--force" in err
    assert (folder / "params.yaml").read_text() == "the user's params.yaml"
    assert cli_main(["train", "--params", str(params), "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1


@pytest.mark.parametrize("folder", ["bench_models", "bench_cache"])
def test_the_benchmarks_folders_linked_out_are_refused_before_any_work(tmp_path, folder):
    """bench's exported graphs and the streaming bench's engine cache: not written through a link leading out
    of the folder their record goes to (the run folder, or --out-dir)."""
    from waveglow_lib.bench import run_bench
    from waveglow_lib.bench.stream import stream_bench

    out, mine = tmp_path / "out", tmp_path / "mine"
    out.mkdir()
    mine.mkdir()
    (out / folder).symlink_to(mine, target_is_directory=True)
    run = (lambda: run_bench(WorkflowConfig(), model="demo", quick=True, out_dir=out, progress=False)) \
        if folder == "bench_models" else (lambda: stream_bench(WorkflowConfig(), out_dir=out))
    with pytest.raises(RunFolderError, match=f"{out / folder}: the bench .* resolves to {mine}, outside {out}"):
        run()
    assert list(mine.iterdir()) == []
