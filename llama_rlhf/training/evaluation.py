"""Generation-based checks during training: GRPO's held-out evaluation (--eval_file: sampled with the rollout
engine, scored with the training rewards, logged as eval/<reward>, eval/mean@n, eval/pass@k, eval/maj@n) and
SFT's sample tracking (--sample_prompts_file: a few fixed prompts answered greedily, logged as "samples").

Both read their prompts before the model is loaded (a bad file fails at start-up), run on every rank (prompts
dealt over the DP x SP replicas, as solver_generate does) and return their values on global rank 0 ({} elsewhere).
They run at step 0 (before the first update of a new run), every N steps, and at the last step.
"""
from __future__ import annotations

from ..inference.batch_generate import generate_rows, read_prompts
from ..data.readers import read_records
from ..rewards import check_required_fields
from ..runtime import log
from ..inference.sampling import SamplingParams
from ..inference.scoring import default_pass_k, format_table, summarize

EVAL_SEED = 977  # one random stream for every evaluation of a run: scores move with the policy, not the dice


def due(step: int, every: int, last_step: int) -> bool:
    """Whether a check runs after ``step`` updates: at 0, every ``every`` steps (0: never between), and the last."""
    return step == 0 or step == last_step or (every > 0 and step % every == 0)


class HeldOutEval:
    """GRPO's --eval_file: n samples per held-out prompt at the rollout temperature, scored like the training
    rollouts."""

    def __init__(self, args, tok, rewards, ps, max_prompt_len: int):
        path = args.eval_file
        check_required_fields(rewards, read_records(path))
        self.prompts = read_prompts(path, tok, args.use_chat_template, args.system_prompt, max_prompt_len + 1,
                                    refuse_too_long=False)
        self.n = args.eval_num_samples or args.num_samples_per_prompt
        self.params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens, self.n)
        self.args, self.tok, self.rewards, self.ps = args, tok, rewards, ps
        log(f"{path}: {len(self.prompts)} held-out prompts x {self.n} samples, evaluated at step 0"
            + (f", every {args.eval_steps} steps" if args.eval_steps else "") + " and at the end", ps)

    def __call__(self, model, step: int, compute_dtype) -> dict:
        args = self.args
        rows = generate_rows(self.prompts, model, self.tok, self.ps, self.params,
                             max_batch_size=args.rollout_batch_size or args.max_batch_size * self.n,
                             max_seq_len=args.max_seq_len, seed=args.seed * 1_000_003 + EVAL_SEED,
                             compute_dtype=compute_dtype, rewards=self.rewards)
        if rows is None:
            return {}
        summary = summarize(rows, [name for name, _, _ in self.rewards], default_pass_k(self.n))
        log(f"eval at step {step}: " + format_table(summary))
        return {f"eval/{k[len('reward/'):] if k.startswith('reward/') else k}": v for k, v in summary.items()
                if k not in ("samples_per_prompt", "correct_by", "maj_prompts")}


class SampleTracker:
    """SFT's --sample_prompts_file: each prompt answered greedily, the answers logged as the record's "samples"."""

    def __init__(self, args, tok, ps):
        self.prompts = read_prompts(args.sample_prompts_file, tok, args.use_chat_template, args.system_prompt,
                                    args.max_seq_len, refuse_too_long=False)
        self.params = SamplingParams(0.0, 1.0, 0, args.sample_max_new_tokens, 1)
        self.args, self.tok, self.ps = args, tok, ps
        log(f"{args.sample_prompts_file}: {len(self.prompts)} prompts answered greedily at step 0"
            + (f", every {args.sample_steps} steps" if args.sample_steps else "") + " and at the end", ps)

    def __call__(self, model, step: int, compute_dtype) -> dict:
        rows = generate_rows(self.prompts, model, self.tok, self.ps, self.params,
                             max_batch_size=self.args.max_batch_size, max_seq_len=self.args.max_seq_len,
                             seed=self.args.seed, compute_dtype=compute_dtype)
        if rows is None:
            return {}
        answers = [r["output"][0] for r in rows]
        for i, answer in enumerate(answers):
            log(f"  [sample {i} at step {step}] {answer[:300]!r}")
        return {"samples": answers}
