"""`llmpipe <stage> [--config FILE] [key.sub=value ...]`, `llmpipe validate <stage> ...`, `llmpipe run PIPELINE`,
`llmpipe report RUN_DIR`.

The stage table below is the only indirection: each stage module has a `Config` dataclass and `run(cfg)`; a
command of two words (`annotate export`) is one entry. A module's `FLAGS` names config keys that are also taken
as `--key VALUE` options (`--log labels.jsonl` is `log=labels.jsonl`).
Bad input (config, data, artifact folders) prints one line per problem and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import signal
import sys
import textwrap


def _quit_now(signum, frame) -> None:
    """Ctrl-C while llmpipe starts up or shuts down (nothing of the user's is open): exit 130 at once, no traceback."""
    os.write(2, b"llmpipe: interrupted\n")
    os._exit(130)


# Installed first, before the imports that take a second or more, when llmpipe runs as a program (never when a
# test or notebook imports this module); a launcher that left SIGINT ignored is obeyed. _exit_code puts Python's
# own handler back while a command runs, so its Ctrl-C is a KeyboardInterrupt that writes what it must.
_AS_PROGRAM = __name__ == "__main__" or os.path.basename(sys.argv[0]) == "llmpipe"
if _AS_PROGRAM and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _quit_now)

from pipeline.config import StageFailed, UserError, describe_fields, load_config  # noqa: E402 (after the handler)
from pipeline.data import check_data_paths  # noqa: E402

# stage name -> (module, one-line summary)
STAGES = {
    "tokenizer": ("pipeline.stages.tokenizer", "train a byte-level BPE tokenizer with chat tokens"),
    "pretrain": ("pipeline.stages.pretrain", "train a causal LM from scratch (or continue one) on packed text"),
    "sft": ("pipeline.stages.sft", "supervised fine-tuning on chat data with trl, full or LoRA"),
    "reward": ("pipeline.stages.reward", "train a reward model (one score) on preference pairs with trl"),
    "dpo": ("pipeline.stages.dpo", "align a chat model on preference pairs with trl's DPO"),
    "pairs": ("pipeline.stages.pairs", "sample a model, judge its answers by a rule, write preference pairs"),
    "ppo": ("pipeline.stages.ppo", "RLHF with PPO against a reward model or a rule reward (our Accelerate loop)"),
    "grpo": ("pipeline.stages.grpo", "critic-free RL with rule rewards (group-relative) on trl's GRPOTrainer"),
    "explain": ("pipeline.stages.explain", "why a reward model scored that: token attributions and a rewrite probe"),
    "eval": ("pipeline.stages.evaluate", "few-shot evaluation (multiple choice, generation) with lm-eval's numbers"),
    "annotate": ("pipeline.stages.annotate", "label preference pairs in the terminal, one key per judgement"),
    "annotate export": ("pipeline.stages.annotate_export", "write the labels as preference pairs for reward and dpo"),
    "annotate stats": ("pipeline.stages.annotate_stats", "labels per annotator, agreement (kappa), position bias"),
}
# commands over several stages -> (module with main(argv), one-line summary)
COMMANDS = {
    "run": ("pipeline.orchestrate", "run a pipeline file: every stage in order, skipping finished ones"),
    "report": ("pipeline.report", "rebuild a run's report card (report.md and plots)"),
}
EXIT_BAD_INPUT = 2


def stage_module(name: str):
    if name not in STAGES:
        hint = difflib.get_close_matches(name, list(STAGES), n=1)
        raise UserError(
            f"unknown stage {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; stages: {', '.join(STAGES)}"
        )
    return importlib.import_module(STAGES[name][0])


def _fields_help(config_cls: type) -> str:
    lines = ["config keys (set in the YAML file or as key=value; sections with dots, e.g. data.path=...):"]
    for key, type_name, default, help_text in describe_fields(config_cls):
        shown = "required" if default == "required" else f"default {default}"
        head = f"  {key}" if type_name == "section" else f"  {key} ({type_name}, {shown})"
        lines.append(head if type_name != "section" else f"{head}:")
        if help_text:
            lines += textwrap.wrap(help_text, width=100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _parser(stage: str, validate: bool) -> argparse.ArgumentParser:
    module = stage_module(stage)
    prog = f"llmpipe {'validate ' if validate else ''}{stage}"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(module.__doc__ or "").strip(),
        epilog=_fields_help(module.Config),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys below); overrides on the command line win")
    for key in getattr(module, "FLAGS", ()):
        parser.add_argument(f"--{key}", metavar=key.upper(), help=f"same as {key}=... (config keys below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.lr=3e-4")
    return parser


def _close_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits. Left to exit, gloo's threads sometimes abort a
    finished rank ("terminate called without an active exception", exit -6: seen once in CI after a 2-process
    sft run had written its model), and accelerate launch then reports the whole run as failed."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a rank that cannot tear down cleanly must not hide the stage's outcome
            pass


def _main_usage() -> str:
    width = max(len(s) for s in STAGES)
    stages = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in {**STAGES, **COMMANDS}.items())
    return (
        "usage: llmpipe run PIPELINE.yaml [--dry-run] [--from STAGE] [--stages A,B] [--force]\n"
        "       llmpipe report RUN_DIR\n"
        "       llmpipe <stage> [--config FILE] [key=value ...]\n"
        "       llmpipe validate <stage> [--config FILE] [key=value ...]\n"
        "       llmpipe <stage> --help    (lists every config key)\n"
        "       llmpipe annotate --pairs FILE --log FILE --annotator NAME    (then: annotate export|stats)\n\n"
        f"stages and commands:\n{stages}\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_main_usage())
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] in COMMANDS:  # llmpipe run PIPELINE / llmpipe report RUN_DIR
        module = importlib.import_module(COMMANDS[argv[0]][0])
        resume_hint = "; run the same command again to resume"
        return _exit_code(f"llmpipe {argv[0]}", lambda: module.main(argv[1:]), resume_hint)
    validate = argv[0] == "validate"
    if validate:
        argv = argv[1:]
        if not argv or argv[0].startswith("-"):
            print("usage: llmpipe validate <stage> [--config FILE] [key=value ...]", file=sys.stderr)
            return EXIT_BAD_INPUT
    stage = argv[0]
    if len(argv) > 1 and f"{stage} {argv[1]}" in STAGES:  # `annotate export`
        stage, argv = f"{stage} {argv[1]}", [stage, *argv[2:]]
    return _exit_code(f"llmpipe {stage}", lambda: _run_stage(stage, argv, validate))


def _exit_code(prog: str, call, interrupted_hint: str = "") -> int:
    """Run `call` (returning an exit code or None for 0) and turn llmpipe's errors into one-line messages and exit
    codes: a failed stage 1, bad input 2 (one line per problem, no traceback), an interrupt 130."""
    if signal.getsignal(signal.SIGINT) is _quit_now:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return call() or 0
    except StageFailed as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        for problem in exc.problems:
            print(f"{prog}: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{interrupted_hint}", file=sys.stderr)
        return 130
    finally:  # from here to the exit, a Ctrl-C has nothing left to interrupt
        if _AS_PROGRAM and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _quit_now)


def _run_stage(stage: str, argv: list[str], validate: bool) -> int:
    module = stage_module(stage)
    args = _parser(stage, validate).parse_args(argv[1:])
    # --key VALUE options come last so they win; JSON quoting keeps a value such as 007 a string
    flags = [f"{k}={json.dumps(getattr(args, k))}" for k in getattr(module, "FLAGS", ()) if getattr(args, k)]
    cfg = load_config(module.Config, args.config, args.overrides + flags)
    check_data_paths(cfg)
    if validate:
        print(f"{args.config or 'command line'}: valid {stage} config")
        return 0
    try:
        module.run(cfg)
    finally:
        _close_process_group()
    return 0


def _exit_rank(code: int) -> None:
    """End a rank of a multi-process launch without interpreter finalization. After destroy_process_group, gloo's
    C++ worker threads can still hold work objects with Python references; destroying them while the interpreter
    tears down aborts the process (SIGABRT, "terminate called without an active exception"; seen in CI after a
    2-process sft run and, once in 4 CI-class runs, a 2-process ppo run that had written its model), and accelerate
    launch then fails the whole stage.
    Everything a stage writes is closed and fsync'd by then; only the standard streams need flushing."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_rank(exit_code)
    sys.exit(exit_code)
