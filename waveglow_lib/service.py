"""Serving: a Ray Serve deployment around one warm backend — `POST /vocode` a mel, get `audio/wav` back.

`python -m waveglow_lib serve [--replicas N] [--port 8000]` or `serve_vocoder(cfg, ...)`. A request body is
the mel as `.npy` bytes (`Content-Type: application/octet-stream` or `application/x-npy`; read without
pickles) or, for small mels, JSON (`application/json`: `{"mel": [[...], ...]}` or the bare nested list),
shaped `[80, T]` (or `[1, 80, T]`). The mel format check (`mel_input.check_mel_format`) applies: a mel in
dB, log10, normalised, transposed ... is refused with the check's message. The answer is a 32-bit float
WAV at the model's rate: the same samples as the infer stage's `out/<id>_out.bin` for the same mel, seed
and utterance id (`?id=LJ001-0001`; without one, the id is the first 16 hex digits of the mel's sha256),
because the noise comes from (seed, id) and the `fast` backend's output does not depend on what else
shares its batch.

Bad requests get a 4xx with a one-line message (400 unreadable body, 404/405 wrong route or method, 413
too large, 415 wrong content type, 422 not a vocodable mel); nothing a client sends crashes the replica.
Concurrent requests are batched by Ray Serve (`@serve.batch`: up to `max_batch` requests, waiting at most
`batch_wait_s` for more); each replica holds one backend (threads = its CPUs). Bound to 127.0.0.1 unless
`host` says otherwise.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import torch

from .batching import utterance_noise, vocode
from .config import STFTConfig, WorkflowConfig
from .engines.ray import INSTALL, actor_resources, connect
from .errors import MelError, WaveGlowError, import_optional
from .layout import check_utterance_id
from .mel_input import check_mel_format
from .stages.infer import backend_name, open_backend, resolve_model_config

APP_NAME = "waveglow"


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold: body bytes (npy / JSON) and mel frames (256 samples each at 22.05 kHz)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_json_bytes: int = 512 * 1024
    max_frames: int = 4000  # 46 s of audio


class BadRequest(WaveGlowError):
    """A request the service refuses; `status` is its HTTP code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_mel(body: bytes, content_type: str, limits: ServeLimits = ServeLimits(),
               stft: STFTConfig = STFTConfig()) -> np.ndarray:
    """A request body → float32 `[n_mel, T]`, or BadRequest naming what is wrong with it."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"request body of {len(body)} bytes is over the limit of {limits.max_body_bytes}")
    if kind == "application/json":
        if len(body) > limits.max_json_bytes:
            raise BadRequest(413, f"JSON body of {len(body)} bytes is over the JSON limit of "
                                  f"{limits.max_json_bytes}; send larger mels as .npy bytes")
        try:
            data = json.loads(body)
            array = np.asarray(data["mel"] if isinstance(data, dict) else data, dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequest(400, f"JSON body is not a mel ({{\"mel\": [[...80 rows...]]}}): {exc}") from None
    elif kind in ("application/octet-stream", "application/x-npy", ""):
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BadRequest(400, f"body is not .npy bytes (np.save of a float array; no pickles): {exc}") \
                from None
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise BadRequest(422, f"the .npy holds dtype {array.dtype}, not numbers")
        array = array.astype(np.float32)
    else:
        raise BadRequest(415, f"content type {content_type!r}: send application/octet-stream (.npy bytes) "
                              "or application/json")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2 and array.shape[0] == stft.n_mel_channels and array.shape[1] > limits.max_frames:
        raise BadRequest(413, f"mel of {array.shape[1]} frames is over the limit of {limits.max_frames}")
    verdict = check_mel_format(array, "request mel", stft)
    if not verdict.ok:
        raise BadRequest(422, verdict.message())
    return np.ascontiguousarray(array)


def request_id(query_id: str | None, mel: np.ndarray) -> str:
    """The utterance id the noise is drawn for: the client's, or one derived from the mel's bytes."""
    if query_id:
        try:
            return check_utterance_id(query_id, "request")
        except WaveGlowError as exc:
            raise BadRequest(400, str(exc)) from None
    return hashlib.sha256(mel.tobytes()).hexdigest()[:16]


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """32-bit float WAV (the exact float32 samples the backend made)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(audio, dtype=np.float32), rate, subtype="FLOAT", format="WAV")
    return buffer.getvalue()


def build_app(cfg: WorkflowConfig, *, replicas: int = 1, max_batch: int = 8, batch_wait_s: float = 0.01,
              limits: ServeLimits = ServeLimits()):
    """The Ray Serve application: one deployment, `replicas` replicas, each one warm backend."""
    serve = import_optional("ray.serve", INSTALL, "serve")
    responses = import_optional("starlette.responses", INSTALL, "serve")
    name = backend_name(cfg)

    @serve.deployment(name="Vocoder", num_replicas=replicas, ray_actor_options=actor_resources(cfg, name),
                      max_ongoing_requests=max(2 * max_batch, 16))
    class Vocoder:
        def __init__(self):
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
            try:
                if request.url.path.rstrip("/") != "/vocode":
                    raise BadRequest(404, f"no route {request.url.path}; POST a mel to /vocode")
                if request.method != "POST":
                    raise BadRequest(405, f"{request.method} /vocode: POST a mel")
                declared = request.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
                    raise BadRequest(413, f"request body of {declared} bytes is over the limit of "
                                          f"{limits.max_body_bytes}")
                body = await request.body()
                mel = decode_mel(body, request.headers.get("content-type", ""), limits)
                utt_id = request_id(request.query_params.get("id"), mel)
                audio, shared = await self.vocode_batched((utt_id, mel))
            except BadRequest as exc:
                return responses.PlainTextResponse(f"{exc}\n", status_code=exc.status)
            except (WaveGlowError, MelError) as exc:  # a mel the backend refused: the request's fault
                return responses.PlainTextResponse(f"{exc}\n", status_code=422)
            return responses.Response(wav_bytes(audio, self.rate), media_type="audio/wav",
                                      headers={"X-Utterance-Id": utt_id, "X-Batch-Requests": str(shared)})

    return Vocoder.bind()


def serve_vocoder(cfg: WorkflowConfig, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
                  max_batch: int = 8, batch_wait_s: float = 0.01, limits: ServeLimits = ServeLimits()) -> str:
    """Start (or update) the service on Ray (`cfg.ray_address`, else a local Ray); returns its /vocode URL."""
    connect(cfg.ray_address)
    serve = import_optional("ray.serve", INSTALL, "serve")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, replicas=replicas, max_batch=max_batch, batch_wait_s=batch_wait_s, limits=limits),
              name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/vocode"


def shutdown() -> None:
    """Stop the service (Ray itself keeps running)."""
    serve = import_optional("ray.serve", INSTALL, "serve")
    serve.shutdown()


def application(args: dict):
    """Ray Serve application builder (`import_path: waveglow_lib.service:application`, as in a RayService or
    `serve run`): `args` = {"params": {WorkflowConfig fields}, "replicas": N, "max_batch": B,
    "batch_wait_s": S}."""
    args = dict(args or {})
    cfg = WorkflowConfig.from_dict(args.pop("params", {}) or {}, source="serve application args")
    return build_app(cfg, replicas=int(args.pop("replicas", 1)), max_batch=int(args.pop("max_batch", 8)),
                     batch_wait_s=float(args.pop("batch_wait_s", 0.01)))
