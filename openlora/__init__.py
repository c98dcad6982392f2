"""OpenLoRA: one base LLM, thousands of LoRA adapters, and a receipt for every inference."""

from openlora.outputs import CompletionOutput, RequestOutput
from openlora.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and transformers: import it lazily so light users (CLI --help) stay fast.
    if name == "LLM":
        from openlora.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
