"""The one record reader (`records.read_record`): a record is loaded through its pydantic model, a field of
another JSON type is named in one line, and what damage means is the caller's to say (`damaged=`).
The stages' own records are covered end to end by test_record_shapes.py."""
from __future__ import annotations

import json

import pytest

from waveglow_lib import records
from waveglow_lib.errors import DataError, InputNotFound
from waveglow_lib.records import (ExportRecord, GearsRecord, JobRecord, Metrics, PostprocessEntry, PostprocessRecord,
                                  TimingsEntry, read_record)

WHAT = "the test's record"


def write(tmp_path, value, name="record.json"):
    path = tmp_path / name
    path.write_text(json.dumps(value) if not isinstance(value, str) else value)
    return path


def refused(path, model, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        read_record(path, model, WHAT, damaged="refuse", **kwargs)
    assert "\n" not in str(caught.value) and caught.value.path == path
    return str(caught.value)


@pytest.mark.parametrize("model, value, field, got, expected", [
    (JobRecord, {"settings": {"backend_used": 1}}, "settings.backend_used", "number", "a string"),
    (JobRecord, {"settings": {"precision_probe": {"snr_db": "40"}}}, "settings.precision_probe.snr_db", "string",
     "a number"),
    (JobRecord, {"workers": [1]}, "workers", "array", "an object"),
    (ExportRecord, {"opset": True}, "opset", "boolean", "a number"),
    (ExportRecord, {"opset": 1.5}, "opset", "number", "a number"),
    (ExportRecord, {"model_config": "x"}, "model_config", "string", "an object"),
    (GearsRecord, {"mel_lengths": [1, None]}, "mel_lengths[1]", "null", "a number"),
    (GearsRecord, {"source": "x"}, "source", "string", "an object"),
    (Metrics, {"utterances": [{"id": "a"}, {"notes": [1]}]}, "utterances[1].notes[0]", "number", "a string"),
    (Metrics, {"checkpoint": {"is_demo_model": 1}}, "checkpoint.is_demo_model", "number", "a boolean"),
])
def test_a_field_of_another_type_is_refused_naming_the_file_the_field_and_the_advice(tmp_path, model, value, field,
                                                                                     got, expected):
    path = write(tmp_path, value)
    message = refused(path, model, advice="run the test stage again")
    assert message == (f"{path}: field {field} holds a JSON {got}, expected {expected} ({WHAT}); "
                       "run the test stage again")


def test_a_damaged_record_to_redo_counts_as_absent_and_is_said(tmp_path):
    said = []
    for text in ('{"settings": "x"}', "{not json", "[1]", '"x"'):
        path = write(tmp_path, text)
        assert read_record(path, JobRecord, WHAT, on_damage=said.append) == {}
        assert said[-1].startswith(f"{path}: ") and WHAT in said[-1]
    assert said[0] == f"{path}: field settings holds a JSON string, expected an object ({WHAT})"
    assert "not valid JSON" in said[1] and "holds a JSON array" in said[2]
    for text in ("{not json", "[1]"):  # the same damage, needed to run: refused, with the advice
        path = write(tmp_path, text)
        assert refused(path, JobRecord, advice="or pass --force").endswith("; or pass --force")


def test_the_record_is_returned_as_written_less_its_null_fields(tmp_path):
    value = {"settings": {"backend_used": "torch", "precision_probe": None, "own": [1]}, "workers": None,
             "sigma": 1, "extra": {"kept": True}}
    path = write(tmp_path, value)
    assert read_record(path, JobRecord, WHAT) == {"settings": value["settings"], "sigma": 1, "extra": {"kept": True}}
    path = write(tmp_path, {"sigma": 1, "seed": 2})
    record = read_record(path, Metrics, WHAT, damaged="refuse")
    assert record == {"sigma": 1, "seed": 2} and isinstance(record["sigma"], int)  # an int is a number, kept


def test_a_missing_record_is_none_or_an_error_when_required(tmp_path):
    assert read_record(tmp_path / "none.json", JobRecord, WHAT, damaged="refuse") == {}
    with pytest.raises(InputNotFound, match="none.json: not found"):
        read_record(tmp_path / "none.json", JobRecord, WHAT, damaged="refuse", required=True)
    (tmp_path / "folder.json").mkdir()
    assert "not a regular file (a folder)" in refused(tmp_path / "folder.json", JobRecord, required=True)


def test_damaged_entries_are_dropped_one_by_one_and_said(tmp_path):
    good = {"settings": {"a": 1}, "output": {"size": 3, "sha256": "ab"}}
    path = write(tmp_path, {"items": {"a": good, "b": "x", "c": {"output": {"size": "3"}}, "d": None,
                                      "e": {**good, "settings": [1]}}})
    said = []
    record = read_record(path, PostprocessRecord, WHAT, entries=PostprocessEntry, damaged="refuse",
                         on_damage=said.append)
    assert record == {"items": {"a": good}}
    assert said == [f"{path}: field items.b holds a JSON string, expected an object ({WHAT})",
                    f"{path}: field items.c.output.size holds a JSON string, expected a number ({WHAT})",
                    f"{path}: field items.e.settings holds a JSON array, expected an object ({WHAT})"]
    path = write(tmp_path, {"items": [good]})  # the entries' mapping itself damaged: the whole record
    assert "field items holds a JSON array, expected an object" in refused(path, JobRecord, entries=TimingsEntry)


def test_every_record_model_is_strict_and_keeps_the_fields_it_does_not_name():
    models = [m for m in vars(records).values() if isinstance(m, type) and issubclass(m, records.Record)]
    assert len(models) > 20
    for model in models:
        assert model.model_config["strict"] and model.model_config["extra"] == "allow", model
        assert all(not f.is_required() for f in model.model_fields.values()), model  # absent = null = none


def test_caches_and_locks_are_read_through_their_models_too(tmp_path):
    """The lock record and the cache files take `max_bytes` and `follow_links=False` (`io.read_bounded`)."""
    from waveglow_lib.runlock import LOCK_NAME, read_holder

    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": 7, "host": "h", "started": "yesterday", "command": "run"}))
    assert read_holder(tmp_path)["pid"] == 7  # a start time of another type is shown as unknown, not refused
    lock.write_text(json.dumps({"pid": "7", "host": "h"}))
    assert read_holder(tmp_path) == {}  # a pid of another type: the record gives no details
    said = []
    target = write(tmp_path, {"key": {}, "mac": "x"}, "target.json")
    (tmp_path / "link.json").symlink_to(target)
    assert read_record(tmp_path / "link.json", records.EngineMeta, WHAT, follow_links=False,
                       on_damage=said.append) == {}
    assert "not a regular file (a symbolic link)" in said[0]
    assert read_record(target, records.EngineMeta, WHAT, max_bytes=4, on_damage=said.append) == {}
    assert "more than" in said[1]
    write(tmp_path, {"files": {"flow00.safetensors": 1}}, "meta.json")
    assert "field files.flow00.safetensors holds a JSON number, expected a string" in refused(
        tmp_path / "meta.json", records.EngineMeta)
