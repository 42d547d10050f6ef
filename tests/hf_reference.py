"""Tiny random models saved by transformers, and transformers' own outputs to compare against.

Used only in the pytest (parent) process: worker processes load the saved folders with llama_rlhf and read
the reference tensors from a .pt file (``torch.load(weights_only=True)``), so they never import transformers.
"""
from __future__ import annotations

import os

import torch


def save_tiny_model(out_dir: str, config, model_cls, seed: int = 0, std: float = 0.2) -> str:
    """Build ``model_cls(config)`` with random weights (std large enough to make differences visible), save it."""
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def sample_batch(vocab: int, batch: int, seq: int, seed: int = 0, ignore_first: int = 3):
    """Random input ids and labels (= ids, first tokens of each row ignored with -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :ignore_first] = -100
    return ids, labels


def hf_reference(model_dir: str, ids: torch.Tensor, labels: torch.Tensor, out_file: str | None = None) -> dict:
    """transformers' logits, loss (next-token, mean over non-ignored) and parameter gradients, in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()  # dropout is 0 in these configs; train mode keeps gradients flowing as in training
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = {"ids": ids, "labels": labels, "logits": out.logits.detach(), "loss": out.loss.detach()}
    for name, p in model.named_parameters():
        ref["grad." + name] = p.grad.detach().clone()
    if out_file:
        torch.save(ref, out_file)
    return ref


def tiny_llama_configs():
    """Llama configs that exercise: padded vocab, GQA split and replicated, tied embeddings, biases, rope theta."""
    from transformers import LlamaConfig

    common = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, attention_dropout=0.0)
    return {
        # 8 query heads, 4 KV heads: split at MP 2 and 4
        "gqa_split": LlamaConfig(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False, **common),
        # 1 KV head: replicated at MP 2 and 4; tied embeddings; q/k/v/o biases; Llama 3 rope base
        "kv_replicated_tied": LlamaConfig(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                          attention_bias=True, rope_theta=500000.0, **common),
    }


def write_tiny_llamas(root: str) -> dict[str, str]:
    """Save every tiny Llama config with transformers plus a reference file; returns name -> folder."""
    from transformers import LlamaForCausalLM

    folders = {}
    for i, (name, config) in enumerate(tiny_llama_configs().items()):
        folder = os.path.join(root, name)
        save_tiny_model(folder, config, LlamaForCausalLM, seed=i)
        ids, labels = sample_batch(config.vocab_size, batch=2, seq=12, seed=i)
        hf_reference(folder, ids, labels, os.path.join(folder, "reference.pt"))
        folders[name] = folder
    return folders


def write_tiny_chat_model(folder: str, tokenizer_dir: str, seed: int = 0, architecture: str = "llama",
                          **overrides) -> str:
    """A tiny random Llama (or Qwen2: ``architecture="qwen2"``) that uses a real chat tokenizer (SmolLM2's):
    small enough to train in seconds."""
    import shutil

    import transformers

    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[architecture]
    settings = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings)).float()
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src) and not (name == "generation_config.json" and os.path.exists(os.path.join(folder, name))):
            shutil.copy2(src, folder)
    return folder
