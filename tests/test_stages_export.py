"""Export: the (mel, z) graph checked and verified against PyTorch in the same call, the guide's
variant, and the stage's skip/force behaviour."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from waveglow_lib.errors import ExportError, ResourceError
from waveglow_lib.export import export_onnx
from waveglow_lib.stages.export import export


def test_noise_input_graph(tiny_onnx):
    path = tiny_onnx
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["exporter"] == "legacy" and info["opset"] == 17 and info["snr_db"] >= 60
    assert info["probe_shape"] == [3, 37 * 256]  # batch and length other than the traced ones
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["mel", "z"] and [o.name for o in graph.output] == ["audio"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert dims == [["batch", 80, "frames"], ["batch", 8, "noise_length"]]


def test_guide_variant_draws_noise_in_the_graph(tiny_model, tmp_path):
    import onnxruntime as ort

    info = export_onnx(tiny_model(), tmp_path / "WaveGlow_onnx.onnx", opset=13, variant="guide")
    assert info["inputs"] == ["mel"] and info["outputs"] == ["output_audio"] and info["opset"] == 13
    model = onnx.load(tmp_path / "WaveGlow_onnx.onnx")
    assert "RandomNormalLike" in {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(str(tmp_path / "WaveGlow_onnx.onnx"), providers=["CPUExecutionProvider"])
    mel = np.full((1, 80, 11), -5.0, np.float32)
    first, second = (session.run(None, {"mel": mel})[0] for _ in range(2))
    assert first.shape == (1, 11 * 256) and not np.allclose(first, second)


def test_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="variant"):
        export_onnx(tiny_model(), tmp_path / "x.onnx", variant="other")
    with pytest.raises(ExportError, match="exporter must be"):
        export_onnx(tiny_model(), tmp_path / "x.onnx", exporter="magic")
    assert not list(tmp_path.iterdir())


def test_a_folder_where_the_graph_goes_is_one_line(tiny_model, tmp_path):
    """A folder at the graph's path failed as an IsADirectoryError traceback when the exported temp file was
    renamed onto it; now ResourceError naming the file, and no temp file is left."""
    (tmp_path / "waveglow.onnx").mkdir()
    with pytest.raises(ResourceError, match=r"waveglow\.onnx: could not write \(a folder is where the file goes"):
        export_onnx(tiny_model(), tmp_path / "waveglow.onnx", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["waveglow.onnx"]


def test_stage_skips_a_current_export(make_cfg, tiny_checkpoint, tmp_path):
    cfg = make_cfg(tmp_path)
    first = export(cfg)["noise_input"]
    assert first["status"] == "exported" and (cfg.run_dir / "onnx" / "waveglow.onnx").is_file()
    assert export(cfg)["noise_input"]["status"].startswith("skipped")
    assert export(cfg.with_overrides(opset=18))["noise_input"]["opset"] == 18  # a changed opset re-exports
    assert tiny_checkpoint.is_file()


def test_dynamo_exporter_also_works(tiny_model, tmp_path):
    """The fallback route (torch.export with a derived noise-length dimension) in case the legacy
    TorchScript exporter disappears from a later torch."""
    info = export_onnx(tiny_model(), tmp_path / "dynamo.onnx", exporter="dynamo")
    assert info["exporter"] == "dynamo" and info["snr_db"] >= 60 and info["probe_shape"] == [3, 37 * 256]
    assert info["inputs"] == ["mel", "z"] and info["outputs"] == ["audio"]
