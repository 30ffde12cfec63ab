"""The `jaxalign` command line.

    jaxalign train CONFIG [--set a.b=c ...]      run the trainer the config names
    jaxalign shardings CONFIG [--set ...]        print the mesh and every parameter's sharding
    jaxalign plan CONFIG --devices N [--hbm-gib G]   estimate memory per device
    jaxalign plan CONFIG --compile [--topology v5p-64] [--json]   compile: exact memory, FLOPs
    jaxalign tokenizer train --input F --vocab-size N [--output PREFIX]
    jaxalign export --checkpoint RUN_DIR|CKPT|HF_DIR --output DIR   a Hugging Face model directory
                                                          (a LoRA run: a PEFT adapter; --merge-lora)
    jaxalign generate --model RUN_DIR|HF_DIR --input prompts.jsonl --output out.jsonl [--set ...]
    jaxalign rejection-sample --model RUN_DIR --input prompts.jsonl --reward-fn MOD:FN
        --output-sft best.jsonl --output-dpo pairs.jsonl [--set sampling.num_samples=8]
    jaxalign score --model RUN_DIR|HF_DIR --input F.jsonl [--output OUT.jsonl]   reward scores
    jaxalign quickstart [--fast] [--tools] [--run-dir DIR] [--stages ...] [--from-stage S]
    jaxalign eval --model RUN_DIR [--reference RUN] [--reward-model RM_RUN] [--output M.json]

Wherever a command takes a RUN_DIR (--model, --reference, --reward-model, --checkpoint), a
Hugging Face model directory (config.json + safetensors) works too; its tokenizer and chat
template come with it (docs/hf.md).
    jaxalign eval --model RUN_DIR --environment calculator=sums.jsonl   environment episodes
    jaxalign eval --compare RUN_A RUN_B --max-drop 2.0   non-zero exit on a regression

Errors in user input print one line (`error: ...`) and exit with status 2; `--debug` shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jaxalign.compilation_cache import enable_compilation_cache as _enable_compilation_cache


class _CurrentStdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a record is emitted (redirection and capture see
    it), as the `print` calls this replaced did."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides
        pass


class _PrefixFormatter(logging.Formatter):
    """`[jaxalign] message`; the quickstart's own progress lines read `[quickstart] message`."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "quickstart" if record.name == "jaxalign.quickstart" else "jaxalign"
        return f"[{prefix}] {record.getMessage()}"


def _main_process_only(record: logging.LogRecord) -> bool:
    # Evaluated when a record is emitted, i.e. after distributed.initialize() has run.
    import jax

    return jax.process_index() == 0


def configure_logging(level: int = logging.INFO) -> None:
    """Show the `jaxalign` loggers' records on stdout, on process 0 only (what the commands print
    as progress). Idempotent; the library itself never installs a handler."""
    logger = logging.getLogger("jaxalign")
    if not any(isinstance(h, _CurrentStdoutHandler) for h in logger.handlers):
        handler = _CurrentStdoutHandler()
        handler.setFormatter(_PrefixFormatter())
        handler.addFilter(_main_process_only)
        logger.addHandler(handler)
        logger.propagate = False  # a root handler (e.g. basicConfig) would show it twice
    logger.setLevel(level)


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set train.steps=10",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from jaxalign.config import load_config
    from jaxalign.trainers import train

    cfg = load_config(args.config, args.overrides)
    _enable_compilation_cache()
    train(cfg)  # logs the run's summary line
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from jaxalign.config import load_config
    from jaxalign.errors import UserError

    if args.compile:
        return _plan_compile(args)
    if args.devices is None:
        raise UserError("plan: give --devices N (or --compile to compile the run's programs)")
    from jaxalign.plan import check_fits, format_plan, make_plan

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args.devices, args.platform)
    print(format_plan(plan, args.hbm_gib))
    if args.hbm_gib:
        check_fits(plan, args.hbm_gib)
    return 0


def _plan_compile(args: argparse.Namespace) -> int:
    """`plan --compile`: the run's programs compiled for --topology (or the local devices)."""
    import os

    if args.topology:  # compiled for, never run on: the local backend stays the CPU
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxalign import aot, topology
    from jaxalign.config import load_config

    cfg = load_config(args.config, args.overrides)
    devices, where = None, "local devices"
    if args.topology:
        topo = topology.parse_topology(args.topology, args.slices)
        devices = topology.topology_devices(topo)
        where = f"{topo.name}" + (f" x {topo.num_slices} slices" if topo.num_slices > 1 else "")
        where += f" ({topo.num_devices} {topo.chip.name} chips)"
    try:
        reports = aot.compile_run(cfg, devices)
    except aot.ProgramDoesNotFit as e:
        print(f"error: {e}", file=sys.stderr)
        if args.debug:
            raise
        return 1
    if args.json:
        print(aot.reports_json(reports, config=args.config, devices=where))
    else:
        print(aot.format_reports(reports, header=f"compiled for {where}"))
    try:
        aot.check_reports_fit(reports)
    except aot.ProgramDoesNotFit as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_shardings(args: argparse.Namespace) -> int:
    from jaxalign import sharding as shd
    from jaxalign.config import load_config
    from jaxalign.models.params import build_model
    from jaxalign.trainers import get_trainer

    cfg = load_config(args.config, args.overrides)
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.sharding)
    algorithm = get_trainer(cfg.trainer)  # the trained tree: e.g. PPO's {policy, value}
    _, shapes, shardings = build_model(
        cfg, mesh, rules, lambda rngs: algorithm.make_model(cfg, rngs)
    )
    shd.validate_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh, rules)
    print(shd.describe(shapes, shardings, mesh))
    print(shd.describe_activation_rules(rules))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxalign.hf.model import export_checkpoint
    from jaxalign.trainers.lora_runs import load_lora_run

    out = export_checkpoint(
        args.checkpoint,
        args.output,
        tokenizer=args.tokenizer,
        family=args.family,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        merge_lora=args.merge_lora,
        load_lora_run=load_lora_run,
    )
    print(f"[jaxalign] wrote {out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from jaxalign.data import train_tokenizer

    output = args.output or str(Path(args.input[0]).with_suffix("")) + ".tokenizer"
    path = train_tokenizer(args.input, output, args.vocab_size, seed=args.seed)
    print(f"[jaxalign] wrote {path}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from jaxalign.rewards.model import score_file

    _enable_compilation_cache()
    counts = score_file(args.model, args.input, args.output)
    if not _is_main_process():
        return 0
    if args.output:
        print(f"[jaxalign] wrote {counts['records']} rewards to {args.output}", file=sys.stderr)
    if counts["truncated"]:
        print(
            f"[jaxalign] {counts['truncated']} records longer than the model's seq_len were "
            "scored on their last tokens",
            file=sys.stderr,
        )
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a RUN_DIR, one of its checkpoints/<step>, or a Hugging Face model directory",
    )
    p.add_argument("--input", required=True, help="prompts JSONL: {prompt} or {messages}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the run's config, e.g. sampling.temperature=0.7",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its .partial output files",
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxalign.generate import generate_file, load_policy

    _enable_compilation_cache()
    policy = load_policy(args.model, args.overrides)
    count = generate_file(
        policy, args.input, args.output, progress=args.progress, resume=args.resume
    )
    if _is_main_process():
        print(f"[jaxalign] wrote {count} records to {args.output}")
    return 0


def cmd_rejection_sample(args: argparse.Namespace) -> int:
    from jaxalign.generate import load_policy
    from jaxalign.rejection import rejection_sample
    from jaxalign.rewards import Scorer

    scorer = Scorer.from_flags(args.reward_fn, args.reward_model)
    _enable_compilation_cache()
    policy = load_policy(args.model, args.overrides)
    stats = rejection_sample(
        policy,
        args.input,
        scorer,
        args.output_sft,
        args.output_dpo,
        scorer_prompts="messages" if scorer.needs_sequences else "text",
        progress=args.progress,
        resume=args.resume,
    )
    if not _is_main_process():
        return 0
    print(
        f"[jaxalign] {stats['prompts']} prompts x {stats['samples_per_prompt']} samples: "
        f"{stats['sft_records']} SFT records to {args.output_sft}, {stats['dpo_pairs']} DPO "
        f"pairs; mean score {stats['mean_score']:.4f}, mean best {stats['mean_best_score']:.4f}"
    )
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from jaxalign import quickstart

    return quickstart.run(
        args.run_dir,
        fast=args.fast,
        stages=args.stages,
        from_stage=args.from_stage,
        tools=args.tools,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from jaxalign.errors import UserError

    if args.compare:
        from jaxalign.eval.compare import run_gate

        return run_gate(args.compare[0], args.compare[1], args.max_drop)
    if not args.model:
        raise UserError("eval: give --model RUN_DIR (or --compare RUN_A RUN_B)")
    from jaxalign.eval.episodes import evaluate_environments
    from jaxalign.eval.suite import evaluate, read_generations
    from jaxalign.quickstart import eval_files

    _enable_compilation_cache()
    metrics = {}
    # --environment alone runs only the episodes; with --eval-file too, both.
    if args.eval_file or not args.environment:
        baseline = read_generations(args.baseline) if args.baseline else None
        metrics = evaluate(
            args.model,
            args.eval_file or eval_files(),
            reference=args.reference,
            reward_model=args.reward_model,
            baseline=baseline,
            limit_per_family=args.limit,
            max_new_tokens=args.max_new_tokens or 48,
            generations_path=args.generations,
        )
    if args.environment:
        metrics |= evaluate_environments(
            args.model,
            args.environment,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            max_turns=args.max_turns,
            episodes_path=args.episodes,
        )
    if not _is_main_process():  # every process evaluates; process 0 writes and prints
        return 0
    text = json.dumps({"model": args.model, "metrics": metrics}, indent=1)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the trainer a config names")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="check a config against N devices without having them")
    _add_config_args(p)
    p.add_argument("--devices", type=int, help="number of devices (the fast estimate)")
    p.add_argument("--hbm-gib", type=float, default=None, help="memory per device (GiB)")
    p.add_argument(
        "--platform",
        choices=("cpu", "gpu", "tpu"),
        help="with --devices: the devices' platform, for `auto` model settings (on TPU the "
        "attention is splash, keeping no scores); default: this host's JAX backend",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the run's programs (XLA's exact memory and FLOPs) instead of estimating",
    )
    p.add_argument(
        "--topology",
        help="with --compile: a TPU slice to compile for on any host, e.g. v5p-64, v5e-256, "
        "2xv5p-64 (needs libtpu); default: the local devices",
    )
    p.add_argument("--slices", type=int, default=1, help="with --topology: number of slices")
    p.add_argument("--json", action="store_true", help="with --compile: print one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("shardings", help="print the mesh and every parameter's sharding")
    _add_config_args(p)
    p.set_defaults(func=cmd_shardings)

    p = sub.add_parser("score", help="write a reward model's reward for every record")
    p.add_argument(
        "--model",
        required=True,
        help="a reward model: an RM RUN_DIR, or a Hugging Face *ForSequenceClassification "
        "directory (num_labels 1)",
    )
    p.add_argument("--input", required=True, help="JSONL of {prompt, response} or {messages}")
    p.add_argument("--output", help="output JSONL (default: stdout)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face model directory")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="RUN_DIR or RUN_DIR/checkpoints/STEP (or a Hugging Face directory to re-export)",
    )
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument(
        "--tokenizer",
        help="tokenizer to include (default: data.tokenizer or the "
        "model.from_hf directory's files)",
    )
    p.add_argument("--family", help="Hugging Face model_type (default: inferred)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 2GB")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="cast the weights (default: as trained; a Hugging Face directory's torch_dtype)",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="a LoRA run: write the full model with the adapters merged (default: a PEFT adapter)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a SentencePiece tokenizer")
    t.add_argument("--input", action="append", required=True, help="JSONL or text file")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", help="output prefix (writes PREFIX.model)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("generate", help="sample completions for a JSONL file of prompts")
    _add_generation_args(p)
    p.add_argument("--output", required=True, help="output JSONL, one record per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "rejection-sample",
        help="K samples per prompt, scored: best as SFT, best/worst as DPO JSONL",
    )
    _add_generation_args(p)
    p.add_argument(
        "--reward-fn",
        help="MODULE:FUNCTION or FILE.py:FUNCTION, called as "
        "fn(prompts, completions, **record_fields) -> scores",
    )
    p.add_argument(
        "--reward-model", help="a reward-model RUN_DIR (trainer: rm) or HF sequence classifier"
    )
    p.add_argument("--output-sft", required=True, help="best completion per prompt (JSONL)")
    p.add_argument("--output-dpo", help="best/worst pair per prompt (JSONL)")
    p.set_defaults(func=cmd_rejection_sample)

    from jaxalign.quickstart import STAGES  # quickstart never imports the CLI: no cycle

    p = sub.add_parser(
        "quickstart",
        help="tokenizer -> pretrain -> SFT -> RM -> DPO -> PPO/GRPO "
        "-> evals on the bundled data, with a report",
    )
    p.add_argument("--fast", action="store_true", help="a smaller model and fewer steps")
    p.add_argument("--run-dir", help="default: runs/quickstart (runs/quickstart_fast)")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages")
    p.add_argument("--from-stage", choices=STAGES, help="run this stage and the later ones")
    p.add_argument(
        "--tools",
        action="store_true",
        help="also the tools stage (GRPO with a calculator) and its tool-use evals",
    )
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("eval", help="held-out checker evals of a policy, or a regression gate")
    p.add_argument("--model", help="policy RUN_DIR (or Hugging Face directory) to evaluate")
    p.add_argument(
        "--eval-file",
        action="append",
        help="eval JSONL (repeatable; default: the quickstart's held-out task and safety splits)",
    )
    p.add_argument("--reference", help="RUN_DIR or HF dir of the reference policy (KL to it)")
    p.add_argument(
        "--reward-model", help="RM RUN_DIR or HF classifier (win rate against --baseline)"
    )
    p.add_argument(
        "--baseline",
        help="generations JSONL of the baseline model (--generations of an earlier eval)",
    )
    p.add_argument(
        "--environment",
        action="append",
        metavar="SPEC=FILE",
        help="greedy episodes with an environment (a bundled name, module:Class or "
        "file.py:Class) over FILE's records: env/<name>/ success rate, turns, tool calls and "
        "tool errors (repeatable; alone, only these run)",
    )
    p.add_argument(
        "--max-turns", type=int, help="model turns per episode (default: the run's rl.max_turns)"
    )
    p.add_argument(
        "--limit", type=int, help="at most this many prompts per family (or per environment)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="answer tokens (default 48); with --environment, each episode's token budget "
        "after its first observation (default: the run's sampling.max_new_tokens)",
    )
    p.add_argument("--episodes", help="write each environment episode here (JSONL)")
    p.add_argument("--generations", help="write each prompt's answer and verdict here (JSONL)")
    p.add_argument("--output", help="write the metrics here (JSON)")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="compare two evaluations (run dirs or metrics JSON files)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=2.0,
        help="largest allowed regression per metric, in points (with --compare)",
    )
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    from jaxalign.errors import UserError

    try:
        if args.command not in {"plan", "shardings", "tokenizer"}:
            from jaxalign import distributed

            distributed.initialize()  # no-op unless the environment describes a cluster
        configure_logging()
        return args.func(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
