"""OmegaConf resolvers used by conf/.

`${tiny:DEMO,TINY}` is DEMO normally and TINY under `debug=tiny`. Writing both sizes side by side keeps each
group readable, and an explicit override (`tokenizer.model.ch=16`) simply replaces the interpolation, so the
user's value always wins over the debug preset.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def _tiny(demo: Any, tiny: Any, *, _root_: Any) -> Any:
    return tiny if _root_.get("tiny", False) else demo


def register() -> None:
    if not OmegaConf.has_resolver("tiny"):
        OmegaConf.register_new_resolver("tiny", _tiny)


register()
