"""The model as an ONNX graph every runtime can load, and the graph's contract (input/output names).

Our graph takes the noise as an input: `mel [B, n_mel, T]`, `z [B, n_group, T*hop/n_group]` (already
scaled by sigma) → `audio [B, T*hop]`, dynamic batch and length, so every backend can be fed the same
noise and compared. The guide's variant (`variant="guide"`) draws the noise inside the graph
(RandomNormalLike) from the mel alone and names its output `output_audio`, for users of the original
commands; its outputs are not reproducible.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from .checkpoint import model_fingerprint
from .config import ONNX_OPSETS
from .errors import ExportError, ResourceError, import_optional
from .io import atomic_write_json, file_entry, replace_file, storage_problem
from .layout import record_path
from .metrics import snr_db

#: names used in the exported ONNX graph (noise as an input)
ONNX_INPUTS = ("mel", "z")
ONNX_OUTPUT = "audio"
#: names of the guide's variant (noise drawn inside the graph)
GUIDE_INPUTS = ("mel",)
GUIDE_OUTPUT = "output_audio"
#: opsets the exporter writes as asked (older ones are silently upgraded by torch's exporter)
MIN_OPSET, MAX_OPSET = ONNX_OPSETS

#: probe used to verify the export: batch 3, a length other than the one traced (batch 2)
TRACE_FRAMES = 24
PROBE_FRAMES = 37
#: ONNX Runtime must reproduce PyTorch at least this well (fp32) or export fails
MIN_SNR_DB = 60.0


def _wrappers(model, sigma: float):
    class NoiseInput(torch.nn.Module):
        """forward(mel, z) = model.forward: the reverse pass with complete, pre-scaled noise."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, mel, z):
            return self.model(mel, z)

    class GuideVariant(torch.nn.Module):
        """forward(mel): noise drawn in the graph, shaped from the mel so the length stays dynamic."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.sigma = float(sigma)

        def forward(self, mel):
            g = model.n_group
            template = mel[:, :1, :].repeat(1, g, model.hop_length // g)
            return self.model(mel, torch.randn_like(template) * self.sigma)

    return NoiseInput(), GuideVariant()


def export_onnx(model, path: str | Path, opset: int = 17, *, variant: str = "noise_input", sigma: float = 0.6,
                exporter: str = "auto", verify: bool = True, seed: int = 0) -> dict:
    """Export `model` (a WaveGlow) to `path`; check it and, for the noise-input graph, verify it.

    - `variant`: "noise_input" (inputs mel, z; output audio) or "guide" (input mel; noise drawn in the
      graph with `sigma`, the guide's default 0.9 being replaced by ours; output output_audio).
    - `exporter`: "legacy" (TorchScript tracer, `dynamo=False`), "dynamo" (torch.export with
      dynamic_shapes), or "auto" (legacy, falling back to dynamo if it fails).
    - runs `onnx.checker`, then ONNX Runtime on a probe (batch 3, a length other than the traced one)
      against PyTorch with the same noise: `snr_db` in the result, ExportError below MIN_SNR_DB.
    The file is written atomically; `<path stem>.json` records opset, names, model config and the SNR.
    """
    onnx = import_optional("onnx", "pip install 'waveglow-workflow[onnx]'", "ONNX export")
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ExportError(f"{path}: opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}, the opsets this exporter "
                          "writes as asked", path=path)
    if variant not in ("noise_input", "guide"):
        raise ExportError(f"variant must be 'noise_input' or 'guide', got {variant!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    noise_module, guide_module = _wrappers(model, sigma)
    n_mel = model.config.n_mel_channels
    generator = torch.Generator().manual_seed(seed)
    # batch 2 in the trace: torch.export would specialise a batch of 1 to a constant
    mel = torch.randn(2, n_mel, TRACE_FRAMES, generator=generator) - 5.0
    z = torch.randn(model.noise_shape(2, TRACE_FRAMES), generator=generator)
    if variant == "noise_input":
        module, args, inputs, output = noise_module, (mel, z), list(ONNX_INPUTS), ONNX_OUTPUT
        dynamic_axes = {"mel": {0: "batch", 2: "frames"}, "z": {0: "batch", 2: "noise_length"},
                        output: {0: "batch", 1: "samples"}}
    else:
        module, args, inputs, output = guide_module, (mel,), list(GUIDE_INPUTS), GUIDE_OUTPUT
        dynamic_axes = {"mel": {0: "batch", 2: "frames"}, output: {0: "batch", 1: "samples"}}

    tmp = path.with_name(f".{path.name}.tmp")
    started = time.perf_counter()
    attempts = ["legacy", "dynamo"] if exporter == "auto" else [exporter]
    errors = []
    used = None
    for attempt in attempts:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation / tracer warnings
                if attempt == "legacy":
                    torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=opset,
                                      input_names=inputs, output_names=[output], dynamic_axes=dynamic_axes,
                                      do_constant_folding=True)
                elif attempt == "dynamo":
                    _export_dynamo(module, args, tmp, opset, inputs, output, model)
                else:
                    raise ExportError(f"exporter must be auto, legacy or dynamo, got {exporter!r}")
            used = attempt
            break
        except ExportError:
            raise
        except Exception as exc:  # exporter failures come as many exception types
            if storage_problem(exc):  # a full disk fails every exporter alike: say so, naming the file
                tmp.unlink(missing_ok=True)
                raise ResourceError(f"{path}: could not write ({storage_problem(exc)})", path=path) from None
            errors.append(f"{attempt}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            tmp.unlink(missing_ok=True)
    if used is None:
        raise ExportError(f"{path}: ONNX export failed ({'; '.join(errors)})")
    try:
        onnx.checker.check_model(str(tmp))
        proto = onnx.load(str(tmp), load_external_data=False)
        graph = proto.graph
        actual_opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset)
        names_in = [i.name for i in graph.input]
        names_out = [o.name for o in graph.output]
        if names_in != inputs or names_out != [output]:
            raise ExportError(f"{path}: exported graph has inputs {names_in}, outputs {names_out}")

        result = {"path": str(path), "variant": variant, "opset": actual_opset, "opset_requested": int(opset),
                  "exporter": used,
                  "inputs": names_in, "outputs": names_out, "export_seconds": round(time.perf_counter() - started, 2),
                  "model_config": model.config.to_dict(), "n_mel_channels": n_mel, "n_group": model.n_group,
                  "hop_length": model.hop_length, "sigma_in_graph": sigma if variant == "guide" else None,
                  # what model the graph holds: infer and convert compare it with the run's model
                  "model_fingerprint": model_fingerprint(model)}
        # the files the graph is, with any external data it names: what the backends check before use
        external = sorted({entry.value for tensor in graph.initializer for entry in tensor.external_data
                           if tensor.data_location == onnx.TensorProto.EXTERNAL and entry.key == "location"})
        if verify:
            result.update(_verify(model, tmp, variant, seed))
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    result["files"] = {name: file_entry(path.parent / name) for name in [path.name, *external]}
    atomic_write_json(record_path(path), result)
    return result


def _export_dynamo(module, args, tmp: Path, opset: int, inputs: list, output: str, model) -> None:
    """torch.export route: the noise length is a derived dimension (frames * hop / n_group)."""
    batch, frames = Dim("batch", min=1, max=256), Dim("frames", min=2, max=100000)
    shapes = {"mel": {0: batch, 2: frames}}
    if "z" in inputs:
        shapes["z"] = {0: batch, 2: frames * (model.hop_length // model.n_group)}
    program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=inputs,
                                output_names=[output], dynamic_shapes=shapes, verbose=False)
    program.save(str(tmp))


def _verify(model, onnx_path: Path, variant: str, seed: int) -> dict:
    """ONNX Runtime vs PyTorch on a probe input the tracer never saw (batch 3, PROBE_FRAMES)."""
    ort = import_optional("onnxruntime", "pip install onnxruntime", "verifying the ONNX export")
    rng = np.random.default_rng(seed + 1)
    mel = (rng.standard_normal((3, model.config.n_mel_channels, PROBE_FRAMES)) - 5.0).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    expected_len = PROBE_FRAMES * model.hop_length
    if variant == "guide":
        audio = session.run(None, {"mel": mel})[0]
        if audio.shape != (3, expected_len) or not np.isfinite(audio).all():
            raise ExportError(f"{onnx_path}: guide variant gives {audio.shape}, expected (3, {expected_len})")
        return {"probe_shape": list(audio.shape), "snr_db": None}
    z = (0.6 * rng.standard_normal(model.noise_shape(3, PROBE_FRAMES))).astype(np.float32)
    audio = session.run(None, {"mel": mel, "z": z})[0]
    with torch.no_grad():
        reference = model.infer(torch.from_numpy(mel), sigma=1.0, z=torch.from_numpy(z)).numpy()
    if audio.shape != reference.shape:
        raise ExportError(f"{onnx_path}: ONNX Runtime output {audio.shape} != PyTorch {reference.shape} "
                          "(dynamic axes lost in export?)")
    snr = snr_db(np.ravel(reference), np.ravel(audio))
    if not snr >= MIN_SNR_DB:
        raise ExportError(f"{onnx_path}: ONNX Runtime reproduces PyTorch at only {snr:.1f} dB SNR "
                          f"(need {MIN_SNR_DB} dB)")
    return {"probe_shape": list(audio.shape), "snr_db": round(snr, 2)}
