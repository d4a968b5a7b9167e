"""Convert stage: the atc command (checked against the guide's text), gear policies, the script fallback,
a run of a stand-in `atc`, and the CPU compile steps (OpenVINO IR, ONNX Runtime optimised graph)."""
from __future__ import annotations

import itertools
import json
import os
import stat

import pytest

from support import random_batch, snr_db
from waveglow_lib.config import GUIDE_MEL_LENGTHS
from waveglow_lib.convert import (MAX_GEARS, ConvertError, atc_command, bucket_lengths, format_command, mel_gears,
                                  padding_overhead)
from waveglow_lib.stages.convert import convert

# the guide's command exactly as printed there (multi-line, ${chip_name} = Ascend310P3)
GUIDE_TEXT = r'''atc --model=WaveGlow_onnx.onnx \
    --output=WaveGlow_om \
    --input_shape="mel:1,80,-1" \
    --framework=5 \
    --input_format=ND \
    --soc_version=${chip_name} \
    --log=debug \
    --dynamic_dims="154;164;443;490;651;699;723;760;832;833"'''


def guide_tokens() -> list[str]:
    return GUIDE_TEXT.replace("\\\n", " ").replace("${chip_name}", "Ascend310P3").split()


def test_guide_command_reproduced_exactly():
    # the guide's mel-only graph, batch 1, its 10 gears
    argv = atc_command("WaveGlow_onnx.onnx", "WaveGlow_om", GUIDE_MEL_LENGTHS, inputs=("mel",))
    assert format_command(argv) == " ".join(guide_tokens())


def test_exact_policy_two_inputs_differs_from_guide_only_in_inputs_and_gears():
    gears = mel_gears(GUIDE_MEL_LENGTHS, "exact")
    assert gears == sorted(GUIDE_MEL_LENGTHS)
    tokens = format_command(atc_command("WaveGlow_onnx.onnx", "WaveGlow_om", gears)).split()
    expected = guide_tokens()
    expected[3] = '--input_shape="mel:1,80,-1;z:1,8,-1"'
    expected[8] = ('--dynamic_dims="154,4928;164,5248;443,14176;490,15680;651,20832;699,22368;723,23136;'
                   '760,24320;832,26624;833,26656"')
    assert tokens == expected


def test_buckets_policy_command_and_optimal_gears():
    lengths = list(GUIDE_MEL_LENGTHS)
    gears = mel_gears(lengths, "buckets", n_buckets=4)
    assert len(gears) == 4 and max(gears) == 833 and set(gears) <= set(lengths)
    # brute force: no other choice of 4 gears (the longest always included) pads less
    best = min(padding_overhead(lengths, list(c) + [833])
               for c in itertools.combinations(sorted(set(lengths) - {833}), 3))
    assert padding_overhead(lengths, gears) == pytest.approx(best)
    tokens = format_command(atc_command("WaveGlow_onnx.onnx", "WaveGlow_om", gears, batch=4,
                                        soc_version="Ascend910B")).split()
    expected = guide_tokens()
    expected[3] = '--input_shape="mel:4,80,-1;z:4,8,-1"'
    expected[6] = "--soc_version=Ascend910B"
    expected[8] = '--dynamic_dims="' + ";".join(f"{g},{32 * g}" for g in gears) + '"'
    assert tokens == expected


def test_bucket_lengths_edge_cases():
    assert bucket_lengths([5, 5, 7], 8) == [5, 7]          # fewer lengths than buckets: exact
    assert bucket_lengths([1, 2, 3, 100], 2) == [3, 100]   # isolates the outlier
    assert bucket_lengths([4, 9, 9, 9], 1) == [9]


def test_gear_limit_of_atc():
    many = list(range(100, 100 + MAX_GEARS + 1))
    with pytest.raises(ConvertError, match="at most 100 gears.*buckets"):
        mel_gears(many, "exact")
    assert len(mel_gears(many, "buckets", n_buckets=MAX_GEARS)) == MAX_GEARS
    with pytest.raises(ConvertError, match="at most 100"):
        mel_gears(many, "buckets", n_buckets=MAX_GEARS + 1)
    with pytest.raises(ConvertError, match="at most 100"):
        atc_command("m.onnx", "o", many)


def test_paths_with_spaces_are_quoted():
    text = format_command(atc_command("/a b/m.onnx", "/a b/o", [10]))
    assert '--model="/a b/m.onnx"' in text and '--output="/a b/o"' in text


def test_convert_writes_script_without_atc(preprocessed_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg = preprocessed_run(tmp_path, with_onnx=True, gear_policy="buckets", n_buckets=2, batch_size=2)
    result = convert(cfg, targets=("atc",))["atc"]
    script = cfg.run_dir / "om" / "convert_atc.sh"
    assert "atc not on PATH" in result["status"] and script.is_file()
    assert os.stat(script).st_mode & stat.S_IXUSR
    assert result["command"] in script.read_text().splitlines()
    assert '--input_shape="mel:2,80,-1;z:2,8,-1"' in result["command"]
    gears = json.loads((cfg.run_dir / "om" / "waveglow.gears.json").read_text())
    # lengths 99, 125, 281 in 2 buckets, plus the exact-batching window (4 frames for the tiny model)
    assert gears["batch"] == 2 and gears["mel_lengths"] == [4, 125, 281]
    assert convert(cfg.with_overrides(exact_batching=False, batch_size=1), targets=("atc",),
                   force=True)["atc"]["gears"] == [125, 281]


def test_convert_runs_atc_when_on_path(preprocessed_run, tmp_path, monkeypatch):
    """Contract test with a stand-in `atc` script (no CANN here): it records its arguments and creates
    `<output>.om` as the real one does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "atc"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args.txt"\n'
                    'for a in "$@"; do case "$a" in --output=*) touch "${a#--output=}.om";; esac; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = preprocessed_run(tmp_path / "runs", with_onnx=True)
    result = convert(cfg, targets=("atc",))["atc"]
    assert result["status"] == "converted" and (cfg.run_dir / "om" / "waveglow.om").is_file()
    args = (bin_dir / "args.txt").read_text().split()
    assert "--framework=5" in args and "--dynamic_dims=99,3168;125,4000;281,8992" in args
    assert convert(cfg, targets=("atc",))["atc"]["status"].startswith("skipped")


def test_convert_needs_export_and_manifest(make_cfg, tiny_onnx, tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match="waveglow.onnx.*export"):
        convert(cfg)
    (cfg.run_dir / "onnx").mkdir(parents=True)
    (cfg.run_dir / "onnx" / "waveglow.onnx").write_bytes(tiny_onnx.read_bytes())
    with pytest.raises(ValueError, match="manifest.json.*preprocess"):
        convert(cfg, targets=("atc",))


def test_cpu_targets_match_the_onnx_graph(preprocessed_run, tiny_model, tmp_path):
    from waveglow_lib.backends import get_backend

    cfg = preprocessed_run(tmp_path, with_onnx=True)
    result = convert(cfg, targets=("openvino", "onnxruntime"))
    xml, optimized = result["openvino"]["xml"], result["onnxruntime"]["onnx"]
    assert xml.endswith(".xml") and os.path.isfile(xml[:-4] + ".bin") and os.path.isfile(optimized)
    mel, z = random_batch(2, 19, seed=3)
    reference = get_backend("torch", model=tiny_model()).run(mel, z)
    assert snr_db(reference, get_backend("openvino", onnx_path=xml).run(mel, z)) >= 50
    assert snr_db(reference, get_backend("onnxruntime", onnx_path=optimized).run(mel, z)) >= 50
    again = convert(cfg, targets=("openvino", "onnxruntime"))
    assert again["openvino"]["status"].startswith("skipped") and again["onnxruntime"]["status"].startswith("skipped")
    assert not list((cfg.run_dir / "onnx").glob(".*tmp*"))


@pytest.mark.parametrize("target, name", [("onnxruntime", "waveglow_optimized.onnx"),
                                          ("openvino", "waveglow_openvino.xml")])
def test_a_folder_where_a_converted_model_goes_is_one_line(preprocessed_run, tmp_path, target, name):
    """A folder at the optimised graph's or the IR's path was an IsADirectoryError traceback at the rename of
    the library's temp file; now ResourceError naming the file, and no temp file is left."""
    from waveglow_lib.errors import ResourceError

    cfg = preprocessed_run(tmp_path, with_onnx=True)
    (cfg.run_dir / "onnx" / name).mkdir()
    with pytest.raises(ResourceError, match=rf"{name}: could not write \(a folder is where the file goes"):
        convert(cfg, targets=(target,))
    assert not list((cfg.run_dir / "onnx").glob(".*tmp*"))


def test_cli_convert_script_only_writes_the_script_and_never_runs_atc(preprocessed_run, tmp_path, monkeypatch):
    """`convert --script-only` with an `atc` on PATH (a stand-in that would leave args.txt): the script is
    written, atc is not run."""
    from waveglow_lib.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "atc").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args.txt"\n')
    (bin_dir / "atc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = preprocessed_run(tmp_path / "runs", with_onnx=True)
    cfg.to_yaml(tmp_path / "params.yaml")
    assert main(["convert", "--params", str(tmp_path / "params.yaml"), "--targets", "atc", "--script-only"]) == 0
    script = cfg.run_dir / "om" / "convert_atc.sh"
    assert script.is_file() and "atc" in script.read_text()
    assert not (bin_dir / "args.txt").exists() and not (cfg.run_dir / "om" / "waveglow.om").exists()
