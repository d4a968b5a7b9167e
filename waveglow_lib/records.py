"""One pydantic model per record file the stages write and read, and the one reader that loads a record
through its model (`read_record`).

Records are data, not instructions: a record of the wrong shape (not JSON, not an object, a field of another
JSON type) is never trusted and never a traceback. Each model names the fields a reader uses and their JSON
types; every field may be absent or null (a null field is an absent one), and fields a reader does not use
are kept as written (`extra="allow"`): the on-disk formats are the ones earlier runs wrote. Types are strict
(no "1" for 1, no true for 1; an int is a number). pydantic's verdict reaches users as one line,
"<file>: field <name> holds a JSON <type>, expected <type> (<what the file holds>)", chosen by
`first_problem`, which the parameters' errors (`config`) share.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import DataError, InputNotFound
from .io import MAX_RECORD_BYTES, json_name, read_json

#: a record's entry: the key of the output file it describes, and of the sha256 of the source it was made from
OUTPUT_KEY = "output"
SOURCE_KEY = "source_sha256"


class Record(BaseModel):
    """A record's fields a reader uses (strict JSON types, each optional); the others are kept as written."""
    model_config = ConfigDict(strict=True, extra="allow")


#: a JSON number (a strict float takes an int, never a bool or a string)
Number = Optional[float]
#: any JSON object
Object = Optional[dict]


class FileEntry(Record):
    """A file a record describes (`io.file_entry`)."""
    size: Optional[int] = None
    sha256: Optional[str] = None


# --- preprocess: mel/manifest.json ----------------------------------------------------------------------
class Manifest(Record):
    """What preprocess reads back of its manifest (each item is checked by preprocess's `_changed`)."""
    settings: Object = None
    items: Optional[list[dict]] = None


# --- infer and vocode: out/timings.json, vocode/vocode.json -----------------------------------------------
class PrecisionProbe(Record):
    reason: Optional[str] = None
    snr_db: Number = None
    log_mel_distance: Number = None


class JobSettings(Record):
    backend_used: Optional[str] = None
    precision_used: Optional[str] = None
    precision_probe: Optional[PrecisionProbe] = None


class JobRecord(Record):
    """A job's record (`timings.json`, `vocode.json`) besides its entries: the one description of it, which
    the report and metrics.json's provenance read too (`provenance.read_timings`)."""
    settings: Optional[JobSettings] = None
    workers: Object = None
    items: Object = None


class TimingsEntry(Record):
    """An entry of `timings.json`'s items (id → entry): its output by size and sha256, its source's sha256."""
    output: Optional[FileEntry] = None
    source_sha256: Optional[str] = None
    frames: Optional[int] = None
    samples: Optional[int] = None
    audio_seconds: Number = None


class VocodeEntry(Record):
    """An entry of `vocode.json`'s items."""
    settings: Object = None
    source_sha256: Optional[str] = None
    source: Optional[str] = None
    output: Object = None
    frames: Optional[int] = None
    samples: Optional[int] = None


# --- postprocess: wav/postprocess.json --------------------------------------------------------------------
class PostprocessRecord(Record):
    items: Object = None


class PostprocessEntry(Record):
    settings: Object = None
    output: Optional[FileEntry] = None


# --- export and convert: <graph>.json, <artefact>.json, waveglow.gears.json ----------------------------------
class ExportRecord(Record):
    """What is read back of the export record (`<graph>.json`); `files` is {name: {"size", "sha256"}}."""
    model_fingerprint: Optional[str] = None
    files: Object = None
    graph_config: Object = Field(None, alias="model_config")  # `model_config` is pydantic's own name
    opset: Optional[int] = None
    variant: Optional[str] = None
    n_mel_channels: Optional[int] = None
    n_group: Optional[int] = None
    hop_length: Optional[int] = None
    stamp: Object = None


class Source(Record):
    model: Optional[str] = None


class ConvertedRecord(Record):
    """A converted model's record (`<artefact>.json`): what it was made from, its files."""
    source: Optional[Source] = None
    files: Object = None


class GearsRecord(ConvertedRecord):
    """The gears record beside the `.om` (the om backend reads batch and mel_lengths)."""
    command: Optional[str] = None
    batch: Optional[int] = None
    mel_lengths: Optional[list[int]] = None


# --- evaluate, bench: metrics.json, bench.json -------------------------------------------------------------
class MetricValues(Record):
    """The quality metrics (`METRIC_KEYS`) of an utterance, or their means."""
    log_mel_distance: Number = None
    mcd_db: Number = None
    stoi: Number = None
    pesq: Number = None


#: the quality metrics of metrics.json, per utterance and summarised
METRIC_KEYS = tuple(MetricValues.model_fields)


class Summary(MetricValues):
    utterances: Optional[int] = None


class UtteranceMetrics(MetricValues):
    id: Optional[str] = None
    seconds: Number = None
    notes: Optional[list[str]] = None


class Parity(Record):
    backend: Optional[str] = None
    reference: Optional[str] = None
    utterances: Optional[int] = None
    snr_db_min: Number = None
    snr_db_mean: Number = None
    max_abs_diff: Number = None


class RoundTrip(Record):
    seconds: Number = None
    snr_db: Number = None
    log_mel_distance: Number = None


class ThroughputRow(Record):
    batch_size: Optional[int] = None
    backend: Optional[str] = None
    precision: Optional[str] = None


class CheckpointInfo(Record):
    path: Optional[str] = None
    file: Optional[str] = None
    size_bytes: Optional[int] = None
    parameters: Optional[int] = None
    sha256: Optional[str] = None
    is_demo_model: Optional[bool] = None
    note: Optional[str] = None


class Machine(Record):
    cpu: Optional[str] = None
    hostname: Optional[str] = None
    usable_cpus: Optional[int] = None
    logical_cpus: Optional[int] = None


class Metrics(JobSettings):
    """metrics.json's fields the report reads back (with the infer job's settings at the top level)."""
    name: Optional[str] = None
    backend: Optional[str] = None
    precision: Optional[str] = None
    sigma: Number = None
    seed: Optional[int] = None
    summary: Optional[Summary] = None
    utterances: Optional[list[UtteranceMetrics]] = None
    parity: Optional[list[Parity]] = None
    round_trip: Optional[RoundTrip] = None
    throughput: Optional[list[ThroughputRow]] = None
    checkpoint: Optional[CheckpointInfo] = None
    machine: Optional[Machine] = None
    commit: Optional[str] = None
    written_at: Optional[str] = None


class BenchSettings(Record):
    model: Optional[str] = None
    quick: Optional[bool] = None
    utterances: Optional[int] = None
    repeats: Optional[int] = None


class BenchRecord(Record):
    """bench.json's fields the report reads."""
    settings: Optional[BenchSettings] = None


class ThroughputKey(Record):
    """`throughput_key.json`: what the notebooks' throughput rows measured (`bench.harness.run_throughput`)."""
    key: Object = None
    measured_at: Optional[str] = None


# --- caches and locks -----------------------------------------------------------------------------------------
class FileStampsCache(Record):
    """`.file_stamps.json`, {resolved path: entry}: each entry is checked where it is used
    (`stamps.FileStamps.value`), a damaged one computed again."""


class LockRecord(Record):
    """A run folder's lock file (`runlock`): who holds it. Anyone in the folder can write it: `started` is
    shown only when it is a time the clock can show."""
    pid: Optional[int] = None
    host: Optional[str] = None
    command: Optional[str] = None
    token: Optional[str] = None
    started: Any = None
    took_over: Object = None


class EngineMeta(Record):
    """The fast engine cache's `engine-*/meta.json`: the key fields, each flow file's sha256, the activation
    ranges, and the MAC that proves it (read through this model by `backends.fast.cache`, which then checks
    the key and the MAC)."""
    key: Object = None
    files: Optional[dict[str, str]] = None
    activations: Object = None
    mac: Optional[str] = None


class ProbeVerdict(Record):
    """The fast engine cache's stored `auto_engine` verdict, and its MAC (read through this model, as
    `EngineMeta`)."""
    key: Object = None
    record: Object = None
    mac: Optional[str] = None


class Int8Record(Record):
    """An OpenVINO int8 cache entry's `record.json`: its key fields and each file's sha256."""
    key: Object = None
    files: Optional[dict[str, str]] = None
    quantise_seconds: Number = None


# --- the one reader ------------------------------------------------------------------------------------------
def read_record(path: str | Path, model: type[Record], what: str, *, entries: type[Record] | None = None,
                damaged: Literal["redo", "refuse"] = "redo", advice: str = "",
                on_damage: Callable[[str], Any] | None = None, required: bool = False,
                max_bytes: int = MAX_RECORD_BYTES, follow_links: bool = True) -> dict:
    """The JSON object at `path`, loaded through `model` (the object as written, its null fields dropped:
    readers need not tell null from absent), or {} when there is none (`required`: InputNotFound naming the
    file). One of the wrong shape is never trusted; what damage means is the caller's to say:

    - `damaged="refuse"` (a record needed to run: the one that proves which model a graph was made from):
      DataError "<file>: <what is wrong>; <advice>", naming the file and the field;
    - `damaged="redo"` (a record that only says what work may be skipped): it counts as absent, {} after
      `on_damage("<file>: <what is wrong>")` (`stamps.announce_redo`), so the work is done again.

    `entries`: the record's `items` is a mapping of entries (id → object), each loaded through `entries`;
    one of the wrong shape is dropped (said to `on_damage`): its item is redone.
    `max_bytes` and `follow_links=False` (a cache's files, a lock file) are `io.read_bounded`'s.
    """
    path = Path(path)
    if not required and not path.is_file():
        return {}
    try:
        record = read_json(path, what, max_bytes=max_bytes, follow_links=follow_links)
        check(record, model, path, what)
    except InputNotFound:
        if required:
            raise
        return {}  # removed since the look
    except DataError as exc:
        if damaged == "refuse":
            raise DataError(f"{exc}; {advice}" if advice else str(exc), path=path) from None
        if on_damage is not None:
            on_damage(str(exc))
        return {}
    record = {key: value for key, value in record.items() if value is not None}
    if entries is not None:
        kept = {}
        for name, entry in (record.get("items") or {}).items():
            if entry is None:  # null: no entry
                continue
            try:
                check(entry, entries, path, what, ("items", name))
            except DataError as exc:
                if on_damage is not None:
                    on_damage(str(exc))
                continue
            kept[name] = entry
        record["items"] = kept
    return record


def check(value: Any, model: type[Record], path: str | Path, what: str, at: tuple = ()) -> None:
    """`value` loaded through `model`, or DataError "<file>: field <at + field> holds a JSON <type>, expected
    <type> (<what>)"."""
    try:
        model.model_validate(value)
    except ValidationError as error:
        item = first_problem(error, value if isinstance(value, dict) else {})
        where = field_name(at + tuple(item["loc"]))
        expected = _EXPECTED.get(item["type"])
        problem = (f"holds a JSON {json_name(item['input'])}, expected {expected}" if expected
                   else str(item["msg"]))
        raise DataError(f"{path}: field {where} {problem} ({what})" if where else f"{path}: {problem} ({what})",
                        path=path) from None


#: what a field of pydantic's type error holds, in JSON's words
_EXPECTED = {"model_type": "an object", "dict_type": "an object", "list_type": "an array",
             "string_type": "a string", "int_type": "a number", "float_type": "a number", "bool_type": "a boolean",
             "none_required": "null"}


def field_name(loc: tuple) -> str:
    """A field's name as the errors say it: ("items", 0, "id") -> items[0].id"""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def first_problem(error: ValidationError, data: Mapping[str, Any]) -> dict:
    """The first of pydantic's errors as users have always read it: a wrong type before a bad value (the
    parameters' errors, `config`, and the records' alike)."""
    items = error.errors(include_url=False)
    return next((i for i in items if is_type_error(i, data)), items[0])


def is_type_error(item: Mapping[str, Any], data: Mapping[str, Any]) -> bool:
    """Whether one of pydantic's errors is a wrong type (not a bad value of the right type)."""
    if item["type"] == "literal_error":  # a string not among the choices is a bad value; anything else a type
        return not isinstance(data.get(item["loc"][0], item["input"]), str)
    return item["type"].endswith("_type") or item["type"] in ("none_required", "unexpected_keyword_argument")
