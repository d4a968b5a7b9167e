"""params/*.yaml and their validation: WorkflowConfig.from_yaml, --set, path resolution, the runner's checks."""
from __future__ import annotations

import threading
from dataclasses import fields
from pathlib import Path

import pytest

from waveglow_lib.cli import main as cli_main
from waveglow_lib.notebook import runner as nr
from waveglow_lib.config import GUIDE_MEL_LENGTHS, WorkflowConfig, parse_set_option
from waveglow_lib.errors import ConfigError, ConfigTypeError
from waveglow_lib.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params"


@pytest.mark.parametrize("name", ["demo", "ljspeech", "ci", "ascend"])
def test_params_files_load_and_name_their_run(name):
    cfg = WorkflowConfig.from_yaml(PARAMS / f"{name}.yaml")
    assert cfg.name == name


def test_demo_lists_every_parameter_with_its_default():
    import yaml

    data = yaml.safe_load((PARAMS / "demo.yaml").read_text())
    assert set(data) == {f.name for f in fields(WorkflowConfig)}
    assert WorkflowConfig.from_dict(data).to_dict() == WorkflowConfig().to_dict()


def test_each_params_file_says_what_it_is_for():
    ci = WorkflowConfig.from_yaml(PARAMS / "ci.yaml")
    assert ci.corpus == "demo" and ci.checkpoint == "demo" and 1 <= ci.limit <= 3
    assert ci.bench_quick and ci.bench_batch_sizes == [1, 2] and ci.bench_repeats == 1
    lj = WorkflowConfig.from_yaml(PARAMS / "ljspeech.yaml")
    assert lj.limit == len(GUIDE_MEL_LENGTHS) and lj.corpus.endswith("LJSpeech-1.1")
    assert lj.checkpoint.endswith("waveglow_256channels_universal_v5.pt")
    ascend = WorkflowConfig.from_yaml(PARAMS / "ascend.yaml")
    assert (ascend.backend, ascend.soc_version, ascend.gear_policy) == ("om", "Ascend310P3", "exact")
    assert ascend.device.startswith("npu")


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="'batchsize'") as info:
        WorkflowConfig.from_yaml(write(tmp_path, "name: x\nbatchsize: 4\n"))
    assert "p.yaml" in str(info.value)
    with pytest.raises(ValueError, match="'sigmaa'"):
        WorkflowConfig.from_yaml(PARAMS / "demo.yaml", {"sigmaa": 0.5})


@pytest.mark.parametrize("text, key", [
    ("limit: ten\n", "limit"),
    ("limit: true\n", "limit"),          # a bool is not an int
    ("sigma: high\n", "sigma"),
    ("metrics: 1\n", "metrics"),
    ("bench_batch_sizes: 4\n", "bench_batch_sizes"),
    ("name: 7\n", "name"),
])
def test_wrong_type_is_named(tmp_path, text, key):
    with pytest.raises(TypeError, match=f"'{key}'"):
        WorkflowConfig.from_yaml(write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("backend: tensorrt\n", "backend"),
    ("precision: fp8\n", "precision"),
    ("batch_size: 0\n", "batch_size"),
    ("limit: -1\n", "limit"),
    ("sigma: -0.1\n", "sigma"),
])
def test_bad_value_is_named(tmp_path, text, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        WorkflowConfig.from_yaml(write(tmp_path, text))


def test_int_is_accepted_for_float_and_file_errors_are_clear(tmp_path):
    assert WorkflowConfig.from_yaml(write(tmp_path, "sigma: 1\n")).sigma == 1.0
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        WorkflowConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="expected a mapping"):
        WorkflowConfig.from_yaml(write(tmp_path, "- a\n- b\n"))


def test_set_options_are_yaml_values():
    assert parse_set_option(["limit=2", "sigma=0.5", "metrics=false", "bench_batch_sizes=[1, 4]", "name=x"]) == {
        "limit": 2, "sigma": 0.5, "metrics": False, "bench_batch_sizes": [1, 4], "name": "x"}
    with pytest.raises(ValueError, match="key=value"):
        parse_set_option(["limit"])
    cfg = WorkflowConfig.from_yaml(PARAMS / "demo.yaml", parse_set_option(["limit=2", "backend=onnxruntime"]))
    assert (cfg.limit, cfg.backend) == (2, "onnxruntime")


def test_paths_resolve_against_the_project_folder(tmp_path, monkeypatch):
    (tmp_path / "params").mkdir()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params" / "x.yaml").write_text("name: x\ncorpus: data/LJ\ncheckpoint: demo\n")
    for where in (tmp_path, tmp_path / "notebooks"):   # the CLI's folder, and a JupyterLab kernel's folder
        monkeypatch.chdir(where)
        cfg = nr.notebook_config("params/x.yaml", {"runs_dir": "out"})
        assert cfg.corpus == str(tmp_path / "data" / "LJ")
        assert cfg.checkpoint == "demo"             # a keyword, not a path
        assert cfg.run_dir == tmp_path / "out" / "x"
    absolute = nr.resolve_paths(WorkflowConfig(corpus=str(tmp_path / "c")), base="/elsewhere")
    assert absolute.corpus == str(tmp_path / "c")


def test_runner_rejects_bad_parameters_before_running_anything(tmp_path):
    with pytest.raises(ValueError, match="'bogus'"):
        nr.run_notebooks(PARAMS / "ci.yaml", {"bogus": 1, "runs_dir": str(tmp_path)})
    with pytest.raises(TypeError, match="'limit'"):
        nr.run_notebooks(PARAMS / "ci.yaml", {"limit": "two", "runs_dir": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_bad_parameter_by_name(tmp_path, capsys):
    code = cli_main(["run", "--params", str(PARAMS / "ci.yaml"), "--set", f"runs_dir={tmp_path}", "--set", "limt=2"])
    assert code == 2
    assert "'limt'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_params_round_trip_through_the_run_folder_copy(tmp_path):
    cfg = WorkflowConfig.from_yaml(PARAMS / "ascend.yaml", {"limit": 3, "bench_batch_sizes": [1, 4]})
    cfg.to_yaml(tmp_path / "params.yaml")
    assert WorkflowConfig.from_yaml(tmp_path / "params.yaml") == cfg
    assert cfg.with_overrides(backend="torch").backend == "torch" and cfg.backend == "om"
    with pytest.raises(ValueError, match="'backend'"):
        cfg.with_overrides(backend="tpu")


# --- hostile or broken YAML, and values that would be blamed on something else later --------------------

@pytest.mark.parametrize("text, message", [
    ("name: x\nlimit: !!python/object/apply:os.system ['touch marker']\n",
     r"p.yaml:2:8: could not determine a constructor for the tag .*python/object/apply"),
    ("name: !!python/name:os.system\n", r"p.yaml:1:7: could not determine a constructor"),
    ("name: x\nbench_batch_sizes: [1, 2\nlimit: 3\n", r"p.yaml:3:\d+: while parsing a flow sequence"),
    ("name: x\n\tlimit: 3\n", r"p.yaml:2:1: .*cannot start any token"),
    ("limit: 2\nlimit: 3\n", r"p.yaml:2:1: key 'limit' is given twice"),
    ("name: &a [1, *a]\n", r"p.yaml:1:7: an alias that refers back"),
    ("name: " + "[" * 60 + "]" * 60 + "\n", r"p.yaml:1:\d+: nested deeper than 50"),
])
def test_yaml_problems_name_file_and_line(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        WorkflowConfig.from_yaml(write(tmp_path, text))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 values
    path = write(tmp_path, "\n".join(lines) + "\n")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("error", _error_of(WorkflowConfig.from_yaml, path)),
                              daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    error = outcome["error"]
    assert type(error) is ConfigError and "p.yaml" in str(error) and "alias bomb" in str(error)
    # a few aliases are fine
    assert WorkflowConfig.from_yaml(write(tmp_path, "bench_batch_sizes: &b [1, 2]\n")).bench_batch_sizes == [1, 2]


def _error_of(function, *args):
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 (handed to the test)
        return error
    return None


def test_binary_file_is_a_config_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="p.yaml.*UTF-8"):
        WorkflowConfig.from_yaml(path)


@pytest.mark.parametrize("text, key", [
    ("sigma: .nan\n", "sigma"),
    ("sigma: .inf\n", "sigma"),
    ("sigma: 1.0e+6\n", "sigma"),
    ("denoiser_strength: .nan\n", "denoiser_strength"),
    ("denoiser_strength: -0.1\n", "denoiser_strength"),
    ("denoiser_strength: 2\n", "denoiser_strength"),
    ("opset: 1\n", "opset"),
    ("opset: 12\n", "opset"),
    ("opset: 21\n", "opset"),
    ("seed: -1\n", "seed"),
    ("bench_batch_sizes: []\n", "bench_batch_sizes"),
    ("bench_batch_sizes: [1, 0]\n", "bench_batch_sizes"),
    ("bench_batch_sizes: [1, two]\n", "bench_batch_sizes"),
])
def test_non_finite_or_out_of_range_values_are_refused(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        WorkflowConfig.from_yaml(write(tmp_path, text))
    name, _, value = text.strip().partition(": ")
    with pytest.raises(ConfigError, match=f"'{key}'"):
        WorkflowConfig.from_yaml(PARAMS / "demo.yaml", parse_set_option([f"{name}={value}"]))


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_supported_opsets_pass(opset):
    assert WorkflowConfig(opset=opset).opset == opset


def test_set_option_yaml_errors_name_the_option():
    with pytest.raises(ConfigError, match=r"--set limit:1:\d+: could not determine a constructor"):
        parse_set_option(["limit=!!python/object/apply:os.system ['true']"])
    with pytest.raises(ConfigError, match=r"--set bench_batch_sizes:1:\d+:"):
        parse_set_option(["bench_batch_sizes=[1, 2"])


# --- numbers that mean something else, and the bounds of a document ----------------------------------
@pytest.mark.parametrize("text, key, read_as", [
    ("limit: 010\n", "limit", "8"),             # YAML 1.1 octal
    ("limit: 0x10\n", "limit", "16"),
    ("seed: 0b11\n", "seed", "3"),
    ("limit: 1_000\n", "limit", "1000"),
    ("limit: 1:20\n", "limit", "80"),           # sexagesimal
    ("sigma: 0_.6\n", "sigma", "0.6"),
    ("%YAML 1.2\n---\nseed: 0b11\n", "seed", "3"),
    ("bench_batch_sizes: [1, 010]\n", "bench_batch_sizes", "8"),
    ("resample: yes\n", "resample", "True"),    # a boolean to YAML 1.1, a string to 1.2
    ("downmix: off\n", "downmix", "False"),
    ("bench_quick: On\n", "bench_quick", "True"),
])
def test_numbers_yaml_1_1_and_1_2_read_differently_are_refused_by_name(tmp_path, text, key, read_as):
    with pytest.raises(ConfigError, match=f"p.yaml:\\d+:\\d+: parameter '{key}': .* means different things in "
                                          f"YAML 1.1 and 1.2 \\(PyYAML reads {read_as}\\)") as caught:
        WorkflowConfig.from_yaml(write(tmp_path, text))
    assert "\n" not in str(caught.value)
    value = text.rpartition(f"{key}: ")[2].strip()
    with pytest.raises(ConfigError, match=f"^--set {key}:1:\\d+: .* means different things"):
        parse_set_option([f"{key}={value}"])
    # plain decimal numbers, true/false, and the same text quoted (a string), read as they always did
    assert parse_set_option(["limit=10", "seed=0", "sigma=0.60", "opset=+17", "resample=true", "downmix=False",
                             f"soc_version='{value}'"]) == {
        "limit": 10, "seed": 0, "sigma": 0.6, "opset": 17, "resample": True, "downmix": False, "soc_version": value}


def test_a_long_plain_list_is_refused_by_its_bytes_and_a_plain_one_that_fits_reads(tmp_path):
    """Bounds count bytes, depth and aliases, not values: a plain list is no alias bomb."""
    long_list = f"[{', '.join(['1'] * 300_000)}]"
    with pytest.raises(ConfigError, match=r"p.yaml: refused: \d+ bytes, more than a params file \(YAML\) may have "
                                          r"\(65536\)") as caught:
        WorkflowConfig.from_yaml(write(tmp_path, f"bench_batch_sizes: {long_list}\n"))
    assert "alias" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"^--set bench_batch_sizes: \d+ bytes, more than the 65536 .*few KiB"):
        parse_set_option([f"bench_batch_sizes={long_list}"])
    cfg = WorkflowConfig.from_yaml(write(tmp_path, f"bench_batch_sizes: [{','.join(['1'] * 20_000)}]\n"))
    assert len(cfg.bench_batch_sizes) == 20_000
    for depth in (60, 20_000):  # deeper than the bound, and deeper than Python's recursion
        with pytest.raises(ConfigError, match=r"p.yaml:1:\d+: nested deeper than 50 levels"):
            WorkflowConfig.from_yaml(write(tmp_path, f"bench_batch_sizes: {'[' * depth}1{']' * depth}\n"))


def test_aliases_are_counted(tmp_path):
    text = "bench_batch_sizes: &b [1]\nx: [" + ", ".join(["*b"] * 101) + "]\n"
    with pytest.raises(ConfigError, match=r"p.yaml:2:\d+: more than 100 aliases"):
        WorkflowConfig.from_yaml(write(tmp_path, text))


# --- types the config's check must see through, and values the OS refuses ------------------------------
@pytest.mark.parametrize("value", ["[1, 2]", "{a: 1}", "1", "true"])
def test_a_union_field_refuses_what_none_of_its_types_takes(tmp_path, value):
    with pytest.raises(ConfigTypeError, match=r"parameter 'ray_address' expects str or None \(null\), got"):
        WorkflowConfig.from_yaml(write(tmp_path, f"ray_address: {value}\n"))
    for ok in ("null", "auto", "ray://head:10001"):
        assert WorkflowConfig.from_dict(parse_set_option([f"ray_address={ok}"])).ray_address == \
            (None if ok == "null" else ok)


@pytest.mark.parametrize("key", ["corpus", "checkpoint", "runs_dir", "cache_dir", "device"])
def test_a_nul_byte_in_a_parameter_is_refused_by_name(tmp_path, key):
    with pytest.raises(ConfigError, match=f"parameter '{key}' holds a NUL byte"):
        WorkflowConfig.from_yaml(write(tmp_path, f'{key}: "a\\0b"\n'))


@pytest.mark.parametrize("key", ["corpus", "checkpoint", "runs_dir", "cache_dir"])
def test_a_lone_surrogate_in_a_path_parameter_is_refused_by_name(tmp_path, key):
    """YAML's "\\ud800" is a str no file name can be encoded from: a UnicodeEncodeError traceback before."""
    with pytest.raises(ConfigError, match=f"parameter '{key}': .* which no file name can be encoded"):
        WorkflowConfig.from_yaml(write(tmp_path, f'{key}: "a\\ud800b"\n'))


@pytest.mark.parametrize("name", ["a\u0085b", "\u202eevil", "a\u2028b", "a\ud800b"])
def test_a_run_name_with_an_unprintable_character_is_refused(tmp_path, name):
    """C1 controls (NEL), bidi overrides, line separators and lone surrogates passed the ASCII-only check (a
    surrogate then failed as a traceback when the folder was made)."""
    with pytest.raises(ConfigError, match="parameter 'name' must be a plain folder name"):
        WorkflowConfig(name=name, runs_dir=str(tmp_path))
    assert WorkflowConfig(name="ünï x", runs_dir=str(tmp_path)).name == "ünï x"  # printable: still a name


def test_names_and_paths_longer_than_the_os_allows_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"parameter 'corpus': the name 'a+'\.\.\. is 300 bytes, longer than the \d+"):
        WorkflowConfig(corpus=str(tmp_path / ("a" * 300)))
    deep = "/".join(["b" * 200] * 21)  # every name fits, the path does not
    with pytest.raises(ConfigError, match=r"parameter 'checkpoint': .* bytes long, longer than the \d+"):
        WorkflowConfig(checkpoint=str(tmp_path / deep))
    with pytest.raises(ConfigError, match=r"the run folder <runs_dir>/<name>: .* \(plus 256 for the files in it\)"):
        WorkflowConfig(runs_dir=str(tmp_path / "/".join(["b" * 200] * 19)))
    with pytest.raises(ConfigError, match=r"parameter 'out_dir': the name 'o+'\.\.\. is 300 bytes"):
        TrainConfig(out_dir=str(tmp_path / ("o" * 300)))  # training's paths too


def test_a_wrong_override_is_said_to_come_from_the_command_line_not_the_params_file(tmp_path):
    params = write(tmp_path, "limit: 2\n")
    with pytest.raises(ConfigError, match="^command line: parameter 'limit' expects int"):
        WorkflowConfig.from_yaml(params, {"limit": "abc"})
    with pytest.raises(ConfigError, match="^command line: unknown parameter\\(s\\) 'limt'"):
        WorkflowConfig.from_yaml(params, {"limt": 3})
    bad_file = write(tmp_path, "limit: abc\n")
    with pytest.raises(ConfigError, match=f"^{bad_file}: parameter 'limit' expects int"):
        WorkflowConfig.from_yaml(bad_file, {"seed": 1})


@pytest.mark.parametrize("key", ["grad_clip", "gen_sigma", "stft_loss_weight", "mel_loss_weight",
                                 "final_learning_rate", "max_seconds", "sigma", "learning_rate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_training_refuses_non_finite_numbers_by_name(key, value):
    """One finite-float type for every parameter set: a NaN grad_clip turned every gradient to NaN."""
    with pytest.raises(ConfigError, match=f"parameter '{key}' must be a finite number, got {value}"):
        TrainConfig.from_dict({key: value})


def test_serve_limits_refuse_non_finite_and_wrong_types():
    from waveglow_lib.service import ServeLimits

    with pytest.raises(ConfigError, match="ServeLimits.body_timeout_s must be a finite number"):
        ServeLimits(body_timeout_s=float("nan"))
    with pytest.raises(ConfigTypeError, match="ServeLimits.max_frames expects int, got str"):
        ServeLimits(max_frames="4000")
