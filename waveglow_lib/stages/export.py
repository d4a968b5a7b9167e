"""Stage 2, export: the run's model → `runs/<name>/onnx/waveglow.onnx` (see `waveglow_lib.export`)."""
from __future__ import annotations

from ..checkpoint import load_waveglow
from ..config import WorkflowConfig, forced
from ..convert import load_export_info
from ..export import export_onnx
from ..io import atomic_write_json
from ..layout import record_path
from ..runlock import locked
from ..stamps import MODEL_KEY, announce_redo, describe, differences, file_stamps, stage_stamp

__all__ = ["export", "export_onnx", "export_stamp"]


def export_stamp(cfg: WorkflowConfig, variant: str, model=None) -> dict:
    """What shapes an exported graph: the model (its fingerprint), the opset, the variant, and the sigma
    baked into the guide's graph."""
    return stage_stamp(cfg, {"opset": cfg.opset, "variant": variant,
                             "sigma": cfg.sigma if variant == "guide" else None}, model=model)


@locked("export")
def export(cfg: WorkflowConfig, *, model=None, guide_variant: bool = False, force: bool = False) -> dict:
    """Export the run's model to `runs/<name>/onnx/waveglow.onnx` (and, with `guide_variant`, the
    guide's `WaveGlow_onnx.onnx`). Skipped when an export of the same model (fingerprint), opset, variant
    (and sigma, for the guide's graph) exists, and its files (graph, any external data) still have the size
    and sha256 its record lists; redone, saying why, when any of them changed."""
    force = forced(force)  # `run --force` reaches the notebooks' stage calls
    layout = cfg.layout
    targets = [("noise_input", layout.onnx)]
    if guide_variant:
        targets.append(("guide", layout.guide_onnx))
    results = {}
    for variant, path in targets:
        layout.check(path, "the exported graph")
        info_path = layout.check(record_path(path), "the export record")
        stamp = export_stamp(cfg, variant, model)
        reason = "no earlier export"
        if not force and path.is_file() and info_path.is_file():
            # a damaged record (not JSON, a field of the wrong shape) is said and counts as none: re-exported
            damage: list[str] = []
            info = load_export_info(path, on_damage=lambda why: damage.append(announce_redo(why)))
            reason = damage[0] if damage else reason
            # the model the graph proves it holds (what infer and convert check) is part of what must match
            changed = differences({**info.get("stamp", {}), MODEL_KEY: info.get("model_fingerprint")}, stamp)
            altered = file_stamps(cfg).files_changed(path.parent, info.get("files"), including=path.name) \
                if info and not changed else None
            if info and not changed and not altered:
                results[variant] = {**info, "status": "skipped (up to date)"}
                continue
            if altered:
                reason = f"re-exported: {announce_redo(altered)}"
            elif info:
                reason = f"re-exported: {describe(changed)}"
        if model is None:
            model = load_waveglow(cfg.checkpoint_path)
        info = export_onnx(model, path, opset=cfg.opset, variant=variant, sigma=cfg.sigma, seed=cfg.seed)
        info["stamp"] = stamp
        atomic_write_json(info_path, info)
        results[variant] = {**info, "status": "exported", "reason": reason}
    return results
