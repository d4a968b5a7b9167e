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

Streamed answers: `POST /vocode?stream=true` answers the same samples chunk by chunk as they are made
(chunked transfer; a WAV header with the streaming sizes, 0xFFFFFFFF, then float32 samples), and the
WebSocket `/vocode/ws?id=X` takes the mel as `.npy` pieces (then the text `end`) and sends each chunk's
float32 PCM as soon as its right context has arrived, then a JSON summary; refusals there are a JSON
`{"error", "status"}` message and a close code (`WS_CLOSE`). Both run `batching.vocode_stream` with
`StreamChunks` (a short first chunk, doubling), outside the batching, on the replica's backend (one lock
for its model calls); a client that goes away ends its stream after the chunk in flight (`stream_steps`).
The same byte, frame, time and body-slot limits apply (`LiveMel` for the WebSocket).

Concurrent requests are batched by Ray Serve (`@serve.batch`: up to `max_batch` requests, waiting at most
`batch_wait_s` for more); each replica holds one backend (threads = its CPUs). HTTP is bound to 127.0.0.1
unless `host` says otherwise; a Ray started here (no `ray_address`) listens on 127.0.0.1 only, without its
dashboard unless asked (`engines.ray.connect`), the replicas' inter-deployment gRPC servers included
(`engines.ray.replica_grpc_on_loopback`), and `shutdown(stop_ray=...)` ends every process it started.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import json
import math
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Annotated, AsyncIterator, Iterator

import numpy as np
import torch

from .audio import stream_wav_header, wav_bytes
from .batching import NOT_YET, utterance_noise, vocode, vocode_stream
from .config import Finite, STFTConfig, WorkflowConfig, above, from_mapping, parameters
from .engines.ray import (INSTALL, actor_resources, child_pids, connect, end_processes, replica_grpc_on_loopback,
                          started_since)
from .errors import ConfigError, DataError, MelError, WaveGlowError, import_optional
from .io import NPY_MAGIC, npy_header
from .jobs import backend_name, open_backend, resolve_model_config
from .layout import check_utterance_id
from .mel_input import check_mel_format

APP_NAME = "waveglow"


@parameters(frozen=True, label="ServeLimits.{key}")
class ServeLimits:
    """What one request may hold: body bytes (npy / JSON), mel frames (a hop of audio each), the time its
    body may take to arrive; and how many bodies one replica reads at once."""

    max_body_bytes: Annotated[int, above(0)] = 8 * 1024 * 1024
    max_json_bytes: Annotated[int, above(0)] = 512 * 1024
    max_frames: Annotated[int, above(0)] = 4000  # 46 s of audio
    #: for the whole body, from when the replica starts reading it (a per-chunk timeout would let a client
    #: that sends a byte every few seconds hold its slot forever); 8 MiB in 10 s is 0.8 MB/s
    body_timeout_s: Annotated[Finite, above(0)] = 10.0
    #: bodies read at once per replica, beyond which 503 at once; worst-case body memory is this × max_body_bytes
    max_concurrent_bodies: Annotated[int, above(0)] = 64


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


#: a zip (.npz, np.savez) opens with ZIP_MAGIC, a .npy with io.NPY_MAGIC
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
    try:
        shape, fortran_order, dtype, offset = npy_header(io.BytesIO(body), len(body))
    except DataError as exc:
        raise BadRequest(400, f"the .npy body: {exc}") from None
    if dtype.kind not in NUMBER_KINDS or dtype.shape:
        raise BadRequest(422, f"the .npy holds dtype {dtype}, not numbers (float or integer)")
    if len(shape) not in (2, 3):
        raise BadRequest(422, f"the .npy holds shape {shape}, not a mel ([80, T] or [1, 80, T])")
    flat = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=offset)
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
               stft: STFTConfig = STFTConfig(), *, check_format: bool = True) -> np.ndarray:
    """A request body → float32 `[n_mel, T]`, or BadRequest naming what is wrong with it: 400 not a
    readable .npy / JSON mel, 413 too large, 415 another content type, 422 numbers that are not a vocodable mel
    (shape, range, NaN/Inf, the mel format check). `check_format=False` (a piece of a streamed mel, too short
    to judge): shape, range and NaN/Inf only; `LiveMel` checks the format once enough has arrived."""
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
        verdict = check_mel_format(array, "request mel", stft) if check_format else None
        if not check_format and not (array.ndim == 2 and array.shape[0] == stft.n_mel_channels
                                     and array.shape[1] >= 1 and np.isfinite(array).all()):
            verdict = check_mel_format(array, "mel piece", stft)  # names what is wrong: shape, no frames, NaN/Inf
    if verdict is not None and not verdict.ok:
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


# --- streamed answers (issue 36): POST /vocode?stream=true and the WebSocket /vocode/ws ---------------------
@parameters(frozen=True, label="StreamChunks.{key}")
class StreamChunks:
    """How a streamed answer is cut (`batching.vocode_stream`): a first chunk of `first_frames` mel frames
    (audio starts once it and its right context are there), each next one twice the last, up to
    `chunk_frames` (each chunk also computes its context: larger chunks waste less, smaller ones come sooner)."""

    first_frames: int = 16
    chunk_frames: int = 256

    def __post_init__(self):
        if not 0 < self.first_frames <= self.chunk_frames:
            raise ConfigError(f"StreamChunks: need 0 < first_frames <= chunk_frames, not {self.first_frames}, "
                              f"{self.chunk_frames}")


class SharedBackend:
    """A replica's backend, shared by its batched requests and its streams: each call that runs the model
    holds one lock (they would otherwise run at once on the same engine and its buffers); the rest is the
    backend's own."""

    def __init__(self, backend) -> None:
        self._backend, self._lock = backend, threading.Lock()

    def __getattr__(self, name: str):
        value = getattr(self._backend, name)
        if name not in ("run", "run_utterances") or not callable(value):
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)
        return locked


_DONE = object()


async def stream_steps(chunks: Iterator) -> AsyncIterator:
    """The items of a `vocode_stream` generator, each step run off the event loop. Closing this (the client
    went away: the response is cancelled) closes the generator once the step in flight is over: no chunk
    after it is computed, and the replica's backend is free for others."""
    loop = asyncio.get_running_loop()
    step = None
    try:
        while True:
            step = loop.run_in_executor(None, next, chunks, _DONE)
            item = await asyncio.shield(step)
            step = None
            if item is _DONE:
                return
            yield item
    finally:
        if step is not None and not step.done():
            step.add_done_callback(lambda done: (done.cancelled() or done.exception(), chunks.close()))
        else:
            chunks.close()


def pcm_float32(audio: np.ndarray) -> bytes:
    """A chunk of audio as the streamed answers send it: float32 little-endian samples (the WAV's data)."""
    return np.ascontiguousarray(audio, dtype="<f4").tobytes()


#: WebSocket close codes for a refusal's HTTP status (RFC 6455 §7.4.1): 1003 unreadable, 1007 not a mel,
#: 1008 a limit of time passed or no such route, 1009 too large, 1013 busy (retry), 1011 anything else
WS_CLOSE = {400: 1003, 415: 1003, 404: 1008, 422: 1007, 408: 1008, 413: 1009, 503: 1013}


class ClientGone(Exception):
    """The WebSocket client disconnected."""


class LiveMel:
    """A mel arriving over a WebSocket, as `vocode_stream`'s live source: binary messages are `.npy` pieces
    `[n_mel, k]` (decode_mel's checks, without the format check), the text message `end` ends it. Limits
    as POST's: total bytes (max_body_bytes), frames (max_frames). The format check (`check_mel_format`) runs on
    the frames so far once there are `check_frames` (what the first chunk needs) or at the end, before any
    of them is vocoded."""

    def __init__(self, limits: ServeLimits, stft: STFTConfig, check_frames: int) -> None:
        self.limits, self.stft, self.check_frames = limits, stft, check_frames
        self.ready: collections.deque = collections.deque()
        self.held: list[np.ndarray] = []  # frames not yet format-checked
        self.frames = self.bytes = 0
        self.checked = self.ended = False

    def take(self, message: dict) -> None:
        if message["type"] == "websocket.disconnect":
            raise ClientGone()
        text, data = message.get("text"), message.get("bytes")
        if text is not None:
            if text.strip().lower() != "end":
                raise BadRequest(400, f"text message {text[:40]!r}: send .npy pieces as binary messages, then the "
                                      "text message end")
            self.ended = True
            self._check()
            return
        self.bytes += len(data or b"")
        if self.bytes > self.limits.max_body_bytes:
            raise BadRequest(413, f"the mel's messages passed the limit of {self.limits.max_body_bytes} bytes")
        piece = decode_mel(data or b"", "application/octet-stream", self.limits, self.stft, check_format=False)
        self.frames += piece.shape[1]
        if self.frames > self.limits.max_frames:
            raise BadRequest(413, f"the mel passed the limit of {self.limits.max_frames} frames")
        (self.ready.append if self.checked else self.held.append)(piece)
        if self.frames >= self.check_frames:
            self._check()

    def _check(self) -> None:
        if self.checked or not self.held:
            return
        verdict = check_mel_format(np.concatenate(self.held, axis=1), "streamed mel", self.stft)
        if not verdict.ok:
            raise BadRequest(422, verdict.message())
        self.ready.extend(self.held)
        self.held, self.checked = [], True

    def pieces(self) -> Iterator[np.ndarray | None]:
        while True:
            if self.ready:
                yield self.ready.popleft()
            elif self.ended:
                return
            else:
                yield NOT_YET


class AsgiApp:
    """An ASGI 3 application calling `handler(scope, receive, send)` (uvicorn, which runs the replica's app
    lifespan, tells ASGI 3 from 2 by an `async def __call__`, which a bound method does not show)."""

    def __init__(self, handler) -> None:
        self.handler = handler

    async def __call__(self, scope, receive, send) -> None:
        await self.handler(scope, receive, send)


def stream_flag(value: str | None) -> bool:
    """`?stream=`: true/1/yes streams the answer, false/0/no or none does not; anything else is a 400."""
    flag = (value or "false").strip().lower()
    if flag not in ("true", "1", "yes", "false", "0", "no"):
        raise BadRequest(400, f"stream={value!r}: give stream=true or stream=false")
    return flag in ("true", "1", "yes")


def build_app(cfg: WorkflowConfig, *, replicas: int = 1, max_batch: int = 8, batch_wait_s: float = 0.01,
              limits: ServeLimits = ServeLimits(), stream: StreamChunks = StreamChunks()):
    """The Ray Serve application: one deployment, `replicas` replicas, each one warm backend; an ASGI app
    (so that it takes WebSockets too): POST /vocode (whole, or `?stream=true`) and the WebSocket /vocode/ws."""
    serve = import_optional("ray.serve", INSTALL, "serve")
    responses = import_optional("starlette.responses", INSTALL, "serve")
    requests = import_optional("starlette.requests", INSTALL, "serve")
    websockets = import_optional("starlette.websockets", INSTALL, "serve")
    name = backend_name(cfg)

    # room for every body slot on top of the batching room: a request beyond the slots must reach the replica
    # to get its quick 503, not wait in the proxy's queue behind stalled clients
    @serve.deployment(name="Vocoder", num_replicas=replicas, ray_actor_options=actor_resources(cfg, name),
                      max_ongoing_requests=max(2 * max_batch, 16) + limits.max_concurrent_bodies)
    @serve.ingress()
    class Vocoder:
        def __init__(self):
            replica_grpc_on_loopback()  # before the replica starts that server, right after this constructor
            self.slots = BodySlots(limits.max_concurrent_bodies)
            torch.set_num_threads(cfg.ray_cpus_per_actor)
            self.model_config = resolve_model_config(cfg)
            self.backend = SharedBackend(open_backend(cfg, model_config=self.model_config, name=name,
                                                      threads=cfg.ray_cpus_per_actor))
            self.rate = STFTConfig().sampling_rate

        def __serve_build_asgi_app__(self):
            return AsgiApp(self.asgi)

        async def asgi(self, scope, receive, send):
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            elif scope["type"] == "websocket":
                await self.websocket(websockets.WebSocket(scope, receive, send))
            else:
                response = await self.http(requests.Request(scope, receive, send))
                await response(scope, receive, send)

        def chunks(self, mel, utt_id: str):
            return vocode_stream(mel, self.backend, self.model_config, sigma=cfg.sigma, seed=cfg.seed, utt_id=utt_id,
                                 chunk_frames=stream.chunk_frames, first_chunk_frames=stream.first_frames,
                                 exact=cfg.exact_batching)

        def streamed(self, utt_id: str, mel: np.ndarray):
            """The answer as chunks are made: a WAV header with the streaming sizes, then float32 samples."""
            async def body():
                yield stream_wav_header(self.rate)
                async for audio in stream_steps(self.chunks(mel, utt_id)):
                    yield pcm_float32(audio)
            return responses.StreamingResponse(body(), media_type="audio/wav", headers={
                "X-Utterance-Id": utt_id, "X-Audio-Samples": str(mel.shape[1] * self.model_config.hop_length)})

        async def websocket(self, ws):
            """One utterance over a WebSocket: .npy pieces in, float32 PCM out as each chunk's right context
            has arrived, then a JSON summary; a refusal is a JSON {"error", "status"} message and a close
            code (WS_CLOSE) with its reason."""
            await ws.accept()
            started, waited, samples, count = time.perf_counter(), 0.0, 0, 0
            with ExitStack() as slot:
                try:
                    if ws.url.path.rstrip("/") != "/vocode/ws":
                        raise BadRequest(404, f"no WebSocket route {ws.url.path}; use /vocode/ws?id=...")
                    query_id = ws.query_params.get("id")
                    if not query_id:
                        raise BadRequest(400, "give the utterance id: /vocode/ws?id=LJ001-0001 (its noise is drawn "
                                              "from it)")
                    utt_id = request_id(query_id, np.zeros(0))
                    slot.enter_context(self.slots.take())  # while the mel arrives, as a POST's body
                    right = self.model_config.chunk_context()[1]
                    mel = LiveMel(limits, STFTConfig(n_mel_channels=self.model_config.n_mel_channels),
                                  check_frames=stream.first_frames + right)
                    async for audio in stream_steps(self.chunks(mel.pieces(), utt_id)):
                        if audio is NOT_YET:
                            before = time.perf_counter()
                            try:
                                message = await asyncio.wait_for(ws.receive(),
                                                                 max(1e-3, limits.body_timeout_s - waited))
                            except asyncio.TimeoutError:
                                raise BadRequest(408, f"mel not complete after {limits.body_timeout_s:g} s of "
                                                      f"waiting for it ({mel.frames} frames arrived)") from None
                            waited += time.perf_counter() - before
                            mel.take(message)
                            if mel.ended:
                                slot.close()  # the mel is in: its slot is free
                            continue
                        await ws.send_bytes(pcm_float32(audio))
                        samples, count = samples + audio.size, count + 1
                    await ws.send_text(json.dumps({"id": utt_id, "samples": samples, "chunks": count,
                                                   "seconds": round(time.perf_counter() - started, 4)}))
                    await ws.close(1000)
                except ClientGone:
                    return
                except (BadRequest, WaveGlowError, MelError) as exc:
                    status = exc.status if isinstance(exc, BadRequest) else 422
                    try:
                        await ws.send_text(json.dumps({"error": str(exc), "status": status}))
                        await ws.close(WS_CLOSE.get(status, 1011), str(exc).encode()[:120].decode(errors="ignore"))
                    except (RuntimeError, OSError, websockets.WebSocketDisconnect):
                        pass  # the client is gone already

        def vocode_now(self, requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
            mels = [mel for _, mel in requests]
            noises = [utterance_noise(self.model_config, mel.shape[1], cfg.seed, utt_id) for utt_id, mel in requests]
            audios, _ = vocode(self.backend, mels, noises, cfg.sigma, self.model_config, exact=cfg.exact_batching)
            return [(audio, len(requests)) for audio in audios]

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def vocode_batched(self, requests: list[tuple[str, np.ndarray]]) -> list:
            # off the event loop, so the replica keeps accepting (and batching) requests meanwhile
            return await asyncio.to_thread(self.vocode_now, requests)

        async def http(self, request):
            body = None
            try:
                if request.url.path.rstrip("/") != "/vocode":
                    raise BadRequest(404, f"no route {request.url.path}; POST a mel to /vocode (or open the "
                                          "WebSocket /vocode/ws)")
                if request.method != "POST":
                    raise BadRequest(405, f"{request.method} /vocode: POST a mel")
                streaming = stream_flag(request.query_params.get("stream"))
                body = await receive_body(request, limits, self.slots)
                mel = decode_mel(body, request.headers.get("content-type", ""), limits)
                utt_id = request_id(request.query_params.get("id"), mel)
                if streaming:
                    return self.streamed(utt_id, mel)
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
                  dashboard: bool = False, stream: StreamChunks = StreamChunks()) -> str:
    """Start (or update) the service on Ray (`cfg.ray_address`, else a local Ray on 127.0.0.1, with Ray's
    dashboard only if `dashboard`); returns its /vocode URL."""
    connect(cfg.ray_address, dashboard=dashboard)
    serve = import_optional("ray.serve", INSTALL, "serve")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, replicas=replicas, max_batch=max_batch, batch_wait_s=batch_wait_s, limits=limits,
                        stream=stream), name=APP_NAME, route_prefix="/")
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
    "batch_wait_s": S, "limits": {ServeLimits fields}, "stream": {StreamChunks fields}}."""
    args = dict(args or {})
    cfg = WorkflowConfig.from_dict(args.pop("params", {}) or {}, source="serve application args")
    limits = from_mapping(ServeLimits, args.pop("limits", {}) or {}, "serve application args: limits")
    stream = from_mapping(StreamChunks, args.pop("stream", {}) or {}, "serve application args: stream")
    return build_app(cfg, replicas=int(args.pop("replicas", 1)), max_batch=int(args.pop("max_batch", 8)),
                     batch_wait_s=float(args.pop("batch_wait_s", 0.01)), limits=limits, stream=stream)
