"""The method's specification: the cached decode path computes what the full forward computes, the
staircase mask leaks nothing, sampling is a deterministic function of the noise, and a student
starts as its teacher."""
import dataclasses
import math
import os

import pytest
import torch

from model import (GPT, GPTConfig, KVCache, SlotReadout, agreement_without_noise, apply_rope,
                   decode_mask, decode_step, draw, generate, inverse_cdf, rope,
                   same_noise_agreement, staircase_mask, window_agreement)

V = 50257


def tiny(max_k=0, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=48, n_layer=2, n_head=2, n_embd=32, max_k=max_k, **kw)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def teacher():
    return tiny()


@pytest.fixture(scope="module")
def student(teacher):
    torch.manual_seed(1)
    s = GPT.student_from(teacher, 4).eval()
    # a fresh noise encoder gives nearly constant slot inputs; perturb the copied weights too, so
    # that a wrong mask or position would show up as a difference in every test below
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return s


def test_rope_rotates_pairs_by_their_position():
    """Every path calls the same apply_rope, so the consistency tests below cannot catch a wrong
    rotation. Check it against the per-half formula, and check what RoPE is for: q.k depends on the
    positions only through m - n."""
    cfg = GPTConfig(n_head=2, n_embd=16)
    q, k = torch.randn(2, 8, dtype=torch.float64).float().unbind(0)
    pos = torch.arange(40)
    cos, sin = rope(cfg, pos)
    qr = apply_rope(q.expand(40, 8), cos, sin)
    ang = pos[:, None].float() * 10000.0 ** (-torch.arange(0, 8, 2).float() / 8)
    x1, x2 = q[:4], q[4:]
    torch.testing.assert_close(
        qr, torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1),
        rtol=0, atol=1e-6)
    kr = apply_rope(k.expand(40, 8), cos, sin)
    dots = qr @ kr.T                                   # dots[m, n] = rope(q, m) . rope(k, n)
    # both blocks hold offsets m - n from -12 to 26, each at positions 7 apart
    torch.testing.assert_close(dots[10:30, 3:23], dots[17:37, 10:30], rtol=0, atol=1e-4)
    assert not torch.allclose(dots[10, 3], dots[10, 4])   # and it does depend on m - n


@torch.no_grad()
@pytest.mark.parametrize("splits", [[1, 17, 40], [6, 7, 8, 9, 30], [40]])
def test_kv_cache_decode_equals_full_forward(teacher, splits):
    x = torch.randint(0, V, (3, 40))
    full, _ = teacher(x)
    cache = KVCache(teacher.config, 3, "cpu", torch.float32)
    start = 0
    for end in splits:
        last = teacher._logits(teacher.forward_step(x[:, start:end], torch.arange(start, end),
                                                    None, cache))
        torch.testing.assert_close(last[:, -1], full[:, end - 1], rtol=0, atol=1e-4)
        start = end


@torch.no_grad()
def test_stale_cache_entries_are_masked(teacher):
    # a cache full of garbage past the current length must not change anything
    x = torch.randint(0, V, (2, 20))
    full, _ = teacher(x)
    cache = KVCache(teacher.config, 2, "cpu", torch.float32)
    for t in cache.k + cache.v:   # garbage in every entry
        t.normal_()
    last = teacher._logits(teacher.forward_step(x, torch.arange(20), None, cache))
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=0, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("m", [0, 2])
def test_student_cached_step_equals_staircase(student, m):
    """A decode step ([committed tokens | k slots] over the cache) gives the logits that the
    training layout gives for the same window: the two layouts are one function."""
    B, N, A, k = 2, 30, 5, 4 - m
    x = torch.randint(0, V, (B, N))
    anchors = torch.stack([torch.randperm(N)[:A] for _ in range(B)])
    u = torch.rand(B, A, k, dtype=torch.float64)
    window = torch.randint(0, V, (B, A, m)) if m else None
    stair = student.forward_staircase(x, anchors, u, window=window)
    for b in range(B):
        for a in range(A):
            t = anchors[b, a].item()
            ctx = (x[b:b + 1, :t + 1] if not m
                   else torch.cat([x[b:b + 1, :t + 1], window[b:b + 1, a]], 1))
            cache = KVCache(student.config, 1, "cpu", torch.float32)
            split = max(1, ctx.size(1) // 2)   # commit the context in two passes, as decoding does
            # the slots sit after the context
            slots, end = student.noise_encoder(u[b:b + 1, a]), ctx.size(1) + k
            student.forward_step(ctx[:, :split], torch.arange(split), None, cache)
            step = student.forward_step(ctx[:, split:], torch.arange(split, end), slots, cache) \
                if ctx.size(1) > split else None
            if step is None:   # a 1-token context: commit it together with the slots
                cache = KVCache(student.config, 1, "cpu", torch.float32)
                step = student.forward_step(ctx, torch.arange(end), slots, cache)
            torch.testing.assert_close(student._logits(step[0, 1:]), stair[b, a], rtol=0,
                                       atol=1e-4)


@torch.no_grad()
def test_forward_window_is_the_teachers_chain_after_the_window(teacher):
    """After anchor t and its window of m tokens, forward_window gives what a plain causal pass over
    [x_0..x_t | window] gives at its last m + 1 positions: the teacher's conditional chain after any
    tokens (on-policy and exact targets) comes from one staircase pass."""
    x = torch.randint(0, V, (2, 20))
    anchors, window = torch.tensor([[3, 11], [0, 19]]), torch.randint(0, V, (2, 2, 3))
    out = teacher.forward_window(x, anchors, window)
    for b in range(2):
        for a in range(2):
            t = anchors[b, a].item()
            seq = torch.cat([x[b, :t + 1], window[b, a]])[None]
            torch.testing.assert_close(out[b, a], teacher(seq)[0][0, t:], rtol=0, atol=1e-4)


@torch.no_grad()
def picture(mask, rows, positions, columns, width):
    """A mask as the README draws it: a header of column names, then one line per row, x where it
    may attend."""
    lines = [" " * (width + 3) + " ".join(f"{c:>{width}}" for c in columns)]
    lines += [f"{r:>{width}}@{p} "
              + " ".join(f"{'x' if seen else '.':>{width}}" for seen in m.tolist())
              for r, p, m in zip(rows, positions, mask)]
    return "```text\n" + "\n".join(lines) + "\n```"


def test_the_readmes_mask_pictures_are_the_codes():
    """The README draws the staircase (N = 5, anchors 1 and 3, k = 2) and a decode pass (k = 2, the
    second pass after a 3-token prompt, a cache of 8): they must be what staircase_mask and
    decode_mask build."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "README.md")) as f:
        readme = f.read()
    N, anchors, k = 5, torch.tensor([[1, 3]]), 2
    names = [f"x{i}" for i in range(N)] + [f"a{t}s{i + 1}" for t in (1, 3) for i in range(k)]
    positions = list(range(N)) + [t + 1 + i for t in (1, 3) for i in range(k)]
    assert picture(staircase_mask(N, anchors, k)[0, 0], names, positions, names, 4) in readme
    qpos = torch.arange(3, 7)
    assert picture(decode_mask(qpos, 8), ["t3", "t4", "s1", "s2"], qpos.tolist(),
                   ["p0", "p1", "p2", "t3", "t4", "s1", "s2", "-"], 3) in readme


def test_staircase_mask_leaks_nothing(student):
    """A slot sees only context <= its anchor and the slots of its own window up to itself."""
    B, N, A, k = 2, 24, 4, 4
    x = torch.randint(0, V, (B, N))
    anchors = torch.tensor([[3, 10, 11, 20], [0, 5, 17, 23]])
    u = torch.rand(B, A, k, dtype=torch.float64)
    base = student.forward_staircase(x, anchors, u)
    # later context tokens: change everything after the smallest anchor of row 0 (t = 3)
    x2 = x.clone()
    x2[0, 4:] = torch.randint(0, V, (N - 4,))
    out = student.forward_staircase(x2, anchors, u)
    torch.testing.assert_close(out[0, 0], base[0, 0], rtol=0, atol=1e-5)
    assert (out[0, 1:] - base[0, 1:]).abs().max() > 1e-3   # the others do see it: the test can fail
    # later slots' noise, and other windows' noise: change u of slots 3.. of window 1 and all of
    # window 2 (windows counted from 0, as indexed; slots from 1)
    u2 = u.clone()
    u2[:, 1, 2:] = torch.rand(B, 2, dtype=torch.float64)
    u2[:, 2] = torch.rand(B, k, dtype=torch.float64)
    out = student.forward_staircase(x, anchors, u2)
    torch.testing.assert_close(out[:, 1, :2], base[:, 1, :2], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, [0, 3]], base[:, [0, 3]], rtol=0, atol=1e-5)
    assert (out[:, 1, 2:] - base[:, 1, 2:]).abs().max() > 1e-3
    # the context rows never see any slot (so a window cannot reach another through the context, as
    # windows 0 and 3 above show), and the forward that DDP wraps returns the same staircase logits
    assert not staircase_mask(N, anchors, k)[:, :, :N, N:].any()
    assert torch.equal(student(x, anchors=anchors, noise=u)[0], base)


@torch.no_grad()
@pytest.mark.parametrize("readout", ["argmax", "cdf_seq"])
def test_first_slots_of_a_k_model_are_a_smaller_k_model(teacher, student, readout):
    torch.manual_seed(0)   # the same inputs whatever ran before
    model = student if readout == "argmax" else cdf_student(teacher, readout)
    x = torch.randint(0, V, (2, 20))
    anchors = torch.tensor([[4, 9], [15, 19]])
    u = torch.rand(2, 2, 4, dtype=torch.float64)
    full = model.window_tokens(x, anchors, u)
    for kk in (1, 2, 3):
        assert torch.equal(model.window_tokens(x, anchors, u[:, :, :kk]), full[:, :, :kk])
    # and in decoding: the first window of k = 4 starts with the first window of k = 2
    prompt, noise = torch.randint(0, V, (3, 6)), torch.rand(3, 8, dtype=torch.float64)
    g4, g2 = generate(model, prompt, noise, k=4), generate(model, prompt, noise, k=2)
    assert torch.equal(g4[:, :2], g2[:, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # summed in float64 / float32
def test_inverse_cdf_never_lands_on_an_id_without_mass(dtype):
    # rows enough that some cumulative sums end below 1, in float64 too (27 of these 64 do)
    B = 64
    logits = torch.randn(B, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[:, :3] = logits[:, 49:] = float("-inf")   # ids without mass at both ends
    summed_in = torch.float64 if dtype == torch.float32 else torch.float32   # as inverse_cdf sums
    assert (torch.softmax(logits, -1, dtype=summed_in).cumsum(-1)[:, -1] < 1).any()   # premise
    # u = 0 gives the first token with mass, u -> 1 the last: never an id without mass, whatever
    # the rounding
    assert (inverse_cdf(logits, torch.zeros(B, dtype=torch.float64)) == 3).all()
    # the first u_max is the largest u below 1
    for u_max in (math.nextafter(1.0, 0.0), 1 - 1e-12, 1 - 1e-9, 1 - 1e-7):
        assert (inverse_cdf(logits, torch.full((B,), u_max, dtype=torch.float64)) == 48).all()


def test_inverse_cdf_sums_float32_logits_in_float64():
    """Same-noise targets need the same token for the same (logits, u): a u between a token's
    float64 cumulative probability and its float32 rounding must fall on the float64 side."""
    logits = torch.tensor([[math.log(0.3), math.log(0.7)]])
    edge = torch.softmax(logits.double(), -1)[0, 0].item()
    for u in (edge - 1e-13, edge + 1e-13):
        assert inverse_cdf(logits, torch.tensor([u], dtype=torch.float64)).item() == int(u >= edge)


@pytest.mark.parametrize("coupling", ["inverse_cdf", "gumbel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_coupling_samples_the_softmax(dtype, coupling):
    torch.manual_seed(0)
    logits = (torch.randn(20) * 2).to(dtype)   # bf16 logits (bench's speed runs) sum in float32
    n = 200_000
    tok = draw(logits.expand(n, -1), torch.rand(n, dtype=torch.float64), coupling)
    freq = torch.bincount(tok, minlength=20).double() / n
    tv = 0.5 * (freq - torch.softmax(logits.double(), -1)).abs().sum().item()
    assert tv < 0.01, tv       # sampling error of 200k draws over 20 bins is ~0.003


def test_the_gumbel_coupling_is_near_maximal():
    """Two nearby distributions drawn with the same u: no coupling agrees more often than 1 - TV;
    Gumbel-max (its variates a fixed function of u and the token) agrees at least (1 - TV) / (1 +
    TV) of the time, the inverse CDF loses a share at every bucket boundary that moves."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(20, generator=g) * 2
    q = p + 0.3 * torch.randn(20, generator=g)
    tv = 0.5 * (p.double().softmax(-1) - q.double().softmax(-1)).abs().sum().item()   # 0.08
    u = torch.rand(200_000, generator=g, dtype=torch.float64)
    agree = {c: (draw(p.expand(len(u), -1), u, c) == draw(q.expand(len(u), -1), u, c)).double()
             .mean().item() for c in ("inverse_cdf", "gumbel")}
    assert (1 - tv) / (1 + tv) - 0.01 < agree["gumbel"] < 1 - tv + 0.01, (agree, tv)
    assert agree["inverse_cdf"] < agree["gumbel"] - 0.1, agree   # here 0.75 against 0.91


def test_the_gumbel_coupling_reads_every_bit_of_u():
    """Gumbel-max hashes all 53 bits of u (folded to 32), so uniforms whose low bits are all zero
    (float32 noise keeps 24 bits; a grid of 2^14 steps) still give each u its own variates and
    sample the softmax. Hashing only u's low 32 bits would give every grid point one set of
    variates (one token), and float32 noise eight."""
    logits = torch.randn(20, generator=torch.Generator().manual_seed(0)) * 2
    n = 2 ** 14
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for u in (grid, torch.rand(n, generator=torch.Generator().manual_seed(1)).double()):
        freq = torch.bincount(draw(logits.expand(n, -1), u, "gumbel"), minlength=20).double() / n
        tv = 0.5 * (freq - torch.softmax(logits.double(), -1)).abs().sum().item()
        assert tv < 0.05, tv   # sampling error of 16k draws over 20 bins is ~0.02


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 2, 4])
def test_same_noise_same_sample(teacher, student, k):
    model = teacher if k == 1 else student
    prompt = torch.randint(0, V, (3, 6))
    noise = torch.rand(3, 16, dtype=torch.float64)
    a, b = generate(model, prompt, noise, k), generate(model, prompt, noise.clone(), k)
    assert torch.equal(a, b)
    # the noise is the only source of randomness, and it is used: other noise gives another sample
    assert not torch.equal(a, generate(model, prompt, torch.rand(3, 16, dtype=torch.float64), k))


def test_agreement_without_noise_is_the_teachers_own_odds():
    """At each new token, given the sample so far: sum p^2 for an independent draw, max p for the
    most likely token. The teacher here is sure after an odd token and splits 1/2, 1/4, 1/4 after an
    even one."""
    sure = torch.tensor([0.0] + [float("-inf")] * 7)
    split = torch.tensor([1 / 2, 1 / 4, 1 / 4] + [0.0] * 5).log()
    teacher = lambda x: (torch.where((x % 2 == 1).unsqueeze(-1), sure, split), None)  # noqa: E731
    # the three new tokens of row 1 are drawn after 2, 4 and 6 (split each time), those of row 2
    # after 3, 5 and 7 (sure)
    prompts, samples = torch.tensor([[1, 2], [1, 3]]), torch.tensor([[4, 6, 7], [5, 7, 1]])
    for batch in (1, 16):
        assert agreement_without_noise(teacher, prompts, samples, batch=batch) == pytest.approx(
            {"independent_draw": (3 * 0.375 + 3) / 6, "teacher_mode": (3 * 0.5 + 3) / 6})


@torch.no_grad()
def test_ar_decode_equals_naive_sampling(teacher):
    """The cached loop samples x_j = F^-1(u_j | x_<j) exactly as a full forward per token would."""
    prompt, noise = torch.randint(0, V, (2, 6)), torch.rand(2, 10, dtype=torch.float64)
    seq = prompt
    for j in range(10):
        logits = teacher(seq)[0][:, -1]
        seq = torch.cat([seq, inverse_cdf(logits, noise[:, j]).unsqueeze(1)], 1)
    assert torch.equal(generate(teacher, prompt, noise, k=1), seq[:, 6:])


def cdf_student(teacher, readout, perturb=True, layers=1, coupling="inverse_cdf"):
    torch.manual_seed(1)
    s = GPT.student_from(teacher, 4, readout=readout, readout_layers=layers,
                         coupling=coupling).eval()
    with torch.no_grad():   # as the student fixture: a wrong mask or readout must show
        for p in s.parameters() if perturb else ():
            p.add_(0.05 * torch.randn_like(p))
    return s


@torch.no_grad()
@pytest.mark.parametrize("readout,layers,coupling", [
    ("argmax", 1, "inverse_cdf"), ("cdf", 1, "inverse_cdf"), ("cdf_seq", 1, "inverse_cdf"),
    ("cdf_seq", 3, "inverse_cdf"), ("cdf_seq", 3, "gumbel")])
def test_student_decode_equals_staircase(teacher, student, readout, layers, coupling):
    """Each pass of generate() is the student's staircase window on the tokens committed so far."""
    model = student if readout == "argmax" else cdf_student(teacher, readout, layers=layers,
                                                            coupling=coupling)
    prompt, noise = torch.randint(0, V, (2, 6)), torch.rand(2, 12, dtype=torch.float64)
    out = generate(model, prompt, noise, k=4)
    seq = torch.cat([prompt, out], 1)
    for s in range(0, 12, 4):
        t = 6 + s - 1
        anchors = torch.full((2, 1), t)
        ref = model.window_tokens(seq[:, :t + 1], anchors, noise[:, None, s:s + 4])[:, 0]
        assert torch.equal(out[:, s:s + 4], ref)
    assert not torch.equal(generate(model, prompt, 1 - noise, k=4), out)   # they use the noise


@torch.no_grad()
@pytest.mark.parametrize("readout,layers", [("cdf", 1), ("cdf_seq", 1), ("cdf_seq", 3)])
def test_a_cdf_student_starts_as_its_teacher(teacher, readout, layers):
    """The distribution readout reads token 1's distribution from the last real token's state: a
    fresh student's is exactly the teacher's, so at k = 1 it samples the teacher exactly (AR is the
    readout with no slot), and at k = 4 its first token of every window is the teacher's (its
    logits to rounding: the staircase pass sums in another order). The slot MLP's output layers
    start at zero: a fresh cdf_seq student reads out what a cdf one does."""
    s = cdf_student(teacher, readout, perturb=False, layers=layers)
    prompt, noise = torch.randint(0, V, (3, 6)), torch.rand(3, 16, dtype=torch.float64)
    ar = generate(teacher, prompt, noise, k=1)
    assert torch.equal(generate(s, prompt, noise, k=1), ar)
    x, anchors = torch.randint(0, V, (2, 20)), torch.tensor([[3, 9, 19], [0, 5, 12]])
    u = torch.rand(2, 3, 4, dtype=torch.float64)
    logits, tokens = s.forward_cdf(x, anchors, u)
    assert logits.shape == (2, 3, 4, V) and tokens.shape == (2, 3, 4)
    teacher_logits = teacher.next_token_logits(x, anchors)
    torch.testing.assert_close(logits[:, :, 0], teacher_logits)
    assert torch.equal(tokens[..., 0], draw(teacher_logits, u[..., 0], "inverse_cdf"))
    if readout == "cdf_seq":
        plain = cdf_student(teacher, "cdf", perturb=False)   # no slot MLP, the same noise encoder
        plain.noise_encoder.load_state_dict(s.noise_encoder.state_dict())
        torch.testing.assert_close(logits, plain.forward_cdf(x, anchors, u)[0])


@pytest.mark.parametrize("readout", ["cdf", "cdf_seq"])
def test_the_distribution_readouts_gradient_is_the_derivative_of_its_logits(teacher, readout):
    """Distillation follows the gradient of the staircase pass's logits: every path from a weight
    to a slot's distribution carries gradient. A detached slot state, r_{i-1} or token embedding in
    the readout would leave every value as it is and quietly train less. Autograd's directional
    derivative equals central differences in float64 along directions in the noise encoder, the
    slot MLP, the embedding and the blocks (the drawn tokens stay put)."""
    s = cdf_student(teacher, readout, layers=2).double()
    x, anchors = torch.randint(0, V, (2, 12)), torch.tensor([[3, 9], [0, 11]])
    u = torch.rand(2, 2, 4, dtype=torch.float64)
    w = torch.randn(2, 2, 4, V, dtype=torch.float64)   # a fixed linear function of the logits
    params = dict(s.named_parameters())

    def f():
        logits, tokens = s.forward_cdf(x, anchors, u)
        return (logits * w).sum(), tokens
    y, tokens = f()
    grads = dict(zip(params, torch.autograd.grad(y, list(params.values()))))
    for group in ("noise_encoder.", "slot_readout.", "wte.", "blocks."):
        names = [name for name in params if name.startswith(group)]
        if not names:   # cdf: no slot MLP
            continue
        d = {name: torch.randn_like(params[name]) for name in names}

        @torch.no_grad()
        def moved(step):   # f at the weights moved by step along d, then the weights put back
            at = {name: params[name].clone() for name in names}
            for name in names:
                params[name].add_(step * d[name])
            out = f()
            for name in names:
                params[name].copy_(at[name])
            return out
        eps = 1e-6
        (up, t_up), (down, t_down) = moved(eps), moved(-eps)
        assert torch.equal(t_up, tokens) and torch.equal(t_down, tokens)
        autograd = sum((grads[name] * d[name]).sum() for name in names)
        torch.testing.assert_close(autograd, (up - down) / (2 * eps), rtol=1e-6, atol=0)


@torch.no_grad()
def test_only_the_sequential_readout_sees_the_token_a_slot_produced(teacher):
    """read_out from fixed states: changing u_1 changes token 1; with cdf the second distribution
    comes from slot 1's state alone and stays, with cdf_seq it also reads token 1 and moves."""
    h_last, h_slots = torch.randn(1, 32), torch.randn(1, 3, 32)
    u = torch.tensor([[0.01, 0.5, 0.5, 0.5], [0.99, 0.5, 0.5, 0.5]], dtype=torch.float64)
    for readout, layers, coupling in (("cdf", 1, "inverse_cdf"), ("cdf_seq", 1, "inverse_cdf"),
                                      ("cdf_seq", 3, "inverse_cdf"), ("cdf_seq", 3, "gumbel")):
        logits, tokens = cdf_student(teacher, readout, layers=layers, coupling=coupling).read_out(
            h_last.expand(2, -1), h_slots.expand(2, -1, -1), u)
        assert tokens[0, 0] != tokens[1, 0]
        assert torch.equal(logits[0, 0], logits[1, 0])
        assert torch.equal(logits[0, 1], logits[1, 1]) == (readout == "cdf"), readout
        for i in range(4):   # each token is drawn from its own distribution by the coupling
            assert torch.equal(tokens[:, i], draw(logits[:, i], u[:, i], coupling))


@torch.no_grad()
@pytest.mark.parametrize("layers", [1, 3])
def test_the_sequential_readout_reads_every_earlier_token(teacher, layers):
    """cdf_seq, as the teacher's chain: a u_2 that changes token 2 leaves the first two
    distributions and moves the third, and the fourth even where token 3 came out the same (r_3
    carries token 2 on)."""
    s = cdf_student(teacher, "cdf_seq", layers=layers)
    h_last, h_slots = torch.randn(1, 32).expand(16, -1), torch.randn(1, 3, 32).expand(16, -1, -1)
    u = torch.tensor([0.3, 0.0, 0.6, 0.4], dtype=torch.float64).repeat(16, 1)
    u[:, 1] = (torch.arange(16) + 0.5) / 16
    logits, tokens = s.read_out(h_last, h_slots, u)
    assert (logits[:, :2] == logits[:1, :2]).all()
    other = tokens[:, 1] != tokens[0, 1]
    assert other.sum() >= 8
    assert (logits[other, 2] != logits[0, 2]).any(-1).all()
    same_3 = other & (tokens[:, 2] == tokens[0, 2])
    assert same_3.any() and (logits[same_3, 3] != logits[0, 3]).any(-1).all()


@torch.no_grad()
def test_the_slot_readouts_layers_refine_the_state_in_turn():
    """Each layer of the slot MLP reads the state the layer before left, with the token and
    r_{i-1}: a 2-layer readout is its two layers applied one after the other."""
    torch.manual_seed(0)
    two = SlotReadout(GPTConfig(n_embd=16, n_head=2, readout="cdf_seq", readout_layers=2))
    one = [SlotReadout(GPTConfig(n_embd=16, n_head=2, readout="cdf_seq")) for _ in range(2)]
    for layer, m in enumerate(one):
        m.fc[0].load_state_dict(two.fc[layer].state_dict())
        m.proj[0].load_state_dict(two.proj[layer].state_dict())
    h, emb, r_prev = torch.randn(3, 5, 16).unbind(0)
    torch.testing.assert_close(two(h, emb, r_prev), one[1](one[0](h, emb, r_prev), emb, r_prev))


def test_student_copies_every_shared_tensor(teacher):
    s = GPT.student_from(teacher, 2)
    ts, ss = teacher.state_dict(), s.state_dict()
    assert set(ss) - set(ts) == {k for k in ss if k.startswith("noise_encoder.")} != set()
    for name, t in ts.items():
        assert torch.equal(ss[name], t), name
        assert ss[name].data_ptr() != t.data_ptr(), f"{name} is shared, not copied"
    # a later stage copies the noise encoder too
    s2 = GPT.student_from(s, 4)
    for name, t in s.state_dict().items():
        assert torch.equal(s2.state_dict()[name], t), name
    assert s2.config.max_k == 4 and dataclasses.asdict(s2.config)["n_embd"] == 32
    # and keeps the first stage's choices, whatever it is passed
    first = GPT.student_from(teacher, 2, readout="cdf_seq", readout_layers=3, coupling="gumbel",
                             noise_features="high")
    later = GPT.student_from(first, 4, readout="argmax", readout_layers=1,
                             coupling="inverse_cdf", noise_features="paper")
    c = later.config
    assert (c.readout, c.readout_layers, c.coupling, c.noise_features) == \
        ("cdf_seq", 3, "gumbel", "high")


def test_noise_features_separate_nearby_noise():
    """Noises 0.01 apart (a likely token's share of the inverse CDF) give distinct slot inputs: a
    little apart with the paper's frequencies (at most one cycle over [0, 1]), much further with
    "high" (up to 256 cycles)."""
    u = torch.tensor([0.50, 0.51], dtype=torch.float64)
    gap = {}
    for features in ("paper", "high"):
        e = tiny(max_k=1, noise_features=features).noise_encoder(u)
        assert torch.isfinite(e).all()
        gap[features] = ((e[0] - e[1]).norm() / e[0].norm()).item()   # about 0.02 and 1.1
    assert gap["paper"] > 0.005 and gap["high"] > 10 * gap["paper"], gap
    with pytest.raises(ValueError):
        tiny(max_k=1, noise_features="nope")


@torch.no_grad()
@pytest.mark.parametrize("features", ["paper", "high"])
def test_noise_encoder_is_the_methods_formula(features):
    """The method's noise-encoder formula, written out by hand: sinusoidal features of u in float64
    (frequencies 10000^(-i/half), or 1 to 256 cycles for "high"; arguments u * freq * 2 pi;
    [cos, sin]) -> Linear -> x + MLP(RMSNorm(x)). At 256 cycles a float32 argument near u = 1 would
    be off by more than the tolerance."""
    enc = tiny(max_k=1, noise_features=features).noise_encoder
    # non-trivial weights (RMSNorm's start at 1), so that every term shows
    for p in enc.parameters():
        p.add_(0.1 * torch.randn_like(p))
    u = torch.tensor([0.0, 0.3, 0.7001, 0.9999999], dtype=torch.float64)
    i = torch.arange(enc.half, dtype=torch.float64)
    freqs = 10000.0 ** (-i / enc.half) if features == "paper" else 256.0 ** (i / (enc.half - 1))
    arg = u[:, None] * freqs * 2 * math.pi
    x = enc.inp(torch.cat([arg.cos(), arg.sin()], dim=-1).float())
    want = x + enc.mlp.proj(torch.nn.functional.gelu(enc.mlp.fc(enc.ln(x))))
    torch.testing.assert_close(enc(u), want, rtol=0, atol=1e-6)


def test_agreement_per_slot():
    """Position j (from 0) is slot j mod k + 1 (not the j-th block of n/k positions: these samples
    tell the two apart)."""
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = torch.tensor([[1, 0, 3, 0, 5, 6]])
    assert same_noise_agreement(a, b, 2) == pytest.approx([1, 1 / 3])
    # a partial last pass: slot 1 has 3 positions, slot 2 has 2
    b = torch.tensor([[1, 0, 3, 4, 0]])
    assert same_noise_agreement(a[:, :5], b, 2) == pytest.approx([2 / 3, 1 / 2])


@torch.no_grad()
def test_values_are_not_rotated_and_logits_cover_the_real_vocabulary(teacher, student):
    """RoPE leaves the values alone: the cache holds the plain value projection. And no sampling
    path gives logits for the padding ids of the embedding (50257 -> 50304), which sampling could
    pick and the tokenizer not decode (the AR loss keeps them: see GPT._logits)."""
    x = torch.randint(0, V, (2, 5))
    cache = KVCache(teacher.config, 2, "cpu", torch.float32)
    assert teacher._logits(teacher.forward_step(x, torch.arange(5), None, cache)).size(-1) == V
    block = teacher.blocks[0]
    v = block.attn.qkv(block.ln1(teacher.wte(x))).view(2, 5, 3, 2, 16)[:, :, 2].transpose(1, 2)
    torch.testing.assert_close(cache.v[0][:, :, :5], v)
    assert teacher(x)[0].size(-1) == V
    slots = student.noise_encoder(torch.rand(2, 4, dtype=torch.float64))
    cache = KVCache(student.config, 2, "cpu", torch.float32)
    assert student._logits(student.forward_step(x, torch.arange(9), slots, cache)).size(-1) == V
    anchors = torch.tensor([[1, 3]] * 2)
    assert student.forward_staircase(x, anchors, torch.rand(2, 2, 4)).size(-1) == V
    s = cdf_student(teacher, "cdf_seq", perturb=False)
    assert s.forward_cdf(x, anchors, torch.rand(2, 2, 4, dtype=torch.float64))[0].size(-1) == V
    assert teacher.forward_window(x, anchors, torch.randint(0, V, (2, 2, 3))).size(-1) == V
    assert teacher.next_token_logits(x, anchors).size(-1) == V


def test_a_student_trains_without_dropout():
    """The k-stages train with dropout 0 (paper), whatever the teacher's."""
    assert GPT.student_from(tiny(dropout=0.1), 2).config.dropout == 0


def test_decode_step_rejects_multi_token_ar(teacher):
    cache = KVCache(teacher.config, 1, "cpu", torch.float32)
    with pytest.raises(AssertionError):
        decode_step(teacher, torch.zeros(1, 3, dtype=torch.long), torch.arange(3),
                    torch.rand(1, 2, dtype=torch.float64), cache)


def test_generate_rejects_what_the_model_cannot_decode(teacher, student):
    prompt = torch.zeros(2, 3, dtype=torch.long)
    noise = lambda n: torch.rand(2, n, dtype=torch.float64)  # noqa: E731
    for model, prompt_, noise_, k, match in (
            (teacher, prompt, noise(8), 2, "decodes 1 to 1 tokens per pass"),
            (student, prompt, noise(8), 8, "decodes 1 to 4 tokens per pass"),
            (student, prompt, noise(8), 0, "decodes 1 to 4 tokens per pass"),
            (student, prompt, noise(8), 3, "must be a multiple of k"),
            (teacher, prompt, noise(48), 1, "exceed the block size 48"),
            (student, prompt[:, :0], noise(8), 4, "the prompt is empty")):
        with pytest.raises(ValueError, match=match):
            generate(model, prompt_, noise_, k=k)
    for model in (teacher, student):   # nothing to generate: both kinds return no tokens alike
        assert generate(model, prompt, noise(0), k=1).shape == (2, 0)


@torch.no_grad()
def test_generate_gives_each_pass_its_own_float64_noise(monkeypatch):
    """Each pass gets exactly its k uniforms, in float64 (the staircase encodes them so in
    training; "high" features are sensitive to it). The prefill runs decode_step itself, every
    later pass step_fn."""
    torch.manual_seed(0)
    s = GPT.student_from(GPT(GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=32)), 2,
                         noise_features="high").eval()
    prompt, noise = torch.randint(0, V, (2, 6)), torch.rand(2, 20, dtype=torch.float64)
    seen = []

    def spy(name):   # records which pass ran where, and its noise
        return lambda m, t, p, u, c: seen.append((name, u.clone())) or decode_step(m, t, p, u, c)
    monkeypatch.setattr("model.decode_step", spy("prefill"))
    generate(s, prompt, noise, 2, step_fn=spy("step"))
    assert [name for name, _ in seen] == ["prefill"] + ["step"] * 9   # 20 uniforms, 2 a pass
    assert all(u.shape == (2, 2) and u.dtype == torch.float64 for _, u in seen)
    assert torch.equal(torch.cat([u for _, u in seen], 1), noise)


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 2, 4])
def test_window_agreement_decodes_each_window_on_the_teachers_context(teacher, student, k):
    """The one-pass windowed agreement equals decoding every window separately: the student's first
    pass on the teacher's prompt + tokens so far, with the teacher's noise for the next k tokens."""
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, V, (3, 6), generator=gen)
    noise = torch.rand(3, 24, generator=gen, dtype=torch.float64)
    ar = generate(teacher, prompts, noise, 1)
    seq = torch.cat([prompts, ar], dim=1)
    hits = torch.stack([generate(student, seq[:, :6 + s], noise[:, s:s + k], k) == ar[:, s:s + k]
                        for s in range(0, 24, k)], dim=1)   # (B, windows, k)
    want = hits.float().mean(dim=(0, 1)).tolist()
    assert (window_agreement(student, prompts, ar, noise, k)
            == window_agreement(student, prompts, ar, noise, k, batch=2) == want)   # 2 + 1 samples
    # against the student's own free-running tokens, every window starts in step and must agree
    # everywhere; 23 tokens: a partial last window is left out, the others keep their places
    own = generate(student, prompts, noise, k)
    assert window_agreement(student, prompts, own[:, :23], noise[:, :23], k) == [1.0] * k
