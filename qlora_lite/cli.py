"""The `qlora-lite` command: parses arguments and calls the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys

from . import __version__



def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions whose message is the whole story: printed without a traceback."""
    from .adapters import AdapterError
    from .config import ConfigError
    from .data import DataError
    from .lora import LoRAError
    from .quant import ModelLoadError
    from .train import TrainingError

    return (AdapterError, ConfigError, DataError, LoRAError, ModelLoadError, TrainingError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-lite", description="QLoRA fine-tuning on one GPU.")
    parser.add_argument("--version", action="version", version=f"qlora-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an adapter from a YAML recipe")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny-demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4 lora.r=8")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="delete an earlier run in output_dir and start over")
    return parser


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import fit

    cfg = load_config(args.recipe, args.overrides)
    summary = fit(cfg, resume=args.resume, overwrite=args.overwrite)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"done: {summary['steps']} steps; adapter written to {summary['adapter_dir']}"]
    for key in ("eval_loss", "exact_match"):
        if f"final_{key}" in summary:
            before = summary.get(f"initial_{key}")
            after = summary[f"final_{key}"]
            fmt = "{:.1%}" if key == "exact_match" else "{:.4f}"
            lines.append(f"  {key}: " + (f"{fmt.format(before)} -> " if before is not None else "") + fmt.format(after))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after flags (`train R.yaml --resume a.b=1`): argparse stops
    # filling a positional list at the first flag, so collect the rest from the leftovers.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    quiet_library_progress_bars()
    try:
        return {"train": run_train}[args.command](args)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def quiet_library_progress_bars() -> None:
    """transformers' per-file loading bars drown our own report for small models."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
