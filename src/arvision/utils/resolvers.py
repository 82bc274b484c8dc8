"""OmegaConf resolvers used by conf/.

`${tiny:DEMO,TINY}` is DEMO normally and TINY under `debug=tiny`. Writing both sizes side by side keeps each
group readable, and an explicit override (`tokenizer.model.ch=16`) simply replaces the interpolation, so the
user's value always wins over the debug preset.

`${short_hash:TEXT}` is 8 hex digits of TEXT's SHA-1: sweep job folders are `<job number>_<hash of its overrides>`
(conf/hydra/default.yaml), short whatever the overrides; the overrides themselves are in the job's
`.hydra/<time>/overrides.yaml` and its results.json.
"""

from __future__ import annotations

import hashlib
from typing import Any

from omegaconf import OmegaConf


def _tiny(demo: Any, tiny: Any, *, _root_: Any) -> Any:
    return tiny if _root_.get("tiny", False) else demo


def _short_hash(text: Any) -> str:
    return hashlib.sha1(str(text).encode()).hexdigest()[:8]


def register() -> None:
    if not OmegaConf.has_resolver("tiny"):
        OmegaConf.register_new_resolver("tiny", _tiny)
    if not OmegaConf.has_resolver("short_hash"):
        OmegaConf.register_new_resolver("short_hash", _short_hash)


register()
