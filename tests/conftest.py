"""Fixtures built once per test session (session-scoped, in pytest's temporary folder): the tiny model as
a checkpoint and as ONNX, a short LJSpeech-layout corpus, its preprocessed mels; factories for configs and
run folders. Plain helpers are in support.py."""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

from support import LIMIT, SHORT_IDS, TINY, TINY_PIPELINE, tiny_waveglow
from waveglow_lib.checkpoint import save_waveglow
from waveglow_lib.config import DEMO_CORPUS_DIR, ModelConfig, WorkflowConfig
from waveglow_lib.export import export_onnx
from waveglow_lib.stages.preprocess import preprocess


@pytest.fixture(scope="session", autouse=True)
def engine_cache_dir(tmp_path_factory) -> Path:
    """The fast backend's engine cache in pytest's temporary folder: tests never write into ~/.cache."""
    path = tmp_path_factory.mktemp("engine_cache")
    previous = os.environ.get("WAVEGLOW_CACHE_DIR")
    os.environ["WAVEGLOW_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("WAVEGLOW_CACHE_DIR", None)
    else:
        os.environ["WAVEGLOW_CACHE_DIR"] = previous


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(**TINY)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(seed=0): a fresh copy (tests may cast or move it) of the session's tiny WaveGlow."""
    built: dict[int, object] = {}

    def make(seed: int = 0):
        if seed not in built:
            built[seed] = tiny_waveglow(TINY_PIPELINE, seed=seed)
        return copy.deepcopy(built[seed])

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> Path:
    return save_waveglow(tiny_model(), tmp_path_factory.mktemp("checkpoint") / "tiny_0.safetensors")


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_model) -> Path:
    """The tiny model exported (noise-input graph), with its `.json` record beside it."""
    path = tmp_path_factory.mktemp("onnx") / "waveglow.onnx"
    export_onnx(tiny_model(), path)
    return path


@pytest.fixture(scope="session")
def short_corpus(tmp_path_factory) -> Path:
    """An LJSpeech-layout folder holding the demo corpus's three shortest utterances (SHORT_IDS)."""
    corpus = tmp_path_factory.mktemp("short_corpus")
    (corpus / "wavs").mkdir()
    for utt_id in SHORT_IDS:
        shutil.copy2(DEMO_CORPUS_DIR / "wavs" / f"{utt_id}.wav", corpus / "wavs")
    return corpus


@pytest.fixture(scope="session")
def make_cfg(tiny_checkpoint):
    """make_cfg(runs_dir, **overrides): a run of the tiny checkpoint on the demo corpus (torch backend)."""
    def make(runs_dir: Path, **overrides) -> WorkflowConfig:
        values = dict(name="t", runs_dir=str(runs_dir), checkpoint=str(tiny_checkpoint), limit=LIMIT,
                      backend="torch")
        values.update(overrides)
        return WorkflowConfig(**values)

    return make


@pytest.fixture(scope="session")
def preprocessed_mels(tmp_path_factory, make_cfg, short_corpus) -> Path:
    runs = tmp_path_factory.mktemp("preprocessed")
    preprocess(make_cfg(runs, corpus=str(short_corpus), limit=0))
    return runs / "t" / "mel"


@pytest.fixture(scope="session")
def preprocessed_run(make_cfg, preprocessed_mels, short_corpus, tiny_onnx):
    """preprocessed_run(runs_dir, with_onnx=False, **overrides): a config whose run folder already holds the
    mels of the short demo utterances (copied) and, with `with_onnx`, the tiny model's export."""
    def make(runs_dir: Path, *, with_onnx: bool = False, **overrides) -> WorkflowConfig:
        overrides.setdefault("corpus", str(short_corpus))
        overrides.setdefault("limit", 0)
        cfg = make_cfg(runs_dir, **overrides)
        shutil.copytree(preprocessed_mels, cfg.run_dir / "mel")
        if with_onnx:
            (cfg.run_dir / "onnx").mkdir(parents=True)
            for suffix in (".onnx", ".json"):
                shutil.copy2(tiny_onnx.with_suffix(suffix), cfg.run_dir / "onnx" / f"waveglow{suffix}")
        return cfg

    return make
