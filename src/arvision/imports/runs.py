"""Official files → an ordinary arvision run folder, and back.

`import_official(cfg)` (arvision-import) builds the tokenizer and generator that `official=<preset>` describes,
loads the official tensors into them strictly through the family's name map, and writes:

- the tokenizer as an artifact keyed by the file's sha256 and the preset's tokenizer config
  (`<artifacts>/tokenizer/<key>/tokenizer.pt`, the layout stage 1 writes), so every import of the same file shares it;
- `<run>/generator.pt` (the same weights as `generator` and `ema`: official files hold one set);
- `<run>/results.json`: the composed config (the preset's sampling settings are the run's `generator.sample`), and
  `imported`: the family, preset, each file's path, sha256 and layout, the published numbers and the CFG convention.

`arvision-sample`, `arvision-eval`, editing and `arvision-table` read that folder as any other run.
A preset without a generator file (`official.files.generator: null`, e.g. official=mar_kl16) imports the tokenizer
alone: the artifact and a `results.json` with `generator: null`, as a stage-1 run (train_generator=false) writes.
`export_official(run, out)` (arvision-export) writes the official files back from such a folder: the same tensors
under the same names in the same top-level layout (training-only entries such as optimiser state and pickled
`args` are not carried).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from arvision import pipeline
from arvision.imports.base import OfficialFamily, file_sha256, find_state_dict, fit, read_official
from arvision.results import RunRecord, now, read_results, versions, git_sha, write_results
from arvision.utils.artifacts import ArtifactCache, config_hash
from arvision.utils.files import load_weights
from arvision.utils.instantiate import RefusedTarget, check_target, instantiate
from arvision.utils.validate import SettingError, check_model_keys


class ImportError_(ValueError):  # noqa: N801  (not the builtin ImportError)
    """A request arvision-import or arvision-export cannot carry out; the message says what to do."""


@dataclass
class Imported:
    run_dir: Path
    tokenizer_artifact: Path
    message: str


def family_of(cfg: DictConfig) -> OfficialFamily:
    if cfg.get("official") is None or cfg.official.get("family") is None:
        raise ImportError_("give official=<preset> (the released model: conf/official/, e.g. official=var_d16)")
    try:
        family = instantiate(cfg.official.family)
    except RefusedTarget as err:
        raise ImportError_(str(err)) from None
    if not isinstance(family, OfficialFamily):
        raise ImportError_(f"official.family builds a {type(family).__name__}, not an OfficialFamily")
    return family


def _file(cfg: DictConfig, key: str) -> Path:
    released = cfg.official.files.get(key.removesuffix("_file"))
    value = cfg.get(key)
    if value is None:
        raise ImportError_(f"give {key}=<path of the official {released or key} you downloaded>")
    path = Path(str(value)).expanduser()
    if path.is_dir() and released and (path / released).is_file():  # a diffusers folder: the weights file in it
        path = path / released
    if not path.is_file():
        raise FileNotFoundError(f"no file {path} ({key}); give the path of the official {released or 'checkpoint'}")
    return path


def tokenizer_only(cfg: DictConfig) -> bool:
    """The preset releases a tokenizer and no generator (`official.files.generator: null`)."""
    return cfg.official.get("files") is not None and cfg.official.files.get("generator") is None


def check_models(cfg: DictConfig) -> None:
    """The preset's model keys against the constructors they fill, before any file is read."""
    try:
        for group in ("tokenizer",) if tokenizer_only(cfg) else ("tokenizer", "generator"):
            model = cfg[group].model
            check_model_keys(check_target(model._target_), OmegaConf.to_container(model, resolve=True),
                             where=f"{group}.model", supplied=pipeline.SUPPLIED_AT_RUN_TIME[group])
    except (SettingError, RefusedTarget) as err:
        raise pipeline.ConfigError(str(err)) from None


def import_official(cfg: DictConfig, run_dir: Path) -> Imported:
    started = time.perf_counter()
    family = family_of(cfg)
    preset = str(cfg.official.name)
    alone = tokenizer_only(cfg)
    tokenizer_path = _file(cfg, "tokenizer_file")
    generator_path = None if alone else _file(cfg, "generator_file")
    check_models(cfg)
    if (run_dir / "results.json").exists():
        raise ImportError_(f"{run_dir} already holds a run; import into a new directory (hydra.run.dir=<new dir>)")

    # Build and fill both models before anything is written, so a file that does not fit leaves nothing behind.
    dm_shape = {"image_size": int(cfg.data.image_size), "image_channels": int(cfg.data.channels)}
    tokenizer = instantiate(cfg.tokenizer.model, **dm_shape)
    official_tok, tok_layout = family.read_tokenizer(tokenizer_path)
    tok_state, tok_extras = family.tokenizer_to_ours(official_tok, tokenizer)
    fit(tokenizer, tok_state, path=tokenizer_path, preset=preset, official_names=family.tokenizer_names(tokenizer))
    tokenizer.eval().requires_grad_(False)
    del official_tok
    files = {"tokenizer": {"path": str(tokenizer_path.resolve()), "sha256": file_sha256(tokenizer_path),
                           "layout": tok_layout}}

    generator = None
    if generator_path is not None:
        generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=int(cfg.data.num_classes))
        generator.attach_tokenizer(tokenizer)
        gen_keys = (*family.ema_keys, *family.generator_keys) if cfg.get("ema", True) else family.generator_keys
        official_gen, gen_layout = find_state_dict(read_official(generator_path), generator_path, gen_keys)
        gen_state, gen_extras = family.generator_to_ours(official_gen, generator)
        fit(generator, gen_state, path=generator_path, preset=preset,
            official_names=family.generator_names(generator))
        del official_gen
        files["generator"] = {"path": str(generator_path.resolve()), "sha256": file_sha256(generator_path),
                              "layout": gen_layout}
    tokenizer_config = OmegaConf.to_container(cfg.tokenizer.model, resolve=True)
    cache = ArtifactCache(cfg.paths.artifact_dir)
    key = config_hash("official-tokenizer", files["tokenizer"]["sha256"], tokenizer_config, dm_shape)

    def build(tmp: Path) -> dict[str, Any]:
        torch.save({"state_dict": tokenizer.state_dict(), "config": tokenizer_config,
                    "image_size": dm_shape["image_size"], "image_channels": dm_shape["image_channels"],
                    "official_extras": tok_extras}, tmp / "tokenizer.pt")
        return {"kind": "tokenizer", "name": cfg.tokenizer.name, "spec": tokenizer.spec.to_dict(),
                "imported_from": files["tokenizer"], "official": preset, "train_seconds": 0.0, "train_steps": 0,
                "train_img_per_s": 0.0, "config": OmegaConf.to_container(cfg.tokenizer, resolve=True),
                "data": pipeline.data_identity(cfg), "seed": cfg.seed}

    tokenizer_dir = cache.get_or_build("tokenizer", key, build)
    run_dir.mkdir(parents=True, exist_ok=True)
    if generator is not None:
        state = generator.state_dict()
        torch.save({"generator": state, "ema": state,
                    "config": OmegaConf.to_container(cfg.generator.model, resolve=True),
                    "num_classes": int(cfg.data.num_classes), "official_extras": gen_extras}, run_dir / "generator.pt")
    official = OmegaConf.to_container(cfg.official, resolve=True)
    record = RunRecord(
        run_dir=str(run_dir), started=now(), choices=pipeline.group_choices(), overrides=pipeline.task_overrides(),
        tokenizer=cfg.tokenizer.name, generator=None if generator is None else cfg.generator.name,
        data=cfg.data.name, seed=cfg.seed,
        tags=[*cfg.get("tags", []), "imported", preset], config=OmegaConf.to_container(cfg, resolve=True),
        versions=versions(), git_sha=git_sha(), feature_extractor={}, metrics={},
        costs={"total_seconds": time.perf_counter() - started}, tokenizer_artifact=str(tokenizer_dir),
        spec=tokenizer.spec.to_dict(),
        imported={"family": family.name, "preset": preset, "files": files,
                  "published": official.get("published", {}), "convention": official.get("convention"),
                  "source": official.get("source")},
        finished=now())
    write_results(run_dir, record)
    if generator is None:
        params = sum(p.numel() for p in tokenizer.parameters()) / 1e6
        return Imported(run_dir=run_dir, tokenizer_artifact=tokenizer_dir,
                        message=f"imported official={preset} ({params:.1f}M-parameter tokenizer, no generator) into "
                                f"{run_dir}; its tokenizer artifact: {tokenizer_dir}")
    params = sum(p.numel() for p in generator.parameters()) / 1e6
    return Imported(run_dir=run_dir, tokenizer_artifact=tokenizer_dir,
                    message=f"imported official={preset} ({params:.1f}M-parameter generator) into {run_dir}; "
                            f"sample with: arvision-sample run={run_dir}")


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file  # diffusers' dependency: only a diffusers import writes this format

    save_file({name: tensor.contiguous() for name, tensor in state.items()}, path)


def export_official(run_dir: Path, out_dir: Path) -> list[Path]:
    """The official files of an imported (or compatible) run, written into `out_dir` under their released names."""
    record = read_results(run_dir)
    imported = record.get("imported")
    if not imported:
        raise ImportError_(f"{run_dir} was not imported from official files (its results.json has no `imported`); "
                           "arvision-export writes back what arvision-import read")
    cfg = OmegaConf.create(record["config"])
    family = family_of(cfg)
    tokenizer_dir = Path(record["tokenizer_artifact"])
    parts = [("tokenizer", pipeline.load_tokenizer(tokenizer_dir), load_weights(tokenizer_dir / "tokenizer.pt"),
              "state_dict")]
    if "generator" in imported["files"]:
        run = pipeline.load_run(run_dir)
        parts.append(("generator", run.generator, load_weights(run_dir / "generator.pt"), "ema"))
    files = OmegaConf.to_container(cfg.official.files, resolve=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, model, blob, key in parts:
        convert = family.tokenizer_to_official if kind == "tokenizer" else family.generator_to_official
        wrap = family.tokenizer_file if kind == "tokenizer" else family.generator_file
        state = convert(blob[key], blob.get("official_extras", {}), model)
        released = Path(files.get(kind) or f"{kind}.pt")
        # a released name with folders (RQ-Transformer's stage1/model.pt, stage2/model.pt) keeps them
        target = out_dir / (released if not released.is_absolute() and ".." not in released.parts else released.name)
        if target.exists():
            raise ImportError_(f"{target} exists; export into an empty directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        obj = wrap(state, imported["files"][kind]["layout"])
        if target.suffix == ".safetensors":  # a diffusers folder's weights
            save_safetensors(obj, target)
        else:
            torch.save(obj, target)
        written.append(target)
        companions = family.tokenizer_companions(model) if kind == "tokenizer" else {}
        for name, text in companions.items():  # e.g. a diffusers folder's config.json, beside the weights
            (target.parent / name).write_text(text)
            written.append(target.parent / name)
    return written
