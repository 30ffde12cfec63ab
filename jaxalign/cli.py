"""The `jaxalign` command line.

    jaxalign train CONFIG [--set a.b=c ...]      run the trainer the config names
    jaxalign shardings CONFIG [--set ...]        print the mesh and every parameter's sharding
    jaxalign tokenizer train --input F --vocab-size N [--output PREFIX]

Errors in user input print one line (`error: ...`) and exit with status 2; `--debug` shows the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _enable_compilation_cache() -> None:
    import jax

    cache_dir = os.environ.get("JAXALIGN_COMPILATION_CACHE",
                               str(Path.home() / ".cache" / "jaxalign" / "xla"))
    if cache_dir and cache_dir != "off":
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.steps=10")


def cmd_train(args: argparse.Namespace) -> int:
    from jaxalign.config import load_config
    from jaxalign.trainers import make_algorithm
    from jaxalign.trainers.loop import Trainer

    cfg = load_config(args.config, args.overrides)
    _enable_compilation_cache()
    trainer = Trainer(cfg, make_algorithm(cfg))
    result = trainer.run()
    if result.history and trainer.mesh.devices.flat[0].process_index == 0:
        first, last = result.history[0], result.history[-1]
        state = "stopped (preempted)" if result.preempted else "done"
        print(f"[jaxalign] {state} at step {result.final_step}: loss {first['loss']:.4f} "
              f"(step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); "
              f"run dir {cfg.run_dir}")
    return 0


def cmd_shardings(args: argparse.Namespace) -> int:
    from jaxalign import sharding as shd
    from jaxalign.config import load_config
    from jaxalign.trainers.loop import build_model

    cfg = load_config(args.config, args.overrides)
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.sharding)
    _, shapes, shardings = build_model(cfg, mesh, rules)
    shd.validate_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh, rules)
    print(shd.describe(shapes, shardings, mesh))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from jaxalign.data import train_tokenizer

    output = args.output or str(Path(args.input[0]).with_suffix("")) + ".tokenizer"
    path = train_tokenizer(args.input, output, args.vocab_size, seed=args.seed)
    print(f"[jaxalign] wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the trainer a config names")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("shardings", help="print the mesh and every parameter's sharding")
    _add_config_args(p)
    p.set_defaults(func=cmd_shardings)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a SentencePiece tokenizer")
    t.add_argument("--input", action="append", required=True, help="JSONL or text file")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", help="output prefix (writes PREFIX.model)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tokenizer_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxalign.errors import UserError

    try:
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
