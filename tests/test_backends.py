"""Backends: parity torch / onnxruntime / openvino with identical noise, precisions, bad model files,
`auto`, and the `om` backend as a contract test against a fake ais_bench InferSession."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from support import TINY_PIPELINE, install_fake_ais_bench, random_batch, snr_db
from waveglow_lib.backends import (BackendError, BackendUnavailable, ModelSpec, available_backends, get_backend,
                                   resolve_backend)


@pytest.fixture(scope="module")
def batch():
    return random_batch(2, 23, seed=1)


@pytest.fixture(scope="module")
def reference(tiny_model, batch):
    mel, z = batch
    with torch.no_grad():
        return tiny_model().infer(torch.from_numpy(mel), sigma=1.0, z=torch.from_numpy(z)).numpy()


@pytest.mark.parametrize("name", ["torch", "onnxruntime", "openvino"])
def test_fp32_parity_with_identical_noise(tiny_model, tiny_onnx, name, batch, reference):
    mel, z = batch
    with get_backend(name, model=tiny_model(), onnx_path=tiny_onnx) as backend:
        audio = backend.run(mel, z)
    assert audio.shape == (2, 23 * 256) and audio.dtype == np.float32
    assert snr_db(reference, audio) >= 50


@pytest.mark.parametrize("name,precision", [("torch", "bf16"), ("openvino", "bf16"), ("torch", "fp16")])
def test_reduced_precision_runs_close_to_fp32(tiny_model, tiny_onnx, name, precision, batch, reference):
    mel, z = batch
    model = tiny_model()
    backend = get_backend(name, model=model, onnx_path=tiny_onnx, precision=precision)
    audio = backend.run(mel, z)
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert snr_db(reference, audio) >= 25
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not cast


def test_run_checks_shapes(tiny_onnx, batch):
    mel, z = batch
    backend = get_backend("onnxruntime", onnx_path=tiny_onnx)
    with pytest.raises(BackendError, match=r"z must be \[2, 8, 736\]"):
        backend.run(mel, z[:, :, :-8])
    with pytest.raises(BackendError, match=r"mel must be \[B, 80, T\]"):
        backend.run(mel[:, :40], z)


def test_onnx_that_is_not_this_model_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    other = tmp_path / "other.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), other)
    for name in ("onnxruntime", "openvino"):
        with pytest.raises(BackendError, match=f"{other}: not a WaveGlow export.*inputs \\['x'\\]"):
            get_backend(name, onnx_path=other)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(BackendError, match=str(garbage)):
        get_backend("onnxruntime", onnx_path=garbage)
    with pytest.raises(BackendError, match="not found"):
        get_backend("openvino", onnx_path=tmp_path / "missing.onnx")


def test_onnx_of_another_config_or_the_guide_variant_is_refused(tiny_model, tiny_onnx, tmp_path):
    with pytest.raises(BackendError, match=r"input 'z'.*\[B, 4, T\]"):
        get_backend("onnxruntime", onnx_path=tiny_onnx, spec=ModelSpec(n_group=4))
    from waveglow_lib.export import export_onnx

    guide = tmp_path / "guide.onnx"
    export_onnx(tiny_model(), guide, variant="guide", verify=False)
    with pytest.raises(BackendError, match="guide's variant"):
        get_backend("onnxruntime", onnx_path=guide)


def test_unsupported_options_are_clear_errors(tiny_model, tiny_onnx):
    with pytest.raises(BackendError, match="needs the model"):
        get_backend("torch")
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        get_backend("tensorrt")
    with pytest.raises(BackendError, match="precision 'bf16' not supported"):
        get_backend("onnxruntime", onnx_path=tiny_onnx, precision="bf16")
    with pytest.raises(BackendError, match="int8: use the fast backend"):
        get_backend("torch", model=tiny_model(), precision="int8")
    with pytest.raises(BackendUnavailable, match="onnxruntime-cann"):
        get_backend("onnxruntime", onnx_path=tiny_onnx, device="npu:0")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            get_backend("torch", model=tiny_model(), device="cuda")


def test_available_and_auto(tiny_onnx, tmp_path):
    table = available_backends()
    assert set(table) == {"torch", "onnxruntime", "openvino", "om", "fast"}
    assert table["torch"][0] and table["onnxruntime"][0] and table["openvino"][0]
    # on a CPU auto is the built-in fast engine, exported or not (the graph runtimes are opt-in)
    assert resolve_backend("auto") == "fast"
    assert resolve_backend("auto", onnx_path=tiny_onnx) == "fast"
    # fast is CPU-only: an NPU run without its .om goes to the graph runtimes (whose errors say what is missing)
    assert resolve_backend("auto", device="npu:0", onnx_path=tiny_onnx) == "onnxruntime"
    assert resolve_backend("auto", device="cuda") == "torch"
    assert resolve_backend("onnxruntime") == "onnxruntime"
    with pytest.raises(BackendError):
        resolve_backend("nope")


# --- om: contract test ----------------------------------------------------------------------------
@pytest.fixture
def fake_ais_bench(monkeypatch):
    return install_fake_ais_bench(monkeypatch)


def test_om_without_ais_bench_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ais_bench", None)  # import fails even if installed
    om = tmp_path / "waveglow.om"
    om.write_bytes(b"om")
    with pytest.raises(BackendUnavailable, match="not on PyPI.*ais-bench_workload/tool/ais_bench.*msit"):
        get_backend("om", om_path=om)
    usable, message = available_backends()["om"]
    assert not usable and "ais_bench" in message


@pytest.mark.parametrize("old_api", [False, True])
def test_om_backend_contract(tmp_path, fake_ais_bench, batch, reference, old_api):
    """Contract test against a fake InferSession (see FakeInferSession): not a run on an NPU."""
    fake_ais_bench.old_api = old_api
    om = tmp_path / "waveglow.om"
    om.write_bytes(b"om")
    (tmp_path / "waveglow.gears.json").write_text('{"batch": 2, "mel_lengths": [23, 40]}')
    mel, z = batch
    backend = get_backend("om", om_path=om, device="npu:3", spec=ModelSpec.from_model_config(TINY_PIPELINE))
    session = fake_ais_bench.instances[-1]
    assert (session.device_id, session.model_path) == (3, str(om))
    assert backend.fixed_batch == 2 and backend.pad_length(20) == 23 and backend.pad_length(24) == 40
    with pytest.raises(BackendError, match="exceeds the largest compiled gear 40"):
        backend.pad_length(41)
    assert snr_db(reference, backend.run(mel, z)) >= 50
    backend.run(mel, z)
    assert backend.device_times_ms == [1.5, 3.0] and session.calls[0] == ((2, 80, 23), (2, 8, 736))
    with pytest.raises(BackendError, match="not one of its gears"):
        backend.run(*random_batch(2, 30))
    backend.close()
    backend.close()
    assert session.released == ("free_resource" if old_api else "finalize")


def test_om_needs_an_om_file(tiny_onnx, tmp_path, fake_ais_bench):
    with pytest.raises(BackendError, match="not found.*convert"):
        get_backend("om", om_path=tmp_path / "missing.om")
    with pytest.raises(BackendError, match="needs an .om file"):
        get_backend("om", om_path=tiny_onnx)
