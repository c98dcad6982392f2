"""`openlora adapters merge`: merge local PEFT adapters into a new PEFT-format adapter folder.

    openlora adapters merge --strategy ties --density 0.5 ./a:0.7 ./b:0.3 -o ./merged [--base-model PATH_OR_ID]

Each source is `PATH[:WEIGHT]` (weight 1.0 when omitted); sources are local adapter folders (hub and
S3 names are resolved by the server's adapter sources, not by this offline tool).

Shape checks: with `--base-model` pointing at a local model folder, adapters are checked against
that model's shape. Otherwise (no `--base-model`, or a hub id that is only recorded as
`base_model_name_or_path`) the shape is inferred from the adapters' own tensors
(`adapter.infer_shape`): the adapters must agree with each other, and the layer count is
1 + the highest adapted layer index.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openlora.config import ModelConfig, ModelShape
from openlora.errors import InvalidRequest, OpenLoRAError
from openlora.lora.adapter import infer_shape, load_peft_adapter, save_peft_adapter
from openlora.lora.merge import SIGN_METHODS, STRATEGIES, merge_adapters, merge_key

PROVENANCE_NAME = "openlora_merge.json"


def parse_source(spec: str) -> tuple[str, float]:
    """`PATH:WEIGHT` -> (PATH, WEIGHT); a spec without a numeric suffix has weight 1.0."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def add_adapter_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `adapters merge` on the top-level CLI's subparsers (sets `func` to the handler)."""
    adapters = subparsers.add_parser("adapters", help="offline adapter tools")
    sub = adapters.add_subparsers(dest="adapters_command", metavar="COMMAND", required=True)
    m = sub.add_parser("merge", help="merge PEFT adapters (cat, linear, ties, dare_*, *_svd, delta_svd)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("sources", nargs="+", metavar="NAME_OR_PATH:WEIGHT", help="adapter folder and its weight")
    m.add_argument("-o", "--output", required=True, help="folder to write the merged PEFT adapter to")
    m.add_argument("--strategy", choices=STRATEGIES, default="cat",
                   help="merge strategy (default cat: exact, rank = sum of ranks)")
    m.add_argument("--density", type=float, default=None, help="fraction kept by ties / dare / magnitude_prune")
    m.add_argument("--majority-sign-method", choices=SIGN_METHODS, default="total")
    m.add_argument("--svd-rank", type=int, default=None, help="rank of SVD merges (default: largest input rank)")
    m.add_argument("--svd-clamp", type=float, default=None, help="quantile at which SVD factors are clamped")
    m.add_argument("--seed", type=int, default=0, help="seed of the DARE masks (default 0)")
    m.add_argument("--base-model", default=None, help="local model folder (shape check) or hub id (recorded)")
    m.add_argument("--id", dest="adapter_id", default=None, help="id of the merged adapter")
    m.set_defaults(func=run_merge)


def _shape_and_base(base_model: str | None, paths: list[str]) -> tuple[ModelShape, str | None]:
    """The shape to check against, and the base-model name to record."""
    if base_model and (Path(base_model) / "config.json").is_file():
        return ModelConfig.from_pretrained(base_model).shape, base_model
    return infer_shape(paths), base_model


def run_merge(args: argparse.Namespace) -> int:
    """Handler of `adapters merge`: load, merge, write; prints a JSON summary. Returns the exit code."""
    try:
        specs = [parse_source(s) for s in args.sources]
        for path, _ in specs:
            if not Path(path).is_dir():
                raise InvalidRequest(f"sources: {path!r} is not a local adapter folder")
        paths = [p for p, _ in specs]
        shape, base = _shape_and_base(args.base_model, paths)
        adapters = [load_peft_adapter(p, Path(p).name, shape, expected_base_model=base) for p in paths]
        weights = [w for _, w in specs]
        params = dict(density=args.density, majority_sign_method=args.majority_sign_method,
                      svd_rank=args.svd_rank, svd_clamp=args.svd_clamp, seed=args.seed)
        merged = merge_adapters(adapters, weights, args.strategy, new_id=args.adapter_id, **params)
        out = save_peft_adapter(merged, args.output, base_model_name_or_path=base)
        summary = {
            "output": str(out),
            "adapter_id": merged.adapter_id,
            "content_hash": merged.content_hash,
            "merge_key": merge_key(adapters, weights, args.strategy, params),
            "strategy": args.strategy,
            "rank": merged.max_rank,
            "num_modules": len(merged.modules),
            "sources": [{"path": p, "weight": w, "content_hash": a.content_hash}
                        for (p, w), a in zip(specs, adapters)],
            "params": params,
        }
        # Provenance beside the PEFT files (PEFT ignores it): what went into this adapter.
        (out / PROVENANCE_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    except OpenLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InvalidRequest) else 1
    print(json.dumps(summary))
    return 0
