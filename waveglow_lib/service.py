"""Serving: a Ray Serve deployment around one warm backend — `POST /vocode` a mel, get `audio/wav` back.

`python -m waveglow_lib serve [--replicas N] [--port 8000]` or `serve_vocoder(cfg, ...)`. A request body is
the mel as `.npy` bytes (`Content-Type: application/octet-stream` or `application/x-npy`; read without
pickles) or, for small mels, JSON (`application/json`: `{"mel": [[...], ...]}` or the bare nested list),
shaped `[80, T]` (or `[1, 80, T]`). The mel format check (`mel_input.check_mel_format`) applies: a mel in
dB, log10, normalised, transposed ... is refused with the check's message. The answer is a 32-bit float
WAV at the model's rate: the infer stage's `out/<id>_out.bin` for the same mel, seed and utterance id
(`?id=LJ001-0001`; without one, the id is the first 16 hex digits of the mel's sha256), because the noise
comes from (seed, id) and the `fast` backend's output depends on what else shares its batch only by
rounding (`backends.fast.engine.PACKED_MIN_SNR_DB`).

Bad requests get a 4xx with a one-line message, never a 500 (400 not a readable .npy or JSON mel: an .npz,
a header whose shape does not match the bytes after it, Python objects, ragged lists, strings, NaN/Infinity
constants, JSON nested too deep; 404/405 wrong route or method, 408 body too slow, 413 too large, 415 wrong
content type or any Content-Encoding (compressed bodies are not read), 422 numbers that are not a vocodable
mel: complex, bool or text dtypes, beyond float32's range, NaN/Inf, wrong shape, the format check); nothing a
client sends crashes the replica. A .npy header is checked before anything is allocated: its shape must
account for exactly the bytes that follow it, so a header declaring (10**12, 80) costs nothing. What a client can hold (`ServeLimits`): the body is read as it
arrives and refused with 413 as soon as its Content-Length, or the bytes so far (chunked bodies too), pass
8 MiB (512 KiB for JSON), so the handler never keeps more than that of one request (Ray's HTTP proxy and
the replica's receive queue read ahead of it, Ray's doing: tens of MB of a fast oversized upload can be in
flight before the 413, freed with the request); the whole body must arrive within 10 s of the replica
starting to read it (a total, not per chunk: a client trickling a byte at a time is cut off too), else
408; a replica reads at most 64 bodies at once and answers any more with 503 (`Retry-After: 1`) at once,
so clients that stall after their headers cannot make good requests queue behind them, and kept bodies
stay under 64 × 8 MiB. A refusal before the body's end closes the connection.

Concurrent requests are batched by Ray Serve (`@serve.batch`: up to `max_batch` requests, waiting at most
`batch_wait_s` for more); each replica holds one backend (threads = its CPUs). HTTP is bound to 127.0.0.1
unless `host` says otherwise; a Ray started here (no `ray_address`) listens on 127.0.0.1 only, without its
dashboard unless asked (`engines.ray.connect`), the replicas' inter-deployment gRPC servers included
(`engines.ray.replica_grpc_on_loopback`), and `shutdown(stop_ray=...)` ends every process it started.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .audio import wav_bytes
from .batching import utterance_noise, vocode
from .config import STFTConfig, WorkflowConfig
from .engines.ray import (INSTALL, actor_resources, child_pids, connect, end_processes, replica_grpc_on_loopback,
                          started_since)
from .errors import ConfigError, MelError, WaveGlowError, import_optional
from .jobs import backend_name, open_backend, resolve_model_config
from .layout import check_utterance_id
from .mel_input import check_mel_format

APP_NAME = "waveglow"


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold: body bytes (npy / JSON), mel frames (a hop of audio each), the time its
    body may take to arrive; and how many bodies one replica reads at once."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_json_bytes: int = 512 * 1024
    max_frames: int = 4000  # 46 s of audio
    #: for the whole body, from when the replica starts reading it (a per-chunk timeout would let a client
    #: that sends a byte every few seconds hold its slot forever); 8 MiB in 10 s is 0.8 MB/s
    body_timeout_s: float = 10.0
    #: bodies read at once per replica, beyond which 503 at once; worst-case body memory is this × max_body_bytes
    max_concurrent_bodies: int = 64

    def __post_init__(self):
        for name in ("max_body_bytes", "max_json_bytes", "max_frames", "body_timeout_s", "max_concurrent_bodies"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ServeLimits.{name} must be > 0, not {getattr(self, name)!r}")


class BadRequest(WaveGlowError):
    """A request the service refuses; `status` is its HTTP code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


BODY_KINDS = ("application/json", "application/octet-stream", "application/x-npy", "")


def body_kind(content_type: str) -> str:
    """The media type of a request (no parameters, lower case), or 415 for one the service does not read."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in BODY_KINDS:
        raise BadRequest(415, f"content type {content_type!r}: send application/octet-stream (.npy bytes) "
                              "or application/json")
    return kind


def check_encoding(content_encoding: str | None) -> None:
    """415 for a compressed body (`Content-Encoding: gzip`, `deflate`, `br` ...): the service reads bodies as
    sent, so the byte limits bound what a request holds, with no inflating to bound (a zip bomb)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding not in ("", "identity"):
        raise BadRequest(415, f"Content-Encoding {content_encoding!r} is not supported: send the body "
                              "uncompressed (.npy bytes or JSON, no Content-Encoding)")


@dataclass
class BodySlots:
    """How many request bodies a replica is reading; all its requests run on one event loop, so a count is enough."""

    limit: int
    in_use: int = 0

    @contextmanager
    def take(self):
        """One slot while a body is read, or 503 at once when all are taken (rather than a queue that clients
        stalling after their headers would fill)."""
        if self.in_use >= self.limit:
            raise BadRequest(503, f"busy: {self.in_use} request bodies are being received (the limit); retry shortly")
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1


async def read_body(chunks, declared: str | None, limit: int, timeout_s: float) -> bytes:
    """The body from an async iterator of its chunks (starlette's `request.stream()`): 413 as soon as the
    declared Content-Length or the bytes so far pass `limit` (chunked bodies too; the chunk that passes it is
    not kept), 408 unless all of it arrives within `timeout_s` in total."""
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(400, f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise BadRequest(413, f"request body of {int(declared)} bytes is over the limit of {limit}")
    parts: list[bytes] = []
    size = 0

    async def collect():
        nonlocal size
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"request body passed the limit of {limit} bytes while arriving")
            parts.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(408, f"request body not complete after {timeout_s:g} s ({size} bytes arrived)") from None
    return b"".join(parts)


async def receive_body(request, limits: ServeLimits, slots: BodySlots) -> bytes:
    """A starlette request's body, within `limits` (JSON's own byte limit for JSON), holding one of `slots`;
    its type and encoding are checked first (415), before a slot is taken."""
    kind = body_kind(request.headers.get("content-type", ""))
    check_encoding(request.headers.get("content-encoding"))
    limit = limits.max_json_bytes if kind == "application/json" else limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {int(declared)} bytes is over the limit of {limit}")  # no slot
    client_gone = import_optional("starlette.requests", INSTALL, "serve").ClientDisconnect
    with slots.take():
        try:
            return await read_body(request.stream(), declared, limit, limits.body_timeout_s)
        except client_gone:
            raise BadRequest(400, "the client disconnected before the end of its body") from None


#: what a .npy body opens with (np.save); a zip (.npz, np.savez) opens with ZIP_MAGIC
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
#: element kinds a mel may come in, cast to float32: floats, signed and unsigned integers; anything else
#: (object = pickles, complex, bool, text, dates, records, sub-arrays) is refused
NUMBER_KINDS = "fiu"
FLOAT32_MAX = float(np.finfo(np.float32).max)
MEL_JSON = '{"mel": [[...80 rows of numbers...]]} or the bare [[...], ...]'


def npy_array(body: bytes) -> np.ndarray:
    """.npy bytes → the array they hold, its header checked before anything is allocated: version 1 or 2,
    numbers (no pickles), a shape whose bytes are exactly what the body holds after the header (so a header
    declaring (10**12, 80) costs nothing), C or Fortran order. The array is a view of `body` (no copy)."""
    if not body.startswith(NPY_MAGIC):
        found = ("a zip archive (.npz?): send one array, np.save's bytes" if body.startswith(ZIP_MAGIC)
                 else "no data" if not body
                 else "JSON? send it with Content-Type: application/json" if body.lstrip()[:1] in (b"[", b"{")
                 else f"it starts {body[:8]!r}")
        raise BadRequest(400, f"body is not .npy bytes (np.save of a float array; no pickles): {found}")
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:  # 3.0 only differs by a UTF-8 header, which only record field names need
            raise BadRequest(400, f".npy format version {version[0]}.{version[1]}: send version 1.0 or 2.0 "
                                  "(what np.save writes for a float array)")
    except BadRequest:
        raise
    except Exception as exc:  # numpy parses the header with ast and, for old headers, tokenize: anything goes
        raise BadRequest(400, f"body is not .npy bytes, its header is unreadable: {exc}") from None
    if dtype.hasobject:
        raise BadRequest(400, f"the .npy holds Python objects (dtype {dtype}, a pickle): send numbers; "
                              "pickles are never read")
    if dtype.kind not in NUMBER_KINDS or dtype.shape:
        raise BadRequest(422, f"the .npy holds dtype {dtype}, not numbers (float or integer)")
    if any(n < 0 for n in shape):
        raise BadRequest(400, f"the .npy header declares shape {shape}, with a negative dimension")
    if len(shape) not in (2, 3):
        raise BadRequest(422, f"the .npy holds shape {shape}, not a mel ([80, T] or [1, 80, T])")
    data = len(body) - stream.tell()
    needed = dtype.itemsize * math.prod(shape)
    if needed != data:
        raise BadRequest(400, f"the .npy header declares shape {shape} of {dtype} ({needed} bytes), the body "
                              f"holds {data} bytes after it")
    flat = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


#: more digits than any float32 integer has (3.4e38: 39): not converted (Python's own limit is 4300 digits,
#: whose message advises `sys.set_int_max_str_digits()`), refused where it stands (`_LongInteger`)
MAX_INT_DIGITS = 40


class _LongInteger:
    """A JSON integer of more than MAX_INT_DIGITS digits, kept as its digit count for the refusal."""

    def __init__(self, digits: int):
        self.digits = digits


def _json_int(text: str):
    """A JSON integer of the body: an int, or `_LongInteger` for one too long to be a float32 (refused by
    `json_array` with its place in the mel, never converted)."""
    digits = len(text.lstrip("-"))
    return _LongInteger(digits) if digits > MAX_INT_DIGITS else int(text)


def json_array(body: bytes) -> np.ndarray:
    """JSON bytes → a float64 array: a `{"mel": rows}` object or the bare rows, where rows are lists of lists
    (2 or 3 levels) of JSON numbers, all of one length per level; no NaN/Infinity constants, no strings,
    booleans or nulls, no keys given twice, no other keys."""
    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number")

    def unique_keys(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"keys given twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
        return dict(pairs)

    try:
        data = json.loads(body, parse_constant=no_constant, object_pairs_hook=unique_keys, parse_int=_json_int)
    except RecursionError:  # "[" * 100000: the parser gives up at Python's recursion limit
        raise BadRequest(400, f"JSON body is nested too deep to be a mel ({MEL_JSON}, 2 or 3 levels)") from None
    except ValueError as exc:  # also: not UTF-8, an integer of more than 4300 digits
        raise BadRequest(400, f"JSON body is not a mel ({MEL_JSON}): {exc}") from None
    if isinstance(data, dict):
        if set(data) != {"mel"}:
            raise BadRequest(400, f"JSON object with keys {sorted(data)}: expected only \"mel\" ({MEL_JSON})")
        data = data["mel"]
    shape: list[int] = []
    probe = data
    while isinstance(probe, list) and len(shape) < 4:
        shape.append(len(probe))
        probe = probe[0] if probe else None
    if len(shape) not in (2, 3):
        raise BadRequest(400, f"JSON mel is {len(shape)} level(s) of lists, not 2 or 3 ({MEL_JSON})")
    numbers: list = []

    def collect(node, depth: int, where: str):
        if not isinstance(node, list):
            raise BadRequest(400, f"JSON mel{where} is {type(node).__name__}, not a list ({MEL_JSON})")
        if len(node) != shape[depth]:
            raise BadRequest(400, f"JSON mel is ragged: mel{where} has {len(node)} items, the first list at its "
                                  f"level has {shape[depth]}")
        if depth + 1 < len(shape):
            for i, child in enumerate(node):
                collect(child, depth + 1, f"{where}[{i}]")
            return
        for i, value in enumerate(node):
            if isinstance(value, _LongInteger):
                raise BadRequest(422, f"JSON mel{where}[{i}] is an integer of {value.digits} digits, outside "
                                      f"float32's range")
            if type(value) not in (int, float):  # bool is an int subclass: refused too
                raise BadRequest(400, f"JSON mel{where}[{i}] is {json.dumps(value)[:40]}, not a number")
            if not -FLOAT32_MAX <= value <= FLOAT32_MAX:  # exact for huge ints; false for inf (1e400)
                shown = f"an integer of {len(str(abs(value)))} digits" if type(value) is int else repr(value)
                raise BadRequest(422, f"JSON mel{where}[{i}] is {shown}, outside float32's range")
        numbers.extend(node)

    collect(data, 0, "")
    return np.array(numbers, dtype=np.float64).reshape(shape)


def decode_mel(body: bytes, content_type: str, limits: ServeLimits = ServeLimits(),
               stft: STFTConfig = STFTConfig()) -> np.ndarray:
    """A request body → float32 `[n_mel, T]`, or BadRequest naming what is wrong with it: 400 not a
    readable .npy / JSON mel, 413 too large, 415 another content type, 422 numbers that are not a vocodable mel
    (shape, range, NaN/Inf, the mel format check)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"request body of {len(body)} bytes is over the limit of {limits.max_body_bytes}")
    if kind == "application/json":
        if len(body) > limits.max_json_bytes:
            raise BadRequest(413, f"JSON body of {len(body)} bytes is over the JSON limit of "
                                  f"{limits.max_json_bytes}; send larger mels as .npy bytes")
        array = json_array(body)
    elif kind in ("application/octet-stream", "application/x-npy", ""):
        array = npy_array(body)
    else:
        raise BadRequest(415, f"content type {content_type!r}: send application/octet-stream (.npy bytes) "
                              "or application/json")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2 and array.shape[0] == stft.n_mel_channels and array.shape[1] > limits.max_frames:
        raise BadRequest(413, f"mel of {array.shape[1]} frames is over the limit of {limits.max_frames}")
    # a signalling NaN's cast warns "invalid value": noise, the check below names NaN/Inf itself
    with np.errstate(all="ignore"):
        if array.dtype.kind == "f" and array.dtype.itemsize > 4:  # float64 beyond float32's range: inf once cast
            beyond = int((np.isfinite(array) & (np.abs(array) > FLOAT32_MAX)).sum())
            if beyond:
                raise BadRequest(422, f"{beyond} of the mel's values are beyond float32's range")
        verdict = check_mel_format(array, "request mel", stft)
    if not verdict.ok:
        raise BadRequest(422, verdict.message())
    return np.ascontiguousarray(array, dtype=np.float32)


def request_id(query_id: str | None, mel: np.ndarray) -> str:
    """The utterance id the noise is drawn for: the client's, or one derived from the mel's bytes."""
    if query_id:
        try:
            return check_utterance_id(query_id, "request")
        except WaveGlowError as exc:
            raise BadRequest(400, str(exc)) from None
    return hashlib.sha256(mel.tobytes()).hexdigest()[:16]


def build_app(cfg: WorkflowConfig, *, replicas: int = 1, max_batch: int = 8, batch_wait_s: float = 0.01,
              limits: ServeLimits = ServeLimits()):
    """The Ray Serve application: one deployment, `replicas` replicas, each one warm backend."""
    serve = import_optional("ray.serve", INSTALL, "serve")
    responses = import_optional("starlette.responses", INSTALL, "serve")
    name = backend_name(cfg)

    # room for every body slot on top of the batching room: a request beyond the slots must reach the replica
    # to get its quick 503, not wait in the proxy's queue behind stalled clients
    @serve.deployment(name="Vocoder", num_replicas=replicas, ray_actor_options=actor_resources(cfg, name),
                      max_ongoing_requests=max(2 * max_batch, 16) + limits.max_concurrent_bodies)
    class Vocoder:
        def __init__(self):
            replica_grpc_on_loopback()  # before the replica starts that server, right after this constructor
            self.slots = BodySlots(limits.max_concurrent_bodies)
            torch.set_num_threads(cfg.ray_cpus_per_actor)
            self.model_config = resolve_model_config(cfg)
            self.backend = open_backend(cfg, model_config=self.model_config, name=name,
                                        threads=cfg.ray_cpus_per_actor)
            self.rate = STFTConfig().sampling_rate

        def vocode_now(self, requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
            mels = [mel for _, mel in requests]
            noises = [utterance_noise(self.model_config, mel.shape[1], cfg.seed, utt_id) for utt_id, mel in requests]
            audios, _ = vocode(self.backend, mels, noises, cfg.sigma, self.model_config, exact=cfg.exact_batching)
            return [(audio, len(requests)) for audio in audios]

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def vocode_batched(self, requests: list[tuple[str, np.ndarray]]) -> list:
            # off the event loop, so the replica keeps accepting (and batching) requests meanwhile
            return await asyncio.to_thread(self.vocode_now, requests)

        async def __call__(self, request):
            body = None
            try:
                if request.url.path.rstrip("/") != "/vocode":
                    raise BadRequest(404, f"no route {request.url.path}; POST a mel to /vocode")
                if request.method != "POST":
                    raise BadRequest(405, f"{request.method} /vocode: POST a mel")
                body = await receive_body(request, limits, self.slots)
                mel = decode_mel(body, request.headers.get("content-type", ""), limits)
                utt_id = request_id(request.query_params.get("id"), mel)
                audio, shared = await self.vocode_batched((utt_id, mel))
            except BadRequest as exc:
                # a body not read to its end is not read at all: the connection closes rather than carry it
                headers = {"Connection": "close"} if body is None else {}
                if exc.status == 503:
                    headers["Retry-After"] = "1"
                return responses.PlainTextResponse(f"{exc}\n", status_code=exc.status, headers=headers)
            except (WaveGlowError, MelError) as exc:  # a mel the backend refused: the request's fault
                return responses.PlainTextResponse(f"{exc}\n", status_code=422)
            return responses.Response(wav_bytes(audio, self.rate, "float32"), media_type="audio/wav",
                                      headers={"X-Utterance-Id": utt_id, "X-Batch-Requests": str(shared)})

    return Vocoder.bind()


def serve_vocoder(cfg: WorkflowConfig, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
                  max_batch: int = 8, batch_wait_s: float = 0.01, limits: ServeLimits = ServeLimits(),
                  dashboard: bool = False) -> str:
    """Start (or update) the service on Ray (`cfg.ray_address`, else a local Ray on 127.0.0.1, with Ray's
    dashboard only if `dashboard`); returns its /vocode URL."""
    connect(cfg.ray_address, dashboard=dashboard)
    serve = import_optional("ray.serve", INSTALL, "serve")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, replicas=replicas, max_batch=max_batch, batch_wait_s=batch_wait_s, limits=limits),
              name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/vocode"


def shutdown(*, stop_ray: bool = False, existing: set[int] | None = None, grace_s: float = 10.0) -> list[str]:
    """Stop the service. With `stop_ray` (the local Ray `serve_vocoder` started for this process), stop Ray
    too, then end every process started since (not in `existing`, from `child_pids()` before) that outlived
    `ray.shutdown()` by `grace_s`: Ray's dashboard and runtime-env agents can. Returns those it had to end."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():  # serve.shutdown() would start a Ray to connect to
        return []
    serve = import_optional("ray.serve", INSTALL, "serve")
    serve.shutdown()
    if not stop_ray:
        return []
    started = started_since(existing or set())
    ray.shutdown()
    return end_processes(started, wait_s=grace_s)


def application(args: dict):
    """Ray Serve application builder (`import_path: waveglow_lib.service:application`, as in a RayService or
    `serve run`): `args` = {"params": {WorkflowConfig fields}, "replicas": N, "max_batch": B,
    "batch_wait_s": S, "limits": {ServeLimits fields}}."""
    args = dict(args or {})
    cfg = WorkflowConfig.from_dict(args.pop("params", {}) or {}, source="serve application args")
    try:
        limits = ServeLimits(**(args.pop("limits", {}) or {}))
    except TypeError as exc:
        raise ConfigError(f"serve application args: limits: {exc} (fields: {', '.join(ServeLimits.__annotations__)})") \
            from None
    return build_app(cfg, replicas=int(args.pop("replicas", 1)), max_batch=int(args.pop("max_batch", 8)),
                     batch_wait_s=float(args.pop("batch_wait_s", 0.01)), limits=limits)
