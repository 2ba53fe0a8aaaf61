"""
K-Forcing (arXiv 2606.10820) in one file: one GPT that is both the autoregressive (AR) teacher
and the push-forward student.

Sampling from an AR model is a deterministic function of uniform noise: with u_1..u_k ~ U(0,1),
x_{t+i} = F^-1(u_i | x_<t+i), so the next k tokens are G(prefix, u_1..u_k). AR needs k passes to
evaluate G; the K-Forcing student evaluates it in ONE: the k noises enter as k noise slots after
the context, and the argmax at slot i is token i. The student is the teacher's network plus a small
noise encoder (max_k > 0); a teacher is the same class with max_k = 0.

The distribution readout (readout="cdf" or "cdf_seq", distill.py's default; not the paper's)
keeps the sampling outside the network: token 1's distribution is read from the last real token's
state (exactly the teacher's at the start), token i+1's from noise slot i's state, and x_i =
draw(that distribution, u_i) by a fixed, exact map from u to a token, the coupling: the inverse
CDF, or the Gumbel-max trick (coupling="gumbel"), under which two models' samples from the same
noise coincide more often. A student that learns the teacher's conditionals samples the teacher
exactly; AR is its k = 1 case, with no slot. "cdf_seq" adds a small residual MLP stack, shared by
the slots, that also reads token i (as Hydra's or DeepSeek-V3's multi-token heads do).

Read top to bottom:
  1. the blocks: GPTConfig, rope, attention, MLP, Block
  2. the student's pieces, NoiseEncoder, staircase_mask and SlotReadout; then GPT: forward and
     next_token_logits (the teacher), forward_staircase, forward_cdf and read_out (the student's
     training passes), forward_window (the teacher after given tokens, on the staircase),
     student_from, forward_step (a cached decoding pass)
  3. sampling as a function of noise: inverse_cdf and gumbel_max (two couplings, draw picks one),
     decode_mask, KVCache, decode_step, generate (one decode loop; AR is its k = 1 case)
  4. measures: same-noise agreement, on the teacher's context, against a student blind to the noise
fast.py makes decoding fast (FlexAttention, CUDA graphs) without computing anything new.
"""
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 256      # longest sequence (context + new tokens); the KV cache's length
    vocab_size: int = 50257    # from the dataset (GPT-2 BPE, or a character set); padded to 64s
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    tie_embeddings: bool = True   # our corpora are small: an untied 50k x d head mostly memorises
    max_k: int = 0             # 0: an AR teacher; > 0: a student with a noise encoder, max_k slots
    # "paper": frequencies 10000^(-i/half), at most one cycle over [0, 1];
    # "high": 1 to 256 cycles, so that nearby u (inverse-CDF buckets are narrow) look different
    noise_features: str = "paper"
    # "argmax": the paper's push-forward readout; "cdf": the distribution readout; "cdf_seq": cdf
    # with a small residual MLP stack (shared by the slots): noise slot i also reads token i
    readout: str = "argmax"
    readout_layers: int = 1    # cdf_seq: the residual MLPs of that slot readout
    # how a uniform u becomes a token (model.draw): "inverse_cdf", smooth in u as the argmax readout
    # needs, or "gumbel" (distribution readouts), whose same-noise samples agree more often
    coupling: str = "inverse_cdf"

    @property
    def padded_vocab(self):
        return (self.vocab_size + 63) // 64 * 64


# where a student may differ from its teacher: student_from sets max_k and dropout, and takes the
# choices of its first stage; every other field of a student is its teacher's
STUDENT_CHOICES = ("noise_features", "readout", "readout_layers", "coupling")
STUDENT_FIELDS = ("max_k", "dropout") + STUDENT_CHOICES


# ------------------------------------------------------------------------------------------------
# 1. The blocks: a pre-norm causal Transformer with RoPE. Positions always come as a tensor: noise
# slot i of a window anchored at t sits at t + i, the position of the token its noise u_i draws.

def rope(cfg, pos, base=10000.0):
    """cos/sin for positions `pos` ((L,) or (B, L)), in float32 (no table to size or to cast to
    bf16). The sign of the rotation is folded into sin so that apply_rope is one multiply-add."""
    hd = cfg.n_embd // cfg.n_head
    inv_freq = base ** (-torch.arange(0, hd, 2, device=pos.device, dtype=torch.float32) / hd)
    ang = pos.float().unsqueeze(-1) * inv_freq
    if pos.dim() == 2:
        ang = ang.unsqueeze(1)   # per-row positions (B, L): broadcast over heads
    cos, sin = torch.cos(ang), torch.sin(ang)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate the pairs (x1[i], x2[i]) of x's two halves: x1 cos - x2 sin, x2 cos + x1 sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.layer, self.dropout = cfg.n_head, layer, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, pos=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)   # q and k rotated together
        v = qkv[2]
        if cache is not None:   # decoding: write this pass's K/V, attend over the cache
            k, v = cache.update(self.layer, pos, k, v)
            y = cache.attend(q.to(k.dtype), k, v, mask)
        else:   # is_causal for plain AR training lets SDPA pick the flash kernel on CUDA
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
    def __init__(self, cfg, layer):
        super().__init__()
        self.ln1 = nn.RMSNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln2 = nn.RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, cache=None, pos=None):
        x = x + self.drop(self.attn(self.ln1(x), cos, sin, mask, cache, pos))
        return x + self.mlp(self.ln2(x))


# ------------------------------------------------------------------------------------------------
# 2. The student's pieces: the noise encoder (u -> a noise slot's input), the staircase mask (every
# anchor's window of k slots trained in one pass) and cdf_seq's slot readout. GPT below uses them.
# An anchor is a context position t; its window, the noise slots at t+1..t+k (the distribution
# readout: k - 1) that decode the tokens after t, as a decoding pass would after a prefix ending
# at t.

class NoiseEncoder(nn.Module):
    """u in [0, 1) -> a noise slot's input: float64 sinusoidal features -> Linear -> residual MLP.
    One encoder for all slots; a slot's identity is its RoPE offset from the anchor. (The paper
    also feeds a temperature tau, but trains only at tau = 1: no tau here.)"""

    def __init__(self, cfg):
        super().__init__()
        if cfg.noise_features not in ("paper", "high"):
            raise ValueError(f"noise_features must be paper or high, not {cfg.noise_features!r}")
        self.half, self.kind = cfg.n_embd // 2, cfg.noise_features
        self.inp = nn.Linear(2 * self.half, cfg.n_embd)
        self.ln = nn.RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd)

    def forward(self, u):
        # float64 phases, not a buffer: a bf16 model never casts them (only the features, after)
        i = torch.arange(self.half, dtype=torch.float64, device=u.device)
        if self.kind == "paper":
            freqs = 10000.0 ** (-i / self.half)               # cycles over [0, 1]: at most 1
        else:
            freqs = 256.0 ** (i / max(self.half - 1, 1))      # 1 .. 256 cycles
        arg = u.double().unsqueeze(-1) * freqs * (2 * math.pi)
        x = self.inp(torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1).to(self.inp.weight.dtype))
        return x + self.mlp(self.ln(x))


def staircase_mask(N, anchors, W):
    """Boolean mask (True = may attend) of the staircase layout, (B, 1, N + A*W, N + A*W)."""
    B, A = anchors.shape
    ctx = torch.arange(N, device=anchors.device)
    mask = torch.zeros(B, N + A * W, N + A * W, dtype=torch.bool, device=anchors.device)
    # 1. context rows: plain causal attention
    mask[:, :N, :N] = ctx[:, None] >= ctx[None, :]
    # 2. window rows -> context: up to their anchor
    mask[:, N:, :N] = (ctx[None, None, :] <= anchors[:, :, None]).repeat_interleave(W, dim=1)
    # 3. window rows -> windows: their own window only, causal inside it
    w = torch.arange(A * W, device=anchors.device)
    mask[:, N:, N:] = (w[:, None] // W == w[None, :] // W) & (w[:, None] >= w[None, :])
    return mask.unsqueeze(1)


class SlotReadout(nn.Module):
    """cdf_seq: slot i's state r_i starts as h_i, then r_i += MLP([r_i, embedding of token i,
    r_{i-1}]) readout_layers times, so that token i+1's distribution sees token i as drawn, not only
    the noise u_i that drew it. Output layers start at zero: the readout starts as the cdf one."""

    def __init__(self, cfg):
        super().__init__()
        n, C = cfg.readout_layers, cfg.n_embd
        self.fc = nn.ModuleList(nn.Linear(3 * C, 4 * C) for _ in range(n))
        self.proj = nn.ModuleList(nn.Linear(4 * C, C) for _ in range(n))

    def forward(self, h, emb, r_prev):
        r = h
        for fc, proj in zip(self.fc, self.proj):
            r = r + proj(F.gelu(fc(torch.cat([r, emb, r_prev], dim=-1))))
        return r


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.noise_encoder = NoiseEncoder(cfg) if cfg.max_k > 0 else None
        if cfg.readout not in ("argmax", "cdf", "cdf_seq"):
            raise ValueError(f"readout must be argmax, cdf or cdf_seq, not {cfg.readout!r}")
        # (at k = 1 no token comes from a slot: no slot MLP, which DDP would find without a grad)
        self.slot_readout = SlotReadout(cfg) if cfg.readout == "cdf_seq" and cfg.max_k > 1 else None
        if cfg.coupling not in ("inverse_cdf", "gumbel"):
            raise ValueError(f"coupling must be inverse_cdf or gumbel, not {cfg.coupling!r}")
        for m in self.modules():   # GPT-2's init, with residual projections scaled by depth
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and name.startswith("blocks"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for proj in self.slot_readout.proj if self.slot_readout is not None else []:
            nn.init.zeros_(proj.weight)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _trunk(self, x, pos, mask, cache=None):
        # RoPE in the residual stream's dtype: a bf16 copy rotates q and k in bf16, as it makes them
        cos, sin = (t.to(x.dtype) for t in rope(self.config, pos))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache, pos)
        return self.ln_f(x)

    def _logits(self, h, real_vocab=True):
        # sampling and the student's loss never see the padding ids; the AR loss keeps them (never
        # targets, they learn to vanish) and skips the copy a slice costs
        logits = self.lm_head(h)
        return logits[..., :self.config.vocab_size] if real_vocab else logits

    def forward(self, idx, targets=None, anchors=None, noise=None, window=None):
        """AR training and scoring: causal attention over real tokens; returns (logits, loss).
        With noise, the student's staircase pass instead: (slot logits, None), or with the cdf
        readout (logits, tokens). All go through forward: DDP and torch.compile wrap them alike."""
        if noise is not None and self.config.readout != "argmax":
            return self.forward_cdf(idx, anchors, noise)
        if noise is not None:
            return self.forward_staircase(idx, anchors, noise, window), None
        pos = torch.arange(idx.size(1), device=idx.device)
        logits = self._logits(self._trunk(self.wte(idx), pos, None), real_vocab=targets is None)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def next_token_logits(self, idx, anchors):
        """AR logits of the token after each anchor position t: (B, A, vocab)."""
        h = self._trunk(self.wte(idx), torch.arange(idx.size(1), device=idx.device), None)
        return self._logits(torch.gather(h, 1, anchors.unsqueeze(-1).expand(-1, -1, h.size(-1))))

    # --------------------------------------------------------------------------------------------
    # The student: noise slots after the context, trained on the staircase, read out by argmax
    # (forward_staircase) or as distributions (forward_cdf, read_out; draw is in section 3).

    def forward_staircase(self, idx, anchors, noise, window=None):
        """The training layout: one pass over [N context tokens | A windows], the window of anchor t
        holding its k noise slots (B, A, k uniforms) at positions t+1..t+k. window: (B, A, m) tokens
        committed after t, at t+1..t+m as if real, the slots then at t+m+1..t+m+k (the previous
        student's own tokens in a self-forcing rollout). The paper trains every position as an
        anchor; A < N is a saving. Returns the slots' logits, (B, A, k, vocab)."""
        x_win = self.noise_encoder(noise)                                       # (B, A, k, C)
        m = 0 if window is None else window.size(2)
        if window is not None:
            x_win = torch.cat([self.wte(window), x_win], dim=2)
        h = self._staircase(idx, anchors, x_win)[:, idx.size(1):]
        return self._logits(h.reshape(*x_win.shape[:3], -1)[:, :, m:])

    def forward_cdf(self, idx, anchors, noise):
        """The distribution readout's training pass over [context | A windows of k - 1 noise slots],
        then read_out. Noise slot i stands for token i at its position: its state, like a real
        token's, predicts the next (token 1's: the anchor's). Returns the k distributions' logits
        (B, A, k, vocab) and the tokens drawn from them with the noise (B, A, k)."""
        N, k = idx.size(1), noise.size(2)
        h = self._staircase(idx, anchors, self.noise_encoder(noise[:, :, :-1]))
        at_anchor = torch.gather(h, 1, anchors.unsqueeze(-1).expand(-1, -1, h.size(-1)))
        h_slots = h[:, N:].reshape(*noise.shape[:2], k - 1, h.size(-1))
        return self.read_out(at_anchor, h_slots, noise)

    def read_out(self, h_last, h_slots, u):
        """From the states of the last real token (..., C) and of the k - 1 noise slots after it
        (..., k - 1, C) to k distributions and tokens, x_i = draw(distribution i, u_i)."""
        r, logits, tokens = h_last, [], []
        for i in range(u.size(-1)):
            logits.append(self._logits(r))
            tokens.append(draw(logits[-1], u[..., i], self.config.coupling))
            if i + 1 < u.size(-1):   # the state that token i+1's distribution is read from
                h, mlp = h_slots[..., i, :], self.slot_readout
                r = h if mlp is None else mlp(h, self.wte(tokens[-1]), r)
        return torch.stack(logits, dim=-2), torch.stack(tokens, dim=-1)

    def window_tokens(self, idx, anchors, noise):
        """The student's tokens for each anchor's window of noise, (B, A, k), by its readout."""
        if self.config.readout == "argmax":
            return self.forward_staircase(idx, anchors, noise).argmax(-1)
        return self.forward_cdf(idx, anchors, noise)[1]

    def forward_window(self, idx, anchors, window):
        """AR logits of the m + 1 tokens after each anchor t when the m tokens of `window` (B, A, m)
        follow t as if real: (B, A, m + 1, vocab), in one pass on the staircase. A teacher's
        conditional chain after a student's own tokens (on-policy targets) or its own (exact)."""
        B, N = idx.shape
        h = self._staircase(idx, anchors, self.wte(window))
        at_anchor = torch.gather(h, 1, anchors.unsqueeze(-1).expand(-1, -1, h.size(-1)))
        return self._logits(torch.cat([at_anchor.unsqueeze(2),
                                       h[:, N:].reshape(*window.shape, h.size(-1))], dim=2))

    def _staircase(self, idx, anchors, x_win):
        """The trunk over [N context tokens | A windows of W inputs x_win (B, A, W, C)] under the
        staircase mask, window element j of anchor t at position t + 1 + j: (B, N + A*W, C)."""
        B, N = idx.shape
        A, W = x_win.shape[1:3]
        x = torch.cat([self.wte(idx), x_win.reshape(B, A * W, x_win.size(-1))], dim=1)
        win_pos = anchors.unsqueeze(-1) + 1 + torch.arange(W, device=idx.device)   # (B, A, W)
        pos = torch.cat([torch.arange(N, device=idx.device).expand(B, N),
                         win_pos.reshape(B, A * W)], dim=1)
        return self._trunk(x, pos, staircase_mask(N, anchors, W))

    @classmethod
    def student_from(cls, teacher, max_k, **choices):
        """A student initialised from its teacher: every shared tensor copied; from an AR teacher
        (the first stage) the noise encoder and slot readout are new, later stages copy them too.
        No dropout, as in the paper's k = 4 stage. choices (STUDENT_CHOICES): the first stage's;
        later stages inherit them."""
        assert set(choices) <= set(STUDENT_CHOICES), choices
        cfg = GPTConfig(**{**asdict(teacher.config), "max_k": max_k, "dropout": 0.0})
        if teacher.noise_encoder is None:
            cfg = replace(cfg, **{name: v for name, v in choices.items() if v is not None})
        student = cls(cfg).to(next(teacher.parameters()).device)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all(k.startswith(("noise_encoder.", "slot_readout."))
                                      for k in missing)
        return student

    # --------------------------------------------------------------------------------------------
    # Decoding (section 3): each pass feeds [the k tokens committed last pass | the noise slots].

    def forward_step(self, tokens, pos, slots, cache):
        """One cached pass: the n tokens to commit (the prompt at prefill), then the noise slots'
        inputs `slots` (B, s, C) (None if none: AR, a cdf student at k = 1), at consecutive
        positions `pos`. Returns only the states a readout needs: the last real token's and the
        slots', (B, 1 + s, C)."""
        x = self.wte(tokens)
        if slots is not None:
            x = torch.cat([x, slots.to(x.dtype)], dim=1)
        return self._trunk(x, pos, cache.mask(pos), cache=cache)[:, tokens.size(1) - 1:]


# ------------------------------------------------------------------------------------------------
# 3. Sampling as a deterministic function of noise, and the one decode loop.

def inverse_cdf(logits, u):
    """x = F^-1(u | ctx): the smallest id whose cumulative probability (token-id order) exceeds u.
    Float32 logits (targets, quality) are summed in float64, so the same (logits, u) give the same
    token on any device unless u falls within float64 rounding of a bucket's edge; bf16 logits
    (timed decoding, the student's own draws under autocast) in float32, as a server samples. u is
    scaled by the sum's total (which misses 1 by its rounding) and the result clamped to the last
    id with mass: no u, however close to 1, lands on an id without mass."""
    dtype = torch.float64 if logits.dtype in (torch.float32, torch.float64) else torch.float32
    cdf = torch.cumsum(torch.softmax(logits, dim=-1, dtype=dtype), dim=-1)
    total = cdf[..., -1:].contiguous()
    tok = torch.searchsorted(cdf, (u.to(dtype).unsqueeze(-1) * total).contiguous(), right=True)
    last = torch.searchsorted(cdf, total, right=False)   # the last id with mass
    return torch.minimum(tok, last).squeeze(-1)


def _mix(x):   # a 32-bit integer hash in int64 arithmetic (no product reaches 2^63)
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def gumbel_max(logits, u):
    """x = argmax_j logit_j + G_j: the Gumbel-max trick, its Gumbel variates G_j = -log E_j made
    from the one uniform u by a fixed hash of (u, j), E_j ~ Exp(1). Exact as a pseudo-random draw
    is. Two nearby distributions drawn with the same u give the same token with probability at
    least (1 - TV) / (1 + TV); the inverse CDF loses a share at every bucket boundary that moves."""
    bits = (u.double() * 2.0 ** 53).long()   # u's 53 bits, folded to 32
    seed = ((bits >> 32) ^ bits).unsqueeze(-1) & 0xFFFFFFFF
    j = torch.arange(logits.size(-1), device=u.device) * 0x9E3779B1 & 0xFFFFFFFF
    e = -torch.log((_mix(seed ^ j).double() + 0.5) / 2.0 ** 32)
    return (logits.double() - torch.log(e)).argmax(-1)


def draw(logits, u, coupling):
    """A token from each distribution and its uniform u, by the coupling: noise to token, fixed."""
    return gumbel_max(logits, u) if coupling == "gumbel" else inverse_cdf(logits, u)


def decode_mask(qpos, length):
    """Query i of a cached pass, at position qpos[i], sees the cache entries up to its own position:
    (T, length) booleans. For [k committed tokens | k noise slots] that is the staircase's rule, and
    stale entries past a query (an earlier, longer generation) stay hidden, unsliced. The last
    pass's slots are not masked: this pass's tokens overwrite them first (KVCache)."""
    return torch.arange(length, device=qpos.device)[None, :] <= qpos[:, None]


class KVCache:
    """A static KV cache, a K and a V tensor (B, heads, block_size, head dim) per layer, written in
    place at the positions of each pass's inputs, noise slots included: a slot's row is the position
    of the token its noise draws, so the next pass overwrites it with that token before any of its
    queries reads it. So a slot is attended only by itself and the later slots of its own pass (the
    paper: slots are used in the pass and discarded), and shapes never change (compilable,
    capturable in a CUDA graph)."""

    def __init__(self, cfg, batch_size, device, dtype):
        shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.batch_size, self.length, self.dtype = batch_size, cfg.block_size, dtype
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]

    def update(self, layer, pos, k, v):
        self.k[layer].index_copy_(2, pos, k.to(self.dtype))
        self.v[layer].index_copy_(2, pos, v.to(self.dtype))
        return self.k[layer], self.v[layer]

    def mask(self, qpos):   # additive, built once per pass (SDPA would convert a boolean per layer)
        visible = decode_mask(qpos, self.length)
        return torch.full(visible.shape, float("-inf"), dtype=self.dtype,
                          device=qpos.device).masked_fill_(visible, 0.0)

    def attend(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.no_grad()
def decode_step(model, tokens, pos, u, cache):
    """One pass: commit `tokens` and read out the next k tokens from their uniforms u (B, k); pos:
    the positions of the tokens, then of the k after them. The argmax readout: k noise slots, x_i =
    argmax at slot i. The cdf readout: k - 1 slots, x_i = draw(distribution i, u_i) by its coupling;
    AR is its k = 1 case, x = draw(p(. | ctx), u) from the last token's state, with no slot."""
    n, k = tokens.size(1), u.size(1)
    assert model.config.max_k or k == 1, "an AR model decodes one token per pass"
    if model.config.readout == "argmax" and model.config.max_k:
        h = model.forward_step(tokens, pos, model.noise_encoder(u), cache)
        return model._logits(h[:, 1:]).argmax(dim=-1)
    slots = model.noise_encoder(u[:, :-1]) if k > 1 else None
    h = model.forward_step(tokens, pos[:n + k - 1], slots, cache)
    return model.read_out(h[:, 0], h[:, 1:], u)[1]


@torch.no_grad()
def generate(model, prompt, noise, k=1, cache=None, step_fn=decode_step):
    """The one decode loop. prompt: (B, P) tokens. noise: (B, n_new) uniforms, u_j for the j-th new
    token, so that AR (k = 1) and a student (any k) decode the same noise and compare position by
    position. Returns (B, n_new) tokens. cache: a KVCache to reuse (stale entries are masked);
    step_fn: each pass after the prefill, decode_step or fast.CUDAGraphStep() (a CUDA graph)."""
    B, P = prompt.shape
    n_new, max_k = noise.size(1), model.config.max_k or 1
    if not 1 <= k <= max_k:
        raise ValueError(f"k = {k}, but this model decodes 1 to {max_k} tokens per pass")
    if P < 1:
        raise ValueError("the prompt is empty: decoding starts from at least one token")
    if n_new % k:
        raise ValueError(f"the number of new tokens ({n_new}) must be a multiple of k ({k})")
    if P + n_new > model.config.block_size:
        raise ValueError(f"prompt ({P}) + new tokens ({n_new}) exceed the block size "
                         f"{model.config.block_size}")
    if cache is None:
        cache = KVCache(model.config, B, prompt.device, next(model.parameters()).dtype)
    elif cache.batch_size != B or cache.length < P + n_new:
        raise ValueError(f"the cache (batch {cache.batch_size}, length {cache.length}) does not "
                         f"fit batch {B} and {P + n_new} tokens")
    out = torch.empty(B, n_new, dtype=torch.long, device=prompt.device)
    if n_new == 0:
        return out
    pos = torch.arange(P + n_new, device=prompt.device)
    # prefill: commit the prompt, read out the first k tokens (eagerly: a one-off shape)
    out[:, :k] = tokens = decode_step(model, prompt, pos[:P + k], noise[:, :k], cache)
    # decode: each pass commits the k tokens the last one read out, and reads out k more
    for s in range(k, n_new, k):
        tokens = step_fn(model, tokens, pos[P + s - k:P + s + k], noise[:, s:s + k], cache)
        out[:, s:s + k] = tokens
    return out


# ------------------------------------------------------------------------------------------------
# 4. Measures. Same-noise agreement: how often the student's token equals the AR teacher's drawn
# with the same u. Read it against what a student blind to the noise would reach.

def same_noise_agreement(a, b, k):
    """Fraction of positions where two same-noise samples agree, per slot: slot i is the i-th token
    of a pass (position j, from 0, is slot j % k + 1)."""
    eq = (a == b).float()
    return [eq[:, i::k].mean().item() for i in range(k)]


def teacher_context(prompts, ar_tokens, noise, k):
    """Every window on the AR teacher's own context: window j starts from the teacher's sample so
    far (prompt + its first j*k tokens) with the noise the teacher used for its next k tokens.
    Returns the sequence, the windows' anchors (B, n / k) and their uniforms (B, n / k, k), n the
    tokens of whole windows."""
    B, P = prompts.shape
    n = ar_tokens.size(1) // k * k
    seq = torch.cat([prompts, ar_tokens[:, :n]], dim=1)[:, :P + n - k]   # the last window's context
    anchors = (P - 1 + torch.arange(0, n, k, device=seq.device)).expand(B, -1)
    return seq, anchors, noise[:, :n].reshape(B, -1, k)


@torch.no_grad()
def teacher_context_windows(student, prompts, ar_tokens, noise, k, batch=32):
    """The student's tokens in every window on the teacher's context (teacher_context), (B, n);
    a pass per batch rows."""
    seq, anchors, slots = teacher_context(prompts, ar_tokens, noise, k)
    return torch.cat([student.window_tokens(seq[i:i + batch], anchors[i:i + batch],
                                            slots[i:i + batch])
                      for i in range(0, len(seq), batch)]).flatten(1)


@torch.no_grad()
def window_agreement(student, prompts, ar_tokens, noise, k, batch=32):
    """Same-noise agreement per slot on the AR teacher's own context (teacher_context_windows).
    (Free-running, two samples part at their first difference and later positions agree mostly by
    chance; here every window starts in step.)"""
    tokens = teacher_context_windows(student, prompts, ar_tokens, noise, k, batch)
    B, n = tokens.shape
    return (tokens.view(B, -1, k) == ar_tokens[:, :n].reshape(B, -1, k)).float().mean(
        dim=(0, 1)).tolist()


@torch.no_grad()
def agreement_without_noise(teacher, prompts, ar_tokens, batch=16):
    """The agreement of a student blind to the noise, over the positions of the teacher's samples:
    an independent draw from the teacher's p matches with probability sum p^2, its most likely token
    (a student collapsed to the mode) with max p. Agreement above these is carried by the noise."""
    independent = mode = 0.0
    for logits, _ in continuation_logits(teacher, prompts, ar_tokens, batch):
        p = torch.softmax(logits, dim=-1)
        independent += (p * p).sum().item()
        mode += p.max(dim=-1).values.sum().item()
    n = ar_tokens.numel()
    return {"independent_draw": independent / n, "teacher_mode": mode / n}


def continuation_logits(model, prompts, samples, batch):
    """A model's float32 logits for each token of `samples` given the prompt and the samples before
    it, `batch` rows at a time: yields (logits, those rows' samples)."""
    P = prompts.size(1)
    x = torch.cat([prompts, samples], dim=1)
    for i in range(0, len(x), batch):
        logits, _ = model(x[i:i + batch, :-1])   # position j predicts token j + 1
        yield logits[:, P - 1:].float(), x[i:i + batch, P:]
