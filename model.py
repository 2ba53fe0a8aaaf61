"""
The whole network: one GPT that is both the autoregressive (AR) teacher and the K-Forcing student.

K-Forcing (arXiv 2606.10820) writes sampling as a function of uniform noise: with u_1..u_k ~ U(0,1),
x_{t+i} = F^-1(u_i | x_<t+i) is the AR sample, and the next k tokens are G(prefix, u_1..u_k). The
"push-forward" student evaluates G in ONE pass: the k noises enter as k noise slots placed after the
context, and the slots' argmax readouts are the k tokens. The student is the teacher's architecture plus
a small noise encoder (max_k > 0); a teacher is the same class with max_k = 0.

Read in this order: GPTConfig, the blocks, GPT (forward = AR training, forward_staircase = student
training and self-forcing targets, forward_step = cached decoding), then inverse_cdf, decode_step and
generate: the one decode loop, in which AR is the k = 1 case.
"""
import inspect
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


@dataclass
class GPTConfig:
    block_size: int = 256     # longest sequence (context + generated tokens); also the KV cache length
    vocab_size: int = 50257   # GPT-2 BPE; the embedding is padded to a multiple of 64 (50304) for speed
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    # Tied input/output embeddings: at our data sizes (a ~6M-token offline corpus) an untied 50k x d
    # output matrix adds many parameters that mostly memorise. The paper unties them (its preset does too).
    tie_embeddings: bool = True
    max_k: int = 0            # 0: an AR model (teacher). > 0: a student with a noise encoder and up to max_k slots
    # Noise features: "paper" uses frequencies 10000^(-i/half), which never exceed one cycle over [0, 1];
    # "high" spreads them from 1 to 256 cycles so that nearby u (bucket edges ~0.02 apart) separate.
    noise_features: str = "paper"

    @property
    def padded_vocab(self):
        return (self.vocab_size + 63) // 64 * 64


# ----------------------------------------------------------------------------------------------------
# Rotary position embeddings. Positions are always passed as a tensor: noise slot i of a window anchored
# at context position t sits at t + i (the position of the token it will produce), and a decode step can
# then be compiled once and replayed with new positions.

def rope(cfg, pos, base=10000.0):
    """cos/sin for integer positions `pos` ((L,) or (B, L)), computed in float32 on the fly: no table to
    size, and angles that a cast of the model to bf16 cannot degrade. Full head width, with the sign of the
    rotation folded into sin (-sin on the first half), so that apply_rope is a product and a multiply-add."""
    hd = cfg.n_embd // cfg.n_head
    inv_freq = base ** (-torch.arange(0, hd, 2, device=pos.device, dtype=torch.float32) / hd)
    ang = pos.float().unsqueeze(-1) * inv_freq
    if pos.dim() == 2:
        ang = ang.unsqueeze(1)   # per-row positions (B, L): broadcast over heads
    cos, sin = torch.cos(ang), torch.sin(ang)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate the pairs (x1[i], x2[i]) of the first and second half of x by their angles: x1' = x1 cos - x2 sin,
    x2' = x2 cos + x1 sin, in the dtype of cos/sin. x: (..., B, H, T, hd); cos/sin from rope: (T, hd) or
    (B, 1, T, hd). Written as x * cos + [x2, x1] * sin (sin signed by rope) in one multiply-add: 3 kernels
    where the per-half formula takes 8. A decode step is hundreds of tiny kernels, and this runs in every layer."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), sin).type_as(x)


# FlexAttention's KV block (its default): the granularity at which a cached pass skips unwritten entries
FLEX_BLOCK = 128
# decoding needs no backward pass, so no transposed (query-block) index where this torch can skip it
_NO_Q_BLOCKS = {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(
    BlockMask.from_kv_blocks).parameters else {}
_flex_compiled = None


class KVCache:
    """Static KV cache, preallocated for batch x block_size and written in place; positions come as tensors,
    so a decode step has static shapes (compilable, capturable in a CUDA graph). A pass writes the keys and
    values of ALL its inputs at their positions: the committed tokens, then the k noise slots. A slot's row is
    the position of the token it produces, so the next pass overwrites it with that very token before any
    query reads it. Between passes the rows up to the last committed token hold real tokens only, and the last
    pass's slots sit just past them, unread: no later pass ever attends to a slot (the paper's "used in the pass
    and discarded", METHOD.md §4), and no per-layer copy of the cache is ever made. Entries past a query's
    position (the last slots, stale or not yet written) are hidden by the mask.

    attention: how a cached pass attends (both compute the same function, see decode_mask):
      "sdpa" (default): SDPA with an additive mask over the whole cache. Any device; reads every cache entry.
      "flex": FlexAttention (compiled on CUDA) with a block mask that stops at the last written block, so a
              pass reads only the valid prefix and its 2k queries cost little more than one (METHOD.md §5).
              The fastest path on an H100 (README); each new (batch, queries) shape compiles once (seconds).
    """

    def __init__(self, cfg, batch_size, device, dtype, attention="sdpa"):
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be 'sdpa' or 'flex', not {attention!r}")
        hd = cfg.n_embd // cfg.n_head
        self.length, self.attention, self.device, self.dtype = cfg.block_size, attention, torch.device(device), dtype
        self.shape = (cfg.n_layer, batch_size, cfg.n_head, self.length, hd)
        # One tensor per layer, not one (n_layer, ...) tensor: torch.compile turns an in-place write into a VIEW of
        # an input into a copy of the whole viewed tensor (functionalization), i.e. every compiled step would copy
        # the entire cache of every layer; a write into an input of its own stays in place (tests/test_bench.py).
        self.k = [torch.zeros(self.shape[1:], device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(self.shape[1:], device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.ptrs = tuple(t.data_ptr() for t in self.k + self.v)   # the addresses a CUDA graph of a pass holds
        # flex: the ids of its KV blocks of FLEX_BLOCK entries (the cache is padded up to whole blocks, never
        # attended there), made once here rather than in every pass's block mask
        self.kv_block_ids = torch.arange(-(-self.length // FLEX_BLOCK), device=device, dtype=torch.int32)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask, cache=None, layer=0, pos=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)   # q and k rotated together: half the kernels of a decode step's RoPE
        v = qkv[2]
        if cache is not None:
            # write this pass's keys/values at their positions, then attend over the whole static cache;
            # `mask` hides the entries past each query's position
            ck, cv = cache.k[layer], cache.v[layer]
            ck.index_copy_(2, pos, k.to(ck.dtype))
            cv.index_copy_(2, pos, v.to(cv.dtype))
            k, v, q = ck, cv, q.to(ck.dtype)
        if cache is not None and cache.attention == "flex":
            y = flex(q, k, v, mask)
        else:   # is_causal=True for plain AR training lets SDPA pick the flash kernel on CUDA
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, dropout=0.0):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden, bias=False)
        self.proj = nn.Linear(d_hidden, d_in, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.RMSNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, **cache_args):
        x = x + self.drop(self.attn(self.ln1(x), cos, sin, mask, **cache_args))
        return x + self.mlp(self.ln2(x))


class NoiseEncoder(nn.Module):
    """u in [0, 1) -> one input vector per noise slot: float64 sinusoidal features -> Linear -> a residual MLP.
    One encoder is shared by all slots; a slot's identity comes from its RoPE position. The paper also feeds a
    temperature tau the same way (METHOD.md §2: most likely a second input Linear, which would make its 5.9M
    parameters at width 768, against 5.3M here) but trains only at tau = 1, so there is no tau input here."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.noise_features not in ("paper", "high"):
            raise ValueError(f"noise_features must be 'paper' or 'high', not {cfg.noise_features!r}")
        self.half, self.kind = cfg.n_embd // 2, cfg.noise_features
        self.inp = nn.Linear(2 * self.half, cfg.n_embd)
        self.ln = nn.RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd)

    def forward(self, u):
        # frequencies built on the fly in float64 (a buffer would be cast along with a bf16 model)
        i = torch.arange(self.half, dtype=torch.float64, device=u.device)
        if self.kind == "paper":
            freqs = 10000.0 ** (-i / self.half)               # cycles over [0, 1]: at most 1
        else:
            freqs = 256.0 ** (i / max(self.half - 1, 1))      # 1 .. 256 cycles
        arg = u.double().unsqueeze(-1) * freqs * (2 * math.pi)
        feats = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1).to(self.inp.weight.dtype)
        x = self.inp(feats)
        return x + self.mlp(self.ln(x))


# ----------------------------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.noise_encoder = NoiseEncoder(cfg) if cfg.max_k > 0 else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight") and name.startswith("blocks"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def student_from(cls, teacher, max_k, noise_features=None):
        """A push-forward student initialised from its teacher: every shared tensor is copied; only a
        new noise encoder (first stage) starts from scratch. Dropout is 0, as in the paper's k = 4 stage
        (METHOD.md §3), whatever the teacher trained with."""
        cfg = GPTConfig(**{**asdict(teacher.config), "max_k": max_k, "dropout": 0.0})
        if noise_features is not None and teacher.noise_encoder is None:
            cfg.noise_features = noise_features
        student = cls(cfg).to(next(teacher.parameters()).device)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("noise_encoder.") for k in missing), (missing, unexpected)
        return student

    def _trunk(self, x, pos, mask, cache=None):
        # RoPE in the residual stream's dtype: a model cast to bf16 (decoding) rotates q and k in bf16, as its
        # matmuls compute them (half the bytes, no dtype conversions); fp32 and autocast (training) stay in fp32
        cos, sin = (t.to(x.dtype) for t in rope(self.config, pos))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            cache_args = dict(cache=cache, layer=i, pos=pos) if cache is not None else {}
            x = block(x, cos, sin, mask, **cache_args)
        return self.ln_f(x)

    def _logits(self, h, real_vocab=True):
        # Sampling, readouts and the student's loss never see the padding ids; the AR training loss keeps them
        # (they are never targets, so they learn to vanish) and skips the copy a slice would cost.
        logits = self.lm_head(h)
        return logits[..., :self.config.vocab_size] if real_vocab else logits

    def forward(self, idx, targets=None, anchors=None, noise=None, window=None):
        """AR training and scoring: plain causal attention over real tokens; returns (logits, loss).
        With noise (and anchors), the student's staircase pass instead, returning (slot logits, None): see
        forward_staircase. Both go through forward so that DDP and torch.compile wrap them alike."""
        if noise is not None:
            return self.forward_staircase(idx, anchors, noise, window), None
        T = idx.size(1)
        logits = self._logits(self._trunk(self.wte(idx), torch.arange(T, device=idx.device), None),
                              real_vocab=targets is None)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    def next_token_logits(self, idx, anchors):
        """AR logits of the token after each anchor position t: (B, A, vocab), LM head only where needed."""
        h = self._trunk(self.wte(idx), torch.arange(idx.size(1), device=idx.device), None)
        return self._logits(torch.gather(h, 1, anchors.unsqueeze(-1).expand(-1, -1, h.size(-1))))

    def forward_staircase(self, idx, anchors, noise, window=None):
        """Student training layout (the "staircase"): one pass over [N context tokens | A windows].
        idx: (B, N) real tokens. anchors: (B, A) context positions t. noise: (B, A, k) uniforms.
        window: optional (B, A, m) tokens committed after t (self-forcing rollouts feed the previous
        student's own tokens here, as if they were real). Window element j sits at position t + 1 + j:
        first the m committed tokens, then the k noise slots. Each window element sees context <= t and
        the elements of its own window up to itself; context rows are plainly causal. The paper trains
        every position as an anchor (A = N); sampling A < N anchors per sequence is a saving.
        Returns the slots' logits, (B, A, k, vocab)."""
        B, N = idx.shape
        A, k = noise.shape[1], noise.shape[2]
        m = 0 if window is None else window.size(2)
        W = m + k
        dev = idx.device
        x_ctx = self.wte(idx)
        x_slots = self.noise_encoder(noise)                                           # (B, A, k, C)
        x_win = x_slots if window is None else torch.cat([self.wte(window), x_slots], dim=2)
        x = torch.cat([x_ctx, x_win.reshape(B, A * W, -1)], dim=1)
        win_pos = anchors.unsqueeze(-1) + 1 + torch.arange(W, device=dev)            # (B, A, W)
        pos = torch.cat([torch.arange(N, device=dev).expand(B, N), win_pos.reshape(B, A * W)], dim=1)
        mask = staircase_mask(N, anchors, W)                                          # (B, 1, L, L)
        h = self._trunk(x, pos, mask)
        return self._logits(h[:, N:].reshape(B, A, W, -1)[:, :, m:])

    def forward_step(self, tokens, pos, slots, cache):
        """One cached decode pass (METHOD.md §4): feed the n tokens committed last step (or the prompt, at
        prefill), followed by the k noise slots' inputs `slots` (B, k, C) = noise_encoder(u) (None for AR),
        at the consecutive positions `pos` (n + k,): slot i at the position of the token it produces.
        Returns the logits the readout needs: the last real token's (AR, (B, 1, vocab)) or the k slots'
        ((B, k, vocab)); the LM head, the widest matmul, runs on no other row."""
        n = tokens.size(1)
        x = self.wte(tokens)
        if slots is not None:
            x = torch.cat([x, slots.to(x.dtype)], dim=1)
        h = self._trunk(x, pos, decode_mask(pos, cache), cache=cache)
        return self._logits(h[:, n:] if slots is not None else h[:, n - 1:])


def staircase_mask(N, anchors, W):
    """Boolean attention mask (True = may attend) of the staircase layout, (B, 1, N + A*W, N + A*W)."""
    B, A = anchors.shape
    dev = anchors.device
    L = N + A * W
    ctx = torch.arange(N, device=dev)
    mask = torch.zeros(B, L, L, dtype=torch.bool, device=dev)
    mask[:, :N, :N] = ctx[:, None] >= ctx[None, :]                               # context: causal
    # window rows -> context: positions <= anchor
    win_ctx = ctx[None, None, :] <= anchors[:, :, None]                            # (B, A, N)
    mask[:, N:, :N] = win_ctx.repeat_interleave(W, dim=1)
    # window rows -> windows: same window (block diagonal) and causal inside it
    w = torch.arange(A * W, device=dev)
    same = (w[:, None] // W == w[None, :] // W) & (w[:, None] >= w[None, :])
    mask[:, N:, N:] = same
    return mask.unsqueeze(1)


def decode_mask(qpos, cache):
    """Mask of a cached pass whose T queries sit at consecutive positions qpos = pos0, pos0 + 1, ..: query i
    sees the cache entries up to its own position pos0 + i. For [k committed tokens | k noise slots] that is
    exactly the paper's rule (a real token sees the context up to itself; slot i sees the context up to the
    last real token and slots 1..i), i.e. bottom-right causal over the valid prefix. Built from the position
    tensor, so stale entries are hidden without slicing the cache (static shapes).
    "sdpa": an additive (T, cache.length) mask, 0 or -inf. "flex": a BlockMask whose every query block lists only
    the KV blocks up to its last query's position; the kernel skips the rest of the cache."""
    dev, T, pos0 = cache.device, qpos.numel(), qpos[0]
    if cache.attention == "sdpa":   # additive, once per pass: SDPA would turn a boolean mask into it in every layer
        visible = torch.arange(cache.length, device=dev)[None, :] <= qpos[:, None]
        return torch.full(visible.shape, float("-inf"), dtype=cache.dtype, device=dev).masked_fill_(visible, 0.0)
    last = qpos[(torch.arange(0, T, FLEX_BLOCK, device=dev) + FLEX_BLOCK - 1).clamp(max=T - 1)]
    kv_num_blocks = (last // FLEX_BLOCK + 1).to(torch.int32).view(1, 1, -1)      # per query block
    kv_indices = cache.kv_block_ids.expand(1, 1, last.numel(), -1)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= pos0 + q_idx
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(T, cache.length), **_NO_Q_BLOCKS)


def flex(q, k, v, block_mask):
    """FlexAttention: compiled into one fused kernel on CUDA (flex-decoding for short queries); the unfused
    reference implementation elsewhere (what the CPU tests check against SDPA)."""
    global _flex_compiled
    if not q.is_cuda:
        return _flex_reference(q, k, v, block_mask=block_mask)
    if torch.compiler.is_compiling():   # inside a compiled step (bench.py --compile): fused along with the rest of it
        return flex_attention(q, k, v, block_mask=block_mask)
    if _flex_compiled is None:
        _flex_compiled = compile_per_shape(flex_attention)
    return _flex_compiled(q, k, v, block_mask=block_mask)


# The CPU reference stays eager even inside a compiled step (bench.py --compile): torch's CPU flex kernel failed on
# a q sliced from q and k together, and failed to build for caches of 2048 entries (torch 2.13).
_flex_reference = torch.compiler.disable(flex_attention)


def compile_per_shape(fn):
    """torch.compile with static shapes: one compiled version per (batch, queries, cache length, model), and room
    for many of them (past dynamo's default limit it would fall back to eager without a word)."""
    for name in ("recompile_limit", "cache_size_limit"):   # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------------------------------
# Sampling as a deterministic function of noise, and the one decode loop.

def inverse_cdf(logits, u):
    """x = F^-1(u | ctx): the smallest token id whose cumulative probability exceeds u, by a softmax and a
    cumulative sum in token-id order (u in [0, 1), as torch.rand draws it: even u = 0 gives a token with mass).
    Float32 logits (teacher targets, quality, same-noise agreement) are summed in float64, so that the same
    (logits, u) give the same token wherever they are computed. bf16 logits (the bf16 models that bench.py times)
    in float32, as a server samples: they carry bf16's three digits anyway, and a float64 softmax and cumsum over
    the vocabulary would add to every AR step bytes that the push-forward readout (an argmax) never moves, i.e.
    a slower baseline. The cumsum's total misses 1 by its rounding (up to 1e-4 in float32), so u is scaled by
    that total, and no u, however close to 1, can fall past it onto an id without mass."""
    dtype = torch.float64 if logits.dtype in (torch.float32, torch.float64) else torch.float32
    cdf = torch.cumsum(torch.softmax(logits, dim=-1, dtype=dtype), dim=-1)
    total = cdf[..., -1:].contiguous()
    tok = torch.searchsorted(cdf, (u.to(dtype).unsqueeze(-1) * total).contiguous(), right=True)
    last = torch.searchsorted(cdf, total, right=False)   # the last id with mass: where the total is first reached
    return torch.minimum(tok, last).squeeze(-1)


@torch.no_grad()
def decode_step(model, tokens, pos, noise, cache):
    """Commit `tokens` and return the next k = noise.size(1) tokens; pos: the positions of the pass's inputs.
    AR (max_k = 0): noise is (B, 1) uniforms u and k must be 1; x = F^-1(u | ctx) from the last real token's
    logits; pos holds the tokens' positions. K-Forcing: noise is the k noise slots' inputs (B, k, C), the
    noise encoder's image of u; x_i = argmax of slot i's logits (the push-forward readout); pos holds the tokens'
    positions, then the slots'."""
    if model.config.max_k == 0:
        assert noise.size(1) == 1, "an AR model decodes one token per pass"
        logits = model.forward_step(tokens, pos, None, cache)
        return inverse_cdf(logits[:, -1], noise[:, 0]).unsqueeze(1)
    return model.forward_step(tokens, pos, noise, cache).argmax(dim=-1)


NOISE_CHUNK = 256   # noise positions per noise-encoder call in generate: bounds the memory of its activations


@torch.no_grad()
def generate(model, prompt, noise, k=1, cache_dtype=None, step_fn=None, cache=None):
    """The one decode loop. prompt: (B, P) tokens, every row the same length. noise: (B, n_new), u_j is
    the noise of the j-th new token, so the same noise can be decoded by AR (k = 1) and by a student with
    any k and the tokens compared position by position. Each pass commits the previous k tokens and
    produces k more; the prompt is committed by the first pass (prefill). Returns (B, n_new) tokens.
    cache: a KVCache to reuse (its stale entries are hidden by the mask, so it needs no clearing; reusing
    one keeps CUDA graphs valid across calls). step_fn: decode_step, or a CUDAGraphStep() to replay the
    decode steps from CUDA graphs, which needs a cache (keep both to keep the graphs between calls)."""
    B, P = prompt.shape
    n_new = noise.size(1)
    max_k = model.config.max_k or 1   # an AR model makes one token per pass
    if not 1 <= k <= max_k:
        raise ValueError(f"k = {k}, but this model decodes 1 to {max_k} tokens per pass")
    if P < 1:
        raise ValueError("the prompt is empty: decoding starts from at least one token")
    if n_new % k:
        raise ValueError(f"the number of new tokens ({n_new}) must be a multiple of k ({k})")
    if P + n_new > model.config.block_size:
        raise ValueError(f"prompt ({P}) + new tokens ({n_new}) exceed the block size {model.config.block_size}")
    if isinstance(step_fn, CUDAGraphStep) and cache is None:
        raise ValueError("pass cache= with a CUDAGraphStep: its graphs are recorded on one cache, and a new cache "
                         "per call would record (and keep) new graphs every call")
    dev = prompt.device
    if n_new == 0:
        return torch.empty(B, 0, dtype=torch.long, device=dev)
    if cache is None:
        cache = KVCache(model.config, B, dev, cache_dtype or next(model.parameters()).dtype)
    elif cache.shape[:3] != (model.config.n_layer, B, model.config.n_head) or cache.length < P + n_new:
        raise ValueError(f"the cache {cache.shape} does not fit this model, batch size {B} and length")
    step_fn = step_fn or decode_step
    step_noise, n_slots = noise, 0   # what a pass takes per new token: AR, the uniform u itself
    if model.config.max_k > 0:
        # a student, its noise slot's input. That depends on the noise alone, never on a token: encode the whole
        # generation's noise here, in a few large calls (chunks bound the memory), not in some twenty small kernels
        # a pass
        step_noise = torch.cat([model.noise_encoder(noise[:, i:i + NOISE_CHUNK])
                                for i in range(0, n_new, NOISE_CHUNK)], dim=1)
        n_slots = k
    out = torch.empty(B, n_new, dtype=torch.long, device=dev)
    positions = torch.arange(P + n_new, device=dev)   # made once: a pass's positions are a slice of it
    tokens, start = prompt, 0
    for s in range(0, n_new, k):
        # the pass's inputs: the tokens to commit, at start .. P + s - 1, then a student's k slots, at P + s ..
        tokens = step_fn(model, tokens, positions[start:P + s + n_slots], step_noise[:, s:s + k], cache)
        out[:, s:s + k] = tokens
        start = P + s   # where the tokens just made are committed by the next pass
    return out


class CUDAGraphStep:
    """A step_fn for generate that replays decode_step from CUDA graphs. At small batch a decode step is
    hundreds of tiny kernels whose launch cost exceeds their run time; a graph launches them all at once.
    A graph replays fixed kernels on fixed memory, so each (model, cache, batch, n_tokens, k) gets its own,
    captured on first use, with static input buffers (tokens, pos, u: AR's uniforms, or a student's noise slot
    inputs, noise_encoder(u), as decode_step takes them) that each call copies into; the
    cache is written in place (the mask built from pos hides stale entries: shapes never change). The
    prefill (the prompt, once per generation) runs eagerly. The returned tokens are the graph's static
    output, overwritten by the next replay (generate copies them out at once). Graphs pin their memory
    until this object is dropped. On CPU, or with capture=False, the same static-buffer plumbing runs
    eagerly, which is what the CPU tests check against generate's plain path.
    compile=True runs the decode step through torch.compile first (one compiled step per shape, compiled during
    the warm-up, then captured): fused elementwise kernels instead of one per operation. Experimental: checked
    against eager on CPU for both attention paths, not yet timed on a GPU."""

    def __init__(self, capture=True, warmup=2, compile=False):
        self.capture, self.warmup, self.graphs = capture, warmup, {}
        self.step = compile_per_shape(decode_step) if compile else decode_step

    def __call__(self, model, tokens, pos, u, cache):
        if tokens.size(1) != u.size(1):   # prefill (prompt + k slots): a one-off shape, not worth a graph
            # (a prompt of exactly k tokens has the decode step's shape and simply replays its graph)
            return decode_step(model, tokens, pos, u, cache)
        w = next(model.parameters())      # a graph holds the addresses of the weights and of the cache
        key = (id(model), w.data_ptr(), w.dtype, cache.ptrs,
               tuple(tokens.shape), tuple(u.shape), u.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._record(model, tokens, pos, u, cache)
        static = self.graphs[key]
        static["tokens"].copy_(tokens)
        static["pos"].copy_(pos)
        static["u"].copy_(u)
        return static["run"]()

    def _record(self, model, tokens, pos, u, cache):
        # The closures below hold the buffers, not this dict: no reference cycle, so dropping the step
        # object frees its graphs' memory at once (without waiting for the garbage collector).
        tokens, pos, u = tokens.clone(), pos.clone(), u.clone()
        static = {"tokens": tokens, "pos": pos, "u": u}
        fn = self.step   # (not self: a closure over self would be a reference cycle)
        step = lambda: fn(model, tokens, pos, u, cache)  # noqa: E731
        if not (self.capture and tokens.is_cuda):
            static["run"] = step
            return static
        # Warm up on a side stream first (lazy cuBLAS/cuDNN set-up must not happen during capture). The
        # warm-up passes hold this call's real inputs, so they write the very K/V that the step itself
        # writes at these positions: the cache ends up as if the step had run once.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):     # records the kernels, runs nothing
            out = step()

        def replay():
            graph.replay()
            return out
        static.update(graph=graph, run=replay)
        return static


def same_noise_agreement(a, b, k):
    """Fraction of positions where two same-noise samples agree, per slot (position j is slot j mod k)."""
    eq = (a == b).float()
    return [eq[:, i::k].mean().item() for i in range(k)]


@torch.no_grad()
def window_agreement(student, prompts, ar_tokens, noise, k, batch=32):
    """Same-noise agreement per slot on the AR teacher's own context. Window j starts from the teacher's
    sample so far (prompt + its first j*k tokens), takes the noise the teacher used for its next k tokens,
    and is compared with those k tokens. In free-running decoding (same_noise_agreement on two generations)
    the sequences part at the first different token and later positions agree mostly by chance; here every
    window starts in step with the teacher. One staircase pass per `batch` samples computes all their windows
    (its logits, batch x n x vocab floats, are what bounds the memory)."""
    B, P = prompts.shape
    n = ar_tokens.size(1) // k * k
    seq = torch.cat([prompts, ar_tokens[:, :n]], dim=1)[:, :P + n - k]   # the last window's context ends there
    anchors = (P - 1 + torch.arange(0, n, k, device=seq.device)).expand(B, -1)
    slots = noise[:, :n].reshape(B, -1, k)
    tokens = torch.cat([student.forward_staircase(seq[i:i + batch], anchors[i:i + batch],
                                                  slots[i:i + batch]).argmax(-1)
                        for i in range(0, B, batch)])   # (B, n/k, k)
    return (tokens == ar_tokens[:, :n].reshape(B, -1, k)).float().mean(dim=(0, 1)).tolist()


@torch.no_grad()
def agreement_without_noise(teacher, prompts, ar_tokens, batch=16):
    """The agreement a student blind to the noise would reach on the teacher's own context, averaged over the
    positions of the teacher's samples: an independent draw from the teacher's distribution p there matches the
    teacher's token with probability sum_v p(v)^2, and its most likely token (what a student that has collapsed to the
    mode answers) with probability max_v p(v). Same-noise agreement above these is information carried by the noise.
    Returns {"independent_draw": .., "teacher_mode": ..}."""
    independent = mode = 0.0
    for logits, _ in continuation_logits(teacher, prompts, ar_tokens, batch):
        p = torch.softmax(logits, dim=-1)   # each new token's distribution, given the sample so far
        independent += (p * p).sum().item()
        mode += p.max(dim=-1).values.sum().item()
    return {"independent_draw": independent / ar_tokens.numel(), "teacher_mode": mode / ar_tokens.numel()}


def continuation_logits(model, prompts, samples, batch):
    """A model's float32 logits for each token of `samples` given the prompt and the samples before it, `batch` rows
    at a time (the logits, rows x tokens x vocab, bound the memory): yields (logits, those rows' samples)."""
    P = prompts.size(1)
    x = torch.cat([prompts, samples], dim=1)
    for i in range(0, len(x), batch):
        logits, _ = model(x[i:i + batch, :-1])   # position j predicts token j + 1
        yield logits[:, P - 1:].float(), x[i:i + batch, P:]


# ----------------------------------------------------------------------------------------------------
# Model FLOPs utilisation, against the device's peak dense bf16 rate.

# Matched in order against torch.cuda.get_device_name: a longer name before the one it contains (L40S, L40, L4).
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
              ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("4090", 165e12)]


def device_peak(device, table, name=None):
    """The first value of a [(name part, value)] table whose name part is in this GPU's name (or in `name`, a GPU
    named instead, in any case); None on CPU or for a GPU the table does not know. Serves PEAK_FLOPS and bench.py's
    PEAK_BANDWIDTH."""
    if name is None:
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
    return next((v for key, v in table if key.lower() in name.lower()), None)


def peak_flops(device):
    return device_peak(device, PEAK_FLOPS)


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token: 6 x parameters in matmuls + attention (PaLM appendix B)."""
    d, L = cfg.n_embd, cfg.n_layer
    n_matmul = L * 12 * d * d + d * cfg.padded_vocab
    return 6 * n_matmul + 12 * L * d * seq_len
