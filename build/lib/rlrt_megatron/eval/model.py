"""`--ckpt DIR` -> a Hugging Face model directory the rollout engines load.

Accepted (checked in this order):

1. a Hugging Face model directory (`config.json` with a `model_type` + safetensors/bin weights);
2. a trainer checkpoint root with a `latest` file (-> the `iter_N` it names);
3. a trainer checkpoint `iter_N/` (Megatron dist checkpoint in `iter_N/dist/`, the run's
   `TrainConfig` in `iter_N/config.json`);
4. a Megatron dist checkpoint (`metadata.json`, e.g. from `rlrt convert hf-to-megatron`).

Megatron checkpoints are converted once with `convert.megatron_to_hf` into `cache_dir` (reused
when it already holds a complete conversion of the same checkpoint). The HF config + tokenizer
come from `--hf-config`, else `<dist>/hf`, `<iter>/hf`, the run's `model.hf_path`, or
`<run_dir>/model/hf` (the tiny demo's model).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """The HF directory to load, what it came from, and the trainer config when there is one."""

    hf_dir: Path
    source: str  # "hf" | "megatron"
    ckpt: Path
    train_config: dict | None = None

    @property
    def label(self) -> str:
        return str(self.ckpt)


def is_hf_model_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return isinstance(data, dict) and "model_type" in data and has_weights


def _train_config(iter_dir: Path) -> dict | None:
    p = iter_dir / "config.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) and "model" in data else None


def _hf_meta_candidates(dist: Path, iter_dir: Path | None, cfg: dict | None) -> list[Path]:
    out = [dist / "hf"]
    if iter_dir is not None:
        out += [iter_dir / "hf", iter_dir.parent.parent / "model" / "hf"]
    if cfg:
        hf_path = (cfg.get("model") or {}).get("hf_path")
        if hf_path:
            out.append(Path(hf_path))
        logging_cfg = cfg.get("logging") or {}
        run_dir = logging_cfg.get("run_dir") or str(Path("runs") / str(cfg.get("name", "run")))
        out.append(Path(run_dir) / "model" / "hf")
    out.append(dist.parent / "hf")
    return out


def resolve_model(
    ckpt: str | Path, cache_dir: str | Path, hf_config: str | Path | None = None
) -> ResolvedModel:
    """Find or make the HF model directory for `ckpt` (module docstring)."""
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt {path}: no such directory")
    if is_hf_model_dir(path):
        return ResolvedModel(hf_dir=path, source="hf", ckpt=path)
    iter_dir: Path | None = None
    if (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        iter_dir = path / name
        if not (iter_dir / "dist").is_dir():
            raise FileNotFoundError(
                f"--ckpt {path}: `latest` names {name!r} but {iter_dir}/dist does not exist; "
                "pass an iter_N directory explicitly"
            )
        dist = iter_dir / "dist"
    elif (path / "dist" / "metadata.json").is_file():
        iter_dir, dist = path, path / "dist"
    elif (path / "metadata.json").is_file():
        dist = path
    else:
        raise FileNotFoundError(
            f"--ckpt {path}: not a Hugging Face model directory (config.json + *.safetensors), "
            "a trainer checkpoint (iter_N/dist or a root with `latest`) or a Megatron dist "
            "checkpoint (metadata.json)"
        )
    cfg = _train_config(iter_dir) if iter_dir is not None else None
    if hf_config is not None:
        meta = Path(hf_config)
    else:
        cands = _hf_meta_candidates(dist, iter_dir, cfg)
        found = [c for c in cands if (c / "config.json").is_file()]
        if not found:
            raise FileNotFoundError(
                f"--ckpt {path}: no HF config.json + tokenizer for this Megatron checkpoint "
                f"(looked in {', '.join(str(c) for c in cands)}); pass --hf-config DIR (the "
                "base model's Hugging Face directory)"
            )
        meta = found[0]
    out = Path(cache_dir) / f"hf_{(iter_dir or dist).name}"
    stamp = out / "rlrt_eval_source.json"
    want = {"dist": str(dist.resolve()), "mtime": (dist / "metadata.json").stat().st_mtime}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and is_hf_model_dir(out):
        logger.info("using the converted model in %s", out)
    else:
        from rlrt_megatron.convert.megatron_to_hf import megatron_to_hf

        logger.info("converting %s -> %s (HF config from %s)", dist, out, meta)
        megatron_to_hf(dist, out, hf_config_dir=meta, overwrite=True, show_progress=False)
        stamp.write_text(json.dumps(want))
    return ResolvedModel(hf_dir=out, source="megatron", ckpt=path, train_config=cfg)
