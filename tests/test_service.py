"""The vocoding service: request decoding and its refusals (clear 4xx, checked without Ray), and a real
Ray Serve deployment under concurrent clients whose responses equal the infer stage's outputs byte for
byte (e2e; skipped without ray, which is the `ray` extra, part of `.[all]`)."""
from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest

from support import optional_ray
from waveglow_lib.bench.serve_load import load_level, load_test, npy_bytes, post_mel, render_load_markdown
from waveglow_lib.errors import ConfigError
from waveglow_lib.io import read_bin
from waveglow_lib.service import BadRequest, ServeLimits, decode_mel, request_id, wav_bytes

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


def test_size_limits(speech_mel):
    small = ServeLimits(max_body_bytes=10_000, max_json_bytes=1_000, max_frames=50)
    assert refused(npy_bytes(speech_mel), "application/octet-stream", small).status == 413  # 31 kB body
    assert refused(npy_bytes(speech_mel[:, :60]), "application/octet-stream",
                   ServeLimits(max_frames=50)).status == 413
    assert refused(json.dumps(speech_mel[:, :5].tolist()).encode(), "application/json", small).status == 413


def test_request_ids_are_plain_names_or_derived_from_the_mel(speech_mel):
    assert request_id("LJ001-0008", speech_mel) == "LJ001-0008"
    assert request_id(None, speech_mel) == request_id(None, speech_mel.copy()) != request_id(None, speech_mel + 1)
    with pytest.raises(BadRequest) as info:
        request_id("../etc/passwd", speech_mel)
    assert info.value.status == 400


def test_wav_response_keeps_the_float32_samples():
    import soundfile

    audio = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 0.1
    back, rate = soundfile.read(io.BytesIO(wav_bytes(audio, 22050)), dtype="float32")
    assert rate == 22050 and back.tobytes() == audio.tobytes()


def test_load_test_refuses_other_hosts():
    with pytest.raises(ConfigError, match="127.0.0.1"):
        load_test("http://10.0.0.1:8000/vocode", [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ray
@pytest.mark.e2e
def test_served_audio_equals_offline_under_concurrent_clients(preprocessed_run, tmp_path, speech_mel):
    from waveglow_lib import service
    from waveglow_lib.stages.infer import infer

    cfg = preprocessed_run(tmp_path, backend="fast", precision="fp32")
    infer(cfg)  # the offline truth, batch 1
    items = json.loads(cfg.layout.manifest.read_text())["items"]
    mels = [(i["id"], read_bin(cfg.layout.mel_dir / f"{i['id']}.bin", tuple(i["shape"]))) for i in items]
    expected = {i["id"]: np.fromfile(cfg.layout.out_dir / f"{i['id']}_out.bin", dtype="<f4") for i in items}
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    url = service.serve_vocoder(cfg, replicas=1, port=free_port(), max_batch=4, batch_wait_s=0.05)
    try:
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
        status, body, _ = post_mel(url, json.dumps({"mel": mels[0][1].tolist()}).encode(), mels[0][0],
                                   content_type="application/json")
        assert status == 200
        import soundfile
        audio, _ = soundfile.read(io.BytesIO(body), dtype="float32")
        assert audio.tobytes() == expected[mels[0][0]].tobytes()
        assert "| 4 | 12 | 0 |" in render_load_markdown({"levels": [level]})
    finally:
        service.shutdown()
