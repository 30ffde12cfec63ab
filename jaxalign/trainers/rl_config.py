"""The `rl` config section of the on-policy RL trainers (ppo, grpo, rloo, reinforce_pp). Light
(no jax): `jaxalign/config.py` loads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RLConfig:
    """On-policy RL (`trainer: ppo | grpo | rloo | reinforce_pp`); formulas in
    docs/trainers/{ppo,grpo}.md.

    A rollout samples `num_generations` completions for each of `prompts_per_rollout` prompts
    (data.train_file) = R rows, then trains `epochs` passes over them in shuffled minibatches of
    train.batch_size rows: one rollout is epochs * R / train.batch_size optimizer steps, and
    train.steps counts optimizer steps. Rows are [P prompt tokens, left padded | N response
    tokens], P the data.prompt_buckets entry of the rollout's prompts and N the response_buckets
    entry that fits its longest response; train.seq_len must equal the widest row,
    max(data.prompt_buckets) + sampling.max_new_tokens.
    """

    prompts_per_rollout: int = 16  # prompts sampled per rollout (global)
    num_generations: int = 1  # samples per prompt; GRPO/RLOO's group size (>= 2)
    epochs: int = 1  # passes over each rollout (PPO epochs)
    # Scores: the sum of these reward functions ("module:fn" or "file.py:fn", called as
    # fn(prompts, completions, **record_fields)) and of the reward model run's score, if any.
    reward_functions: list[str] = field(default_factory=list)
    reward_model: str | None = None  # an RM run dir or a HF sequence classifier (same tokenizer)
    normalize_reward_model: bool = True  # (r - mean) / std with the run's reward_stats.json
    # Weights of rl.reward_functions, then the reward model (TRL's reward_weights); None: 1 each.
    reward_weights: list[float] | None = None
    missing_eos_penalty: float | None = None  # subtracted from the score of rows with no stop
    reward_clip: float | None = None  # scores clipped to [-c, c] (after the penalty)
    whiten_rewards: bool = False  # PPO: scale per-token rewards to unit variance (mean kept)
    kl_estimator: Literal["k1", "k2", "k3"] | None = None  # None: ppo k1, grpo/rloo k3
    kl_clamp: float | None = None  # per-token KL estimate clipped to [-c, c]
    kl_coef: float = 0.05  # PPO: reward penalty (initial, if adaptive); GRPO/RLOO: loss weight
    # PPO/REINFORCE++ adaptive KL: the target per-sequence KL (None: a fixed coefficient)
    kl_target: float | None = None
    kl_horizon: float = 10000.0  # PPO adaptive KL horizon, in sequences
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # PPO: masked whitening over the whole rollout
    whiten_unbiased: bool = True  # whitening variance: / (n - 1) (true) or / n
    clip_eps: float = 0.2  # policy ratio clip
    clip_eps_high: float | None = None  # upper ratio clip 1 + this (DAPO); None: clip_eps
    value_clip: float = 0.2  # PPO value clip around the rollout's values
    vf_coef: float = 0.1  # PPO value-loss weight
    entropy_coef: float = 0.0  # entropy bonus weight (subtracted from the loss)
    value_init_from: str | None = None  # PPO value model: an RM run; None: the policy + zero head
    # PPO/GRPO ratio denominator: a training-forward pass after the rollout, or the sampler's
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    scale_rewards: bool = True  # GRPO: divide by the group's std (false: Dr. GRPO)
    # reinforce_pp: center each score on its group's mean first (REINFORCE++-baseline; G >= 2)
    reinforce_baseline: bool = False
    # GRPO/RLOO importance ratio: per token, or GSPO's one length-normalized ratio per sequence
    # (clipped as a whole; GSPO clips at ~3e-4 / 4e-4: rl.clip_eps / rl.clip_eps_high).
    importance_sampling: Literal["token", "sequence"] = "token"
    # GRPO/RLOO: a mean over the minibatch's tokens, of per-sequence means, or (Dr. GRPO) the
    # token sum over sequences x sampling.max_new_tokens (docs/trainers/grpo.md).
    loss_aggregation: Literal["token_mean", "sequence_mean", "token_sum_norm"] = "token_mean"
    # GRPO/RLOO: responses that never emitted a stop token (cut at sampling.max_new_tokens) get
    # no loss (their tokens weigh 0; they still count in their group's statistics). TRL's
    # mask_truncated_completions, DAPO's overlong filtering.
    mask_truncated_completions: bool = False
    # GRPO/RLOO, DAPO's dynamic sampling: groups whose scores are all equal (zero advantage, no
    # policy gradient) are left out and more batches of prompts sampled until the rollout has
    # prompts_per_rollout groups with a spread, at most max_generate_rounds batches; short of
    # that, left-out groups fill the rest.
    filter_groups: bool = False
    max_generate_rounds: int = 4
    # PPO with model.lora: the value model is a second set of adapters plus a value head on the
    # policy's frozen base (adapters: one copy of the base), or a separate model of its own,
    # initialized from the base (or rl.value_init_from) and trained in full (separate).
    lora_critic: Literal["adapters", "separate"] = "adapters"
    # With model.lora, what the rollout samples with: the adapters applied in every decode
    # step (unmerged), or W + scale * A @ B computed once per rollout into a temporary copy of
    # the adapted weights (merged; measured faster: docs/performance.md).
    lora_sampling: Literal["merged", "unmerged"] = "merged"
    # How rollouts sample: continuous batching (a fixed set of decode slots, each refilled with
    # the next prompt or episode turn as soon as its row ends; a GRPO group's prompt prefilled
    # once) or static batches of sampling.batch_size prompts that decode until their longest
    # row ends. The same rows for a seed either way; sampling penalties use static batches.
    sampler: Literal["continuous", "static"] = "continuous"
    offload_frozen: bool = False  # keep the reference (and RM) in host memory between rollouts
    # Rows per log-prob forward (policy, reference, values) after generation; 0: all rows in one.
    # The [rows, N, V] float32 logits of that forward dominate a large model's rollout memory.
    forward_batch_size: int = 0
    # Response widths a rollout's rows are trimmed to: the smallest that fits its longest
    # response (sampling.max_new_tokens is always one). Fewer padded tokens in the log-prob
    # forwards and train steps, at one compilation per (prompt bucket, response bucket) shape.
    # None: 16, 32, 64, ... below max_new_tokens; [] or [max_new_tokens]: no trimming.
    response_buckets: list[int] | None = None
    # Train steps and the rollout's log-prob/value forwards on packed rows: up to this many
    # rollout sequences (prompt + response, without their padding) share one row, each its own
    # attention segment; fewer rows where responses are short. 0 or 1: one sequence per row.
    pack_rows: int = 0
    # Greedy evals on data.eval_file every N rollouts (0: off): the pass rate, or with
    # rl.environment one episode per record (success rate, turns, tool calls and errors).
    eval_every: int = 0
    eval_prompts: int = 0  # how many eval prompts (0: all)
    # PPO-ptx (InstructGPT): every optimizer step adds ptx_coef x the mean next-token loss of
    # ptx_batch_size rows of ptx_file (SFT-format records: text, prompt/completion or messages;
    # packed to train.seq_len like SFT data), so the policy keeps what RL would otherwise erode.
    ptx_coef: float = 0.0  # 0: off
    ptx_file: str | None = None  # any source data.train_file accepts
    ptx_batch_size: int = 0  # global rows per optimizer step (0: train.batch_size)
    # Multi-turn episodes (docs/trainers/grpo.md, "Environments and tools"): an environment
    # (a bundled name, calculator or format_checker; "module:Class" or "file.py:Class") whose
    # observations (e.g. tool results) alternate with the model's turns. Its rewards replace
    # rl.reward_functions / rl.reward_model. The episode after the first prompt (model and
    # observation tokens) fits sampling.max_new_tokens; only the model's tokens are trained.
    environment: str | None = None
    max_turns: int = 4  # model turns per episode
    turn_tokens: int = 0  # model tokens per turn (0: sampling.max_new_tokens)
    tool_call_format: Literal["hermes", "llama3"] = "hermes"  # how the model writes a call
    tool_timeout: float = 5.0  # seconds a turn's tool calls may run; later ones are cut off
    tool_max_chars: int = 4096  # a tool result's characters; longer ones are cut with a note
    # Per-turn rewards (ppo, reinforce_pp): each environment step's reward on the last token of
    # the model turn it answers, so returns credit each turn with what came after it. False: one
    # reward per episode (the sum of its step rewards) on its last model token.
    turn_rewards: bool = False
