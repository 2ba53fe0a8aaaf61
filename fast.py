"""
What only makes things fast: decoding, and distill.py's draw of its targets. Nothing here computes
anything model.py does not (tests/test_fast.py checks each piece against model.py's eager code),
so a reader can skip this file and still know K-Forcing.

- FlexCache: a KV cache whose passes attend through FlexAttention over the cache blocks written so
  far, so that a pass's queries (k tokens, up to k slots) read the valid prefix once and cost
  about what one query does.
- CUDAGraphStep: a decode pass replayed from a CUDA graph (at small batch a pass is hundreds of tiny
  kernels whose launches cost more than their work), optionally compiled first.
- compile_per_shape: torch.compile with static shapes, for a decode step, and for distill.py's
  draw of its targets over batch x anchors x k x vocab.
- the peak FLOP/s and bandwidth of known GPUs, for MFU and rooflines.
"""
import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from model import KVCache, decode_step

FLEX_BLOCK = 128   # FlexAttention's KV block: the unit in which a pass skips unwritten entries
# decoding has no backward pass: no transposed block index, where this torch can skip it
_NO_Q_BLOCKS = {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(
    BlockMask.from_kv_blocks).parameters else {}


def compile_per_shape(fn):
    """torch.compile with static shapes, with room for one compiled version per (batch, queries,
    cache length, model): past dynamo's default limit it would fall back to eager, with only a
    logged warning."""
    for name in ("recompile_limit", "cache_size_limit"):   # renamed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(fn, dynamic=False)


# eager on CPU even inside a compiled step: torch's CPU flex kernel failed on q sliced from qkv
_flex_reference = torch.compiler.disable(flex_attention)
_flex_compiled = None


def flex(q, k, v, block_mask):
    """One fused kernel on CUDA (compiled once per shape); the unfused reference elsewhere."""
    global _flex_compiled
    if not q.is_cuda:
        return _flex_reference(q, k, v, block_mask=block_mask)
    if torch.compiler.is_compiling():   # inside a compiled step: fused along with the rest
        return flex_attention(q, k, v, block_mask=block_mask)
    if _flex_compiled is None:
        _flex_compiled = compile_per_shape(flex_attention)
    return _flex_compiled(q, k, v, block_mask=block_mask)


class FlexCache(KVCache):
    """model.KVCache attended through FlexAttention: the same mask (model.decode_mask), given as a
    block mask whose every query block lists only the KV blocks up to its last query's position."""

    def __init__(self, cfg, batch_size, device, dtype):
        super().__init__(cfg, batch_size, device, dtype)
        self.block_ids = torch.arange(-(-self.length // FLEX_BLOCK), device=device,
                                      dtype=torch.int32)

    def mask(self, qpos):
        T, pos0 = qpos.numel(), qpos[0]
        last = qpos[(torch.arange(0, T, FLEX_BLOCK, device=qpos.device) + FLEX_BLOCK - 1)
                    .clamp(max=T - 1)]
        kv_num_blocks = (last // FLEX_BLOCK + 1).to(torch.int32).view(1, 1, -1)

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= pos0 + q_idx
        kv_indices = self.block_ids.expand(1, 1, last.numel(), -1)
        return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=mask_mod, seq_lengths=(T, self.length),
                                        **_NO_Q_BLOCKS)

    def attend(self, q, k, v, mask):
        return flex(q, k, v, mask)


def make_cache(cfg, batch_size, device, dtype, attention="sdpa"):
    """sdpa: model.KVCache (an additive mask over the whole cache); flex: FlexCache."""
    caches = {"sdpa": KVCache, "flex": FlexCache}
    if attention not in caches:
        raise ValueError(f"attention must be 'sdpa' or 'flex', not {attention!r}")
    return caches[attention](cfg, batch_size, device, dtype)


class CUDAGraphStep:
    """A step_fn for model.generate that replays each decode pass from a CUDA graph. A graph replays
    fixed kernels on fixed memory, so each (model, cache, input shapes) gets its own, captured on
    first use, with static input buffers that each call copies into; pass generate the same cache
    every call (a new cache captures new graphs, and a graph keeps its model and cache alive: it
    reads their memory); generate runs the prefill eagerly. The returned tokens are the graph's
    static output, overwritten by the next replay. On CPU, or with capture=False, the same buffers
    run eagerly (what the CPU tests check). compile=True runs the pass through torch.compile before
    capture (fused elementwise kernels).
    Why not torch.compile(mode="reduce-overhead")? Inductor skips CUDA graphs for a step that
    writes into an input in place, as every pass writes the KV cache, unless the cache is static."""

    def __init__(self, capture=True, warmup=2, compile=False):
        self.capture, self.warmup, self.graphs = capture, warmup, {}
        self.step = compile_per_shape(decode_step) if compile else decode_step

    def __call__(self, model, tokens, pos, noise, cache):
        w = next(model.parameters())   # a graph holds the addresses of the weights and the cache
        key = (id(model), w.data_ptr(), w.dtype, id(cache), tuple(tokens.shape),
               tuple(noise.shape), noise.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._record(model, tokens, pos, noise, cache)
        static = self.graphs[key]
        for name, t in (("tokens", tokens), ("pos", pos), ("noise", noise)):
            static[name].copy_(t)
        return static["run"]()

    def _record(self, model, tokens, pos, noise, cache):
        static = {"tokens": tokens.clone(), "pos": pos.clone(), "noise": noise.clone()}
        fn, args = self.step, (model, static["tokens"], static["pos"], static["noise"], cache)
        static["args"] = args   # alive while the graph is: it reads their memory (and keys by id)
        if not (self.capture and tokens.is_cuda):
            static["run"] = lambda: fn(*args)
            return static
        # warm up on a side stream (lazy cuBLAS set-up must not happen during capture); the warm-up
        # writes the very K/V the step writes here, so the cache ends as if the step had run once
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):   # records the kernels, runs nothing
            out = fn(*args)
        static["graph"] = graph
        static["run"] = lambda: (graph.replay(), out)[1]
        return static


# ------------------------------------------------------------------------------------------------
# Peaks, matched in order against torch.cuda.get_device_name (a longer name before one it contains).

PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("A100", 312e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12),
              ("L4", 121e12), ("4090", 165e12)]   # dense bf16
# GH200 ships with 4.0 or 4.9 TB/s under one name: unknown rather than the H200's figure
PEAK_BANDWIDTH = [("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("GH200", None),
                  ("H200", 4.8e12), ("A100-SXM4-40GB", 1.555e12), ("A100-PCIE-40GB", 1.555e12),
                  ("A100", 2.0e12)]   # HBM bytes/s


def device_peak(device, table, name=None):
    """The table's value for this GPU (or for the GPU called `name`); None on CPU or if unknown."""
    if name is None:
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
    return next((v for key, v in table if key.lower() in name.lower()), None)


def peak_flops(device):
    return device_peak(device, PEAK_FLOPS)


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token: 6 x the matmul parameters, plus attention (PaLM, appendix B)."""
    d, L = cfg.n_embd, cfg.n_layer
    return 6 * (L * 12 * d * d + d * cfg.padded_vocab) + 12 * L * d * seq_len
