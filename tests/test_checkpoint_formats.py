"""HF checkpoint file formats: single and sharded safetensors, pytorch_model.bin and sharded .bin with index.

Every format must give the same weights (and slices) as the single safetensors file transformers wrote.
"""
import json
import os

import pytest
import torch

from llama_rlhf.checkpoint.hf import CheckpointError, TorchFileSource, open_hf_checkpoint
from llama_rlhf.models.pretrained import load_pretrained
from llama_rlhf.parallel.state import single_process_state
from tests.hf_reference import save_tiny_model, tiny_llama_configs


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import LlamaForCausalLM
    root = tmp_path_factory.mktemp("formats")
    base = save_tiny_model(str(root / "safetensors"), tiny_llama_configs()["gqa_split"], LlamaForCausalLM)
    model = LlamaForCausalLM.from_pretrained(base)
    out = {"safetensors": base}
    out["sharded_safetensors"] = str(root / "sharded_safetensors")
    model.save_pretrained(out["sharded_safetensors"], max_shard_size="40KB")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name in ("bin", "sharded_bin"):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(open(os.path.join(base, "config.json")).read())
        out[name] = str(folder)
    torch.save(state, root / "bin" / "pytorch_model.bin")
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[:len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for file, part in halves.items():
        torch.save({k: state[k] for k in part}, root / "sharded_bin" / file)
    (root / "sharded_bin" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, part in halves.items() for k in part}}))
    return out


def test_every_format_loads_the_same_weights(folders):
    assert os.path.isfile(os.path.join(folders["sharded_safetensors"], "model.safetensors.index.json"))
    ps = single_process_state()
    reference = dict(load_pretrained(folders["safetensors"], "llama-hf", ps).named_parameters())
    for name in ("sharded_safetensors", "bin", "sharded_bin"):
        loaded = dict(load_pretrained(folders[name], "llama-hf", ps).named_parameters())
        for key, value in reference.items():
            assert torch.equal(loaded[key], value), f"{name}: {key} differs"


def test_slices_read_only_what_is_asked(folders):
    full = open_hf_checkpoint(folders["safetensors"])
    for name in ("sharded_safetensors", "bin", "sharded_bin"):
        source = open_hf_checkpoint(folders[name])
        assert isinstance(source, TorchFileSource) == name.endswith("bin")
        assert source.keys() == full.keys()
        key = "model.layers.1.self_attn.o_proj.weight"
        for dim, start, stop in ((0, 8, 40), (1, 16, 48), (None, 0, None)):
            assert torch.equal(source.read(key, dim, start, stop), full.read(key, dim, start, stop))


def test_folder_without_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights in .*safetensors.*pytorch_model"):
        open_hf_checkpoint(str(tmp_path))
