"""OpenVINO int8 (NNCF post-training quantisation, backends/openvino_int8.py) on the tiny model: it builds,
its quantised graph is cached (the second load reads the entry back, quantising nothing), it stays close to
fp32, a corrupt entry is rebuilt, and without nncf it is refused in one line (a contract test: nncf made
unimportable)."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from support import random_batch, snr_db
from waveglow_lib.backends import BackendError, MissingDependency, get_backend
from waveglow_lib.backends.openvino_int8 import calibration_windows

pytest.importorskip("openvino")
pytest.importorskip("nncf")

#: the tiny model's int8 graph against its fp32 output, same noise (measured ~35 dB; the official model's
#: figure is in docs/benchmarks.md)
MIN_SNR_INT8_DB = 20


@pytest.fixture(scope="module")
def calibration():
    return [random_batch(1, frames, seed=10 + k) for k, frames in enumerate((40, 64))]


@pytest.fixture(scope="module")
def batch():
    return random_batch(1, 37, seed=1)


def _entries(cache_dir):
    return sorted(p for p in (cache_dir / "openvino").iterdir() if not p.name.startswith("."))


def test_int8_builds_is_cached_and_stays_close_to_fp32(tiny_model, tiny_onnx, calibration, batch, tmp_path):
    mel, z = batch
    with torch.no_grad():
        reference = tiny_model().infer(torch.from_numpy(mel), sigma=1.0, z=torch.from_numpy(z)).numpy()
    first = get_backend("openvino", onnx_path=tiny_onnx, precision="int8", calibration=calibration, cache_dir=tmp_path)
    assert first.cache["cache"] == "built" and first.cache["seconds"] > 0
    assert "int8" in first.description and "quantised graph: built" in first.description
    audio = first.run(mel, z)
    first.close()
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    snr = snr_db(reference, audio)
    assert MIN_SNR_INT8_DB <= snr < 90, snr  # close to fp32, and really quantised (not fp32 itself)

    [entry] = _entries(tmp_path)
    record = json.loads((entry / "record.json").read_text())
    assert record["key"]["nncf"] and record["key"]["openvino"] and record["key"]["calibration"]
    xml = (entry / "model.xml").read_text()
    assert "FakeQuantize" in xml  # NNCF's quantisation nodes are in the stored graph
    stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    second = get_backend("openvino", onnx_path=tiny_onnx, precision="int8", calibration=calibration, cache_dir=tmp_path)
    assert second.cache["cache"] == "hit" and second.cache["seconds"] == 0.0
    assert _entries(tmp_path) == [entry]  # no second entry, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps
    np.testing.assert_array_equal(second.run(mel, z), audio)  # the same quantised graph
    second.close()

    # other calibration mels: another key, another entry
    other = [random_batch(1, 48, seed=99)]
    third = get_backend("openvino", onnx_path=tiny_onnx, precision="int8", calibration=other, cache_dir=tmp_path)
    assert third.cache["cache"] == "built" and len(_entries(tmp_path)) == 2
    third.close()


def test_a_corrupt_entry_is_rebuilt_not_used(tiny_onnx, calibration, tmp_path):
    get_backend("openvino", onnx_path=tiny_onnx, precision="int8", calibration=calibration, cache_dir=tmp_path).close()
    [entry] = _entries(tmp_path)
    with open(entry / "model.bin", "r+b") as f:
        f.seek(0)
        f.write(b"\x00" * 16)
    with pytest.warns(RuntimeWarning, match="sha256 differs"):
        again = get_backend("openvino", onnx_path=tiny_onnx, precision="int8", calibration=calibration,
                            cache_dir=tmp_path)
    assert again.cache["cache"].startswith("rebuilt: model.bin")
    again.close()
    assert _entries(tmp_path) == [entry]


def test_int8_needs_calibration_and_a_cache_folder(tiny_onnx, tmp_path):
    with pytest.raises(BackendError, match="precision int8 needs calibration="):
        get_backend("openvino", onnx_path=tiny_onnx, precision="int8")
    with pytest.raises(BackendError, match="calibration pairs must be mel"):
        get_backend("openvino", onnx_path=tiny_onnx, precision="int8", calibration=[(np.zeros((80, 10)), np.zeros((8, 320)))],
                    cache_dir=tmp_path)


def test_calibration_windows_are_short_spread_and_carry_their_noise():
    mel = np.arange(80 * 100, dtype=np.float32).reshape(1, 80, 100)
    z = np.arange(8 * 3200, dtype=np.float32).reshape(1, 8, 3200)
    windows = calibration_windows([(mel, z), (mel[:, :, :10], z[:, :, :320])], frames=32, count=4)
    assert len(windows) == 4
    assert [w["mel"].shape[-1] for w in windows] == [32, 32, 32, 10]  # the short utterance whole
    starts = [int(w["mel"][0, 0, 0]) for w in windows[:3]]
    assert starts == [0, 34, 68]  # spread over the utterance, up to its end
    for w, s in zip(windows[:3], starts):
        np.testing.assert_array_equal(w["z"], z[:, :, s * 32:(s + 32) * 32])


def test_without_nncf_it_is_refused_in_one_line(tiny_onnx, tmp_path, monkeypatch, calibration):
    """Contract test: nncf made unimportable (sys.modules entry None)."""
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(MissingDependency) as info:
        get_backend("openvino", onnx_path=tiny_onnx, precision="int8", calibration=calibration, cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "pip install nncf" in message and "waveglow-workflow[nncf]" in message
    assert not (tmp_path / "openvino").exists()  # refused before any work


def test_bench_row_is_measured_and_its_quantised_graph_reused(tmp_path, monkeypatch):
    from support import TINY, tiny_waveglow
    from waveglow_lib import bench
    from waveglow_lib.config import WorkflowConfig

    cfg = WorkflowConfig(name="t", runs_dir=str(tmp_path / "runs"))
    model = tiny_waveglow(TINY)

    def measure():
        return bench.run_bench(cfg, model=model, quick=True, rows=["openvino-int8"], batch_sizes=[1],
                               out_dir=tmp_path, progress=False)

    first = measure()
    [row] = [r for r in first["rows"] if r["row"] == "openvino-int8"]
    assert row["precision"] == "int8" and math.isfinite(row["snr_db"]) and row["snr_db"] >= MIN_SNR_INT8_DB
    assert first["quantised_graphs"]["openvino-int8"]["cache"] == "built"
    md = (tmp_path / "bench.md").read_text()
    assert "**Quantised graphs**" in md and "openvino-int8 built" in md
    second = measure()  # the same run's mels: the stored quantised graph is read back
    assert second["quantised_graphs"]["openvino-int8"]["cache"] == "hit"
    assert len(_entries(tmp_path / bench.harness.BENCH_MODELS_DIR)) == 1

    monkeypatch.setitem(sys.modules, "nncf", None)  # contract: nncf not installed → the row is skipped, saying why
    third = measure()
    assert "pip install nncf" in third["skipped_rows"]["openvino-int8"]
    assert not [r for r in third["rows"] if r["row"] == "openvino-int8"]
