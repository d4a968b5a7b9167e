"""Records are data, not instructions: a stage record whose fields have the wrong JSON type (a string, a
number, a list or null where an object is expected, an entry that is not an object) is never a traceback
and never trusted (`records.read_record`).

A record that only says what work may be skipped (the manifest and journal as preprocess reads them, the
records of postprocess, vocode and convert, the export record as export reads it, the file stamps cache,
the entries of timings.json) counts as absent: the work is redone, said on stderr, and the outputs are
the ones the clean run made. A record needed to run (the export record that proves which model a graph
holds, a converted model's record, timings.json's settings, the manifest as infer reads it) is a one-line
WaveGlowError naming the file and the field. One run folder is built once and copied per test.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from support import SHORT_IDS
from waveglow_lib import records, stamps as stamps_module
from waveglow_lib.errors import WaveGlowError
from waveglow_lib.stages import convert, export, infer, postprocess, preprocess, vocode

#: wrong-shaped values: a string, a number, a list, null, an object where another type is expected
WRONG = ["x", 1, [1], None, {}]
FIRST, SECOND, THIRD = SHORT_IDS
#: fields whose JSON type is a string: "x" is of the right shape there (another content: refused as such)
STRINGS = {"model_fingerprint", "variant", "source.model", "settings.backend_used", "command", "items.0.sha256"}
#: fields whose JSON type is a number
NUMBERS = {"opset", "n_group"}


def wrong_type(field: str, value) -> bool:
    """Whether `value` is of another JSON type than `field` holds (null and {} are where an object is)."""
    return value is not None and not (value == "x" and field in STRINGS) and not (value == 1 and field in NUMBERS) and not (
        value == {} and field in ("files", "model_config", "stamp", "settings", "source", "settings.stft"))


def field_name(where: str) -> str:
    """`records.field_name` of a field: items.0.id -> items[0].id"""
    return re.sub(r"\.(\d+)", r"[\1]", where)


@pytest.fixture(scope="module")
def built(tmp_path_factory, preprocessed_run):
    """A run folder after export, convert (the ONNX Runtime graph, the atc script), infer, postprocess and
    vocode, and what each stage made (bytes by file)."""
    cfg = preprocessed_run(tmp_path_factory.mktemp("built") / "runs")
    export(cfg)
    convert(cfg, targets=("atc", "onnxruntime"), run_atc=False)
    infer(cfg)
    postprocess(cfg)
    vocode(cfg, cfg.layout.mel_dir)
    return cfg, outputs(cfg)


def outputs(cfg) -> dict[str, bytes]:
    run = cfg.run_dir
    return {str(p.relative_to(run)): p.read_bytes()
            for pattern in ("mel/*.bin", "mel/*.txt", "out/*_out.bin", "wav/*_syn.wav", "vocode/*_syn.wav")
            for p in sorted(run.glob(pattern))}


@pytest.fixture
def run(built, tmp_path):
    """A copy of the built run folder, and its config."""
    cfg, _ = built
    shutil.copytree(cfg.runs_dir, tmp_path / "runs")
    stamps_module._open.clear()  # a new process: nothing hashed in this one is known
    return cfg.with_overrides(runs_dir=str(tmp_path / "runs"))


def damage(path, changes: dict) -> None:
    """Set fields of the JSON record `path`: {"a.b.0": value} (keys and list indices joined by dots)."""
    record = json.loads(path.read_text())
    for where, value in changes.items():
        keys = [int(k) if k.isdigit() else k for k in where.split(".")]
        holder = record
        for key in keys[:-1]:
            holder = holder[key]
        holder[keys[-1]] = value
    path.write_text(json.dumps(record))


def refused(stage, *args, **kwargs) -> str:
    """The one-line message of the WaveGlowError the stage raises (anything else fails the test)."""
    with pytest.raises(WaveGlowError) as caught:
        stage(*args, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# --- what the stages write is what their models read ------------------------------------------------------
def test_every_record_a_run_writes_loads_through_its_model_whole(built):
    """Each record of a clean run is read through its model (`records`) with nothing refused or dropped: the
    writers and the models agree, field by field and entry by entry."""
    cfg, _ = built
    layout = cfg.layout
    said = []
    for path, model, entries in [
            (layout.manifest, records.Manifest, None), (layout.onnx.with_suffix(".json"), records.ExportRecord, None),
            (layout.onnx_optimized.with_suffix(".json"), records.ConvertedRecord, None),
            (layout.om_dir / "waveglow.gears.json", records.GearsRecord, None),
            (layout.timings, records.JobRecord, records.TimingsEntry),
            (layout.postprocess_record, records.PostprocessRecord, records.PostprocessEntry),
            (layout.vocode_record, records.JobRecord, records.VocodeEntry),
            (cfg.run_dir / ".file_stamps.json", records.FileStampsCache, None)]:
        written = json.loads(path.read_text())
        read = records.read_record(path, model, "a record", entries=entries, damaged="refuse", on_damage=said.append)
        assert read == {k: v for k, v in written.items() if v is not None} and read, path
        if entries is not None:
            assert sorted(read["items"]) == sorted(SHORT_IDS), path
    assert said == []


# --- records needed to run: a one-line error naming the file and the field ------------------------------
def test_a_damaged_export_record_is_an_error_naming_the_file_and_field(run, capsys):
    record = run.layout.onnx.with_suffix(".json")
    good = record.read_text()
    for field in ("model_fingerprint", "files", "model_config", "opset", "variant", "n_group", "stamp"):
        for value in filter(lambda value: wrong_type(field, value), WRONG):  # the others: below
            damage(record, {field: value})
            message = refused(convert, run, targets=("onnxruntime",))
            assert f"{record}: field {field} holds a JSON" in message and "export stage" in message, message
            record.write_text(good)
    for changes in ({"files": {}}, {"files": None}, {"model_fingerprint": None}, {"model_fingerprint": "x"},
                    {"model_config": {"x": 1}}, {"files": {"waveglow.onnx": [1]}}):
        damage(record, changes)
        message = refused(convert, run, targets=("onnxruntime",))
        assert (str(record) in message or str(run.layout.onnx) in message) and "export stage" in message, message
        record.write_text(good)


def test_the_export_stage_makes_a_damaged_record_again_and_says_so(run, capsys):
    record = run.layout.onnx.with_suffix(".json")
    damage(record, {"stamp": [1], "model_fingerprint": None})
    again = export(run)["noise_input"]
    assert again["status"] == "exported" and f"{record}: field stamp holds a JSON array" in again["reason"]
    assert f"{record}: field stamp holds a JSON array" in capsys.readouterr().err
    damage(record, {"model_fingerprint": None})  # the model the graph proves it holds is part of its stamp
    assert export(run)["noise_input"]["status"] == "exported"
    assert export(run)["noise_input"]["status"] == "skipped (up to date)"
    convert(run, targets=("onnxruntime",))


def test_a_damaged_converted_model_record_is_an_error_then_convert_makes_it_again(run, capsys):
    record = run.layout.onnx_optimized.with_suffix(".json")
    good = record.read_text()
    ort = run.with_overrides(backend="onnxruntime")
    for field in ("source", "source.model", "files"):
        for value in WRONG:
            damage(record, {field: value})
            message = refused(infer, ort, out_dir=run.run_dir / "ort_out")  # a graph's origin is never guessed
            assert (str(record) in message or str(run.layout.onnx_optimized) in message) \
                and "convert stage" in message, message
            if wrong_type(field, value):
                assert f"{record}: field {field} holds a JSON" in message, message
            record.write_text(good)
    damage(record, {"source": "x"})
    capsys.readouterr()
    assert convert(run, targets=("onnxruntime",))["onnxruntime"]["status"] == "converted"
    assert f"{record}: field source holds a JSON string" in capsys.readouterr().err
    assert json.loads(record.read_text()) == json.loads(good)


def test_damaged_timings_settings_are_an_error_naming_the_file(run):
    timings = run.layout.timings
    good = timings.read_text()
    for field in ("settings", "settings.backend_used", "items", "workers"):
        for value in filter(lambda value: wrong_type(field, value) and value != {}, WRONG):
            damage(timings, {field: value})
            message = refused(infer, run)
            assert f"{timings}: field {field} holds a JSON" in message and "--force" in message, message
            timings.write_text(good)


def test_a_damaged_manifest_is_an_error_for_infer(run):
    manifest = run.layout.manifest
    good = manifest.read_text()
    for field in ("settings", "settings.stft", "items.0.sha256"):
        for value in WRONG:
            damage(manifest, {field: value})
            if not wrong_type(field, value) and value != "x":  # the mels' settings not recorded: not checked
                assert infer(run)["written"] == []
            else:  # a wrong type, or another mel's hash
                message = refused(infer, run)
                assert str(manifest) in message and (field.rsplit(".", 1)[-1] in message or value == "x"), message
            manifest.write_text(good)
    damage(manifest, {"settings.stft": {"hop_length": "256"}})
    assert "settings.stft" in refused(infer, run)


# --- records that only say what may be skipped: redone and said, the outputs are the clean run's ----------
def redone_in_rounds(run, stage, record, rounds, built, capsys) -> None:
    """For each round of damage to `record`: `stage(run)` makes every utterance again, as the clean run made
    it, and says each damaged field on stderr."""
    for changes in rounds:
        damage(record, changes)
        result = stage(run)
        assert sorted(result["written"]) == sorted(SHORT_IDS), (changes, result)
        assert outputs(run) == built[1]
        err = capsys.readouterr().err
        for field in changes:
            assert f"{record}: field {field} holds a JSON" in err, err


def test_damaged_timings_entries_are_vocoded_again(run, built, capsys):
    redone_in_rounds(run, infer, run.layout.timings, [
        {f"items.{FIRST}": "x", f"items.{SECOND}.output": [1], f"items.{THIRD}.source_sha256": 1},
        {f"items.{FIRST}": [1], f"items.{SECOND}.output.sha256": {}, f"items.{THIRD}.output.size": "x"}], built, capsys)


def test_a_damaged_postprocess_record_is_redone(run, built, capsys):
    redone_in_rounds(run, postprocess, run.layout.postprocess_record, [
        {"items": "x"}, {"items": [1]},
        {f"items.{FIRST}": "x", f"items.{SECOND}.settings": [1], f"items.{THIRD}.output": 1},
        {f"items.{FIRST}": [1], f"items.{SECOND}.settings": "x", f"items.{THIRD}.output.size": "x"}], built, capsys)
    damage(run.layout.postprocess_record,
           {f"items.{FIRST}": None, f"items.{SECOND}.settings": {}, f"items.{THIRD}.output": None})
    assert sorted(postprocess(run)["written"]) == sorted(SHORT_IDS) and outputs(run) == built[1]


def test_a_damaged_vocode_record_is_redone(run, built, capsys):
    redone_in_rounds(run, lambda cfg: vocode(cfg, cfg.layout.mel_dir), run.layout.vocode_record, [
        {"settings": "x"}, {"items": [1]}, {"workers": 1},
        {f"items.{FIRST}": "x", f"items.{SECOND}.settings": [1], f"items.{THIRD}.output": "x"},
        {f"items.{FIRST}": 1, f"items.{SECOND}.source_sha256": [1], f"items.{THIRD}.output": []}], built, capsys)
    damage(run.layout.vocode_record, {f"items.{FIRST}": None, f"items.{SECOND}.settings": None,
                                      f"items.{THIRD}.output": {}})
    assert sorted(vocode(run, run.layout.mel_dir)["written"]) == sorted(SHORT_IDS) and outputs(run) == built[1]


def test_a_damaged_gears_file_is_written_again(run, capsys):
    gears = run.layout.om_dir / "waveglow.gears.json"
    convert(run, targets=("atc",), run_atc=False)  # this run folder's command
    good = json.loads(gears.read_text())
    for field in ("source", "files", "command", "mel_lengths", "batch"):
        damage(gears, {field: "x" if field != "command" else [1]})
        convert(run, targets=("atc",), run_atc=False)
        assert f"{gears}: field {field} holds a JSON" in capsys.readouterr().err
        assert json.loads(gears.read_text()) == good


def test_a_damaged_manifest_is_rebuilt_by_preprocess(run, built, capsys):
    manifest = run.layout.manifest
    good = json.loads(manifest.read_text())
    for changes in ({"settings": "x"}, {"items": {}}, {"items.0": "x"},
                    {"items.0.id": [1], "items.1.shape": [125, 80], "items.2.samples": "x"},
                    {"items.0.mel_frames": 1.5, "items.1.sha256": [1], "items.2.shape": None},
                    {"items.0.samples": True, "items.1.mel_frames": None, "items.2.wav_size": {}}):
        damage(manifest, changes)
        result = preprocess(run)
        assert result["computed"] == len(SHORT_IDS) and result["reused"] == 0, (changes, result)
        assert json.loads(manifest.read_text()) == good and outputs(run) == built[1]
        if len(changes) == 1:  # the whole manifest is damaged: said
            assert f"{manifest}: field {field_name(next(iter(changes)))} holds a JSON" in capsys.readouterr().err
    assert preprocess(run)["reused"] == len(SHORT_IDS)


def test_damaged_preprocess_journal_lines_are_not_trusted(run, built):
    manifest = json.loads(run.layout.manifest.read_text())
    items = {item["id"]: item for item in manifest["items"]}
    settings = manifest["settings"]
    lines = ['"x"', "1", "[]", "null", json.dumps({"settings": "x", "item": items[FIRST]}),
             json.dumps({"settings": settings, "item": "x"}),
             json.dumps({"settings": settings, "item": {**items[FIRST], "id": [1]}}),
             json.dumps({"settings": settings, "item": {**items[SECOND], "shape": "x"}}),
             json.dumps({"settings": settings, "item": {**items[THIRD], "samples": [1], "mel_frames": {}}})]
    run.layout.manifest.unlink()  # a killed run: only the journal says what was finished
    (run.layout.mel_dir / ".preprocess.jsonl").write_text("\n".join(lines) + "\n")
    result = preprocess(run)
    assert result["reused"] == 0 and json.loads(run.layout.manifest.read_text()) == manifest
    assert outputs(run) == built[1]


def test_a_damaged_file_stamps_cache_is_never_trusted(run, built):
    """Entries forged with the files' own stat keys (so the cache would be believed) but values of the wrong
    type are computed again: the run skips what it made, and finds nothing changed."""
    cache = run.run_dir / ".file_stamps.json"
    output = run.layout.out_dir / f"{FIRST}_out.bin"
    for forged in ({"sha256": [1], "fingerprint": 1, "stft": "x"},
                   {"sha256": {}, "fingerprint": ["x"], "stft": {"hop_length": "256"}},
                   {"sha256": None, "fingerprint": {}, "stft": {"x": 1}}):
        entries = json.loads(cache.read_text())
        for path, fields in ((output, ("sha256",)), (run.checkpoint_path, ("fingerprint", "stft"))):
            entries[str(path.resolve())] = {"stat": stamps_module._stat_key(os.stat(path)),
                                            "checked_ns": time.time_ns() + 10**12,
                                            **{field: forged[field] for field in fields}}
        cache.write_text(json.dumps(entries))
        stamps_module._open.clear()
        assert infer(run)["written"] == [] and outputs(run) == built[1]
    for text in ('"x"', "[1]", "null", "{"):
        cache.write_text(text)
        stamps_module._open.clear()
        assert infer(run)["written"] == [] and outputs(run) == built[1]
