"""Models: the family registry (`registry.py`), the Llama family (`llama.py`), Gemma 2 / Gemma 3
(`gemma.py`, on top of the Llama modules), the reward and actor-critic wrappers, and parameter
setup (`params.py`). Callers build a model with `build(cfg.model, rngs)`, never by naming a
class."""

from jaxalign.models.registry import (
    HFConverter,
    ModelFamily,
    build,
    family_names,
    get_family,
    register_family,
)

__all__ = [
    "HFConverter",
    "ModelFamily",
    "build",
    "family_names",
    "get_family",
    "register_family",
]
