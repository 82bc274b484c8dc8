"""The one place where configs become objects, so a target allow-list can be enforced in one spot."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

ALLOWED_PREFIXES = ("arvision.", "torch.", "lightning.")


def _check_targets(node: Any) -> None:
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_PREFIXES):
            raise ValueError(f"refusing to instantiate {target!r}: targets must start with one of {ALLOWED_PREFIXES}")
        for value in node.values():
            _check_targets(value)


def instantiate(cfg: DictConfig | dict, /, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` with an allow-list of targets; call-site kwargs pass runtime objects."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    _check_targets(cfg)
    return hydra_instantiate(cfg, **kwargs, _convert_="all")
