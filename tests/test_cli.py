"""`python -m waveglow_lib`: help for every command, parameter precedence, a whole run, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from waveglow_lib.cli import build_parser, config_from_args, main

STAGES = ["preprocess", "export", "convert", "infer", "postprocess", "run-all"]


@pytest.mark.parametrize("command", STAGES)
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m waveglow_lib {command}" in text and "--params" in text and "--set" in text


def test_module_entry_point_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "waveglow_lib", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in STAGES:
        assert command in done.stdout


def test_params_then_set_then_flags(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("name: fromfile\nbatch_size: 4\nsigma: 0.5\nseed: 7\n")
    args = build_parser().parse_args(["infer", "--params", str(params), "--set", "sigma=0.7", "--set",
                                      "seed=9", "--seed", "11"])
    cfg = config_from_args(args)
    assert (cfg.name, cfg.batch_size, cfg.sigma, cfg.seed) == ("fromfile", 4, 0.7, 11)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["infer", "--backend", "tensorrt"])


def test_run_all_from_the_command_line(short_corpus, tiny_checkpoint, tmp_path, capsys):
    code = main(["run-all", "--runs-dir", str(tmp_path), "--name", "cli", "--checkpoint", str(tiny_checkpoint),
                 "--corpus", str(short_corpus), "--limit", "2", "--backend", "onnxruntime", "--batch-size", "2",
                 "--targets", "atc"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["infer"]["backend"].startswith("onnxruntime") and len(summary["infer"]["written"]) == 2
    assert sorted(p.name for p in (tmp_path / "cli" / "wav").glob("*.wav")) == ["LJ001-0002_syn.wav",
                                                                               "LJ001-0006_syn.wav"]
    assert (tmp_path / "cli" / "om" / "convert_atc.sh").is_file() and (tmp_path / "cli" / "params.yaml").is_file()
    # the run folder's params.yaml re-creates the run's settings: everything is found finished
    assert main(["infer", "--params", str(tmp_path / "cli" / "params.yaml")]) == 0
    assert len(json.loads(capsys.readouterr().out)["skipped"]) == 2
    # other output settings are refused rather than mixed in
    assert main(["infer", "--params", str(tmp_path / "cli" / "params.yaml"), "--sigma", "0.9"]) == 2
    assert "other settings (sigma: 0.6 -> 0.9)" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["infer", "--runs-dir", str(tmp_path), "--name", "empty"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "empty/mel/manifest.json: manifest not found" in err
    assert len(err.splitlines()) == 1
    assert main(["infer", "--set", "nonsense=1"]) == 2
    assert "unknown parameter(s) 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["preprocess", "--set", "ray_address=[1,2]"], "parameter 'ray_address' expects str or None"),
    (["infer", "--set", "ray_address={a: 1}"], "parameter 'ray_address' expects str or None"),
    (["preprocess", "--set", 'corpus="wavs\\0x"'], "parameter 'corpus' holds a NUL byte"),
    (["preprocess", "--set", "limit=010"], "--set limit:1:1: '010' means different things in YAML 1.1 and 1.2"),
    (["preprocess", "--corpus", "/tmp/" + "c" * 300], "parameter 'corpus': the name 'ccc"),
    (["vocode", "--mels", "/tmp/" + "m" * 300], "--mels: the name 'mmm"),
    (["postprocess", "--wav-dir", "/tmp/" + "/".join(["w" * 200] * 21)], "--wav-dir: '/"),
    (["preprocess", "--params", "/tmp/" + "p" * 300 + ".yaml"], "--params: the name 'ppp"),
])
def test_what_the_os_and_the_types_refuse_is_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    """A NUL byte, a name or path too long for the OS, a value of the wrong type for a union field, a number
    YAML versions read differently: named before anything runs, never a traceback (ENAMETOOLONG, TypeError)."""
    assert main([*args, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_force_is_offered_only_where_it_redoes_work_and_run_passes_it_to_the_notebooks(monkeypatch, tmp_path):
    """--force said "redo finished work" on run, bench, serve and evaluate, and did nothing there."""
    import os

    from waveglow_lib import cli
    from waveglow_lib.config import FORCE_ENV, forced

    parser = cli.build_parser()
    for command in ("bench", "serve", "evaluate"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--force"])
    seen = {}
    monkeypatch.setattr(cli, "run_notebooks", lambda cfg, **kwargs: seen.update(kwargs) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    assert cli.main(["run", "--force", "--set", f"runs_dir={tmp_path}"]) == 130
    assert seen["force"] is True
    monkeypatch.setenv(FORCE_ENV, "1")  # what run_notebooks(force=True) hands the kernels
    assert forced(False) and os.environ[FORCE_ENV] == "1"
    monkeypatch.setenv(FORCE_ENV, "0")
    assert not forced(False) and forced(True)
