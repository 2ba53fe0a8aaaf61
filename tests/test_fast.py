"""The fast decode path computes what model.generate computes: the FlexAttention cache, the
CUDA-graph step (its static buffers run eagerly on CPU; captured on a GPU) and the compiled step.
On a GPU the tests that take a device also capture the graphs and compile for it (the argmax, cdf
and cdf_seq readouts, both couplings, both attention paths), and one more checks the fused
FlexAttention kernel against SDPA on whole generations."""
import dataclasses
import math
import re
import shutil
import weakref

import pytest
import torch

import fast
from fast import FLEX_BLOCK, CUDAGraphStep, compile_per_shape, make_cache
from model import GPT, GPTConfig, KVCache, decode_mask, decode_step, draw, generate

V = 50257
K = 4


@pytest.fixture
def no_tf32():
    """TF32 off on CUDA (exact float32 matmuls), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def perturb(*students):
    """New modules whose output matters (a fresh slot readout adds exactly zero): a kernel that
    computed them wrongly must change the tokens."""
    with torch.no_grad():
        for s in students:
            for p in [*s.noise_encoder.parameters(),
                      *(s.slot_readout.parameters() if s.slot_readout is not None else [])]:
                p.normal_(0, 0.5)


def tiny_models():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    student = GPT.student_from(teacher, K).eval()
    cdf = GPT.student_from(teacher, K, readout="cdf_seq").eval()   # the distribution readout
    perturb(student, cdf)
    return teacher, student, cdf


@pytest.fixture(scope="module")
def teacher():
    return tiny_models()[0]


@pytest.fixture(scope="module")
def student():
    return tiny_models()[1]


@pytest.fixture(scope="module")
def cdf():
    return tiny_models()[2]


@torch.no_grad()
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_noise_slots_leave_only_real_tokens_in_the_cache(teacher, student, attention):
    """A slot's K/V goes to the row of the token it produces, and the next pass overwrites that row
    with the token: between passes the rows up to the last committed token hold what an AR pass
    over the same tokens writes (to rounding), and only the latest slots sit past it."""
    x = torch.randint(0, V, (1, 14))
    with_slots, without = (make_cache(student.config, 1, "cpu", torch.float32, attention)
                           for _ in range(2))
    slots = student.noise_encoder(torch.rand(1, 8, dtype=torch.float64))
    student.forward_step(x[:, :10], torch.arange(14), slots[:, :4], with_slots)
    student.forward_step(x[:, 10:], torch.arange(10, 18), slots[:, 4:], with_slots)
    student.forward_step(x, torch.arange(14), None, without)
    # each (layer, B, H, L, hd)
    (k1, v1), (k0, v0) = ((torch.stack(c.k), torch.stack(c.v)) for c in (with_slots, without))
    torch.testing.assert_close(k1[:, :, :, :14], k0[:, :, :, :14], rtol=0, atol=1e-5)
    torch.testing.assert_close(v1[:, :, :, :14], v0[:, :, :, :14], rtol=0, atol=1e-5)
    assert k1[:, :, :, 14:18].abs().min() > 0 and k0[:, :, :, 14:].abs().sum() == 0
    assert k1[:, :, :, 18:].abs().sum() == 0


@torch.no_grad()
def test_flex_and_sdpa_decoding_agree(teacher, student, cdf):
    """The two attention paths of a cached pass compute the same function (on CPU flex runs its
    unfused reference; the last test checks the compiled kernel on a GPU), with garbage in the stale
    entries."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, V, (2, 6), generator=gen)
    noise = torch.rand(2, 36, generator=gen, dtype=torch.float64)
    for model, k in ((teacher, 1), (student, 3), (student, 4), (cdf, 4)):
        out = {}
        for attention in ("sdpa", "flex"):
            cache = make_cache(student.config, 2, "cpu", torch.float32, attention)
            for t in cache.k + cache.v:   # garbage in every entry
                t.normal_()
            out[attention] = generate(model, prompt, noise, k, cache=cache)
        assert torch.equal(out["sdpa"], out["flex"]), k
    with pytest.raises(ValueError, match="attention must be"):
        make_cache(teacher.config, 1, "cpu", torch.float32, "flash")


@pytest.mark.parametrize("pos0,T,length", [(0, 1, 512), (5, 8, 512), (124, 8, 512), (127, 1, 512),
                                           (128, 1, 512), (300, 200, 512), (0, 10, 64),
                                           (1000, 24, 1024), (0, 200, 512)])
def test_flex_block_mask_lists_exactly_the_written_blocks(pos0, T, length):
    """The block mask is what makes flex fast: a query block must list every KV block that holds a
    key its queries may see (or attention would be wrong on a GPU, where the kernel skips unlisted
    blocks; the CPU reference ignores the block list) and no block past it (or the unwritten cache
    would still be read)."""
    cfg = GPTConfig(block_size=length, n_layer=1, n_head=1, n_embd=8)
    bm = make_cache(cfg, 1, "cpu", torch.float32, "flex").mask(pos0 + torch.arange(T))
    listed = bm.to_dense()[0, 0].bool()                               # (query blocks, KV blocks)
    # a partial last block counts too
    need = torch.zeros(-(-T // FLEX_BLOCK), -(-length // FLEX_BLOCK), dtype=torch.bool)
    for q in range(T):
        need[q // FLEX_BLOCK, :(pos0 + q) // FLEX_BLOCK + 1] = True
    assert torch.equal(listed, need)
    q, kv = torch.arange(T)[:, None], torch.arange(length)[None, :]
    assert torch.equal(bm.mask_mod(0, 0, q, kv), kv <= pos0 + q)   # the same rule as the sdpa mask
    assert torch.equal(decode_mask(pos0 + torch.arange(T), length), kv <= pos0 + q)
    sdpa = KVCache(cfg, 1, "cpu", torch.bfloat16).mask(pos0 + torch.arange(T))
    # additive, in the cache's dtype: SDPA would otherwise get a float32 mask beside bf16 queries
    assert sdpa.dtype == torch.bfloat16
    assert torch.equal(sdpa.float(), torch.where(kv <= pos0 + q, 0.0, float("-inf")))


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_static_step_matches_eager_generate(attention):
    """CUDAGraphStep's plumbing (static input buffers, the static output fed back as the next input,
    one cache reused across generations, a step object reused across shapes) gives generate's exact
    tokens, on either cache. On CPU it runs the steps eagerly; on a GPU the same test checks the
    captured graphs (bench.py --attention flex without --compile)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, student, cdf = (m.to(dev) for m in tiny_models())
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(V, (3, 6), generator=gen).to(dev)
    noise = torch.rand(3, 24, generator=gen, dtype=torch.float64).to(dev)
    cache = make_cache(student.config, 3, dev, torch.float32, attention)
    step = CUDAGraphStep(capture=dev.type == "cuda")
    for model, k in ((teacher, 1), (student, 2), (student, 4), (cdf, 4), (teacher, 1)):
        eager = generate(model, prompt, noise, k)
        assert torch.equal(generate(model, prompt, noise, k, cache=cache, step_fn=step), eager), k
        # the same cache again, now holding a longer generation's stale entries, and new noise
        other = noise.flip(0)
        assert torch.equal(generate(model, prompt, other, k, cache=cache, step_fn=step),
                           generate(model, prompt, other, k)), k
    assert len(step.graphs) == 4   # one per (model, batch, k); prefill runs eagerly
    # the same step, another cache
    other_cache = make_cache(student.config, 3, dev, torch.float32, attention)
    prompt2 = torch.randint(V, (3, 6), generator=gen).to(dev)
    for model, k in ((teacher, 1), (cdf, 4)):   # (the argmax student barely reads its context)
        assert torch.equal(generate(model, prompt2, noise, k, cache=other_cache, step_fn=step),
                           generate(model, prompt2, noise, k)), k
    buffer = weakref.ref(next(iter(step.graphs.values()))["tokens"])
    del step   # no reference cycle: the graphs and their memory go with the step object
    assert buffer() is None
    # a new step object on a new cache
    fresh = make_cache(student.config, 3, dev, torch.float32, attention)
    step = CUDAGraphStep(capture=dev.type == "cuda")
    assert torch.equal(generate(student, prompt, noise, 4, step_fn=step, cache=fresh),
                       generate(student, prompt, noise, 4))
    kept = weakref.ref(fresh)
    del fresh   # a graph reads its cache's memory: the step keeps the cache alive
    assert kept() is not None


needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on CPU needs a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compiled_step_matches_eager_generate(device, no_tf32):
    """bench.py --compile: CUDAGraphStep(compile=True) compiles the decode step (and on a GPU
    captures it) and gives generate's tokens, for every readout and both couplings. Its teacher is
    untied, so that its tokens depend on attention (a random tied model's likeliest next token is
    mostly its input), and sharp, so that rounding differences between fused and unfused kernels
    (~1e-7) cannot move an inverse CDF across a token boundary."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False)
    teacher = GPT(cfg).eval()
    with torch.no_grad():
        teacher.ln_f.weight.mul_(100)   # (copied into each student)
    students = [GPT.student_from(teacher, K, readout=r, coupling=c).eval() for r, c in
                (("argmax", "inverse_cdf"), ("cdf", "inverse_cdf"), ("cdf_seq", "inverse_cdf"),
                 ("cdf_seq", "gumbel"))]
    perturb(*students)
    teacher, student, cdf, cdf_seq, gumbel = (m.to(device) for m in (teacher, *students))
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(V, (3, 6), generator=gen).to(device)
    noise = torch.rand(3, 16, generator=gen, dtype=torch.float64).to(device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()   # (reset() keeps them: count this test's graphs only)
    step = CUDAGraphStep(capture=device == "cuda", compile=True)
    for attention in ("sdpa", "flex"):
        for model, k in ((teacher, 1), (student, 2), (student, 4), (cdf, 4), (cdf_seq, 4),
                         (gumbel, 4)):
            cache = make_cache(model.config, 3, device, torch.float32, attention)
            out = generate(model, prompt, noise, k)
            fast_out = generate(model, prompt, noise, k, step_fn=step, cache=cache)
            assert torch.equal(fast_out, out), (attention, k)
            assert model is student or out.unique().numel() > 16, k   # not a few tokens repeated
    # really compiled: at least a graph per model, k and attention path
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 12


def test_compile_per_shape_has_room_for_every_shape():
    """Past dynamo's default of 8 compiled versions a function runs eagerly without a word."""
    compile_per_shape(lambda x: x)   # compiles nothing until called
    limits = [getattr(torch._dynamo.config, n, 0) for n in ("recompile_limit", "cache_size_limit")]
    assert max(limits) >= 256


def test_every_gpu_finds_its_own_peak():
    """MFU and MBU divide by the GPU's own peak: "H100" must not match an "H100 PCIe", nor
    "H200" a GH200, whatever the case of the name."""
    for table in (fast.PEAK_FLOPS, fast.PEAK_BANDWIDTH):
        for key, peak in table:
            for name in (f"NVIDIA {key}", f"nvidia {key.lower()} 80GB"):
                assert fast.device_peak(None, table, name) == peak, name


def test_flops_per_token_counts_the_models_matrices():
    """6 FLOPs per weight of every matrix a token passes through (the blocks' and the readout's),
    plus attention's 12 x layers x width x context."""
    cfg = GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
    m = GPT(cfg)
    weights = sum(p.numel() for p in m.blocks.parameters() if p.dim() == 2)
    weights += m.lm_head.weight.numel()
    assert fast.flops_per_token(cfg, 64) == 6 * weights + 12 * 2 * 32 * 64


@needs_compiler
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compiled_draw_matches_eager(device):
    """distill.py --compile on CUDA draws its targets with compile_per_shape(model.draw) over
    (batch, anchors, k, vocab) logits: the same tokens as eager, for both couplings (the Gumbel-max
    hash is integer arithmetic that a fused kernel must not round or overflow differently)."""
    gen = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(2, 5, 4, 300, generator=gen)).to(device)
    u = torch.rand(2, 5, 4, generator=gen, dtype=torch.float64).to(device)
    torch._dynamo.reset()
    compiled = compile_per_shape(draw)
    for coupling in ("inverse_cdf", "gumbel"):
        tokens = draw(logits, u, coupling)
        assert tokens.unique().numel() > 10   # many different tokens: a real check
        assert torch.equal(compiled(logits, u, coupling), tokens), coupling


@needs_compiler
@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_compiled_pass_matches_eager_states(attention, device, no_tf32):
    """The compiled cached pass gives eager's states (what the readout reads logits from) pass after
    pass, in a model of two layers. A compiled CPU flex kernel once ignored the storage offset of a
    layer's view into one (layers, ...) cache and read layer 0's keys for layer 1: outputs off by
    ~1e-3, too little to move these random models' tokens, 10-100 times the tolerance. (On CPU,
    flex itself now runs its eager reference inside the compiled step, fast._flex_reference.)"""
    student = tiny_models()[1].to(device)
    gen = torch.Generator().manual_seed(4)
    tokens, u = (torch.randint(V, (3, 6), generator=gen),
                 torch.rand(3, K, generator=gen, dtype=torch.float64))
    tokens, slots = tokens.to(device), student.noise_encoder(u.to(device))
    caches = [make_cache(student.config, 3, device, torch.float32, attention) for _ in range(2)]
    torch._dynamo.reset()
    passes = (student.forward_step, compile_per_shape(student.forward_step))
    pos = torch.arange(6 + K, device=device)   # the prompt, then the slots
    for _ in range(3):
        eager, compiled = (f(tokens, pos, slots, c) for f, c in zip(passes, caches))
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 if device == "cpu" else 1e-4)
        # the tokens made, then the same slots at the next positions
        tokens = student._logits(eager[:, 1:]).argmax(-1)
        pos = pos[-K] + torch.arange(2 * K, device=device)


@needs_compiler
@torch.no_grad()
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_compiled_step_writes_the_cache_in_place(attention):
    """A compiled decode step writes its K/V into the cache in place and allocates nothing of a
    layer's cache size. With one (layers, ...) tensor for the whole cache, each layer wrote into a
    view of a graph input, which torch.compile turned into copies of the layer's whole cache (at
    batch 512 and 1024 tokens, about 1 GB per layer every step); this checks the generated code for
    such buffers."""
    from torch._inductor.utils import run_and_get_code
    cfg = GPTConfig(block_size=512, n_layer=2, n_head=2, n_embd=32, vocab_size=256, max_k=2)
    student = GPT(cfg).eval()
    cache = make_cache(cfg, 3, "cpu", torch.float32, attention)
    # 2 tokens to commit, then 2 slots
    tokens, pos = torch.randint(256, (3, 2)), torch.arange(40, 44)
    u = torch.rand(3, 2, dtype=torch.float64)
    torch._dynamo.reset()
    _, code = run_and_get_code(compile_per_shape(decode_step), student, tokens, pos, u, cache)
    shapes = re.findall(r"empty_strided_\w+\(\(([\d, ]+)\)", "\n".join(code))
    assert shapes, "no buffers found: the generated code's format changed"
    layer_cache = cache.k[0].numel()
    assert max(math.prod(int(d) for d in s.split(",") if d.strip())
               for s in shapes) < layer_cache / 8
    # the cache positions written
    written = torch.stack(cache.k).abs().sum((0, 1, 2, 4)).nonzero().flatten()
    assert written.tolist() == [40, 41, 42, 43]   # the 2 tokens, then the 2 slots


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the compiled FlexAttention kernel needs a GPU")
@torch.no_grad()
def test_compiled_flex_matches_sdpa_on_gpu(no_tf32):
    """The fused flex kernel skips the KV blocks its block mask does not list; over a prefix that
    spans several blocks (and a prefill of several query blocks) it must still give SDPA's states
    (what the readout reads logits from), with garbage in the unwritten cache."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=512, n_layer=2, n_head=2, n_embd=64, max_k=K)
    student = GPT(cfg).cuda().eval()
    x = torch.randint(V, (3, 420), device="cuda")
    u = torch.rand(3, 60, K, dtype=torch.float64, device="cuda")
    logits = {}
    for attention in ("sdpa", "flex"):
        cache = make_cache(cfg, 3, "cuda", torch.float32, attention)
        for t in cache.k + cache.v:   # garbage in every entry
            t.normal_()
        slots = student.noise_encoder(u)   # (3, 60, K, C)
        out = [student.forward_step(x[:, :300], torch.arange(300 + K, device="cuda"),
                                    slots[:, 0], cache)]
        for i, s in enumerate(range(300, 420, K)):
            pos = torch.arange(s, s + 2 * K, device="cuda")   # K tokens to commit, then K slots
            out.append(student.forward_step(x[:, s:s + K], pos, slots[:, i + 1], cache))
        logits[attention] = torch.stack(out)
    torch.testing.assert_close(logits["flex"], logits["sdpa"], rtol=0, atol=2e-3)
    # whole generations at an evaluation's batch size, the AR teacher's 1-query steps included:
    # distill.py's end-of-stage agreement decodes exactly these shapes
    teacher = GPT(dataclasses.replace(cfg, max_k=0)).cuda().eval()
    prompt, noise = x[:, :6].repeat(86, 1), torch.rand(258, 48, dtype=torch.float64, device="cuda")
    for model, k in ((teacher, 1), (student, 1), (student, 2), (student, 4)):
        out = {a: generate(model, prompt, noise, k,
                           cache=make_cache(cfg, 258, "cuda", torch.float32, a))
               for a in ("sdpa", "flex")}
        assert (out["flex"] == out["sdpa"]).float().mean() > 0.99, k
        if model is student and k != 4:
            continue
        # bench.py --compile: the whole step compiled, then captured in a CUDA graph, on both
        # attention paths
        for a in ("sdpa", "flex"):
            compiled = generate(model, prompt, noise, k,
                                cache=make_cache(cfg, 258, "cuda", torch.float32, a),
                                step_fn=CUDAGraphStep(compile=True))
            assert (compiled == out["sdpa"]).float().mean() > 0.99, (a, k)
