"""The vocoding service: request decoding and its refusals (clear 4xx), reading a body within its limits
(size while it arrives, time, concurrent bodies), checked without Ray; a real Ray Serve deployment under
concurrent clients whose responses equal the infer stage's outputs byte for byte, and under hostile ones
(stalled, oversized, chunked); the `serve` command's Ray on 127.0.0.1 and gone after SIGTERM (e2e; skipped
without ray, which is the `ray` extra, part of `.[all]`)."""
from __future__ import annotations

import asyncio
import gzip
import inspect
import io
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from support import optional_ray
from waveglow_lib.audio import wav_bytes
from waveglow_lib.bench.serve_load import (load_level, load_test, npy_bytes, post_mel, render_load_markdown,
                                           wav_samples)
from waveglow_lib.errors import ConfigError
from waveglow_lib.engines.ray import with_startup_retries
from waveglow_lib.io import read_bin
from waveglow_lib.audio import stream_wav_header
from waveglow_lib.batching import NOT_YET
from waveglow_lib.config import STFTConfig
from waveglow_lib.service import (BadRequest, BodySlots, ClientGone, LiveMel, ServeLimits, StreamChunks, application,
                                  check_encoding, decode_mel, read_body, receive_body, request_id, stream_flag,
                                  stream_steps)

ray, needs_ray = optional_ray("ray.serve")

@pytest.fixture(scope="module")
def speech_mel(preprocessed_mels) -> np.ndarray:
    """A real natural-log mel (LJ001-0008, 99 frames) from the preprocess stage."""
    return read_bin(preprocessed_mels / "LJ001-0008.bin", (80, 99))


def refused(body: bytes, content_type: str, limits: ServeLimits = ServeLimits()) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        decode_mel(body, content_type, limits)
    return info.value


def test_npy_and_json_bodies_decode_to_the_same_mel(speech_mel):
    from_npy = decode_mel(npy_bytes(speech_mel), "application/octet-stream")
    from_json = decode_mel(json.dumps({"mel": speech_mel.tolist()}).encode(), "application/json; charset=utf-8")
    bare_list = decode_mel(json.dumps(speech_mel[None].tolist()).encode(), "application/json")
    assert from_npy.tobytes() == speech_mel.tobytes()
    assert from_json.tobytes() == speech_mel.tobytes() == bare_list.tobytes()


def test_bad_requests_get_a_4xx_with_a_reason(speech_mel):
    assert refused(b"not npy at all", "application/octet-stream").status == 400
    assert refused(b"{\"mel\": [1, 2", "application/json").status == 400
    assert refused(npy_bytes(speech_mel), "text/plain").status == 415
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    error = refused(pickled.getvalue(), "application/x-npy")
    assert error.status == 400 and "pickle" in str(error).lower()
    transposed = refused(npy_bytes(speech_mel.T), "application/octet-stream")
    assert transposed.status == 422 and "frames first" in str(transposed)
    decibels = refused(npy_bytes(speech_mel * 20 / np.log(10)), "application/octet-stream")
    assert decibels.status == 422 and "dB" in str(decibels)
    nan = speech_mel.copy()
    nan[3, 7] = np.nan
    assert refused(npy_bytes(nan), "application/octet-stream").status == 422


def npy_header(descr, shape, data: bytes = b"", fortran_order: bool = False) -> bytes:
    """A hand-made .npy: version 1.0, this header, then `data` (what a hostile client can send)."""
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran_order}, 'shape': {shape}, }}".ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + data


def test_npy_header_is_checked_before_anything_is_allocated(speech_mel):
    good = npy_bytes(speech_mel)
    zipped = io.BytesIO()
    np.savez(zipped, mel=speech_mel)
    for body, words in (
            (zipped.getvalue(), ".npz"),  # a zip of arrays, not one
            (npy_header("<f4", (10**12, 80)), "320000000000000 bytes"),  # MemoryError (a 500) before
            (npy_header("<f4", (80, 10**9), b"\0" * 400), "holds 400 bytes"),
            (npy_header("<f4", (80, -5)), "negative"),
            (good + b"more", "holds 31684 bytes"),  # trailing bytes
            (good[:-10], "holds 31670 bytes"),  # truncated
            (b"\x93NUMPY\x03\x00" + b"\x10\x00\x00\x00" + b"{}".ljust(16), "version 3.0"),
            (b"", "no data"),
            (b' {"mel": [[1]]}', "Content-Type: application/json"),
            (npy_header("zz", (80, 5)), "header is unreadable"),
            # a header without its closing brace: numpy re-tokenises it, which raised tokenize.TokenError (500)
            (good.replace(b"}", b" ", 1), "header is unreadable")):
        error = refused(body, "application/octet-stream")
        assert error.status == 400 and words in str(error), (words, str(error))
    many = refused(npy_header("<f4", (0,) * 100), "application/octet-stream")  # 100 dimensions (numpy's max: 64)
    assert many.status == 422 and "not a mel" in str(many)


def test_npy_of_anything_but_numbers_is_refused(speech_mel):
    for values in (speech_mel.astype(np.complex64), speech_mel > -5, speech_mel.astype(str),
                   np.zeros((80, 5), dtype=[("a", "<f4")]), np.zeros((80, 5), dtype="M8[s]")):
        error = refused(npy_bytes_as_is(values), "application/octet-stream")
        assert error.status == 422 and "not numbers" in str(error), str(error)
    sub_array = refused(npy_header(("<f4", (2,)), (80, 5), b"\0" * 3200), "application/octet-stream")
    assert sub_array.status == 422
    beyond = speech_mel.astype(np.float64)
    beyond[0, 0] = 1e300  # a float64 that is inf as float32: the format check's percentiles would not see it
    error = refused(npy_bytes_as_is(beyond), "application/octet-stream")
    assert error.status == 422 and "beyond float32" in str(error)
    # what np.save writes for any float or integer array, in either byte or element order, is read as it is
    for values in (speech_mel.astype(np.float16), speech_mel.astype(">f8"), np.asfortranarray(speech_mel),
                   np.asfortranarray(speech_mel[None]), np.round(speech_mel).astype(np.int16)):
        decoded = decode_mel(npy_bytes_as_is(values), "application/x-npy")
        assert decoded.dtype == np.float32 and decoded.flags.c_contiguous
        assert decoded.tobytes() == np.asarray(values, dtype=np.float32).reshape(80, -1).tobytes()


def npy_bytes_as_is(values: np.ndarray) -> bytes:
    """np.save's bytes of `values` in their own dtype and order (npy_bytes casts to float32)."""
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def test_json_mel_is_lists_of_numbers(speech_mel):
    rows = speech_mel[:, :20].tolist()

    def with_value(text: str) -> bytes:  # one value of a good JSON mel replaced by `text`, as sent
        return json.dumps({"mel": rows}).replace(repr(rows[3][7]), text, 1).encode()

    for text, status, words in (("1e400", 422, "outside float32"),  # inf after json.loads
                                ("1" + "0" * 400, 422, "integer of 401 digits, outside float32"),  # OverflowError (a 500) before
                                ("1" + "0" * 39, 422, "outside float32"),  # a RuntimeWarning and inf before
                                ('"-5.0"', 400, "not a number"),  # was read as -5.0
                                ("true", 400, "not a number"),  # was read as 1.0
                                ("null", 400, "not a number"),
                                ("NaN", 400, "not a JSON number"),
                                ("-Infinity", 400, "not a JSON number"),
                                ("[1, 2]", 400, "not a number"),
                                ('{"a": 1}', 400, "not a number")):
        error = refused(with_value(text), "application/json")
        assert error.status == status and words in str(error), (text, str(error))
        assert "mel[3][7]" in str(error) or "JSON number" in str(error)
    for body, words in ((json.dumps({"mel": rows[:79] + [rows[79][:5]]}), "ragged: mel[79] has 5 items"),
                        (json.dumps([rows, rows[:40] + [5] * 40]), "mel[1][40] is int, not a list"),
                        (json.dumps([[rows]]), "4 level"), (json.dumps(rows[0]), "1 level"), ("5", "0 level"),
                        ('"mel"', "0 level"), ("[]", "1 level"),
                        (json.dumps({"mel": rows, "sigma": 1}), "expected only"),
                        ('{"mel": [[1]], "mel": %s}' % json.dumps(rows), "keys given twice"),
                        (b"\xff\xfe[[1]]", "not a mel")):
        error = refused(body.encode() if isinstance(body, str) else body, "application/json")
        assert error.status == 400 and words in str(error), (body[:40], str(error))
    empty = refused(json.dumps([[]] * 80).encode(), "application/json")
    assert empty.status == 422 and "no frames" in str(empty)


def mutations(good: bytes, n: int, seed: int, alphabet: bytes | None = None):
    """`n` copies of `good` with 1..4 bytes replaced, inserted or deleted (reproducible)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        body = bytearray(good)
        for _ in range(int(rng.integers(1, 5))):
            pos = int(rng.integers(0, len(body)))
            byte = int(alphabet[rng.integers(0, len(alphabet))]) if alphabet else int(rng.integers(0, 256))
            operation = rng.integers(0, 3)
            if operation == 0:
                body[pos] = byte
            elif operation == 1:
                body.insert(pos, byte)
            else:
                del body[pos]
        yield bytes(body)


def test_mutated_bodies_get_a_4xx_never_an_exception(speech_mel):
    """Thousands of near-miss bodies, header bytes and JSON syntax alike: each is a mel or a BadRequest 4xx
    (warnings count as failures here: a cast that warns is a value not checked)."""
    npy_good, json_good = npy_bytes(speech_mel[:, :30]), json.dumps({"mel": speech_mel[:, :30].tolist()}).encode()
    header = len(npy_good) - 80 * 30 * 4
    cases = [(b, "application/octet-stream") for b in mutations(npy_good[:header + 64], 1500, 0)]
    cases += [(b, "application/json") for b in mutations(json_good, 1500, 1, b'[]{},:"0123456789.eE-+nultrfaNIy \\')]
    statuses = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for body, content_type in cases:
            if content_type != "application/json":
                body += npy_good[header + 64:]
            try:
                decode_mel(body, content_type)
            except BadRequest as exc:
                statuses.add(exc.status)
    assert statuses and statuses <= {400, 413, 422}


def test_compressed_bodies_are_a_415():
    for encoding in ("gzip", "deflate", "br", "GZIP", "gzip, identity"):
        with pytest.raises(BadRequest) as info:
            check_encoding(encoding)
        assert info.value.status == 415 and "uncompressed" in str(info.value)
    for encoding in (None, "", "identity", " Identity "):
        check_encoding(encoding)
    slots = BodySlots(1)
    gzipped = FakeRequest(Chunks(n=1, size=10), length=10, encoding="gzip")
    with pytest.raises(BadRequest) as info:  # refused before a slot is taken or a byte read
        asyncio.run(receive_body(gzipped, ServeLimits(), slots))
    assert info.value.status == 415 and gzipped.chunks.given == 0 and slots.in_use == 0


def test_size_limits(speech_mel):
    small = ServeLimits(max_body_bytes=10_000, max_json_bytes=1_000, max_frames=50)
    assert refused(npy_bytes(speech_mel), "application/octet-stream", small).status == 413  # 31 kB body
    assert refused(npy_bytes(speech_mel[:, :60]), "application/octet-stream",
                   ServeLimits(max_frames=50)).status == 413
    assert refused(json.dumps(speech_mel[:, :5].tolist()).encode(), "application/json", small).status == 413


def test_json_nested_too_deep_is_a_400():
    for body in (b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"mel": ' * 50_000):
        error = refused(body, "application/json")
        assert error.status == 400 and "nested too deep" in str(error)


def test_limits_are_checked():
    with pytest.raises(ConfigError, match="body_timeout_s"):
        ServeLimits(body_timeout_s=0)
    with pytest.raises(ConfigError, match="limits"):
        application({"limits": {"max_bodies": 3}})


class Chunks:
    """An async iterator of body chunks, like starlette's `request.stream()`: `n` chunks (None: endless),
    then a stall of `stall_s` if set; counts the chunks it gave."""

    def __init__(self, size: int = 65536, n: int | None = None, stall_s: float = 0.0):
        self.size, self.n, self.stall_s, self.given = size, n, stall_s, 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if self.n is not None and self.given >= self.n:
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            raise StopAsyncIteration
        self.given += 1
        await asyncio.sleep(0)
        return b"x" * self.size


def read(chunks, declared=None, limit=1 << 20, timeout_s=5.0):
    return asyncio.run(read_body(chunks, declared, limit, timeout_s))


def read_refused(*args, **kwargs) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        read(*args, **kwargs)
    return info.value


def test_body_is_refused_while_it_arrives():
    assert read(Chunks(n=16)) == b"x" * (1 << 20)  # exactly the limit
    endless = Chunks()  # chunked, no Content-Length, never ending
    assert read_refused(endless).status == 413
    assert endless.given == 17  # stopped at the first chunk past 1 MiB, nothing more read
    unread = Chunks()
    assert read_refused(unread, declared=str(100 << 20)).status == 413 and unread.given == 0
    assert read_refused(Chunks(n=1), declared="12; drop table").status == 400


def test_body_that_stalls_is_a_408():
    # a 408 is the timeout's own answer: waiting out the 60 s stall would have read the whole body
    error = read_refused(Chunks(n=2, stall_s=60), timeout_s=0.3)
    assert error.status == 408 and "131072 bytes arrived" in str(error)


class Trickle(Chunks):
    """One byte every `every_s`: each chunk in time, the body never (the timeout is a total, not per chunk)."""

    def __init__(self, every_s: float):
        super().__init__(size=1)
        self.every_s = every_s

    async def __anext__(self) -> bytes:
        await asyncio.sleep(self.every_s)
        self.given += 1
        return b"x"


def test_body_trickling_in_is_a_408_too():
    error = read_refused(Trickle(0.05), timeout_s=0.5)
    assert error.status == 408


class FakeRequest:
    def __init__(self, chunks, content_type="application/octet-stream", length=None, encoding=None):
        self.headers = {"content-type": content_type}
        if length is not None:
            self.headers["content-length"] = str(length)
        if encoding is not None:
            self.headers["content-encoding"] = encoding
        self.chunks = chunks

    def stream(self):
        return self.chunks


def test_concurrent_bodies_are_bounded_and_freed():
    limits = ServeLimits(body_timeout_s=0.5, max_concurrent_bodies=2, max_json_bytes=1000)
    slots = BodySlots(limits.max_concurrent_bodies)

    async def scenario():
        stalled = [asyncio.create_task(receive_body(FakeRequest(Chunks(n=0, stall_s=60), length=10), limits, slots))
                   for _ in range(2)]
        await asyncio.sleep(0.05)
        assert slots.in_use == 2
        with pytest.raises(BadRequest) as busy:
            await receive_body(FakeRequest(Chunks(n=1, size=10), length=10), limits, slots)
        # refused at once, not after waiting for a slot: the stalled bodies still hold theirs
        assert busy.value.status == 503 and not any(task.done() for task in stalled)
        # refused before a slot is needed: too large (JSON's own limit), wrong type
        for request, status in ((FakeRequest(Chunks(n=1), "application/json", length=2000), 413),
                                (FakeRequest(Chunks(n=1), "text/plain"), 415)):
            with pytest.raises(BadRequest) as info:
                await receive_body(request, limits, slots)
            assert info.value.status == status
        outcomes = await asyncio.gather(*stalled, return_exceptions=True)
        assert [o.status for o in outcomes] == [408, 408]
        assert slots.in_use == 0  # the stalled clients' slots are free again
        return await receive_body(FakeRequest(Chunks(n=1, size=10), length=10), limits, slots)

    assert asyncio.run(scenario()) == b"x" * 10


def test_request_ids_are_plain_names_or_derived_from_the_mel(speech_mel):
    assert request_id("LJ001-0008", speech_mel) == "LJ001-0008"
    assert request_id(None, speech_mel) == request_id(None, speech_mel.copy()) != request_id(None, speech_mel + 1)
    with pytest.raises(BadRequest) as info:
        request_id("../etc/passwd", speech_mel)
    assert info.value.status == 400


def test_wav_response_keeps_the_float32_samples():
    import soundfile

    audio = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 0.1
    back, rate = soundfile.read(io.BytesIO(wav_bytes(audio, 22050, "float32")), dtype="float32")
    assert rate == 22050 and back.tobytes() == audio.tobytes()


def test_load_test_refuses_other_hosts():
    with pytest.raises(ConfigError, match="127.0.0.1"):
        load_test("http://10.0.0.1:8000/vocode", [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the deployment the real-Ray tests share: small body limits and a short body timeout, so that hostile
#: clients are cheap to play (40 stalled clients fit under 42 body slots; the 41st-42nd are refused)
E2E_LIMITS = ServeLimits(max_body_bytes=1 << 20, body_timeout_s=8.0, max_concurrent_bodies=42)


@pytest.fixture(scope="module")
def served(preprocessed_run, tmp_path_factory):
    """(url, mels, expected): the service on the test's Ray, and the infer stage's outputs for its mels."""
    from waveglow_lib import service
    from waveglow_lib.stages.infer import infer

    cfg = preprocessed_run(tmp_path_factory.mktemp("served"), backend="fast", precision="fp32")
    infer(cfg)  # the offline truth, batch 1
    items = json.loads(cfg.layout.manifest.read_text())["items"]
    mels = [(i["id"], read_bin(cfg.layout.mel_dir / f"{i['id']}.bin", tuple(i["shape"]))) for i in items]
    expected = {i["id"]: np.fromfile(cfg.layout.out_dir / f"{i['id']}_out.bin", dtype="<f4") for i in items}
    if not ray.is_initialized():
        # bounded retries, as `connect` has: a loaded machine can miss Ray's fixed 30 s start-up
        with_startup_retries(lambda: ray.init(num_cpus=2, include_dashboard=False, configure_logging=False))
    url = service.serve_vocoder(cfg, replicas=1, port=free_port(), max_batch=4, batch_wait_s=0.05,
                                limits=E2E_LIMITS)
    try:
        yield url, mels, expected
    finally:
        service.shutdown()


@needs_ray
@pytest.mark.e2e
def test_served_audio_equals_offline_under_concurrent_clients(served, speech_mel):
    url, mels, expected = served
    level = load_level(url, mels, clients=4, max_requests=12, max_seconds=300, expected=expected)
    assert level["requests"] == 12 and level["errors"] == 0, level["error_examples"]
    assert level["compared"] == 12 and level["mismatched"] == []
    # bad requests are answered, and the replica keeps serving
    status, body, _ = post_mel(url, npy_bytes(speech_mel.T), "x")
    assert status == 422 and b"frames first" in body
    status, body, _ = post_mel(url, b"garbage", "x")
    assert status == 400
    status, body, _ = post_mel(url.replace("/vocode", "/nothing"), npy_bytes(speech_mel))
    assert status == 404
    status, body, _ = post_mel(url, ("[" * 100_000).encode(), content_type="application/json")
    assert status == 400 and b"nested too deep" in body
    # malformed bodies that were 500s, and a compressed one that was a 400 about pickles
    zipped = io.BytesIO()
    np.savez(zipped, mel=speech_mel)
    for body, content_type, headers, answer in (
            (zipped.getvalue(), "application/octet-stream", {}, (400, b".npz")),
            (npy_header("<f4", (10**12, 80)), "application/x-npy", {}, (400, b"320000000000000 bytes")),
            (b'{"mel": [[1' + b"0" * 400 + b"]]}", "application/json", {}, (422, b"outside float32")),
            (gzip.compress(npy_bytes(speech_mel)), "application/octet-stream", {"Content-Encoding": "gzip"},
             (415, b"Content-Encoding 'gzip' is not supported"))):
        status, answer_body, _ = post_mel(url, body, content_type=content_type, headers=headers)
        assert (status, answer[1] in answer_body) == (answer[0], True), answer_body
    status, body, _ = post_mel(url, json.dumps({"mel": mels[0][1].tolist()}).encode(), mels[0][0],
                               content_type="application/json")
    assert status == 200
    assert wav_samples(body)[0].tobytes() == expected[mels[0][0]].tobytes()
    assert "| 4 | 12 | 0 |" in render_load_markdown({"levels": [level]})


def open_request(url: str, headers: str) -> socket.socket:
    """A connection that has sent a POST's headers (and nothing of its body yet)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST /vocode HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
                 f"{headers}\r\n".encode())
    return sock


def status_of(sock: socket.socket, timeout: float = 60.0) -> int:
    """The status of the response on `sock` (0: the connection closed without one)."""
    sock.settimeout(timeout)
    try:
        head = sock.recv(64)
    except ConnectionError:
        return 0
    finally:
        sock.close()
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0


def answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


@needs_ray
@pytest.mark.e2e
def test_hostile_clients_neither_swell_nor_starve_the_service(served):
    url, mels, expected = served
    utt_id, mel = mels[0]
    # a declared body over the limit: 413 before any of it is sent
    assert status_of(open_request(url, f"Content-Length: {100 << 20}\r\n"), timeout=30) == 413
    # a chunked body (no Content-Length) is refused once it passes the limit, not when it ends: it never does
    # (how much is sent before the 413 arrives depends on Ray's proxy, which reads ahead of the replica)
    sock = open_request(url, "Transfer-Encoding: chunked\r\n")
    chunk, sent = b"10000\r\n" + b"x" * 0x10000 + b"\r\n", 0
    try:
        while sent < 128 * E2E_LIMITS.max_body_bytes and not answered(sock):
            sock.sendall(chunk)
            sent += 0x10000
    except ConnectionError:  # refused and closed while we were still sending
        pass
    assert status_of(sock, timeout=30) == 413, f"{sent} bytes sent"

    # 40 clients stall after their headers: a good request is still served, while they wait
    stalled = [open_request(url, "Content-Length: 1000\r\n") for _ in range(40)]
    status, body, _ = post_mel(url, npy_bytes(mel), utt_id, timeout=60)
    assert status == 200 and wav_samples(body)[0].tobytes() == expected[utt_id].tobytes()
    assert not any(answered(sock) for sock in stalled)  # not freed by their timeout: served beside them
    # the body slots full (40 + 5 > 42): more clients are told so at once, not queued
    stalled += [open_request(url, "Content-Length: 1000\r\n") for _ in range(5)]
    for _ in range(20):
        status, body, headers = post_mel(url, npy_bytes(mel), utt_id, timeout=60)
        if status == 503:
            break
        time.sleep(0.1)  # the last stalled clients had not reached the replica yet
    # a 503 is the at-once refusal (a queued request would have been served, 200, once a slot freed)
    assert status == 503 and b"busy" in body and {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"
    # and the stalled clients are cut off after the body timeout (or refused at once when the slots were full)
    statuses = [status_of(sock) for sock in stalled]
    assert set(statuses) <= {408, 503} and statuses.count(408) >= 40, statuses
    status, body, _ = post_mel(url, npy_bytes(mel), utt_id, timeout=60)
    assert status == 200


class GrpcServer:
    """Records the addresses a gRPC server is asked to listen on (what `add_port_to_grpc_server` passes on)."""

    def __init__(self):
        self.addresses: list[str] = []

    def add_insecure_port(self, address: str) -> int:
        self.addresses.append(address)
        return 4321


@needs_ray
def test_replica_grpc_server_binds_loopback_on_a_loopback_node(monkeypatch):
    """Contract test of Ray Serve's private replica module (mocked node address, recording server): the bind that
    `replica_grpc_on_loopback` wraps is the one the replica makes, on "[::]:0", and is rewritten to 127.0.0.1
    only when the node's address is loopback; the real bind is checked by the `serve` command's test."""
    import inspect

    from ray.serve._private import replica

    from waveglow_lib.engines.ray import replica_grpc_on_loopback

    assert 'add_port_to_grpc_server(self._server, "[::]:0")' in inspect.getsource(replica.Replica._on_initialized)
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)  # put back after
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.1.2.3")
    assert not replica_grpc_on_loopback()  # a cluster node: left as Ray binds it
    server = GrpcServer()
    replica.add_port_to_grpc_server(server, "[::]:0")
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    assert replica_grpc_on_loopback() and replica_grpc_on_loopback()  # twice: wrapped once
    assert replica.add_port_to_grpc_server(server, "[::]:0") == 4321
    replica.add_port_to_grpc_server(server, "10.1.2.3:9000")
    assert server.addresses == ["[::]:0", "127.0.0.1:0", "10.1.2.3:9000"]


def on_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


@needs_ray
@pytest.mark.e2e
def test_serve_command_keeps_its_ray_on_loopback_and_sigterm_stops_all_of_it(tiny_checkpoint, tmp_path):
    import psutil  # Ray's own copy (ray/thirdparty_files), on the path once ray is imported

    port = free_port()
    log, out = tmp_path / "serve.log", tmp_path / "serve.out"
    command = [sys.executable, "-m", "waveglow_lib", "serve", "--port", str(port), "--set", f"runs_dir={tmp_path}",
               "--set", f"checkpoint={tiny_checkpoint}", "--set", "backend=fast", "--set", "precision=fp32"]
    with log.open("w") as stderr, out.open("w") as stdout:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=Path(__file__).parents[1])
    started: list = []
    try:
        deadline = time.monotonic() + 300
        while "serving POST" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "serving POST" in log.read_text(), log.read_text()[-3000:]
        me = psutil.Process(proc.pid)
        started = me.children(recursive=True)
        assert any(p.name() == "raylet" for p in started)
        listening = [(p.name(), c.laddr) for p in [me, *started] for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert any(addr.ip == "127.0.0.1" and addr.port == port for _, addr in listening)
        # all of this Ray (GCS, raylet, agents, metrics, workers, Serve's proxy and controller) and the replica's
        # inter-deployment gRPC server, which Ray Serve binds to [::] unless told (replica_grpc_on_loopback)
        assert any(name.startswith("ray::ServeReplica") for name, _ in listening), listening
        elsewhere = [(name, addr) for name, addr in listening if not on_loopback(addr.ip)]
        assert elsewhere == []

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert '"stopped": "SIGTERM"' in out.read_text()
        _, left = psutil.wait_procs(started, timeout=15)
        assert [p.name() for p in left if p.status() != psutil.STATUS_ZOMBIE] == []
    finally:  # a failed test leaves nothing running either
        if proc.poll() is None:
            proc.kill()
        for p in started:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# --- streamed answers (issue 36): POST ?stream=true and the WebSocket /vocode/ws ---------------------------
def test_a_stream_closed_midway_computes_nothing_more():
    """The client goes away (the response's iterator is closed or cancelled): the generator is closed after
    the step in flight, and no later chunk is computed."""
    made: list[int] = []
    gate = threading.Event()

    def chunks():
        for i in range(10):
            made.append(i)
            if i == 1:
                gate.wait(30)  # the second chunk is being computed when the client goes
            yield i

    async def closed_after_first():
        gen = chunks()
        steps = stream_steps(gen)
        assert await steps.__anext__() == 0
        await steps.aclose()
        return gen

    gen = asyncio.run(closed_after_first())
    assert made == [0] and inspect.getgeneratorstate(gen) == inspect.GEN_CLOSED

    async def cancelled_in_flight():
        gen = chunks()
        steps = stream_steps(gen)
        assert await steps.__anext__() == 0
        task = asyncio.ensure_future(steps.__anext__())
        while len(made) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert inspect.getgeneratorstate(gen) == inspect.GEN_RUNNING  # the step in flight is left to finish
        gate.set()
        while inspect.getgeneratorstate(gen) != inspect.GEN_CLOSED:
            await asyncio.sleep(0.01)
        return gen

    made.clear()
    asyncio.run(asyncio.wait_for(cancelled_in_flight(), 60))
    assert made == [0, 1]


def test_live_mel_checks_pieces_limits_and_the_format_before_any_frame_is_vocoded(speech_mel):
    limits = ServeLimits(max_body_bytes=200_000, max_frames=150)
    live = LiveMel(limits, STFTConfig(), check_frames=40)
    source = live.pieces()
    assert next(source) is NOT_YET
    live.take({"type": "websocket.receive", "bytes": npy_bytes(speech_mel[:, :30])})
    assert next(source) is NOT_YET  # held: 30 frames are fewer than the check needs
    live.take({"type": "websocket.receive", "bytes": npy_bytes(speech_mel[:, 30:45])})
    assert next(source).shape == (80, 30) and next(source).shape == (80, 15) and next(source) is NOT_YET
    live.take({"type": "websocket.receive", "text": "end"})
    assert list(source) == []
    for message, status, words in (
            ({"type": "websocket.receive", "text": "hello"}, 400, "then the text message end"),
            ({"type": "websocket.receive", "bytes": b"garbage"}, 400, "not .npy"),
            ({"type": "websocket.receive", "bytes": npy_bytes(speech_mel[:, :5].T)}, 422, "frames first"),
            ({"type": "websocket.receive", "bytes": npy_bytes(np.zeros((80, 0)))}, 422, "no frames"),
            ({"type": "websocket.receive", "bytes": npy_bytes(np.full((80, 3), np.nan))}, 422, "NaN"),
            ({"type": "websocket.receive", "bytes": npy_bytes(np.concatenate([speech_mel] * 2, 1))}, 413, "frames")):
        with pytest.raises(BadRequest) as info:
            LiveMel(limits, STFTConfig(), 40).take(message)
        assert info.value.status == status and words in str(info.value), str(info.value)
    decibels = LiveMel(limits, STFTConfig(), 40)
    decibels.take({"type": "websocket.receive", "bytes": npy_bytes(speech_mel[:, :20] * 20 / np.log(10))})
    with pytest.raises(BadRequest, match="dB") as info:  # checked once 40 frames are there
        decibels.take({"type": "websocket.receive", "bytes": npy_bytes(speech_mel[:, 20:60] * 20 / np.log(10))})
    assert info.value.status == 422 and list(decibels.ready) == []
    with pytest.raises(ClientGone):
        live.take({"type": "websocket.disconnect", "code": 1001})
    assert stream_flag(None) is False and stream_flag("true") is True and stream_flag("0") is False
    with pytest.raises(BadRequest, match="stream=true"):
        stream_flag("maybe")


def ws_url(url: str, utt_id: str | None) -> str:
    return url.replace("http", "ws", 1) + "/ws" + (f"?id={utt_id}" if utt_id else "")


@needs_ray
@pytest.mark.e2e
def test_streamed_post_comes_chunked_and_equals_the_whole_answer(served, speech_mel):
    import http.client

    url, mels, expected = served
    utt_id, mel = max(mels, key=lambda m: m[1].shape[1])
    long = np.concatenate([mel] * 3, axis=1)  # several chunks: 16, 32, 64, 128, 256 ... frames
    status, body, _ = post_mel(url, npy_bytes(long), "long")
    assert status == 200
    whole = wav_samples(body)[0]
    host, port = url.split("//")[1].split("/")[0].split(":")

    def streamed(mel: np.ndarray, utt_id: str) -> tuple[http.client.HTTPResponse, bytes]:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", f"/vocode?id={utt_id}&stream=true", body=npy_bytes(mel),
                     headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response, response.read()

    response, data = streamed(long, "long")
    assert response.status == 200 and response.getheader("Content-Type") == "audio/wav"
    assert response.getheader("Transfer-Encoding") == "chunked" and response.getheader("Content-Length") is None
    assert int(response.getheader("X-Audio-Samples")) == long.shape[1] * 256
    assert data[:44] == stream_wav_header(22050)  # the streaming sizes: read to the end
    assert np.frombuffer(data[44:], dtype="<f4").tobytes() == whole.tobytes()
    assert wav_samples(data)[0].tobytes() == whole.tobytes()  # soundfile reads it as it is
    _, data = streamed(mel, utt_id)
    assert np.frombuffer(data[44:], dtype="<f4").tobytes() == expected[utt_id].tobytes()  # the offline truth
    # refusals as without streaming, before anything is streamed
    status, body, _ = post_mel(f"{url}?stream=true&id=x", npy_bytes(speech_mel.T))
    assert status == 422 and b"frames first" in body
    status, body, _ = post_mel(f"{url}?stream=maybe&id=x", npy_bytes(speech_mel))
    assert status == 400 and b"stream=true" in body
    assert status_of(open_request(url + "?stream=true", f"Content-Length: {100 << 20}\r\n"), timeout=30) == 413
    # a client that goes away after the first bytes: the replica drops the stream and keeps serving
    sock = socket.create_connection((host, int(port)), timeout=60)
    body = npy_bytes(long)
    sock.sendall(f"POST /vocode?id=gone&stream=true HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                 f"application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    sock.close()
    status, body, _ = post_mel(url, npy_bytes(mel), utt_id, timeout=60)
    assert status == 200 and wav_samples(body)[0].tobytes() == expected[utt_id].tobytes()


@needs_ray
@pytest.mark.e2e
def test_websocket_sends_audio_as_its_context_arrives_and_equals_the_whole(served, speech_mel):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from support import TINY_PIPELINE

    url, mels, expected = served
    utt_id, mel = mels[0]
    first, right = StreamChunks().first_frames, TINY_PIPELINE.chunk_context()[1]
    with connect(ws_url(url, utt_id), open_timeout=60) as ws:
        ws.send(npy_bytes(mel[:, : first + right]))  # what the first chunk needs, and nothing more yet
        audio = ws.recv(timeout=120)
        assert isinstance(audio, bytes) and len(audio) == first * 256 * 4
        got = [audio]
        rest = mel[:, first + right:]
        for a in range(0, rest.shape[1], 7):
            ws.send(npy_bytes(rest[:, a: a + 7]))
        ws.send("end")
        while isinstance(message := ws.recv(timeout=120), bytes):
            got.append(message)
        summary = json.loads(message)
    joined = np.frombuffer(b"".join(got), dtype="<f4")
    assert joined.tobytes() == expected[utt_id].tobytes()
    assert summary["samples"] == joined.size == mel.shape[1] * 256 and summary["chunks"] == len(got)

    def refused(path_id, *messages) -> tuple[dict, int, str]:
        with connect(ws_url(url, path_id), open_timeout=60) as ws:
            for message in messages:
                ws.send(message)
            while isinstance(answer := ws.recv(timeout=60), bytes):
                pass  # audio made before the refusal
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=60)
        return json.loads(answer), info.value.rcvd.code, info.value.rcvd.reason

    for case, (status, code, words) in {
            (utt_id, "hello"): (400, 1003, "then the text message end"),
            (utt_id, b"garbage"): (400, 1003, "not .npy"),
            (utt_id, npy_bytes(speech_mel[:, :5].T)): (422, 1007, "frames first"),
            (utt_id, npy_bytes(speech_mel * 20 / np.log(10))): (422, 1007, "dB"),
            (utt_id, "end"): (422, 1007, "without a single frame"),
            (None,): (400, 1003, "give the utterance id"),  # refused before any message is read
            (utt_id, *[npy_bytes(np.concatenate([speech_mel] * 10, 1))] * 4): (413, 1009, "limit")}.items():
        error, close_code, reason = refused(*case)
        assert (error["status"], close_code) == (status, code) and words in error["error"], error
        assert reason and reason in error["error"]
    nan = speech_mel.copy()
    nan[0, 50] = np.nan
    error, close_code, _ = refused(utt_id, npy_bytes(speech_mel[:, :50]), npy_bytes(nan[:, 50:]))
    assert close_code == 1007 and "NaN" in error["error"]
    # a client that sends nothing more is cut off after the body timeout, as a POST's body is
    with connect(ws_url(url, utt_id), open_timeout=60) as ws:
        ws.send(npy_bytes(speech_mel[:, :3]))
        error = json.loads(ws.recv(timeout=60))
        assert error["status"] == 408 and "not complete after 8 s" in error["error"]
    # one that goes away mid-stream: the service keeps serving
    with connect(ws_url(url, utt_id), open_timeout=60) as ws:
        ws.send(npy_bytes(mel))
    status, body, _ = post_mel(url, npy_bytes(mel), utt_id, timeout=60)
    assert status == 200 and wav_samples(body)[0].tobytes() == expected[utt_id].tobytes()


@needs_ray
@pytest.mark.e2e
def test_stream_bench_measures_the_served_paths(served):
    """`bench --stream`'s HTTP and WebSocket rows against a running service: every chunk of the plan timed."""
    from support import TINY_PIPELINE
    from waveglow_lib.batching import chunk_plan
    from waveglow_lib.bench.stream import transport_rows

    url, mels, _ = served
    mel = np.concatenate([mels[0][1]] * 3, axis=1)
    rows = transport_rows(url, [mel], TINY_PIPELINE, 16, 256)
    assert [r["backend"] for r in rows] == ["http", "websocket"]
    chunks = len(chunk_plan(mel.shape[1], 256, TINY_PIPELINE, 16))
    for row in rows:
        assert row["chunks"] == chunks and row["audio_seconds"] == pytest.approx(mel.shape[1] * 256 / 22050)
        assert 0 < row["first_audio_ms_median"] <= 1e3 * row["seconds_by_utterance"][0]
        assert row["chunk_ms_p50"] <= row["chunk_ms_p95"]
