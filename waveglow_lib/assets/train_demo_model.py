"""Train the demo model on the demo corpus: `python -m waveglow_lib.assets.train_demo_model --until 05:10 [--install]`.

A small WaveGlow (8 flows, WN 6 x 48, the upsampler frozen as a per-band Hann interpolation placed where each
mel frame's centre lands, so that its 6.5 M weights cost nothing to store or learn) trained with
`waveglow_lib.train` on the 10 bundled espeak-ng utterances, then scored (STOI, PESQ against the originals,
sigma 0.6): the snapshot with the best STOI becomes the candidate, a gzipped float16 file in our format, and
`--install` makes it the bundled demo model. The run is resumable: run the same command again to continue it.

How many steps: training runs in sittings (resumed from the last checkpoint); before each, the rest of
the cosine learning-rate decay is re-planned from the median speed logged so far to end at `--until`,
starting from the rate reached so far (kept in `<out-dir>/plan.json`). A non-finite loss resumes from the
last checkpoint with half the learning rate.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..audio import load_wav, mel_filterbank, mel_spectrogram
from ..checkpoint import load_waveglow
from ..config import DEMO_CORPUS_DIR, DEMO_MODEL_CARD, DEMO_MODEL_PATH, STFTConfig
from ..errors import TrainingError
from ..hardware import native_bf16
from ..metrics import pesq_score, stoi_score
from ..io import atomic_write_bytes, atomic_write_json
from ..layout import CORPUS_WAVS_DIR
from ..train import HISTORY_NAME, TrainConfig, folded_copy, init_from_scratch, lr_at, train

DEMO_TRAIN_CONFIG = TrainConfig(
    corpus="demo",
    model=dict(n_mel_channels=80, n_flows=8, n_group=8, n_early_every=4, n_early_size=2,
               n_layers=6, n_channels=48, kernel_size=3),
    freeze_upsample=True, hann_upsample=True,
    segment_length=4096, batch_size=6, sigma=1.0,
    learning_rate=8e-4, warmup_steps=50, cosine_decay=True, final_learning_rate=4e-5, grad_clip=20.0,
    max_steps=100000, checkpoint_every=150, keep_snapshots=True, save_dtype="float16",
    log_every=10, validate_every=50, validation_segments=6, seed=2019,
    # voicing: the generation-direction losses join the flow loss once the envelope is learnt
    stft_loss_weight=4.0, mel_loss_weight=2.0, gen_sigma=0.6, gen_start_step=5000,
    # bf16 autocast where the CPU multiplies bf16 natively: 1.75x the steps on AMX; elsewhere it only converts
    precision="bf16" if native_bf16() else "fp32",
)
#: continuing from a trained model (--warm-start): the generation losses from the first step, gentler rate
WARM_START_OVERRIDES = dict(model={}, learning_rate=1e-4, warmup_steps=0, gen_start_step=0)
PLAN_NAME = "plan.json"
CANDIDATE_NAME = "demo_waveglow.safetensors.gz"
EVAL_SIGMA = 0.6
EVAL_SEED = 1234
RECIPE_TOOL = "python -m waveglow_lib.assets.train_demo_model, 2 CPU cores"


def _deadline(text: str) -> dt.datetime:
    """HH:MM (today, UTC; tomorrow if already past) or an ISO time."""
    now = dt.datetime.now(dt.timezone.utc)
    if len(text) <= 5 and ":" in text:
        hour, minute = map(int, text.split(":"))
        moment = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return moment if moment > now else moment + dt.timedelta(days=1)
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _seconds_left(deadline: dt.datetime) -> float:
    return (deadline - dt.datetime.now(dt.timezone.utc)).total_seconds()


def _log(entry: dict) -> None:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "time"]
    print(time.strftime("%H:%M:%S"), " ".join(parts), flush=True)


def run_training(out_dir: Path, deadline: dt.datetime, probe_steps: int = 20, sitting_minutes: float = 15,
                 warm_start: Path | None = None) -> None:
    """Sittings of `sitting_minutes`; before each, the cosine schedule's length is re-planned from the speed
    measured so far so that it ends at `deadline` (the machine is shared: its speed changes)."""
    config = DEMO_TRAIN_CONFIG.with_overrides(out_dir=str(out_dir))
    if warm_start is not None:
        config = config.with_overrides(warm_start=str(warm_start), **WARM_START_OVERRIDES)
    plan_path = out_dir / PLAN_NAME
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:  # a short first sitting measures the speed
        train(config.with_overrides(max_steps=probe_steps), on_log=_log)
        plan = {"learning_rate": config.learning_rate, "deadline": deadline.isoformat(), "replans": []}
    while _seconds_left(deadline) > 30:
        history = json.loads((out_dir / HISTORY_NAME).read_text())
        step = history[-1]["step"]
        # the median logged speed so far: a pause (the machine lent to a benchmark) does not shrink the plan
        speed = float(np.median([e["samples_per_s"] for e in history]))
        per_step = config.batch_size * config.segment_length / speed
        if "max_steps" in plan:  # continue the decay from today's rate: the schedule never jumps back up
            current = config.with_overrides(max_steps=plan["max_steps"], learning_rate=plan["learning_rate"],
                                            warmup_steps=plan.get("warmup_steps", config.warmup_steps))
            plan["learning_rate"], plan["warmup_steps"] = lr_at(current, step), step
        plan["max_steps"] = step + max(1, int(_seconds_left(deadline) / per_step))
        plan["replans"].append({"step": step, "seconds_per_step": per_step, "max_steps": plan["max_steps"],
                                "learning_rate": plan["learning_rate"]})
        atomic_write_json(plan_path, plan)
        print(f"step {step}: {per_step:.2f} s/step, schedule ends at step {plan['max_steps']} "
              f"({deadline:%H:%M} UTC)", flush=True)
        run = config.with_overrides(max_steps=plan["max_steps"], learning_rate=plan["learning_rate"],
                                    warmup_steps=plan.get("warmup_steps", config.warmup_steps),
                                    max_seconds=min(sitting_minutes * 60, _seconds_left(deadline)))
        try:
            result = train(run, on_log=_log)
        except TrainingError as error:  # resume from the last good checkpoint, more gently
            print(f"{error}\n-> halving the learning rate and resuming", flush=True)
            plan["learning_rate"] /= 2
            atomic_write_json(plan_path, plan)
            continue
        if result["stopped_by"] == "max_steps":
            break


def vocode_corpus(model, sigma: float = EVAL_SIGMA, seed: int = EVAL_SEED) -> dict[str, dict]:
    """STOI and PESQ of each demo utterance vocoded from its own mel, against the original."""
    scores = {}
    for path in sorted((DEMO_CORPUS_DIR / CORPUS_WAVS_DIR).glob("*.wav")):
        audio, rate = load_wav(path)
        mel = torch.from_numpy(mel_spectrogram(audio))[None]
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out = model.infer(mel, sigma=sigma, generator=generator)[0, : len(audio)].numpy()
        scores[path.stem] = {"stoi": stoi_score(audio, out, rate), "pesq": pesq_score(audio, out, rate)}
    return scores


def envelope_ceilings(iterations: int = 32, seed: int = 0, limit: int = 0,
                      stft: STFTConfig = STFTConfig()) -> dict[str, dict[str, float]]:
    """What the demo utterances score when made from their own mel without any model: the mel's spectral
    envelope (the filterbank's pseudo-inverse) under random phase, i.e. a perfect whisper, and the same
    magnitudes after `iterations` of Griffin-Lim, whose consistent phase brings the voicing back. The first
    bounds what a model that only shapes noise can reach; the gap to the second is what voicing is worth."""
    basis_inverse = torch.from_numpy(np.linalg.pinv(
        mel_filterbank(stft.sampling_rate, stft.filter_length, stft.n_mel_channels, stft.mel_fmin, stft.mel_fmax)))
    window = torch.hann_window(stft.win_length, dtype=torch.float64)

    def synthesise(magnitude: torch.Tensor, phase: torch.Tensor, length: int) -> torch.Tensor:
        return torch.istft(torch.polar(magnitude, phase), stft.filter_length, stft.hop_length, stft.win_length,
                           window, length=length)

    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, list] = {"random_phase": [], "griffin_lim": []}
    paths = sorted((DEMO_CORPUS_DIR / CORPUS_WAVS_DIR).glob("*.wav"))
    for path in paths[: limit or None]:
        audio, rate = load_wav(path)
        envelope = (basis_inverse @ torch.from_numpy(np.exp(mel_spectrogram(audio))).double()).clamp(min=0)
        phase = torch.rand(envelope.shape, generator=generator, dtype=torch.float64) * 2 * np.pi
        for name, rounds in (("random_phase", 0), ("griffin_lim", iterations)):
            for _ in range(rounds):  # Griffin-Lim: keep the phase of the signal the magnitudes and phase make
                phase = torch.stft(synthesise(envelope, phase, len(audio)), stft.filter_length, stft.hop_length,
                                   stft.win_length, window, return_complex=True).angle()
            out = synthesise(envelope, phase, len(audio)).float().numpy()
            scores[name].append({"stoi": stoi_score(audio, out, rate), "pesq": pesq_score(audio, out, rate)})
    return {name: {key: float(np.mean([s[key] for s in rows])) for key in ("stoi", "pesq")}
            for name, rows in scores.items()}


def _summary(scores: dict[str, dict]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in scores.values()])) for key in ("stoi", "pesq")}


def _cached(cache: Path, score: Callable[[], dict[str, dict]]) -> dict[str, dict]:
    """`score()`, kept in the file `cache` so that re-runs skip it."""
    if cache.is_file():
        return json.loads(cache.read_text())
    scores = score()
    atomic_write_json(cache, scores)
    return scores


def _cached_scores(model_path: Path, cache_dir: Path) -> dict[str, dict]:
    """Scores of one model file (cached by name and size)."""
    return _cached(cache_dir / f"{model_path.name}.{model_path.stat().st_size}.json",
                   lambda: vocode_corpus(load_waveglow(model_path)))


def _untrained_scores(cache_dir: Path) -> dict[str, dict]:
    """Scores of the same architecture at step 0 (the run's seed): what training starts from."""
    config = DEMO_TRAIN_CONFIG
    return _cached(cache_dir / "untrained.json", lambda: vocode_corpus(
        folded_copy(init_from_scratch(config.model_config(), config.seed, config.hann_upsample))))


def evaluate_run(out_dir: Path, every: int = 1) -> dict:
    """Score the untrained architecture, the bundled demo model and the run's snapshots; write curve.json and
    the candidate model (the snapshot with the best STOI, then PESQ)."""
    cache_dir = out_dir / "scores"
    snapshots = sorted(out_dir.glob("model_step*.safetensors.gz"))
    chosen = snapshots[::every]
    if snapshots and snapshots[-1] not in chosen:
        chosen.append(snapshots[-1])
    curve = {"config": DEMO_TRAIN_CONFIG.to_dict(), "eval": {"sigma": EVAL_SIGMA, "seed": EVAL_SEED},
             "untrained": _summary(_untrained_scores(cache_dir)),
             "bundled": _summary(_cached_scores(DEMO_MODEL_PATH, cache_dir)), "snapshots": []}
    for path in chosen:
        step = int(path.name[len("model_step"):].split(".")[0])
        scores = _cached_scores(path, cache_dir)
        curve["snapshots"].append({"step": step, "file": path.name, **_summary(scores), "per_utterance": scores})
        print(f"step {step}: {_summary(scores)}", flush=True)
    history_path = out_dir / HISTORY_NAME
    curve["history"] = json.loads(history_path.read_text()) if history_path.is_file() else []
    plan_path = out_dir / PLAN_NAME
    curve["plan"] = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if curve["snapshots"]:
        best = max(curve["snapshots"], key=lambda snap: (round(snap["stoi"], 3), snap["pesq"]))
        shutil.copyfile(out_dir / best["file"], out_dir / CANDIDATE_NAME)
        curve["candidate"] = {"file": str(out_dir / CANDIDATE_NAME), "from": best["file"], "step": best["step"],
                              "stoi": best["stoi"], "pesq": best["pesq"],
                              "bytes": (out_dir / CANDIDATE_NAME).stat().st_size}
    atomic_write_json(out_dir / "curve.json", curve)
    return curve


def model_card(curve: dict, warm_started: bool) -> dict:
    """What the report says of the bundled model: how it was made (after the model it was warm-started
    from, whose card is the bundled one's until it is replaced) and what it scores."""
    config, candidate = DEMO_TRAIN_CONFIG, curve["candidate"]
    model = config.model
    losses = (f"the generation losses (multi-resolution STFT x {config.stft_loss_weight:g}, log-mel "
              f"x {config.mel_loss_weight:g}, gen_sigma {config.gen_sigma:g})")
    autocast = ", bf16 autocast" if config.precision == "bf16" else ""
    if warm_started:
        previous = json.loads(DEMO_MODEL_CARD.read_text())["recipe"] if DEMO_MODEL_CARD.is_file() else "a demo model"
        previous = previous.removesuffix(f" ({RECIPE_TOOL})")
        recipe = (f"{previous}; then {candidate['step']:,} steps of the flow loss with {losses}, Adam "
                  f"{WARM_START_OVERRIDES['learning_rate']:g} with cosine decay{autocast}")
    else:
        recipe = (f"{model['n_flows']} flows, WN {model['n_layers']} x {model['n_channels']}, from scratch: "
                  f"{candidate['step']:,} steps of the flow loss, with {losses} from step {config.gen_start_step:,}"
                  f"{autocast}")
    return {"recipe": f"{recipe} ({RECIPE_TOOL})",
            "scores": {"stoi": candidate["stoi"], "pesq": candidate["pesq"]}, "eval": curve["eval"],
            "untrained": curve["untrained"], "bytes": candidate["bytes"]}


def install_candidate(out_dir: Path, warm_started: bool = False) -> Path:
    """Make the run's candidate the bundled demo model (checked loadable first; written atomically), and
    write its card."""
    candidate = out_dir / CANDIDATE_NAME
    load_waveglow(candidate)
    card = model_card(json.loads((out_dir / "curve.json").read_text()), warm_started)
    atomic_write_bytes(DEMO_MODEL_PATH, candidate.read_bytes())
    atomic_write_json(DEMO_MODEL_CARD, card)
    return DEMO_MODEL_PATH


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("demo_train"),
                        help="checkpoints, snapshots, history, curve.json and the candidate model")
    parser.add_argument("--until", default=None, help="stop training at this UTC time (HH:MM or ISO)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--warm-start", type=Path, default=None,
                        help="continue from this model (e.g. the bundled one) with the generation losses on")
    parser.add_argument("--evaluate-every", type=int, default=3, help="score every Nth snapshot (and the last)")
    parser.add_argument("--evaluate-only", action="store_true", help="score the snapshots, no training")
    parser.add_argument("--ceilings", action="store_true",
                        help="only score the demo utterances made from their own mel without a model (random "
                             "phase; Griffin-Lim): what shaping noise can reach, and what voicing adds")
    parser.add_argument("--install", action="store_true",
                        help=f"then copy the candidate over the bundled demo model ({DEMO_MODEL_PATH.name})")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ceilings:
        print(json.dumps(envelope_ceilings(), indent=2))
        return
    if not args.evaluate_only:
        if args.until is None:
            parser.error("--until is required for training")
        run_training(args.out_dir, _deadline(args.until), warm_start=args.warm_start)
    curve = evaluate_run(args.out_dir, args.evaluate_every)
    print(json.dumps({k: v for k, v in curve.items() if k in ("untrained", "bundled", "candidate")}, indent=2))
    if args.install and curve["snapshots"]:
        print("installed:", install_candidate(args.out_dir, warm_started=args.warm_start is not None))


if __name__ == "__main__":
    main()
