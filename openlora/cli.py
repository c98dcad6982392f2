"""`openlora` command line: serve, bench, adapters merge, ledger ..."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="openlora", description="Multi-LoRA serving with proof of attribution.")
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="command", required=True)

    from openlora.server.cli import add_serve_command

    add_serve_command(sub)

    bench = sub.add_parser("bench", help="run bench/throughput.py (base-model throughput vs transformers)")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_run_bench)

    demo = sub.add_parser("demo", help="prepare the built-in demo model (SmolLM2-135M-Instruct) and print where it "
                                       "and its adapters are")
    demo.set_defaults(func=_run_demo)

    kernels = sub.add_parser("build-kernels", help="compile the C++ CPU kernels now (make setup runs this)")
    kernels.set_defaults(func=_run_build_kernels)

    from openlora.lora.merge_cli import add_adapter_commands

    add_adapter_commands(sub)

    from openlora.attribution.cli import add_ledger_commands

    add_ledger_commands(sub)

    from openlora.chain.cli import add_chain_commands

    add_chain_commands(sub)

    from openlora.network.cli import add_gateway_command

    add_gateway_command(sub)
    return ap


def _run_bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"
    if not script.is_file():
        print("bench/throughput.py is part of the source checkout; run from a clone of the repository", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from openlora.demo import demo_adapters, ensure_demo_model

    model = ensure_demo_model()
    print(f"model: {model}")
    for name, path in demo_adapters().items():
        print(f"adapter {name}: {path}")
    return 0


def _run_build_kernels(args: argparse.Namespace) -> int:
    from openlora.kernels.build import main as build_main

    build_main()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
