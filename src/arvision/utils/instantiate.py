"""The one place where configs become objects, so that a config read from a file can never run code.

A config from a run folder, a checkpoint or an artifact is data. Every `_target_` in it, at any depth (inside lists
too), must name a class defined in arvision or one of Lightning's callbacks and loggers. The check is on the object
the name resolves to, not on the string: `arvision.pipeline.torch.load` is `torch.load`, and is refused.
"""

from __future__ import annotations

from typing import Any

from hydra._internal.utils import _locate
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED_MODULES = ("arvision.", "lightning.pytorch.callbacks.", "lightning.pytorch.loggers.")


class RefusedTarget(ValueError):
    """A config names something other than an allowed class to instantiate."""


def check_target(target: str) -> type:
    """The class `target` names, if it is one arvision may build from a config; else `RefusedTarget`."""
    name = str(target)
    refused = RefusedTarget(f"refusing to instantiate {name!r}: a config may only name classes defined in "
                            f"{', '.join(m.rstrip('.') for m in ALLOWED_MODULES)}")
    if not name.startswith(ALLOWED_MODULES):
        raise refused
    try:
        obj = _locate(name)
    except ImportError as err:
        raise RefusedTarget(f"cannot instantiate {name!r}: {err}") from None
    if not isinstance(obj, type) or not f"{obj.__module__}.".startswith(ALLOWED_MODULES):
        raise refused
    return obj


def _check_targets(node: Any) -> None:
    if isinstance(node, (DictConfig, dict)):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for key, value in items:
            if key == "_target_":
                check_target(value)
            _check_targets(value)
    elif isinstance(node, (ListConfig, list, tuple)):
        for value in node:
            _check_targets(value)


def instantiate(cfg: DictConfig | dict, /, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` behind the target check; call-site kwargs pass runtime objects."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    _check_targets(cfg)
    return hydra_instantiate(cfg, **kwargs, _convert_="all")
