"""The `qlora-lite` command: parses arguments and calls the library. Nothing else lives here.

Each command imports the library inside its run_ function: torch, transformers and bitsandbytes take
seconds to import, and `qlora-lite --help` (and a mistyped flag) should answer at once. What the
parsers need (the data formats, the GGUF types) comes from modules that import none of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .config import OBJECTIVES, load_recipe
from .errors import GenerationError, QloraLiteError
from .llama_cpp import GGUF_TYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-lite", description="QLoRA fine-tuning on one GPU.")
    parser.add_argument("--version", action="version", version=f"qlora-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an adapter from a YAML recipe")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny-demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4 lora.r=8")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="delete an earlier run in output_dir and start over")
    add_plan_parser(sub)
    add_merge_parser(sub)
    add_export_gguf_parser(sub)
    add_generate_parser(sub)
    add_inspect_prompt_parser(sub)
    add_plot_parser(sub)
    doctor = sub.add_parser(
        "doctor",
        help="report versions, GPU or CPU, and whether this setup can train (paste it into bug reports)",
        description="Print the versions of the packages qlora-lite uses and whether they are the tested set, what "
        "bitsandbytes loaded, the GPUs or the CPU, and what auto settings pick. Exit 0 when this setup can train.",
    )
    doctor.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    return parser


def run_train(args: argparse.Namespace) -> int:
    from .training.distributed import read_world, wait_for_rank_zero_to_report
    from .training.fit import fit

    main = read_world().is_main
    if not main:
        # Under torchrun every process runs this command: rank 0 alone reports (its errors, and
        # any other process's, still go to stderr).
        sys.stdout = open(os.devnull, "w")
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except QloraLiteError as err:
        if not main:  # every process reads the same recipe, so rank 0 says what is wrong with it
            err.quiet = True
            wait_for_rank_zero_to_report()
        raise
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


# ---------------------------------------------------------------------------- plan


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="estimate the GPU memory a recipe needs, from the model's config.json alone",
        description="Estimate peak GPU memory of training RECIPE (weights, adapter, optimizer, activations, logits) "
        "without downloading or loading weights, and the largest micro-batch and sequence length that fit.",
    )
    plan.add_argument("recipe", help="recipe YAML, e.g. recipes/llama3.1-8b-alpaca.yaml")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_seq_len=4096")
    plan.add_argument("--vram", default="24GiB", help="memory of one GPU to plan for (default 24GiB)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs (processes) to split the run over, with the recipe's dist.strategy (ddp or fsdp); the plan is then per GPU (default 1)")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def run_plan(args: argparse.Namespace) -> int:
    from .planner import format_plan, parse_bytes, plan_memory

    cfg = load_recipe(args.recipe, args.overrides)
    plan = plan_memory(cfg, vram_bytes=parse_bytes(args.vram), gpus=args.gpus)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan, cfg.model.name_or_path))
    return 0


# ---------------------------------------------------------------------------- doctor


def run_doctor(args: argparse.Namespace) -> int:
    from .doctor import collect_environment, find_problems, format_environment

    env = collect_environment()
    print(json.dumps(env) if args.json else format_environment(env))
    problems = find_problems(env)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if problems else 0


# ---------------------------------------------------------------------------- merge


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    merge = sub.add_parser(
        "merge",
        help="merge an adapter into its base and write a plain Hugging Face model",
        description=(
            "Add the adapter's deltas (alpha/r) B A to the base's original full-precision weights, shard by "
            "shard, and write OUT_DIR as a plain Hugging Face model folder (loads with transformers alone)."
        ),
    )
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a PEFT-format LoRA adapter folder, e.g. runs/NAME/adapter")
    merge.add_argument("--out", required=True, metavar="OUT_DIR", help="folder to create (must be new or empty, unless --overwrite)")
    merge.add_argument("--base", metavar="PATH_OR_ID", help="base model folder or hub id (default: the adapter's base_model_name_or_path)")
    merge.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="output dtype; auto = the base checkpoint's (default)")
    merge.add_argument("--from-4bit", action="store_true", help="merge into the dequantized NF4 weights (lossy; for when the original weights are gone)")
    merge.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=None,
        help="compare merged vs base+adapter logits on probe prompts and fail above a threshold "
        "(default: on for bases up to 1B parameters)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (only once the new one is complete)")
    merge.add_argument("--allow-pickle", action="store_true", help="read an adapter_model.bin pickle (weights_only) if it is all the adapter has")


def run_merge(args: argparse.Namespace) -> int:
    from .export.merge import merge_adapter

    report = merge_adapter(
        args.adapter_dir, args.out, base=args.base, dtype=args.dtype, from_4bit=args.from_4bit,
        verify=args.verify, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    print(format_merge_report(report))
    return 0


def format_merge_report(report) -> str:
    from .methods.table import get_method_by_peft_type

    source = "dequantized NF4 weights" if report.from_4bit else "original weights"
    what = get_method_by_peft_type(report.peft_type).merge_summary.format(n=report.merged_modules)
    lines = [
        f"{what} the base's {source}: {report.num_parameters / 1e6:,.1f}M parameters, "
        f"{report.num_shards} shard(s), {report.dtype} -> {report.out_dir}"
    ]
    if report.from_4bit:
        lost = "not measurable: the base is itself quantized" if report.nf4_logit_diff is None else f"{report.nf4_logit_diff:.4g}"
        lines.append(f"  lossy: merged into NF4-rounded weights; max |logit difference| vs full-precision base+adapter: {lost}")
    if report.max_logit_diff is not None:
        lines.append(
            f"  verify: max |logit difference| merged vs base+adapter on {report.num_probes} probe prompts: "
            f"{report.max_logit_diff:.3g} (threshold {report.threshold:.3g}) ok"
        )
    lines += [f"  note: {note}" for note in report.notes]
    lines.append(f"  peak RSS {report.peak_rss_bytes / 2**30:.2f} GiB")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- export-gguf

def add_export_gguf_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export-gguf",
        help="write a GGUF file for llama.cpp, LM Studio and Ollama (llama.cpp's own converter)",
        usage="qlora-lite export-gguf (MERGED_DIR | ADAPTER_DIR) --out FILE.gguf [--type f16|bf16|q8_0|q4_k_m] [options]",
        description=(
            "Convert a model folder, or an adapter folder (merged into its base first, as `merge` does), to one GGUF file "
            "with llama.cpp's convert_hf_to_gguf.py, holding the chat template the adapter was trained with and its stop "
            "tokens; then load it in llama.cpp and check its tokenization and logits against transformers. Needs the gguf "
            "extra: pip install 'qlora-lite[gguf]'."
        ),
    )
    export.add_argument("source", metavar="MERGED_DIR | ADAPTER_DIR", help="a model folder (config.json + safetensors) or an adapter folder, e.g. runs/NAME/adapter")
    export.add_argument("--out", required=True, metavar="FILE.gguf", help="the file to write (refused if it exists, unless --overwrite)")
    export.add_argument(
        "--type", default="f16", choices=GGUF_TYPES, dest="gguf_type",
        help="weights: f16 (default), bf16, q8_0 (converter) or q4_k_m (llama.cpp's quantize; about 4.8 bits per weight)",
    )
    export.add_argument(
        "--llama-cpp", metavar="DIR",
        help="a llama.cpp checkout whose converter to use (default $QLORA_LITE_LLAMA_CPP, else the tested one from "
        "llama-cpp-python's source distribution, downloaded once)",
    )
    export.add_argument(
        "--format", choices=PROMPT_FORMATS, default="auto", dest="prompt_format",
        help="chat template written into the file; auto = as the adapter was trained (qlora_lite.json), else the "
        "tokenizer's template if it has one, else text",
    )
    export.add_argument("--ollama", action="store_true", help="also write FILE.Modelfile (FROM, TEMPLATE, stop, SYSTEM) for `ollama create`; with --lora-only on a GGUF base: FROM the original and ADAPTER the LoRA")
    export.add_argument("--lora-only", action="store_true", help="write the adapter alone as a GGUF LoRA, served on a base GGUF with llama-server --lora (a GGUF base: on the original file, unchanged)")
    export.add_argument("--base", metavar="PATH", help="the adapter's base folder (default: its base_model_name_or_path)")
    export.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=None,
        help="compare llama.cpp with transformers on probe prompts and fail above the type's tolerance (default: on up to 1B parameters)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace FILE.gguf (and its Modelfile), only once the new one is complete")
    export.add_argument("--allow-pickle", action="store_true", help="read an adapter_model.bin pickle (weights_only) if it is all the adapter has")


def run_export_gguf(args: argparse.Namespace) -> int:
    from .export.gguf import export_gguf, format_gguf_report

    report = export_gguf(
        args.source, args.out, args.gguf_type, llama_cpp_dir=args.llama_cpp, prompt_format=args.prompt_format,
        ollama=args.ollama, lora_only=args.lora_only, base=args.base, verify=args.verify, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
    )  # fmt: skip
    print(format_gguf_report(report))
    return 0


# ---------------------------------------------------------------------------- generate

PROMPT_FORMATS = ("auto", *OBJECTIVES["sft"].formats)  # as generate.PROMPT_FORMATS, without importing torch for --help


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    generate = sub.add_parser(
        "generate",
        help="answer prompts with an adapter, or with several adapters sharing one base",
        usage="qlora-lite generate (ADAPTER_DIR [--base PATH] | --base PATH | --adapter NAME=DIR ...) [PROMPT] [options]",
        description=(
            "Answer PROMPT (or each line of stdin) with the base model plus an adapter, streaming the answer. "
            "With --adapter NAME=DIR (repeatable) one base serves several adapters: start each prompt with "
            "'NAME: ' to pick one ('base: ' for none)."
        ),
    )
    # Each positional takes exactly one string but is optional: with nargs="?", argparse (3.11) uses up
    # PROMPT, empty, at the first positional, so `ADAPTER_DIR --base B PROMPT` left PROMPT unrecognized.
    positionals = [
        generate.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="adapter folder, e.g. runs/NAME/adapter (omit for the plain --base, or with --adapter)"),
        generate.add_argument("prompt", metavar="PROMPT", help="the prompt; without it, prompts are read from stdin, one per line"),
    ]
    for action in positionals:
        action.required = False  # split_generate_inputs says what is missing
    generate.add_argument(
        "--base", metavar="PATH",
        help="base model folder or hub id to put the adapter(s) on (default: the adapter's base_model_name_or_path); "
        "alone, the plain base answers",
    )
    generate.add_argument(
        "--adapter", action="append", type=parse_named_adapter, default=[], metavar="NAME=DIR",
        help="add an adapter under a name (repeatable); route each prompt with a 'NAME: ' prefix",
    )
    generate.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per answer (default 256)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, reproducible answers (default); > 0 samples")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling cut-off when --temperature > 0 (default 1.0)")
    generate.add_argument(
        "--format", choices=PROMPT_FORMATS, default="auto",
        help="prompt layout; auto = as the adapter was trained (qlora_lite.json), else the chat template if the tokenizer has one, else raw text",
    )
    generate.add_argument("--input", default="", metavar="TEXT", help="alpaca format only: the record's input field (what the instruction is about)")
    generate.add_argument(
        "--system", default="", metavar="TEXT",
        help="chat format only: the system message, as in training records (replaces the template's default system prompt)",
    )
    generate.add_argument("--no-4bit", action="store_true", help="load the base unquantized instead of NF4")
    generate.add_argument("--allow-pickle", action="store_true", help="read an adapter_model.bin pickle (weights_only) if it is all an adapter has")


def parse_named_adapter(spec: str) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {spec!r}; e.g. --adapter math=runs/math/adapter")
    return name, folder


def split_generate_inputs(args: argparse.Namespace) -> tuple[dict[str, str], str | None]:
    """(named adapters, prompt or None) from the positionals.

    `ADAPTER_DIR [PROMPT]`, with or without --base (which then replaces the adapter's recorded base);
    `--base PATH [PROMPT]` alone prompts the plain base; with --adapter NAME=DIR the only positional is
    the prompt. With --base and one positional, it is the adapter folder when it is a folder (or looks
    like a path: no spaces, a slash), else the prompt.
    """
    from .generate import collect_named_adapters

    named = collect_named_adapters(args.adapter)
    first, second = args.adapter_dir, args.prompt  # argparse fills ADAPTER_DIR first, whatever the user meant
    if named:
        if second is not None:
            raise GenerationError(
                "with --adapter, the only positional argument is the prompt; "
                "add an adapter folder as --adapter NAME=DIR instead of a positional ADAPTER_DIR"
            )
        return named, first
    if first is None:
        if not args.base:
            raise GenerationError("nothing to load: pass an adapter folder, or --base PATH (with --adapter NAME=DIR to add adapters)")
        return {}, None
    if args.base and second is None and not looks_like_folder(first):
        return {}, first  # `--base PATH PROMPT`: the plain base answers
    if args.base and second is None and not Path(first).expanduser().exists():
        raise GenerationError(
            f"adapter folder {first} does not exist; pass the folder training wrote (e.g. runs/NAME/adapter), "
            "or, to prompt the plain --base model with this text, give it on stdin"
        )
    return {"adapter": first}, second


def looks_like_folder(text: str) -> bool:
    """A folder, or text shaped like a path (no whitespace, a slash), not a prompt."""
    return Path(text).expanduser().is_dir() or (not any(c.isspace() for c in text) and ("/" in text or os.sep in text))


def run_generate(args: argparse.Namespace) -> int:
    from .generate import (
        GenerationSettings,
        answer_prompts,
        check_prompt_options,
        open_switcher,
        read_prompt_lines,
    )

    named, prompt = split_generate_inputs(args)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    if args.format != "auto":  # a known format is checked before the slow load; auto once the adapter's is read
        check_prompt_options(args.format, args.input, args.system)
    switcher = open_switcher(named, args.base, load_in_4bit=not args.no_4bit, allow_pickle=args.allow_pickle)
    prompts = [prompt] if prompt is not None else read_prompt_lines(sys.stdin)
    answer_prompts(switcher, prompts, settings, args.format, routed=bool(args.adapter), input_text=args.input, system=args.system)
    return 0


# ---------------------------------------------------------------------------- inspect-prompt


def add_inspect_prompt_parser(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser(
        "inspect-prompt",
        help="show the vocabulary tokens nearest to each virtual token of a soft prompt",
        description=(
            "For each virtual token of a prompt-tuning adapter, print the vocabulary tokens whose input embeddings "
            "are nearest by cosine similarity. Reads only the base's embedding matrix from its safetensors files."
        ),
    )
    inspect.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a PEFT PROMPT_TUNING adapter folder, e.g. runs/NAME/adapter")
    inspect.add_argument("--top-k", type=int, default=5, help="nearest tokens shown per virtual token (default 5)")
    inspect.add_argument("--base", metavar="PATH", help="base model folder (default: the adapter's base_model_name_or_path)")
    inspect.add_argument("--allow-pickle", action="store_true", help="read an adapter_model.bin pickle (weights_only) if it is all the adapter has")


def run_inspect_prompt(args: argparse.Namespace) -> int:
    from .methods.inspect_prompt import inspect_prompt

    rows = inspect_prompt(args.adapter_dir, top_k=args.top_k, base=args.base, allow_pickle=args.allow_pickle)
    print(format_prompt_neighbours(rows))
    return 0


def format_prompt_neighbours(rows: list[list[tuple[str, int, float]]]) -> str:
    """One line per virtual token: `  0: ' the' 0.98 | 'a' 0.41`; repr shows spaces and newlines."""
    width = len(str(len(rows) - 1))
    lines = [f"nearest vocabulary tokens (cosine similarity) of {len(rows)} virtual tokens:"]
    for index, row in enumerate(rows):
        lines.append(f"  {index:>{width}}: " + " | ".join(f"{text!r} {sim:.2f}" for text, _, sim in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    plot = sub.add_parser(
        "plot",
        help="draw a run's curves into RUN_DIR/curves.png (also while it trains)",
        description=(
            "Draw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl: train loss (as logged and smoothed) and eval loss, "
            "learning rate, gradient norm and tokens/s against the optimizer step. Works while the run is going; "
            "every run also draws it when it ends. Needs matplotlib (pip install 'qlora-lite[plot]')."
        ),
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run's output folder (the recipe's output_dir), e.g. runs/tiny-demo")


def run_plot(args: argparse.Namespace) -> int:
    from .training.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, missing_ok=False)}")
    return 0


# ---------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after flags (`train R.yaml --resume a.b=1`): argparse stops
    # filling a positional list at the first flag, so collect the rest from the leftovers.
    args, extra = parser.parse_known_args(argv)
    # Only train and plan take key=value overrides; for any other command every leftover is an error.
    unknown = [e for e in extra if "=" not in e or e.startswith("-") or args.command not in ("train", "plan")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("train", "plan"):
        args.overrides = [*args.overrides, *extra]
    quiet_library_progress_bars()
    try:
        commands = {
            "train": run_train, "plan": run_plan, "merge": run_merge, "export-gguf": run_export_gguf, "generate": run_generate,
            "inspect-prompt": run_inspect_prompt, "doctor": run_doctor, "plot": run_plot,
        }  # fmt: skip
        return commands[args.command](args)
    except QloraLiteError as err:
        # A stopped run (SIGINT, SIGTERM) is not an error: it says where it stopped and exits 130 / 143.
        if not err.quiet:  # quiet: rank 0 prints this same line (or has printed it)
            print(err.format_line(int(os.environ.get("RANK", "0"))), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, merging): nothing half-written is kept
        print("interrupted", file=sys.stderr)
        return 130


def quiet_library_progress_bars() -> None:
    """transformers' per-file loading bars drown our own report for small models."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
