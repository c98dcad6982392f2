"""GGUF files (llama.cpp's format) as a model source: checked, then converted once into an HF folder.

`--model path/to/file.gguf` and `LLM("file.gguf")` land here. The file is first read with the `gguf`
package (header, architecture, every tensor's type), so that a corrupt or unsupported file fails at once
with a message naming the file, the tensor and its type. Conversion then goes through transformers' own
GGUF support (`from_pretrained(..., gguf_file=...)`: dequantization, llama.cpp's q/k row permutation
undone, tokenizer and chat template from the file's metadata), and the result is written as a plain HF
folder (config.json, model.safetensors in fp32, tokenizer files) under
`cache_dir()/gguf/<sha256 of the file, 16 hex>/`. Later starts find that folder and take seconds.

NOTE: the weights are dequantized (fp32 on disk, cast to the serving dtype at load); serving the
quantized blocks directly is the quantization work's job.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from openlora.cachefs import build_into, file_sha256, locked
from openlora.config import cache_dir
from openlora.errors import ModelLoadError

logger = logging.getLogger("openlora.model")

# GGUF `general.architecture` -> the HF architecture the engine runs.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Tensor types whose dequantization the gguf package implements and our tests cover or share code with.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

LAYOUT_VERSION = "1"  # bump when the converted folder's layout changes


@dataclass(frozen=True)
class GGUFInfo:
    """What the header says: architecture, display name, and the tensor types present."""

    path: Path
    architecture: str  # the GGUF name, e.g. "llama"
    name: str  # general.name, or the file's stem
    tensor_types: tuple[str, ...]  # sorted, distinct
    num_tensors: int


def is_gguf(model: str | Path) -> bool:
    """True when `model` names a file that is (or claims by its suffix to be) a GGUF file."""
    p = Path(model)
    if p.suffix.lower() == ".gguf":
        return True
    if p.is_file():
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    return False


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read the header and tensor table; raise ModelLoadError for anything we cannot serve."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"GGUF file {str(p)!r} does not exist")
    try:
        reader = GGUFReader(str(p))
    except Exception as e:  # bad magic, truncated tables, unknown type codes: gguf raises several kinds
        raise ModelLoadError(f"{p} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    arch_field = reader.fields.get("general.architecture")
    arch = str(arch_field.contents()) if arch_field is not None else ""
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{p}: GGUF architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ModelLoadError(f"{p}: tensor {t.name!r} has type {t.tensor_type.name}, which OpenLoRA cannot "
                                 f"load (supported: {', '.join(SUPPORTED_TYPES)})")
    name_field = reader.fields.get("general.name")
    name = str(name_field.contents()) if name_field is not None else p.stem
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    return GGUFInfo(p, arch, name, types, len(reader.tensors))


def converted_dir(path: str | Path, root: Path | None = None) -> Path:
    """Convert `path` (once) into an HF model folder and return that folder.

    NOTE: the content hash comes first: a file converted before is not parsed again (reading the
    header and tensor table of a 100 MB file with a 49k-token vocabulary takes ~3.5 s here)."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"GGUF file {str(p)!r} does not exist")
    digest = file_sha256(p)
    final = (root or cache_dir() / "gguf") / f"{digest[:16]}-v{LAYOUT_VERSION}"
    if (final / "config.json").is_file():
        return final
    info = inspect_gguf(p)
    with locked(final.parent / f"{final.name}.lock"):
        if (final / "config.json").is_file():  # another process converted it while we waited
            return final
        logger.info("converting %s (%s, tensor types %s) into %s; later starts reuse it",
                    info.path, info.architecture, "/".join(info.tensor_types), final)
        with build_into(final) as tmp:
            _convert(info, digest, tmp)
    return final


def _convert(info: GGUFInfo, digest: str, out: Path) -> None:
    """transformers' GGUF loading (dequantized to fp32) -> config.json + model.safetensors + tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(info.path.parent), info.path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as e:  # transformers' conversion: missing metadata, shapes that do not match
        raise ModelLoadError(f"{info.path}: transformers could not convert this GGUF file: "
                             f"{type(e).__name__}: {e}") from e
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the folder holds plain (dequantized) weights
    cfg.pop("_model_name_or_path", None)
    cfg["architectures"] = [ARCHITECTURES[info.architecture]]
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    state = model.state_dict()
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save_pretrained(str(out))
    (out / "openlora_gguf.json").write_text(json.dumps(
        {"source": info.path.name, "sha256": digest, "name": info.name, "architecture": info.architecture,
         "tensor_types": list(info.tensor_types)}, indent=2))
