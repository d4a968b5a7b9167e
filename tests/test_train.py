"""Training: the objective, resume, data parallel, and the bad inputs training must refuse."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from support import TINY
from waveglow_lib import train as train_module
from waveglow_lib.cli import main as cli_main
from waveglow_lib.checkpoint import load_waveglow, save_waveglow
from waveglow_lib.config import DEMO_CORPUS_DIR, ModelConfig, STFTConfig
from waveglow_lib.errors import AudioError, CheckpointError, ConfigError, MissingDependency, TrainingError
from waveglow_lib.model import WaveGlow
from waveglow_lib.train import (STATE_NAME, FlowLoss, TrainConfig, apply_weight_norm, folded_copy,
                                init_from_scratch, load_corpus, lr_at, read_train_state, train, train_with_ray)

REPO = Path(__file__).resolve().parents[1]


def tiny_run(out_dir: Path, **changes) -> TrainConfig:
    settings = dict(out_dir=str(out_dir), model=dict(TINY), segment_length=1024, batch_size=2,
                    learning_rate=1e-3, max_steps=6, log_every=1, checkpoint_every=3, validate_every=0,
                    num_threads=1, seed=7)
    settings.update(changes)
    return TrainConfig(**settings)


def test_flow_loss_matches_the_models_forward_direction_and_nvidia_formula(tiny_config):
    torch.manual_seed(0)
    glow = init_from_scratch(tiny_config, seed=0)
    with torch.no_grad():  # make every flow do something (the WN ends start at zero)
        for wn in glow.WN:
            wn.end.weight.normal_(0, 0.05)
    corpus = load_corpus(DEMO_CORPUS_DIR, 1024)
    mel, audio = train_module.segments_and_mels(corpus, [0, 3], [1000, 5000], 1024, STFTConfig(),
                                                torch.device("cpu"))
    loss_module = FlowLoss(glow, sigma=0.8)
    z, log_s, log_det_w = loss_module.flow(mel, audio)
    # the same z as the model's own (no-grad) forward direction, in the same row order; that one pads the
    # audio to the mel's length, training (like NVIDIA) trims the mel to the audio: the last columns differ
    expected_z = glow.noise_from_audio(mel, audio)[:, :, : audio.shape[1] // 8]
    torch.testing.assert_close(z.detach()[..., :64], expected_z[..., :64], rtol=1e-5, atol=1e-6)
    # log|det W| summed over flows, times batch * columns (NVIDIA's convinv)
    manual = sum(torch.logdet(c.conv.weight.detach().squeeze(-1).double()) for c in glow.convinv) * 2 * 128
    assert float(log_det_w.detach()) == pytest.approx(float(manual), rel=1e-5, abs=1e-3)
    loss = loss_module(mel, audio)
    nvidia = (torch.sum(z * z) / (2 * 0.8 ** 2) - log_s - log_det_w) / z.numel()
    assert float(loss.detach()) == pytest.approx(float(nvidia.detach()), rel=1e-6)


def test_weight_norm_is_folded_when_saved(tmp_path, tiny_config):
    glow = apply_weight_norm(init_from_scratch(tiny_config, seed=1))
    assert any(k.endswith("weight_g") for k in glow.state_dict())
    with torch.no_grad():
        for wn in glow.WN:
            wn.in_layers[0].weight_g.mul_(1.7)  # g away from |v|: folding must use both
    plain = folded_copy(glow)
    assert not any(k.endswith(("weight_g", "weight_v")) for k in plain.state_dict())
    save_waveglow(plain, tmp_path / "m.safetensors")
    loaded = load_waveglow(tmp_path / "m.safetensors")
    mel = torch.randn(1, 80, 6)
    audio = torch.randn(1, 6 * 256) * 0.1
    torch.testing.assert_close(FlowLoss(loaded)(mel, audio), FlowLoss(glow)(mel, audio), rtol=1e-5, atol=1e-6)


def test_loss_decreases_and_the_saved_model_loads(tmp_path):
    result = train(tiny_run(tmp_path, max_steps=12, learning_rate=2e-3, validate_every=6))
    losses = [entry["loss"] for entry in result["history"]]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert "val_loss" in result["history"][5] and "val_loss" not in result["history"][4]
    assert result["history"][-1]["samples_per_s"] > 0
    model = load_waveglow(tmp_path / "model.safetensors")
    assert model.config == ModelConfig(**TINY)
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] == 12


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = train(tiny_run(tmp_path / "straight"))
    first = train(tiny_run(tmp_path / "interrupted", max_steps=4, checkpoint_every=2))
    assert first["step"] == 4
    resumed = train(tiny_run(tmp_path / "interrupted", checkpoint_every=2))
    assert resumed["step"] == 6
    assert [e["loss"] for e in resumed["history"]] == pytest.approx([e["loss"] for e in straight["history"]],
                                                                     rel=1e-6)
    a, info_a = read_train_state(tmp_path / "straight" / STATE_NAME)
    b, info_b = read_train_state(tmp_path / "interrupted" / STATE_NAME)
    assert info_a["step"] == info_b["step"] == 6
    assert set(a) == set(b) and any(k.startswith("optim.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    # the state file is safetensors + JSON: no pickle opcodes anywhere
    assert (tmp_path / "straight" / STATE_NAME).read_bytes()[8:9] == b"{"
    with pytest.raises(TrainingError, match="another architecture"):
        train(tiny_run(tmp_path / "straight", model=dict(TINY, n_layers=2), max_steps=8))


def test_lr_schedule_warms_up_then_decays():
    config = TrainConfig(learning_rate=1e-3, warmup_steps=10, cosine_decay=True, final_learning_rate=1e-5,
                         max_steps=110)
    assert lr_at(config, 0) == pytest.approx(1e-4)
    assert lr_at(config, 9) == pytest.approx(1e-3)
    assert lr_at(config, 60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(config, 110) == pytest.approx(1e-5)


def test_bf16_autocast_trains(tmp_path):
    result = train(tiny_run(tmp_path, precision="bf16", max_steps=3))
    assert all(np.isfinite(e["loss"]) for e in result["history"])


def test_nan_loss_stops_with_step_and_utterances_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_forward = FlowLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(FlowLoss, "forward", forward)
    with pytest.raises(TrainingError) as info:
        train(tiny_run(tmp_path, checkpoint_every=3))
    message = str(info.value)
    assert "step 5" in message and "LJ001-" in message and str(tmp_path / STATE_NAME) in message
    _, saved = read_train_state(tmp_path / STATE_NAME)
    assert saved["step"] == 3
    monkeypatch.setattr(FlowLoss, "forward", real_forward)
    assert train(tiny_run(tmp_path))["step"] == 6  # resumes from the good checkpoint


def _write_corpus(folder: Path, specs: list[tuple[str, int, int]]) -> Path:
    (folder / "wavs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, rate, samples in specs:
        wavfile.write(folder / "wavs" / f"{name}.wav", rate, (rng.standard_normal(samples) * 3000).astype(np.int16))
    return folder


def test_bad_corpus_names_the_files(tmp_path):
    corpus = _write_corpus(tmp_path / "c", [("ok", 22050, 5000), ("short", 22050, 500), ("fast", 44100, 9000)])
    with pytest.raises(AudioError) as info:
        load_corpus(corpus, 1024)
    message = str(info.value)
    assert "short.wav (500 samples)" in message and "segment_length=1024" in message
    assert "fast.wav (44100 Hz)" in message and "22050" in message
    with pytest.raises(AudioError, match="wavs/"):
        load_corpus(tmp_path / "nowhere", 1024)
    with pytest.raises(ConfigError, match="n_validation"):
        train(tiny_run(tmp_path / "out", corpus=str(_write_corpus(tmp_path / "one", [("a", 22050, 4000)])),
                       n_validation=1))


def test_warm_start_takes_the_weights_and_refuses_another_architecture(tmp_path, tiny_config):
    source = init_from_scratch(tiny_config, seed=3)
    with torch.no_grad():
        for wn in source.WN:
            wn.end.weight.normal_(0, 0.02)
    checkpoint = save_waveglow(source, tmp_path / "pretrained.safetensors")
    result = train(tiny_run(tmp_path / "ft", model={}, warm_start=str(checkpoint), learning_rate=1e-9,
                            max_steps=1))
    tuned = load_waveglow(result["model"])
    for key, value in source.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=key)
    other = dict(TINY, n_channels=32)
    with pytest.raises(CheckpointError, match="n_channels: config 32 vs checkpoint 16"):
        train(tiny_run(tmp_path / "bad", model=other, warm_start=str(checkpoint)))


def test_config_checks_and_the_demo_params_file():
    with pytest.raises(ConfigError, match="unknown parameter"):
        TrainConfig.from_dict({"learning_rat": 1e-3})
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="model"):
        TrainConfig(model={"n_group": 7})
    config = TrainConfig.from_yaml(REPO / "params" / "train_demo.yaml", {"max_steps": 5})
    assert config.max_steps == 5 and config.model_config().n_flows == 8


def test_cli_train_subcommand(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps(tiny_run(tmp_path / "cli", max_steps=2).to_dict()))  # JSON is YAML
    assert cli_main(["train", "--params", str(params), "--set", "max_steps=3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 3 and (tmp_path / "cli" / "params.yaml").is_file()


def test_ray_train_entry_names_the_missing_dependency(tmp_path, monkeypatch):
    # Ray hidden (sys.modules entry None makes the import fail), whether or not it is installed here
    monkeypatch.setitem(sys.modules, "ray.train", None)
    monkeypatch.setitem(sys.modules, "ray.train.torch", None)
    with pytest.raises(MissingDependency, match=r"pip install 'ray\[train\]'"):
        train_with_ray(tiny_run(tmp_path))


DDP_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from waveglow_lib.train import TrainConfig, loop
    writes = {"state": 0, "model": 0}
    real_state, real_model = loop.save_train_state, loop.save_waveglow
    def count_state(*a, **k):
        writes["state"] += 1
        return real_state(*a, **k)
    def count_model(*a, **k):
        writes["model"] += 1
        return real_model(*a, **k)
    loop.save_train_state, loop.save_waveglow = count_state, count_model  # the names the loop calls
    config = TrainConfig.from_dict(json.loads(sys.argv[1]))
    result = loop.train(config)
    rank = int(os.environ["RANK"])
    with open(sys.argv[2] + f"/rank{rank}.json", "w") as f:
        json.dump({"losses": [e["loss"] for e in result["history"]], "writes": writes,
                   "world_size": result["world_size"]}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_follows_the_single_process_trajectory_and_writes_once(tmp_path):
    config = tiny_run(tmp_path / "ddp", batch_size=4, max_steps=4, checkpoint_every=2)
    single = train(tiny_run(tmp_path / "single", batch_size=4, max_steps=4, checkpoint_every=2))
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(script), json.dumps(config.to_dict()),
               str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    expected = [e["loss"] for e in single["history"]]
    for rank in ranks:
        assert rank["losses"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert ranks[0]["writes"] == {"state": 2, "model": 2} and ranks[1]["writes"] == {"state": 0, "model": 0}
    a, _ = read_train_state(tmp_path / "single" / STATE_NAME)
    b, _ = read_train_state(tmp_path / "ddp" / STATE_NAME)
    for key in a:
        if key.startswith("model."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_fast_upsample_equals_the_models_condition(tiny_config):
    glow = WaveGlow(tiny_config)
    mel = torch.randn(3, 80, 7)
    with torch.no_grad():
        torch.testing.assert_close(train_module.upsample(glow.upsample, mel), glow.upsample(mel),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(train_module.condition(glow, mel, 200), glow.condition(mel)[:, :, :200],
                                   rtol=1e-5, atol=1e-5)


def test_train_notebook_is_committed_clean_with_one_parameters_cell():
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / "07_train.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    namespace: dict = {}
    exec(tagged[0].source, namespace)
    assert namespace["params_file"] == "params/my_train.yaml" and namespace["overrides"] == {}   # train_demo until made
    sources = "\n".join(c.source for c in code)
    assert "run_train(" in sources and "def " not in sources  # the logic stays in the library


# --- the generation-direction losses (train option: stft_loss_weight, mel_loss_weight) --------------------
def test_generation_loss_scores_spectra_and_is_zero_for_the_recording():
    corpus = load_corpus(DEMO_CORPUS_DIR, 4096)
    target = torch.from_numpy(np.stack([corpus.audio[0][8000:12096], corpus.audio[1][8000:12096]]))
    loss = train_module.GenerationLoss(sigma=0.6, stft_weight=1.0, mel_weight=1.0)
    same, parts = loss(target, target)
    assert float(same) == pytest.approx(0.0, abs=1e-3) and set(parts) == {"stft", "mel"}
    quieter, _ = loss(0.5 * target, target)
    noise, _ = loss(0.05 * torch.randn_like(target), target)
    assert 0.1 < float(quieter) < float(noise)  # a level error costs less than losing the spectrum
    only_mel = train_module.GenerationLoss(sigma=0.6, stft_weight=0.0, mel_weight=2.0)
    total, parts = only_mel(0.5 * target, target)
    assert set(parts) == {"mel"} and float(total) == pytest.approx(2.0 * parts["mel"], rel=1e-5)


def test_the_reverse_pass_carries_gradients_only_when_training(tiny_config):
    """The generation losses train through the reverse pass: its 1x1 inverses are computed from the weights
    (with gradients) then, and are the float64 buffers in inference, the same numbers up to rounding."""
    glow = init_from_scratch(tiny_config, seed=2)
    mel, z = torch.randn(1, 80, 5) - 5, 0.6 * torch.randn(glow.noise_shape(1, 5))
    inferred = glow.infer(mel, 1.0, z)
    generated = glow(mel, z)
    generated.square().sum().backward()
    assert all(c.conv.weight.grad is not None and c.conv.weight.grad.abs().sum() > 0 for c in glow.convinv)
    torch.testing.assert_close(generated.detach(), inferred, rtol=1e-4, atol=1e-5)


def test_training_with_generation_losses_lowers_them_and_logs_each_term(tmp_path):
    run = tiny_run(tmp_path, max_steps=12, learning_rate=2e-3, segment_length=2048, stft_loss_weight=1.0,
                   mel_loss_weight=1.0, gen_start_step=2)
    result = train(run)
    history = result["history"]
    assert all("flow_loss" in e for e in history)
    assert not any("stft_loss" in e for e in history[:2])  # warm-up: the flow loss alone
    stft = [e["stft_loss"] for e in history[2:]]
    mel = [e["mel_loss"] for e in history[2:]]
    assert all(np.isfinite(stft + mel)) and np.mean(mel[-3:]) < np.mean(mel[:3])
    for entry in history[2:]:  # the logged loss is the weighted sum of the terms
        assert entry["loss"] == pytest.approx(entry["flow_loss"] + entry["stft_loss"] + entry["mel_loss"], rel=1e-4)
    with pytest.raises(ConfigError, match="stft_loss_weight"):
        tiny_run(tmp_path, stft_loss_weight=-1.0)


def test_the_demo_model_card_says_how_it_was_made_and_what_it_scores():
    from waveglow_lib.assets import train_demo_model as script
    from waveglow_lib.config import DEMO_MODEL_CARD

    curve = {"candidate": {"step": 1200, "stoi": 0.7, "pesq": 1.2, "bytes": 10}, "eval": {"sigma": 0.6, "seed": 1},
             "untrained": {"stoi": 0.3, "pesq": 1.0}}
    fresh = script.model_card(curve, warm_started=False)
    assert fresh["recipe"].startswith("8 flows, WN 6 x 48, from scratch: 1,200 steps")
    assert f"from step {script.DEMO_TRAIN_CONFIG.gen_start_step:,}" in fresh["recipe"]
    assert fresh["scores"] == {"stoi": 0.7, "pesq": 1.2}
    continued = script.model_card(curve, warm_started=True)   # after the bundled model's own recipe
    assert continued["recipe"].startswith(json.loads(DEMO_MODEL_CARD.read_text())["recipe"][:30])
    assert "; then 1,200 steps of the flow loss with the generation losses" in continued["recipe"]
    assert continued["recipe"].count(script.RECIPE_TOOL) == 1  # each stage adds its steps, not the tool again
    assert f"Adam {script.WARM_START_OVERRIDES['learning_rate']:g}" in continued["recipe"]


def test_the_envelope_ceilings_show_what_voicing_adds():
    """`train_demo_model --ceilings`: a demo utterance made from its own mel without a model; Griffin-Lim's
    consistent phase must beat random phase (a whisper) by far on both scores, or the docs' bounds are wrong."""
    pytest.importorskip("pystoi")
    pytest.importorskip("pesq")
    from waveglow_lib.assets.train_demo_model import envelope_ceilings

    ceilings = envelope_ceilings(iterations=4, limit=1)
    whisper, voiced = ceilings["random_phase"], ceilings["griffin_lim"]
    assert 0 < whisper["stoi"] < voiced["stoi"] <= 1
    assert voiced["pesq"] > whisper["pesq"] + 0.5


# --- what 07_train shows: before/after samples, a progress bar; threads that follow the free cores ----------
def test_samples_come_before_the_first_step_and_after_the_last(tmp_path):
    steps = []
    result = train(tiny_run(tmp_path, max_steps=5), on_sample=lambda step, model: steps.append(step),
                   sample_every=2, progress=True)
    assert result["step"] == 5 and steps == [0, 2, 4, 5]     # before, every 2 steps, after
    steps.clear()
    train(tiny_run(tmp_path, max_steps=8), on_sample=lambda step, model: steps.append(step), sample_every=8)
    assert steps == [5, 8]                                  # resumed: what it makes now, then at the end


def test_auto_threads_take_the_free_cores_and_are_given_back(tmp_path, monkeypatch):
    """num_threads 0: one thread per core not busy with other processes' work (measured), at least 1; a
    fixed num_threads is kept; torch's setting is what it was once training returns."""
    monkeypatch.setattr(train_module.loop, "usable_cpus", lambda: 4)
    busy = {"others": 2.6}
    monkeypatch.setattr(train_module.loop.CpuMeter, "others_busy", lambda self: busy["others"])
    plan = train_module.loop.ThreadPlan(0)
    before = torch.get_num_threads()
    try:
        assert plan.update() == 1 and torch.get_num_threads() == 1      # 4 cores, 2.6 busy: 1 free
        busy["others"] = 0.2
        assert plan.update() == 4                                         # idle: all of them
        busy["others"] = 9.0
        assert plan.update() == 1                                         # never fewer than one
        assert train_module.loop.ThreadPlan(3).update() == 3              # fixed: as asked
        assert train_module.loop.ThreadPlan(0, world_size=2).cap == 2      # two ranks share the cores
    finally:
        torch.set_num_threads(before)
    used = []
    monkeypatch.setattr(train_module.loop.ThreadPlan, "update",
                        lambda self: used.append(torch.get_num_threads()) or 1)
    train(tiny_run(tmp_path, max_steps=2, num_threads=0))
    assert used and torch.get_num_threads() == before


@pytest.mark.e2e
def test_ray_train_runs_two_steps_on_a_local_ray(tmp_path):
    """Ray Train's TorchTrainer on a local Ray (2 CPUs): two workers run two steps, rank 0 writes the state."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    from waveglow_lib.engines.ray import with_startup_retries

    started = not ray.is_initialized()
    if started:
        with_startup_retries(lambda: ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
                                              runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}))
    try:
        result = train_with_ray(tiny_run(tmp_path / "out", max_steps=2, checkpoint_every=2, batch_size=2),
                                num_workers=2)
    finally:
        if started:
            ray.shutdown()
    # rank 0's resume state is the run's record (Ray 2.60's result.metrics came back empty here)
    _, saved = read_train_state(tmp_path / "out" / STATE_NAME)
    assert saved["step"] == 2 and result["out_dir"] == str(tmp_path / "out"), (saved, result)
