"""fp16 training with dynamic loss scaling: the scaler's arithmetic, and SFT on a tiny model in fp16 whose
first steps overflow (a deliberately high starting scale), back off, then train cleanly; resume restores it."""
import json
import os
import shutil

import pytest
import torch

from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.training.loss_scale import DynamicLossScaler
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT


def test_scaler_backs_off_and_grows():
    s = DynamicLossScaler(scale=8.0, growth_interval=3, min_scale=2.0)
    seen = []
    for overflow in (True, False, False, False, False, True, True, True):
        s.update(overflow)
        seen.append((s.scale, s.good_steps))
    assert seen == [(4.0, 0), (4.0, 1), (4.0, 2), (8.0, 0), (8.0, 1), (4.0, 0), (2.0, 0), (2.0, 0)]
    again = DynamicLossScaler()
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert again == s


def sft(ckpt, out, steps, *extra):
    import solver_train
    from llama_rlhf.training.sft import train
    args = solver_train.parse_args([
        "--ckpt_dir", ckpt, "--train_file", os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl"),
        "--save_dir", out, "--dtype", "float16", "--use_chat_template", "--max_seq_len", "64", "--max_batch_size",
        "2", "--lr", "1e-2", "--lr_scheduler", "constant", "--max_steps", str(steps), "--save_steps", "5",
        "--initial_loss_scale", str(2.0 ** 20), *extra])
    train(args, single_process_state(), torch.float16)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def scaler_of(checkpoint):
    with open(os.path.join(checkpoint, "training_state", "trainer.json")) as f:
        return json.load(f)["loss_scaler"]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


def test_fp16_sft_scales_trains_and_resumes(tiny_chat, tmp_path):
    straight = str(tmp_path / "straight")
    metrics = sft(tiny_chat, straight, 10)
    losses = [m["loss"] for m in metrics]
    skipped = [m["skipped"] for m in metrics]
    print("fp16 SFT losses", [round(x, 3) for x in losses], "skipped", skipped,
          "scale", scaler_of(os.path.join(straight, "checkpoint-10"))["scale"])
    assert all(torch.isfinite(torch.tensor(losses))), losses
    first_clean = skipped.index(False)
    assert 1 <= first_clean <= 5, skipped  # 2^20 overflows fp16 gradients here: the scaler backs off
    assert not any(skipped[first_clean:]), skipped  # then every step updates
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics[first_clean:])
    assert losses[-1] < losses[first_clean] - 2.0, losses
    assert scaler_of(os.path.join(straight, "checkpoint-10"))["scale"] == 2.0 ** (20 - first_clean)
    # resume from step 5: the scale, its clean-step count and the next five steps are those of the straight run
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-5"), os.path.join(resumed, "checkpoint-5"))
    again = sft(tiny_chat, resumed, 10, "--resume", "true")
    assert [(m["step"], m["loss"], m["skipped"]) for m in again] == \
        [(m["step"], m["loss"], m["skipped"]) for m in metrics[5:]]
    assert scaler_of(os.path.join(resumed, "checkpoint-10")) == scaler_of(os.path.join(straight, "checkpoint-10"))
