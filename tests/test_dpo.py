"""Preference optimization (solver_dpo.py): loss math against TRL and by hand, sharded parity, end to end.

- Every loss type on the same per-token log-probs equals TRL's own computation (DPOTrainer._compute_loss for
  sigmoid / hinge / ipo and the sft term, CPOTrainer.cpo_loss for simpo and label smoothing) within 1e-10 (fp64),
  and hand-computed values; our vocab-parallel sequence log-probs equal transformers' log-softmax of the same
  model on the same tokens (1e-4, fp32).
- MP=2 x DP=2, SP=2 x DP=2 and MP=2 x SP=2 (world 4, fp64): reference table, loss and every gradient equal the
  single process (1e-10), for each loss type, with two micro-batches per rank and a padding pair.
- End to end on a tiny chat model: preference accuracy on the training pairs rises; resume is exact.
- Bad input: empty chosen / rejected is a one-line error; identical pairs are a counted skip; a prompt too long
  for --max_seq_len is cut from the left (the responses stay whole).
"""
import json
import math
import os
import shutil
import types
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

from llama_rlhf.data.packing import Row
from llama_rlhf.data.pairs import Pair
from llama_rlhf.models.config import ModelConfig
from llama_rlhf.models.init import init_weights
from llama_rlhf.models.pretrained import build_model
from llama_rlhf.parallel.cross_entropy import IGNORE_INDEX
from llama_rlhf.parallel.layers import take_shard
from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.training.distributed_optimizer import DistributedAdamW
from llama_rlhf.training.dpo import dpo_backward, pair_batch, reference_logps, sequence_logps
from llama_rlhf.training.dpo_loss import PreferenceLoss, pair_losses, step_loss
from tests.distributed import assert_check, grid, run_checks
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, torchrun

DATA = os.path.join(ROOT, "examples", "data", "dpo_arithmetic.jsonl")
CONFIGS = [PreferenceLoss("sigmoid", 0.1), PreferenceLoss("sigmoid", 0.3, label_smoothing=0.2, sft_weight=0.5),
           PreferenceLoss("hinge", 0.5), PreferenceLoss("ipo", 0.2), PreferenceLoss("simpo", 2.0, simpo_gamma=0.5),
           PreferenceLoss("simpo", 2.5, label_smoothing=0.1, simpo_gamma=1.0, sft_weight=0.3)]


# ---- loss math: by hand and against TRL ------------------------------------------------------------------------

def test_losses_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    chosen, rejected, ref_c, ref_r, n_c, n_r = t(-1.0), t(-2.0), t(-1.5), t(-1.5), t(2.0), t(4.0)
    # d = (-1 + 1.5) - (-2 + 1.5) = 1
    expect = {"sigmoid": math.log1p(math.exp(-0.1)), "hinge": 0.9, "ipo": (0.5 / 2 + 0.5 / 4 - 5) ** 2,
              "simpo": math.log1p(math.exp(0.1 * 5))}  # simpo: beta (-1/2 + 2/4 - 0.5 / 0.1) = -0.5
    for loss_type, value in expect.items():
        losses, rc, rr = pair_losses(PreferenceLoss(loss_type, 0.1), chosen, rejected, ref_c, ref_r, n_c, n_r)
        assert abs(losses.item() - value) < 1e-12, (loss_type, losses.item(), value)
    cdpo = pair_losses(PreferenceLoss("sigmoid", 0.1, 0.25), chosen, rejected, ref_c, ref_r, n_c, n_r)
    assert abs(cdpo[0].item() - (0.75 * math.log1p(math.exp(-0.1)) + 0.25 * math.log1p(math.exp(0.1)))) < 1e-12
    assert abs(cdpo[1].item() - 0.05) < 1e-12 and abs(cdpo[2].item() + 0.05) < 1e-12  # beta x log-ratio
    # the step loss: pair mean plus sft_weight x token-mean NLL of the chosen responses
    share = step_loss(PreferenceLoss(sft_weight=2.0), t(1.0, 3.0), t(-4.0, -6.0), 2, 5)
    assert abs(share.item() - (2.0 + 2.0 * 10 / 5)) < 1e-12


def trl_dpo_loss(cfg: PreferenceLoss, per_token, completion_mask, ref_c, ref_r):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs (a stand-in model returns them)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    s1 = per_token.shape[1]
    out = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    model = types.SimpleNamespace(training=True)
    acc = types.SimpleNamespace(device=per_token.device, gather=lambda x: x, gather_for_metrics=lambda x: x)
    loss_types = [cfg.loss_type] + (["sft"] if cfg.sft_weight else [])
    fake = types.SimpleNamespace(model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                                 precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
                                 loss_weights=[1.0] + ([cfg.sft_weight] if cfg.sft_weight else []), beta=cfg.beta,
                                 label_smoothing=cfg.label_smoothing, use_weighting=False,
                                 _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(per_token.shape[0], s1 + 1, dtype=torch.long),
              "attention_mask": torch.ones(per_token.shape[0], s1 + 1, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(fake, lambda **kw: out, inputs, False), fake._metrics["train"]


def trl_cpo_loss(cfg: PreferenceLoss, chosen, rejected):
    """TRL's CPOTrainer.cpo_loss (simpo, and the label-smoothed sigmoid) on given sequence scores."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    fake = types.SimpleNamespace(alpha=0.0, loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                 simpo_gamma=cfg.simpo_gamma, accelerator=types.SimpleNamespace(device=chosen.device))
    return CPOTrainer.cpo_loss(fake, chosen, rejected)


def our_loss(cfg, per_token, mask, ref_c, ref_r):
    """Our loss of the whole batch (single process) from per-token log-probs [2P, S - 1] (0 where not trained)."""
    seq, counts = per_token.sum(-1), mask.sum(-1)
    chosen, rejected = seq.chunk(2)
    n_c, n_r = counts.chunk(2)
    losses, rc, rr = pair_losses(cfg, chosen, rejected, ref_c, ref_r, n_c, n_r)
    return step_loss(cfg, losses, chosen, len(chosen), int(n_c.sum())), rc, rr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


def demo_pairs(tok, n: int, max_len: int = 128):
    from llama_rlhf.data.readers import read_records
    from llama_rlhf.data.samples import DatasetStats, pair_arrays
    pairs, stats = [], DatasetStats()
    for where, obj in read_records(DATA):
        sides = pair_arrays(obj, tok, True, None, max_len, where, stats)
        rows = [Row(ids, labels, list(range(len(ids))), [0] * len(ids)) for ids, labels in sides]
        pairs.append(Pair(len(pairs), *rows))
        if len(pairs) == n:
            return pairs


def test_losses_equal_trl_on_our_model_and_tokens(tiny_model):
    """Our sequence log-probs of real pairs = transformers' on the same model; every loss = TRL's on them."""
    from transformers import AutoModelForCausalLM

    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.tokenizer import load_tokenizer
    from llama_rlhf.training.logprobs import token_logprobs
    tok = load_tokenizer(tiny_model, model_type="llama-hf")
    pairs = demo_pairs(tok, 4)
    ps = single_process_state()
    batch = pair_batch(pairs, tok.pad_id, ps)
    model = load_pretrained(tiny_model, "llama-hf", ps).eval()
    with torch.no_grad():
        ours, _ = token_logprobs(model, batch, ps, 1.0, torch.float32)  # [2P, S]
        seq, _ = sequence_logps(model, batch, ps, torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        logits = hf(batch["input_ids"], attention_mask=(batch["labels"] != IGNORE_INDEX).long() | 1).logits
    mask = batch["labels"] != IGNORE_INDEX
    hf_lp = torch.log_softmax(logits.float(), -1).gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    hf_seq = (hf_lp * mask).sum(-1)
    assert (seq - hf_seq).abs().max().item() < 1e-4 * hf_seq.abs().max().item(), (seq, hf_seq)
    assert torch.allclose(seq, ours.sum(-1))
    # TRL's conventions on the same per-token log-probs, in fp64: TRL's completion mask is unshifted
    per_token = ours[:, :-1].double()
    shifted_mask = mask[:, :-1]
    completion_mask = torch.cat([torch.zeros_like(mask[:, :1]), shifted_mask], dim=1).long()
    g = torch.Generator().manual_seed(0)
    chosen, rejected = per_token.sum(-1).chunk(2)
    ref_c, ref_r = chosen + torch.randn(4, generator=g, dtype=torch.float64), rejected + torch.randn(
        4, generator=g, dtype=torch.float64)
    worst = 0.0
    for cfg in CONFIGS:
        ours_loss, rc, rr = our_loss(cfg, per_token, shifted_mask.double(), ref_c, ref_r)
        if cfg.loss_type != "simpo" and not cfg.label_smoothing:
            trl_loss, trl_metrics = trl_dpo_loss(cfg, per_token, completion_mask, ref_c, ref_r)
            assert abs(trl_metrics["rewards/margins"][0] - (rc - rr).mean().item()) < 1e-10
            assert abs(trl_metrics["rewards/accuracies"][0] - (rc > rr).double().mean().item()) < 1e-12
        else:  # CPO's: the sigmoid on log-ratios (smoothed), or simpo on average log-probs
            n_c, n_r = shifted_mask.double().sum(-1).chunk(2)
            a, b = (chosen / n_c, rejected / n_r) if cfg.loss_type == "simpo" else (chosen - ref_c, rejected - ref_r)
            losses, trl_rc, trl_rr = trl_cpo_loss(cfg, a, b)
            nll = -(per_token[:4] * shifted_mask[:4]).sum() / shifted_mask[:4].sum()
            trl_loss = losses.mean() + cfg.sft_weight * nll
            if cfg.loss_type == "simpo":
                assert torch.allclose(trl_rc, rc, atol=1e-12) and torch.allclose(trl_rr, rr, atol=1e-12)
        err = abs(ours_loss.item() - trl_loss.item())
        assert err < 1e-10, f"{cfg}: ours {ours_loss.item()} vs TRL {trl_loss.item()}"
        worst = max(worst, err)
    print(f"loss vs TRL: worst |diff| {worst:.1e} over {len(CONFIGS)} configurations")


# ---- sharded parity -------------------------------------------------------------------------------------------

LLAMA = dict(model_type="llama-hf", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (MP, SP) in world 4; DP = 4 / (MP x SP)
PAD = 0


def synthetic_pairs(n: int) -> list:
    """Pairs with a shared prompt and responses of different lengths (odd totals: SP pads them)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 61, (3 + i % 3,), generator=g).tolist()
        sides = []
        for length in (4 + i % 4, 6 - i % 3):
            ids = prompt + torch.randint(1, 61, (length,), generator=g).tolist()
            labels = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):] + [IGNORE_INDEX]
            sides.append(Row(ids, labels, list(range(len(ids))), [0] * len(ids)))
        out.append(Pair(i, *sides))
    return out


def new_model(ps, seed: int):
    model = build_model(ModelConfig(**LLAMA), ps, torch.float64)
    init_weights(model, seed)
    return model


def check_sharded_equals_single_process():
    pairs = synthetic_pairs(7)  # 7 pairs + 1 padding: 8 rows, 4 per DP rank when DP = 2
    micro_pairs = 2
    single = single_process_state()
    ref_table = reference_logps(new_model(single, 11), pairs, single, torch.float64, PAD, 3, lora=False)
    chosen_tokens = sum(sum(1 for t in p.chosen.labels if t != IGNORE_INDEX) for p in pairs)
    padded = pairs + [None]
    for cfg in CONFIGS:
        model = new_model(single, 5)
        opt = DistributedAdamW(model, single, stage=0, lr=1e-3)
        expect = dpo_backward(model, opt, [padded], ref_table, cfg, single, torch.float64, PAD, len(pairs),
                              chosen_tokens)
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for mp, sp in LAYOUTS:
            ps = grid(mp, sp)
            where = f"{cfg.loss_type} (MP,SP,DP)=({mp},{sp},{ps.dp_size})"
            table = reference_logps(new_model(ps, 11), pairs, ps, torch.float64, PAD, 2, lora=False)
            assert (table - ref_table).abs().max().item() < 1e-10, f"{where}: reference table differs"
            model = new_model(ps, 5)
            opt = DistributedAdamW(model, ps, stage=0, lr=1e-3)
            per = len(padded) // ps.dp_size
            mine = padded[ps.dp_rank * per:(ps.dp_rank + 1) * per]
            micro = [mine[i:i + micro_pairs] for i in range(0, len(mine), micro_pairs)]
            got = dpo_backward(model, opt, micro, table, cfg, ps, torch.float64, PAD, len(pairs), chosen_tokens)
            for key, value in expect.items():
                assert abs(got[key] - value) < 1e-10 * max(1.0, abs(value)), f"{where}: {key} {got[key]} vs {value}"
            for name, p in model.named_parameters():
                full = take_shard(ref_grads[name], p.shard)
                err = (p.grad - full).abs().max().item() / full.abs().max().clamp(min=1e-30).item()
                assert err < 1e-10, f"{where}: gradient of {name} differs by {err:.1e} (relative)"
    if dist.get_rank() == 0:
        print(f"sharded = single process (1e-10, fp64) for {len(CONFIGS)} losses x layouts {LAYOUTS}")


def test_sharded_loss_and_gradients_equal_single_process():
    report = run_checks(4, [check_sharded_equals_single_process])
    assert_check(report, "check_sharded_equals_single_process")


# ---- data: formats and bad input --------------------------------------------------------------------------------

def test_preference_shapes_and_bad_input(tiny_model):
    from llama_rlhf.data.samples import DatasetStats, pair_arrays
    from llama_rlhf.jsonl import DataError
    from llama_rlhf.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_model, model_type="llama-hf")
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    good, bad = "2 + 2 = 4. The answer is 4.", "2 + 2 = 5. The answer is 5."
    shapes = [{"instruction": user[0]["content"], "chosen": good, "rejected": bad},
              {"prompt": user, "chosen": [{"role": "assistant", "content": good}],
               "rejected": [{"role": "assistant", "content": bad}]},
              {"messages": user, "chosen": good, "rejected": bad},
              {"chosen": user + [{"role": "assistant", "content": good}],
               "rejected": user + [{"role": "assistant", "content": bad}]}]
    stats = DatasetStats()
    rendered = [pair_arrays(obj, tok, True, None, 128, f"x:{i}", stats) for i, obj in enumerate(shapes)]
    assert all(r == rendered[0] for r in rendered), "the four shapes of one pair must give the same tokens"
    (c_ids, c_labels), (r_ids, r_labels) = rendered[0]
    trained = [t for t in c_labels if t != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=True).strip() == good  # the loss is on the response only
    # a string prompt without a chat template is continued exactly as written
    raw = pair_arrays({"prompt": "Q: 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"}, tok, False, None, 64, "r", stats)
    assert tok.decode(raw[0][0]) == tok.decode(tok.encode("Q: 2 + 2?\nA:", add_bos=tok.adds_bos)) + " 4" + \
        tok.decode([tok.eos_id])
    for obj, fragment in (({"prompt": "Q", "chosen": "", "rejected": "no"}, "'chosen' is empty"),
                          ({"prompt": "Q", "chosen": "yes", "rejected": "  "}, "'rejected' is empty"),
                          ({"prompt": user, "chosen": [], "rejected": bad}, "'chosen' must be a non-empty list"),
                          ({"prompt": "Q", "chosen": "yes"}, "needs 'chosen' and 'rejected'"),
                          ({"chosen": "yes", "rejected": "no"}, "no 'prompt'")):
        with pytest.raises(DataError, match=fragment) as info:
            pair_arrays(obj, tok, True, None, 64, "prefs.jsonl:7", stats)
        assert str(info.value).startswith("prefs.jsonl:7: ") and "\n" not in str(info.value)
    counted = DatasetStats()
    assert pair_arrays({"prompt": user, "chosen": good, "rejected": good}, tok, True, None, 128, "s", counted) == []
    assert counted.skipped_identical == 1 and counted.samples == 0 and "1 pairs skipped (chosen = rejected)" in \
        counted.describe()
    long_prompt = {"prompt": "many words " * 200, "chosen": good, "rejected": bad}
    (ids_c, labels_c), (ids_r, labels_r) = pair_arrays(long_prompt, tok, True, None, 64, "l", counted)
    assert len(ids_c) <= 64 and len(ids_r) <= 64 and counted.truncated == 2
    assert tok.decode([t for t in labels_c if t != IGNORE_INDEX], skip_special_tokens=True).strip() == good


# ---- end to end -------------------------------------------------------------------------------------------------

def dpo_args(ckpt, data, save_dir, *extra):
    return ["--ckpt_dir", ckpt, "--train_file", data, "--save_dir", save_dir, "--use_chat_template", "true",
            "--max_seq_len", "96", "--max_batch_size", "4", "--lr", "5e-3", "--dtype", "float32",
            "--lr_scheduler", "constant", "--beta", "0.5", *extra]


def metrics(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_accuracy_rises_and_resume_is_exact(tiny_model, tmp_path):
    from safetensors.torch import load_file
    data = tmp_path / "prefs.jsonl"
    with open(DATA) as f:
        data.write_text("".join(f.readlines()[:8]))
    out = str(tmp_path / "run")
    args = dpo_args(tiny_model, str(data), out, "--epochs", "8", "--max_steps", "10", "--save_steps", "8",
                    "--eval_file", str(data), "--eval_steps", "10")
    proc = torchrun("solver_dpo.py", args, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, *seen = metrics(out)
    # step 0: the held-out evaluation before any update (the policy is its reference: margins 0, loss log 2)
    assert before["step"] == 0 and before["eval_rewards/accuracies"] == 0.0, before
    assert before["eval_rewards/margins"] == 0.0 and abs(before["eval_loss"] - math.log(2)) < 1e-6, before
    assert len(seen) == 10 and all(k in seen[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                          "rewards/accuracies", "logps/chosen", "logps/rejected"))
    # the policy starts as its own reference: every margin is 0, the loss log 2
    assert seen[0]["rewards/accuracies"] == 0.0 and abs(seen[0]["loss"] - math.log(2)) < 1e-6, seen[0]
    assert seen[-1]["eval_rewards/accuracies"] == 1.0 and seen[-1]["eval_rewards/margins"] > 0.1, seen[-1]
    assert seen[-1]["loss"] < 0.6 * seen[0]["loss"], (seen[0]["loss"], seen[-1]["loss"])
    assert "accuracy" in proc.stdout and "pairs/s" in proc.stdout
    # resume from checkpoint-8: the same steps 9 and 10, the same weights
    again = str(tmp_path / "again")
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("checkpoint-10"))
    proc = torchrun("solver_dpo.py", dpo_args(tiny_model, str(data), again, "--epochs", "8", "--max_steps", "10",
                                              "--save_steps", "8", "--resume", "true"), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "reference log-probs of" not in proc.stdout  # table read back
    resumed = metrics(again)
    assert [m["step"] for m in resumed] == list(range(0, 11))  # no second step-0 evaluation on resume
    for a, b in zip(seen[8:], resumed[9:]):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-6, (a, b)
    w1 = load_file(os.path.join(out, "checkpoint-10", "model.safetensors"))
    w2 = load_file(os.path.join(again, "checkpoint-10", "model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6


def test_bad_flags_are_one_line_errors(tiny_model, tmp_path):
    from tests.launch import launch_ranks
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": "", "rejected": "no"}) + "\n")
    for extra, fragment in ((["--loss_type", "ipo", "--label_smoothing", "0.1"], "--label_smoothing applies"),
                            (["--beta", "0"], "--beta 0.0 is not valid"),
                            ([], "prefs.jsonl:1: 'chosen' is empty")):
        results = launch_ranks("solver_dpo.py", dpo_args(tiny_model, str(data), str(tmp_path / "o"), *extra), 2)
        for r in results:
            assert r.returncode != 0 and fragment in r.stdout + r.stderr, (extra, r.stdout[-500:], r.stderr[-800:])
            assert "Traceback" not in r.stderr


def test_lora_reference_is_the_adapters_off_model(tiny_model, tmp_path):
    """With LoRA the reference is the same model with its adapters off: recomputed on resume from a trained
    adapter (its file deleted), the table equals the one the base computed at the start."""
    import numpy as np
    data = tmp_path / "prefs.jsonl"
    with open(DATA) as f:
        data.write_text("".join(f.readlines()[:4]))
    out = str(tmp_path / "lora")
    lora = ["--lora_rank", "4", "--lora_alpha", "8", "--epochs", "3", "--max_steps", "3", "--save_steps", "2"]
    proc = torchrun("solver_dpo.py", dpo_args(tiny_model, str(data), out, *lora), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = metrics(out)
    assert seen[-1]["rewards/margins"] != 0.0  # the adapter moved the policy away from the reference
    (table_file,) = [os.path.join(out, "reference_logps", n) for n in os.listdir(os.path.join(out, "reference_logps"))]
    first = np.load(table_file, allow_pickle=False)
    os.remove(table_file)
    shutil.rmtree(os.path.join(out, "checkpoint-3"))
    proc = torchrun("solver_dpo.py", dpo_args(tiny_model, str(data), out, *lora, "--resume", "true"), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "reference log-probs of 4 pairs" in proc.stdout
    again = np.load(table_file, allow_pickle=False)
    assert np.abs(again - first).max() < 1e-4, (first, again)
    assert abs(metrics(out)[-1]["loss"] - seen[-1]["loss"]) < 1e-5


# ---- the demo's data and plot ------------------------------------------------------------------------------------

def question(record: dict) -> str:
    """The user turn of a demo pair in any of its three shapes."""
    if "instruction" in record:
        return record["instruction"]
    turns = record["prompt"] if "prompt" in record else record["chosen"][:-1]
    (user,) = [t["content"] for t in turns if t["role"] == "user"]
    return user


def test_demo_held_out_pairs_are_disjoint_from_training():
    read = lambda path: [json.loads(line) for line in open(path, encoding="utf-8")]  # noqa: E731
    train, held = read(DATA), read(DATA.replace(".jsonl", "_heldout.jsonl"))
    assert len(train) == 300 and len(held) == 60
    train_q, held_q = {question(r) for r in train}, [question(r) for r in held]
    assert len(set(held_q)) == 60 and not train_q & set(held_q)
    shapes = {("instruction" in r, "prompt" in r) for r in held}
    assert shapes == {(True, False), (False, True), (False, False)}  # all three record shapes
    for r in held:
        assert r["chosen"] != r["rejected"]


def test_plot_draws_dpo_metrics(tmp_path):
    import matplotlib.image

    from llama_rlhf.plot import panels, plot_run
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")
    evals = lambda s: {f"eval_{k}": 0.1 * s for k in keys}  # noqa: E731
    records = [{"step": 0, **evals(0)}] + [{"step": s, **{k: 0.2 * s for k in keys}, "grad_norm": 1.0 / s,
                                            **(evals(s) if s % 2 == 0 else {})} for s in range(1, 5)]
    kind, chosen = panels(records)
    titles = dict(chosen)
    assert kind == "dpo" and len(chosen) == 6
    assert titles["preference accuracy (chosen reward > rejected)"] == ["rewards/accuracies",
                                                                        "eval_rewards/accuracies"]
    assert titles["reward margin (chosen - rejected)"] == ["rewards/margins", "eval_rewards/margins"]
    assert titles["rewards (beta x log-ratio to the reference)"] == [
        "rewards/chosen", "eval_rewards/chosen", "rewards/rejected", "eval_rewards/rejected"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    image = matplotlib.image.imread(plot_run(str(tmp_path)))
    assert image.shape[0] > 600 and image.shape[1] > 600 and image.std() > 0.01  # 3 x 2 panels, drawn
