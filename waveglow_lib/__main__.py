"""Command line: `python -m waveglow_lib <command> [--params FILE] [--set key=value ...] [--<parameter> V]`.

Commands: preprocess, export, convert, infer, postprocess, run-all (the guide's chain, one stage each),
train (its own parameters: `TrainConfig` in train.py, e.g. params/train_demo.yaml), and, when their
modules are present, run (the notebook chain) and bench (the throughput table).
Every parameter comes from `WorkflowConfig` (config.py): a params YAML file, then `--set` pairs, then
the explicit flags, later ones winning. Each command prints its summary as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import typing
from pathlib import Path

from .config import WorkflowConfig, parse_set_option

#: the WorkflowConfig fields offered as explicit flags (others via --set key=value)
FLAG_FIELDS = ("name", "corpus", "limit", "checkpoint", "runs_dir", "resample", "downmix", "backend", "device",
               "precision", "batch_size", "sigma", "seed", "denoiser_strength", "opset", "gear_policy",
               "n_buckets", "soc_version")
#: which flags each stage uses (all stages take the run identity: name, runs_dir, checkpoint)
STAGE_FIELDS = {
    "preprocess": ("corpus", "limit", "resample", "downmix"),
    "export": ("opset", "sigma"),
    "convert": ("gear_policy", "n_buckets", "soc_version", "batch_size"),
    "infer": ("backend", "device", "precision", "batch_size", "sigma", "seed"),
    "postprocess": ("denoiser_strength",),
}
COMMON_FIELDS = ("name", "runs_dir", "checkpoint")
HELP = {
    "preprocess": "LJSpeech folder → runs/<name>/mel/<id>.bin + <id>.txt + manifest.json",
    "export": "model → runs/<name>/onnx/waveglow.onnx (inputs mel, z; output audio), verified with ONNX Runtime",
    "convert": "ONNX → atc command/.om (Ascend), OpenVINO IR, ONNX Runtime optimised graph",
    "infer": "mel .bin → out/<id>_out.bin float32 audio with the chosen backend, in padded batches",
    "postprocess": "out/<id>_out.bin → wav/<id>_syn.wav (22050 Hz int16), optional denoiser",
    "run-all": "all five stages in order",
}


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(WorkflowConfig)


def _add_config_options(parser: argparse.ArgumentParser, fields: typing.Iterable[str]) -> None:
    defaults = WorkflowConfig()
    types = _field_types()
    group = parser.add_argument_group("parameters (override the params file; defaults from WorkflowConfig)")
    for name in fields:
        flag = "--" + name.replace("_", "-")
        kind = types[name]
        default = getattr(defaults, name)
        choices = WorkflowConfig.CHOICES.get(name)
        if kind is bool:
            group.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction,
                               help=f"(default: {default})")
        else:
            group.add_argument(flag, dest=name, default=None, type=kind, choices=choices,
                               metavar=None if choices else name.upper(), help=f"(default: {default})")
    parser.add_argument("--params", default=None, metavar="FILE",
                        help="params YAML file (e.g. params/demo.yaml); default: WorkflowConfig defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any parameter (YAML value), repeatable, e.g. --set limit=2")
    parser.add_argument("--force", action="store_true", help="redo finished work instead of skipping it")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")


def config_from_args(args: argparse.Namespace) -> WorkflowConfig:
    overrides = parse_set_option(args.overrides)
    for name in FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.params:
        return WorkflowConfig.from_yaml(args.params, overrides)
    return WorkflowConfig.from_dict(overrides, source="command line")


def _stage_command(stage: str):
    def command(args: argparse.Namespace) -> int:
        from . import stages

        cfg = config_from_args(args)
        force = args.force
        if stage == "preprocess":
            result = stages.preprocess(cfg, force=force)
        elif stage == "export":
            result = stages.export(cfg, guide_variant=args.guide_variant, force=force)
        elif stage == "convert":
            result = stages.convert(cfg, targets=args.targets, force=force,
                                    run_atc=False if args.script_only else None)
        elif stage == "infer":
            result = stages.infer(cfg, out_dir=args.out_dir, force=force)
        elif stage == "postprocess":
            result = stages.postprocess(cfg, out_dir=args.out_dir, wav_dir=args.wav_dir, force=force)
        else:
            targets = None if args.targets is None else tuple(args.targets)
            result = stages.run_all(cfg, force=force, convert_targets=targets)
        print(json.dumps(_brief(result), indent=2, default=str))
        return 0

    return command


def _brief(result: typing.Any) -> typing.Any:
    """Drop bulky entries (model configs, per-item lists longer than 20) from the printed summary."""
    if isinstance(result, dict):
        return {k: _brief(v) for k, v in result.items() if k not in ("model_config",)}
    if isinstance(result, list) and len(result) > 20:
        return result[:20] + [f"... {len(result) - 20} more"]
    return result


def _train_command(args: argparse.Namespace) -> int:
    from .stages.train import load_train_config, run_train

    config = load_train_config(args.params, parse_set_option(args.overrides))
    result = run_train(config, on_log=lambda entry: print(json.dumps(entry), file=sys.stderr, flush=True))
    if result.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(_brief({k: v for k, v in result.items() if k != "history"}), indent=2, default=str))
    return 0


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    help_text = "train or fine-tune WaveGlow (resumable; torchrun / Ray Train for data parallel)"
    sub = subparsers.add_parser("train", help=help_text, description=help_text)
    sub.add_argument("--params", default=None, metavar="FILE",
                     help="training params YAML (e.g. params/train_demo.yaml); default: TrainConfig defaults")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any training parameter (YAML value), repeatable, e.g. --set max_steps=10")
    sub.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub.set_defaults(func=_train_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m waveglow_lib", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for stage in ("preprocess", "export", "convert", "infer", "postprocess", "run-all"):
        sub = subparsers.add_parser(stage, help=HELP[stage], description=HELP[stage])
        fields = FLAG_FIELDS if stage == "run-all" else COMMON_FIELDS + STAGE_FIELDS[stage]
        _add_config_options(sub, fields)
        if stage == "export":
            sub.add_argument("--guide-variant", action="store_true",
                             help="also export the guide's graph (mel only, noise drawn inside) as WaveGlow_onnx.onnx")
        if stage in ("convert", "run-all"):
            sub.add_argument("--targets", nargs="*", default=None if stage == "run-all" else
                             ["atc", "openvino", "onnxruntime"], choices=["atc", "openvino", "onnxruntime"],
                             help="what to build (default: all three)")
        if stage == "convert":
            sub.add_argument("--script-only", action="store_true",
                             help="write om/convert_atc.sh even when atc is on PATH")
        if stage in ("infer", "postprocess"):
            sub.add_argument("--out-dir", type=Path, default=None, help="folder of <id>_out.bin (default: runs/<name>/out)")
        if stage == "postprocess":
            sub.add_argument("--wav-dir", type=Path, default=None, help="output folder (default: runs/<name>/wav)")
        sub.set_defaults(func=_stage_command(stage))
    _add_train_parser(subparsers)
    # sub-commands other modules own; the CLI works without them
    for module, function in (("notebook_runner", "add_run_parser"), ("bench", "add_bench_parser")):
        try:
            mod = importlib.import_module(f".{module}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise
            continue
        if hasattr(mod, function):
            getattr(mod, function)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, re-run to continue", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        if getattr(args, "traceback", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
