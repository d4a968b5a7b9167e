"""Shared pieces of the pipeline tests (stages, backends, CLI): a tiny randomised model saved as a
checkpoint, its ONNX export and a preprocessed demo run, each built once per test session and cached."""
from __future__ import annotations

import atexit
import copy
import functools
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from waveglow_lib.config import ModelConfig, WorkflowConfig

from conftest import snr_db  # noqa: F401  (one SNR helper for all tests; the stage tests import it from here)

#: tiny but complete: early outputs, two dilations, odd and even flows
TINY_PIPELINE = ModelConfig(n_flows=4, n_group=8, n_early_every=2, n_early_size=2, n_layers=2,
                            n_channels=16, kernel_size=3)
#: demo-corpus utterances used by the stage tests (the guide's order: LJ001-0001..0003)
LIMIT = 3
#: the short demo utterances (125, 281, 99 frames) the infer/backend tests vocode, to keep them fast
SHORT_IDS = ("LJ001-0002", "LJ001-0006", "LJ001-0008")

_CACHE_DIR = Path(tempfile.mkdtemp(prefix="waveglow_pipeline_tests_"))
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _tiny_model(seed: int):
    from waveglow_lib.model import WaveGlow

    torch.manual_seed(seed)
    model = WaveGlow(TINY_PIPELINE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random (WN end convs included), small enough to stay stable
        for name, param in model.named_parameters():
            if "convinv" in name:
                continue
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 / fan_in ** 0.5)
    model.refresh_inverses()
    return model.eval()


def tiny_model(seed: int = 0):
    """A fresh copy (tests may cast or move it) of the cached tiny randomised WaveGlow."""
    return copy.deepcopy(_tiny_model(seed))


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(seed: int = 0) -> Path:
    from waveglow_lib.checkpoint import save_waveglow

    return save_waveglow(_tiny_model(seed), _CACHE_DIR / f"tiny_{seed}.safetensors")


@functools.lru_cache(maxsize=None)
def tiny_onnx(seed: int = 0) -> Path:
    """The tiny model exported (noise-input graph), with its `.json` record beside it."""
    from waveglow_lib.stages.export import export_onnx

    path = _CACHE_DIR / f"onnx_{seed}" / "waveglow.onnx"
    export_onnx(tiny_model(seed), path)
    return path


def make_cfg(runs_dir: Path, **overrides) -> WorkflowConfig:
    values = dict(name="t", runs_dir=str(runs_dir), checkpoint=str(tiny_checkpoint()), limit=LIMIT,
                  backend="torch")
    values.update(overrides)
    return WorkflowConfig(**values)


@functools.lru_cache(maxsize=None)
def short_corpus() -> Path:
    """An LJSpeech-layout folder holding the demo corpus's three shortest utterances (SHORT_IDS)."""
    from waveglow_lib.config import DEMO_CORPUS_DIR

    corpus = _CACHE_DIR / "short_corpus"
    (corpus / "wavs").mkdir(parents=True)
    for utt_id in SHORT_IDS:
        shutil.copy2(DEMO_CORPUS_DIR / "wavs" / f"{utt_id}.wav", corpus / "wavs")
    return corpus


@functools.lru_cache(maxsize=None)
def _preprocessed() -> Path:
    from waveglow_lib.stages.preprocess import preprocess

    runs = _CACHE_DIR / "preprocessed"
    preprocess(make_cfg(runs, corpus=str(short_corpus()), limit=0))
    return runs / "t" / "mel"


def preprocessed_run(runs_dir: Path, *, with_onnx: bool = False, **overrides) -> WorkflowConfig:
    """A config whose run folder already holds the mels of the short demo utterances (copied from a
    cached run) and, with `with_onnx`, the tiny model's export."""
    overrides.setdefault("corpus", str(short_corpus()))
    overrides.setdefault("limit", 0)
    cfg = make_cfg(runs_dir, **overrides)
    shutil.copytree(_preprocessed(), cfg.run_dir / "mel")
    if with_onnx:
        onnx = tiny_onnx()
        (cfg.run_dir / "onnx").mkdir(parents=True)
        for suffix in (".onnx", ".json"):
            shutil.copy2(onnx.with_suffix(suffix), cfg.run_dir / "onnx" / f"waveglow{suffix}")
    return cfg


def random_batch(batch: int, frames: int, seed: int = 0, config: ModelConfig = TINY_PIPELINE):
    """A mel around typical log-mel values and sigma-0.6 noise, float32."""
    rng = np.random.default_rng(seed)
    mel = (rng.standard_normal((batch, config.n_mel_channels, frames)) - 5.0).astype(np.float32)
    z = (0.6 * rng.standard_normal((batch, config.n_group, frames * config.hop_length // config.n_group)))
    return mel, z.astype(np.float32)


# --- a stand-in for ais_bench (contract tests: there is no NPU here) -------------------------------
class FakeInferSession:
    """Contract test double for `ais_bench.infer.interface.InferSession` (no NPU here): it checks the
    documented call shapes (`InferSession(device_id, model_path)`, `infer(feeds, mode="dymdims")` with
    a list of arrays in input order) and computes the answer with the tiny torch model."""

    instances: list = []
    old_api = False

    def __init__(self, device_id, model_path):
        assert isinstance(device_id, int) and isinstance(model_path, str)
        self.device_id, self.model_path = device_id, model_path
        self.calls, self.times, self.released = [], [], None
        self.model = tiny_model()
        FakeInferSession.instances.append(self)
        if self.old_api:  # older releases: sumary() and free_resource() only
            self.sumary, self.free_resource = self._summary, lambda: self._release("free_resource")
        else:
            self.summary, self.finalize = self._summary, lambda: self._release("finalize")

    def infer(self, feeds, mode="static"):
        assert isinstance(feeds, list) and len(feeds) == 2 and mode == "dymdims"
        mel, z = feeds
        assert mel.dtype == np.float32 and z.dtype == np.float32
        self.calls.append((mel.shape, z.shape))
        self.times.append(1.5 * len(self.calls))
        with torch.no_grad():
            return [self.model.infer(torch.from_numpy(mel), 1.0, torch.from_numpy(z)).numpy()]

    def _summary(self):
        return types.SimpleNamespace(exec_time_list=list(self.times))

    def _release(self, how):
        self.released = how


def install_fake_ais_bench(monkeypatch) -> type:
    """Put FakeInferSession behind `from ais_bench.infer.interface import InferSession`."""
    interface = types.ModuleType("ais_bench.infer.interface")
    interface.InferSession = FakeInferSession
    for name, module in {"ais_bench": types.ModuleType("ais_bench"),
                         "ais_bench.infer": types.ModuleType("ais_bench.infer"),
                         "ais_bench.infer.interface": interface}.items():
        monkeypatch.setitem(sys.modules, name, module)
    FakeInferSession.instances.clear()
    FakeInferSession.old_api = False
    return FakeInferSession
