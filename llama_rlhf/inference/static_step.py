"""A fixed-shape decode step for CUDA graphs: every row of the cache, every slot, inputs in preallocated tensors and
no host sync inside, so one call is captured once per ``generate`` call and replayed for every token after.

Shapes never change within a call: tokens and positions [rows, 1], each layer's keys/values
[rows, Hkv, capacity, D], ``valid`` [rows, capacity], the slot being written [1]. Causality comes from ``valid``
(slots after the one being written are not valid yet); a sliding window is measured from the slot tensor. Rows
beyond the active ones decode a dummy token and are ignored. On CPU the same step runs eagerly (the tests check it
gives the dynamic step's tokens); there it buys nothing, the dynamic step of ``engine.py`` is the default.
"""
from __future__ import annotations

import torch


class StaticCacheWindow:
    """The model's view of the whole cache in a fixed-shape step (``CausalLM.forward`` takes its masks as given)."""

    static = True
    start = 0  # unused: the step always passes explicit position ids

    def __init__(self, cache, slot: torch.Tensor):
        self.cache, self.slot = cache, slot
        self.key_slots = torch.arange(cache.capacity, device=slot.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [rows, 1, Hkv, D] at the slot; return every slot's keys/values [rows, capacity, Hkv, D]."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_copy_(2, self.slot, k.transpose(1, 2))  # [rows, 1, Hkv, D] -> [rows, Hkv, 1, D]
        values.index_copy_(2, self.slot, v.transpose(1, 2))
        return keys.transpose(1, 2), values.transpose(1, 2)

    def masks(self, windows) -> dict:
        """Boolean masks [rows, 1, 1, capacity] per sliding window (None: the whole valid history)."""
        valid = self.cache.valid.view(self.cache.valid.shape[0], 1, 1, -1)
        return {w: valid if w is None else valid & (self.key_slots > self.slot - w).view(1, 1, 1, -1)
                for w in windows}


class StaticDecodeStep:
    """``step(tokens_positions, slot)``: logits [n, V_padded / MP] of the n active rows; captured as a CUDA graph on
    its first call when ``cuda_graph`` (and the device is CUDA), replayed after."""

    def __init__(self, model, cache, device: torch.device, cuda_graph: bool):
        self.model, self.cache = model, cache
        self.rows = cache.k[0].shape[0]
        self.inputs = torch.zeros(self.rows, 2, dtype=torch.long, device=device)  # [rows, (token, position)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.window = StaticCacheWindow(cache, self.slot)
        self.use_graph = cuda_graph and device.type == "cuda"
        self.graph, self.logits = None, None

    def forward(self) -> torch.Tensor:
        hidden = self.model(self.inputs[:, :1], position_ids=self.inputs[:, 1:], key_valid=self.cache.valid,
                            kv_cache=self.window, hidden_only=True)  # [rows, 1, h]
        return self.model.logits(hidden[:, -1])  # [rows, h] -> [rows, V_padded / MP]

    def capture(self) -> None:
        """Warm up on a side stream (allocator pools, lazy inits), then record one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward()

    def __call__(self, tokens_positions: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens_positions [n, 2] (host) of the active rows 0..n-1, writing cache slot ``slot`` -> [n, V / MP]."""
        n = tokens_positions.shape[0]
        host = torch.zeros(self.rows, 2, dtype=torch.long)  # idle rows: token 0 at position 0, ignored
        host[:n] = tokens_positions
        self.inputs.copy_(host)
        self.slot.fill_(slot)
        self.cache.valid[:, slot] = True  # idle rows too: every query row sees at least itself
        if not self.use_graph:
            return self.forward()[:n]
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits[:n]
