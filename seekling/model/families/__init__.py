"""The registry of model families: one file each (seekling/model/family.py says what a family is).

    family("qwen3")             # by config.json's model_type
    family_of(model)            # the family of a built model
    gguf_family(gguf_file)      # the family that reads a GGUF file of this architecture

Adding a family is its file here (a subclass of the family it differs least from), its module if it needs
new layers, and its entry below.
"""

from __future__ import annotations

from seekling.model.families.deepseek_v2 import DeepseekV2
from seekling.model.families.deepseek_v3 import DeepseekV3
from seekling.model.families.llama import Llama
from seekling.model.families.qwen2 import Qwen2
from seekling.model.families.qwen3 import Qwen3
from seekling.model.family import Family
from seekling.model.gguf_file import GGUFFile
from seekling.model.layers import CausalLM

FAMILIES: dict[str, Family] = {f.model_type: f for f in (DeepseekV3(), DeepseekV2(), Qwen2(), Qwen3(), Llama())}
# The first family of each GGUF architecture reads its files (deepseek2: DeepSeek-V3's reader tells V3 from V2).
GGUF_READERS: dict[str, Family] = {}
for _f in FAMILIES.values():
    GGUF_READERS.setdefault(_f.gguf_arch, _f)


def family(model_type: str | None, architectures: list[str] | None = None) -> Family:
    """The family of a config.json's model_type; one clear line for one seekling does not run."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture: model_type={model_type!r} (architectures={architectures}); "
                         f"seekling reads {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def family_of(model: CausalLM) -> Family:
    return family(model.config.model_type)


def gguf_family(f: GGUFFile) -> Family:
    if f.arch not in GGUF_READERS:
        raise ValueError(f"{f.path.name}: unsupported GGUF architecture {f.arch!r}; seekling reads "
                         f"{', '.join(GGUF_READERS)}")
    return GGUF_READERS[f.arch]


__all__ = ["FAMILIES", "Family", "family", "family_of", "gguf_family"]
