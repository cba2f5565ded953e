"""The static-cache rollout engine: its counter-based sampler, and its log-probs against a training forward.

On a CPU the engine runs eagerly (the CUDA-graph path is the same step function replayed); the GPU tests at the end
compare graph replay with eager decoding and check bf16 log-probs, and skip without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.models.forward import position_ids_from_mask
from rlhf.ops import _sampling_logits, logprobs_from_logits
from rlhf.rollout import SamplingConfig, generate, resolve_engine
from rlhf.rollout.static import StaticEngine, hash_uniform, sample_tokens, unsupported

SETTINGS = {
    "plain": SamplingConfig(max_new_tokens=12),
    "filtered": SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=40, top_p=0.9),
    "top_p only": SamplingConfig(max_new_tokens=12, temperature=1.3, top_p=0.8),
    "greedy": SamplingConfig(max_new_tokens=12, do_sample=False),
}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


def _prompts(tok):
    # ragged lengths: the engine left-pads, positions count real tokens only
    return [tok.encode(t) for t in ("Name a fruit", "Hi", "Tell me about the sea and the sky and the stars", "Why")]


def _scored(model, rollout, s: SamplingConfig) -> torch.Tensor:
    """[B, R] log-probs of the response tokens from one full forward, as PPO's scoring pass takes them."""
    ids, mask = rollout.input_ids, rollout.attention_mask
    P = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = logprobs_from_logits(logits[:, P - 1:-1].float(), ids[:, P:], s.temperature, s.top_k, s.top_p)
    return logp * rollout.response_mask


def _near_training_in_bf16(model, tok, engine, s: SamplingConfig, prompts) -> None:
    """The engine's rollout of prompts on a bf16 GPU model: the decode step compiled (no eager fallback), and each
    response's mean per-token log-prob gap to a training forward within the bf16 tests' bound (0.05)."""
    r = engine.generate(model, tok, prompts, s, seeds=list(range(len(prompts))))
    assert engine.compile_error is None
    gap = (r.logprobs - _scored(model, r, s)).abs().sum(1) / r.lengths.clamp(min=1)
    assert float(gap.max()) < 0.05


def test_hash_uniform_is_a_pure_function_in_the_open_interval():
    seeds = torch.tensor([0, 1, 2**40 + 7, 2**62])
    ids = torch.arange(1000)
    u = hash_uniform(seeds, torch.tensor(3), ids)
    assert u.shape == (4, 1000) and bool((u > 0).all()) and bool((u < 1).all())
    assert torch.equal(u, hash_uniform(seeds, torch.tensor(3), ids))
    assert torch.equal(u[2:3], hash_uniform(seeds[2:3], torch.tensor(3), ids))  # a row ignores the others
    assert not torch.equal(u, hash_uniform(seeds, torch.tensor(4), ids))  # steps differ
    # 4000 uniforms: mean 1/2 with standard error sqrt(1/12 / 4000) = 0.0046; variance 1/12
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / u.numel())
    assert abs(u.var().item() - 1 / 12) < 0.01
    # distinct token ids within a row give distinct draws (the finalizer is a bijection on 32 bits)
    assert len(set(hash_uniform(seeds[:1], torch.tensor(0), torch.arange(50000))[0].tolist())) > 49000


def _fmix32_by_hand(h: int) -> int:
    """MurmurHash3's finalizer on Python ints (unbounded, so every step is masked to 32 bits explicitly)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_hash_uniform_equals_the_finalizer_computed_by_hand():
    """The uniforms are exactly ((fmix(fmix(fmix(fmix(lo) ^ hi) ^ step) ^ token) >> 8) + 1/2) / 2^24, with the
    per-token finalizer run in int32 bits: seeds whose halves and hashes cross 2^31 (sign bits set), steps and
    token ids up to the vocabulary's size. Exact (24-bit integers and a power of two are exact in float32); eager
    and compiled alike."""
    seeds = [0, 1, 2**31, 2**32 - 1, 2**40 + 7, 2**62, 2**63 - 1]
    steps, ids = [0, 3, 2**31 + 5], [0, 1, 2, 1000, 2**17 + 3, 151935]
    expect = torch.empty(len(steps), len(seeds), len(ids))
    for i, st in enumerate(steps):
        for j, seed in enumerate(seeds):
            key = _fmix32_by_hand(_fmix32_by_hand(seed & 0xFFFFFFFF) ^ (seed >> 32))
            row = _fmix32_by_hand(key ^ (st & 0xFFFFFFFF))
            for k, t in enumerate(ids):
                expect[i, j, k] = ((_fmix32_by_hand(row ^ t) >> 8) + 0.5) / 2**24
    seeds_t, ids_t = torch.tensor(seeds), torch.tensor(ids)
    compiled = torch.compile(hash_uniform, dynamic=False)
    for i, st in enumerate(steps):
        assert torch.equal(hash_uniform(seeds_t, torch.tensor(st), ids_t), expect[i])
        assert torch.equal(compiled(seeds_t, torch.tensor(st), ids_t), expect[i])


@pytest.mark.parametrize("name", ["plain", "filtered"])
def test_sampler_frequencies_follow_the_filtered_softmax(name):
    """20,000 rows with the same logits and different seeds: each token's frequency is within 5 standard errors of
    softmax(filter(logits)) (a binomial standard error sqrt(p (1 - p) / n)); filtered-out tokens never appear."""
    s = SETTINGS[name]
    torch.manual_seed(0)
    V, n = 64, 20000
    logits = torch.randn(V) * 2
    probs = _sampling_logits(logits[None], s.temperature, s.top_k, s.top_p, upcast=False).softmax(-1)[0]
    tok, logp = sample_tokens(logits.expand(n, V), torch.arange(n), torch.tensor(5), s)
    freq = torch.bincount(tok, minlength=V).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert bool(((freq - probs.double()).abs() <= 5 * se + 1e-12).all())
    assert torch.allclose(logp, probs.log()[tok], atol=1e-6)


@pytest.mark.parametrize("name", ["plain", "greedy"])
def test_sampler_over_a_large_vocabulary_is_the_gumbel_max_by_hand(name):
    """A 65,536-token vocabulary: the tokens are exactly the argmax of
    z - log(-log(u)) with the hash's uniforms (z alone for greedy), and the log-probs equal log_softmax's to float32
    rounding of a 65,536-term sum (1e-5 on log-probs of ~-11)."""
    s = SETTINGS[name]
    g = torch.Generator().manual_seed(1)
    V, n = 65536, 16
    logits = torch.randn(n, V, generator=g) * 3
    seeds, step = torch.arange(100, 100 + n), torch.tensor(9)
    tok, logp = sample_tokens(logits, seeds, step, s)
    z = logits / s.temperature
    score = z - torch.log(-torch.log(hash_uniform(seeds, step, torch.arange(V)))) if s.do_sample else z
    assert torch.equal(tok, score.argmax(-1))
    assert torch.allclose(logp, torch.log_softmax(z, -1).gather(-1, tok[:, None])[:, 0], atol=1e-5)


def test_top_k_keeps_ties_with_the_kth_logit():
    s = SamplingConfig(top_k=2)
    logits = torch.full((1, 40), -5.0)
    logits[0, 3], logits[0, 7], logits[0, 9] = 3.0, 1.0, 1.0  # the 2nd and 3rd largest tie
    tok, logp = sample_tokens(logits.expand(3000, 40), torch.arange(3000), torch.tensor(0), s)
    assert set(tok.tolist()) == {3, 7, 9}
    expected = torch.log_softmax(torch.tensor([3.0, 1.0, 1.0]), -1)
    assert torch.allclose(logp[tok == 9], expected[2].expand(int((tok == 9).sum())), atol=1e-6)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_half_precision_logits_sample_as_their_float32_cast(name):
    """The sampler selects top-k candidates in the logits' own dtype, then filters and draws in float32: bf16 logits
    must give exactly what their float32 cast gives. The logits are multiples of 1/16 below 8 in magnitude, exact in
    bf16 and distinct within a row (no ties for the selection to break either way), so the tokens are equal and the
    log-probs differ only by the summation order of one float32 logsumexp (~1e-7)."""
    s = SETTINGS[name]
    g = torch.Generator().manual_seed(0)
    V, n = 250, 64
    logits = torch.stack([torch.randperm(V, generator=g) for _ in range(n)]).float().sub(V // 2).div(16)
    half = logits.to(torch.bfloat16)
    assert torch.equal(half.float(), logits)
    tok_h, logp_h = sample_tokens(half, torch.arange(n), torch.tensor(3), s)
    tok_f, logp_f = sample_tokens(logits, torch.arange(n), torch.tensor(3), s)
    assert logp_h.dtype == torch.float32
    assert torch.equal(tok_h, tok_f)
    assert torch.allclose(logp_h, logp_f, atol=1e-6)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_engine_logprobs_equal_a_training_forward(lm, name):
    """float32: per token within 1e-5. The engine's attention runs over the static cache in a different order of
    summation than the full forward (a few dozen float32 roundings, ~1e-7 each); the log-softmax of O(10) logits
    adds a few more."""
    model, tok = lm
    s = SETTINGS[name]
    rollout = generate(model, tok, prompt_ids=_prompts(tok), sampling=s, engine="static", seeds=[11, 12, 13, 14])
    assert rollout.logprobs is not None and rollout.logprobs.shape == rollout.response_ids.shape
    assert torch.allclose(rollout.logprobs, _scored(model, rollout, s), atol=1e-5)
    assert bool((rollout.logprobs[rollout.response_mask.bool()] <= 0).all())


def test_greedy_equals_hf_generate(lm):
    model, tok = lm
    s = SETTINGS["greedy"]
    prompts = _prompts(tok)
    ours = generate(model, tok, prompt_ids=prompts, sampling=s, engine="static")
    ref = generate(model, tok, prompt_ids=prompts, sampling=s, engine="hf")
    assert torch.equal(ours.response_ids, ref.response_ids)
    assert torch.equal(ours.response_mask, ref.response_mask)
    assert ours.texts == ref.texts


def test_a_row_depends_on_its_seed_and_prompt_only(lm):
    model, tok = lm
    s = SETTINGS["filtered"]
    prompts = _prompts(tok)
    full = generate(model, tok, prompt_ids=prompts, sampling=s, engine="static", seeds=[5, 6, 7, 8], batch_size=4)
    part = generate(model, tok, prompt_ids=prompts[2:0:-1], sampling=s, engine="static", seeds=[7, 6], batch_size=1)
    for i, j in ((0, 2), (1, 1)):
        n = int(full.response_mask[j].sum())
        assert int(part.response_mask[i].sum()) == n
        assert torch.equal(part.response_ids[i, :n], full.response_ids[j, :n])
    other = generate(model, tok, prompt_ids=prompts, sampling=s, engine="static", seeds=[9, 6, 7, 8])
    assert not torch.equal(other.response_ids[0], full.response_ids[0])


def test_stops_once_every_row_has_ended(lm):
    """A head that always prefers EOS: every response is the single EOS token, and the loop stops at its first
    check instead of running max_new_tokens steps."""
    model, tok = lm

    class PreferEos(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, h):
            out = self.head(h).clone()
            out[..., tok.eos_token_id] += 1e4
            return out

    head = model.lm_head
    model.lm_head = PreferEos(head)
    try:
        s = SamplingConfig(max_new_tokens=64)
        r = StaticEngine(check_every=4).generate(model, tok, _prompts(tok), s, seeds=[1, 2, 3, 4])
    finally:
        model.lm_head = head
    assert r.response_ids.shape[1] == 4
    assert bool(r.eos.all()) and r.lengths.tolist() == [1, 1, 1, 1]
    assert bool((r.response_ids[:, 0] == tok.eos_token_id).all())


def test_timed_engine_records_its_phases_and_draws_the_same_tokens(lm):
    """timed=True adds synchronized clocks at the phase ends and nothing else: the same tokens and log-probs; on the
    CPU (no graph) every decode step counts as warm-up. Untimed, `times` stays empty."""
    model, tok = lm
    s = SamplingConfig(max_new_tokens=6)
    plain = StaticEngine()
    timed = StaticEngine(timed=True)
    a = plain.generate(model, tok, _prompts(tok), s, seeds=[1, 2, 3, 4])
    b = timed.generate(model, tok, _prompts(tok), s, seeds=[1, 2, 3, 4])
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert plain.times == {}
    assert sorted(timed.times) == ["prefill", "warmup"] and all(v > 0 for v in timed.times.values())


def test_prefill_functions_are_the_modules_forwards():
    """compile_prefill's functions give the modules' outputs bit for bit (Llama's and Qwen2's RMSNorm, transformers'
    SiLU times the up projection), in float32 and bf16; a module whose forward differs keeps its own."""
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from rlhf.rollout import static

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 24, dtype=dtype) * 3
        for cls in (LlamaRMSNorm, Qwen2RMSNorm):
            norm = cls(24, eps=1e-5).to(dtype)
            norm.weight.data = torch.randn(24, dtype=dtype)
            assert torch.equal(static._rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
        g, u = torch.randn(4, 9, dtype=dtype), torch.randn(4, 9, dtype=dtype)
        assert torch.equal(static._silu_mul(g, u), ACT2FN["silu"](g) * u)

    class Shifted(Qwen2RMSNorm):
        def forward(self, h):
            return super().forward(h) + 1

    ops = static._PrefillOps(lambda *a: a, compiled=False)
    ops.compiled = True  # the compiled branch, with the functions run eagerly (no compile on the CPU here)
    x = torch.randn(2, 24)
    shifted, gelu = Shifted(24), ACT2FN["gelu"]
    assert torch.equal(ops.norm(shifted, x), shifted(x))
    g, u = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.equal(ops.act_mul(gelu, g, u), gelu(g) * u)


def test_compile_prefill_runs_the_functions_and_draws_the_same(lm, monkeypatch):
    """StaticEngine(compile_prefill=True) sends the prefill's norms, rotary embedding and SiLU products through the
    compiled functions (torch.compile replaced by a counting wrapper, so eager arithmetic: the same tokens and
    log-probs to the bit); the decode steps keep the modules."""
    from rlhf.rollout import static

    calls = {}

    def counting(fn):
        def run(*a):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*a)
        return run

    monkeypatch.setattr(static, "_compiled_fn", counting)
    model, tok = lm
    s = SamplingConfig(max_new_tokens=6)
    plain = StaticEngine(stack_projections=True).generate(model, tok, _prompts(tok), s, seeds=[1, 2, 3, 4])
    fused = StaticEngine(stack_projections=True, compile_prefill=True).generate(model, tok, _prompts(tok), s,
                                                                                seeds=[1, 2, 3, 4])
    assert torch.equal(plain.response_ids, fused.response_ids) and torch.equal(plain.logprobs, fused.logprobs)
    layers = model.config.num_hidden_layers
    # one prefill forward (4 prompts): two norms and one SiLU product a layer, and the rotary embedding
    assert calls == {"_rms_norm": 2 * layers, "_silu_mul": layers, "apply_rotary_pos_emb": layers}, calls


def test_reading_the_cache_in_blocks_equals_reading_all_of_it(lm):
    """kv_block: attention over the filled blocks of the cache only. The slots it leaves out are masked (weight
    exactly 0), so only the summation order of the softmax's denominator may change: float32 rounding, ~1e-7
    relative, far below 1e-5 on log-probs of O(1); the draws (a hash of seed, step and token) are the same."""
    model, tok = lm
    s = SamplingConfig(max_new_tokens=24, temperature=0.9)
    whole = StaticEngine(kv_block=0).generate(model, tok, _prompts(tok), s, seeds=[1, 2, 3, 4])
    for block in (1, 4, 7):  # 7 does not divide the cache length: the last block is cut at the cache's end
        blocks = StaticEngine(kv_block=block).generate(model, tok, _prompts(tok), s, seeds=[1, 2, 3, 4])
        assert torch.equal(blocks.response_ids, whole.response_ids)
        assert torch.allclose(blocks.logprobs, whole.logprobs, atol=1e-5)
    assert torch.allclose(whole.logprobs, _scored(model, whole, s), atol=1e-5)


@pytest.mark.parametrize("prefill_batch", [32, 3])
def test_varlen_layout_equals_the_masked_one(lm, prefill_batch):
    """The varlen layout (a row's token at position p in slot p, decode attending to the row's first p + 1 slots)
    against the left-padded, masked one: the same keys and values reach each query, and the slots either layout
    leaves out carry weight exactly 0, so only the softmax's summation order differs (float32, ~1e-7 relative;
    1e-5 on log-probs of O(1)). A prefill batch of 3 rows of 4 puts the second batch's rows at a cache offset."""
    model, tok = lm
    s = SamplingConfig(max_new_tokens=24, temperature=0.9)
    prompts, seeds = _prompts(tok), [1, 2, 3, 4]
    masked = StaticEngine(attention="masked").generate(model, tok, prompts, s, batch_size=prefill_batch, seeds=seeds)
    varlen = StaticEngine(attention="varlen-reference").generate(model, tok, prompts, s, batch_size=prefill_batch,
                                                                 seeds=seeds)
    assert torch.equal(varlen.response_ids, masked.response_ids)
    assert torch.allclose(varlen.logprobs, masked.logprobs, atol=1e-5)
    assert torch.allclose(varlen.logprobs, _scored(model, varlen, s), atol=1e-5)


def _run_under_triton_interpreter(script: str) -> None:
    """Run `script` in a child process under Triton's interpreter (Triton reads TRITON_INTERPRET when it is first
    imported); it prints "ok" when its assertions hold."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_triton_sampler_draws_what_the_torch_sampler_draws(tiny_model_dir):
    """The Triton pass over the vocabulary (rollout/triton_sample.py), run by Triton's interpreter on the CPU: on
    raw logits of a 10,000-token vocabulary (two whole chunks of 4,096 and a cut one; blocks cut at the end), float32
    and bf16, temperature 1 and 0.7, sampled and greedy, its tokens are the torch sampler's (the same uniforms, the
    same first maximum; only a 1-ulp difference between numpy's and torch's logarithm at a near-tie could change
    one, and none lies within that here) and its log-probs equal theirs to float32 rounding of a 10,000-term
    log-sum-exp summed in another order (1e-5 on log-probs of ~-12); greedy on tied logits takes the first maximum
    (ties across chunks, across blocks of a chunk, within a block); in the engine, the same rollouts."""
    import importlib.util
    import textwrap

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    _run_under_triton_interpreter(textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from rlhf.rollout import SamplingConfig
        from rlhf.rollout.static import StaticEngine, sample_tokens

        g = torch.Generator().manual_seed(0)
        logits = torch.randn(6, 10000, generator=g) * 3
        seeds, step = torch.tensor([0, 1, 2**40 + 7, 2**62, 5, 9]), torch.tensor(11)
        for dtype in (torch.float32, torch.bfloat16):
            for s in (SamplingConfig(), SamplingConfig(temperature=0.7), SamplingConfig(do_sample=False)):
                x = logits.to(dtype)
                tok, lp = sample_tokens(x, seeds, step, s, kernel=True)
                ref_tok, ref_lp = sample_tokens(x, seeds, step, s)
                assert torch.equal(tok, ref_tok), (dtype, s, tok, ref_tok)
                assert lp.dtype == torch.float32 and torch.allclose(lp, ref_lp, atol=1e-5), (lp - ref_lp).abs().max()
        ties = torch.zeros(3, 10000)  # the first maximum wins across chunks, across blocks, within a block
        ties[0, [100, 9000]] = ties[1, [4097, 6000]] = ties[2, [5001, 5002]] = 5.0
        tok, _ = sample_tokens(ties, seeds[:3], step, SamplingConfig(do_sample=False), kernel=True)
        assert tok.tolist() == [100, 4097, 5001], tok

        tok = AutoTokenizer.from_pretrained({tiny_model_dir!r})
        model = AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}, dtype=torch.float32).eval()
        prompts = [tok.encode(t) for t in ("Name a fruit", "Hi", "Tell me about the sea and the sky", "Why")]
        s = SamplingConfig(max_new_tokens=10, temperature=0.9)
        plain = StaticEngine().generate(model, tok, prompts, s, seeds=[1, 2, 3, 4])
        kernel = StaticEngine(sampler="triton").generate(model, tok, prompts, s, seeds=[1, 2, 3, 4])
        assert torch.equal(kernel.response_ids, plain.response_ids)
        assert torch.allclose(kernel.logprobs, plain.logprobs, atol=1e-5)
        print("ok")
    """))


def test_triton_topk_candidates_are_torch_topk(tiny_model_dir):
    """The radix-select top-k (rollout/triton_topk.py) under Triton's interpreter: on rows of 10,000 distinct bf16 and
    fp16 values (two whole chunks of 4,096 and a cut one; positive, negative, -inf), values and token ids equal
    torch.topk's; on rows of four values, where ties cross the k-th place, the values are torch.topk's and the tied
    ones are the lowest token ids; and on distinct values the filtered sampler draws the tokens and log-probs of the
    torch.topk path, to the bit."""
    import importlib.util
    import textwrap

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    script = textwrap.dedent("""
        import torch
        from rlhf.rollout import SamplingConfig
        from rlhf.rollout.static import sample_tokens
        from rlhf.rollout.triton_topk import _select, topk_candidates

        torch.manual_seed(0)
        B, V = 3, 10000

        def distinct(dtype):  # V distinct finite values: bit patterns below the largest finite one, both signs
            top = 0x7F7F if dtype == torch.bfloat16 else 0x7BFF
            bits = torch.randperm(top)[:V] + 1
            bits = torch.where(torch.rand(V) < 0.5, bits | 0x8000, bits)
            return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(dtype)

        for dtype in (torch.bfloat16, torch.float16):
            rows = torch.stack([distinct(dtype) for _ in range(B)])
            rows[1, 5] = float("-inf")
            assert all(r.float().unique().numel() == V for r in rows)
            for k in (1, 216, 4500):
                v, i = topk_candidates(rows, k)
                tv, ti = torch.topk(rows, k)
                assert torch.equal(v, tv) and torch.equal(i, ti), (dtype, k)
        x = torch.tensor([-1.0, 0.5, 2.0, 3.0])[torch.randint(0, 4, (B, 9000))].to(torch.bfloat16)
        for k in (50, 3000):
            v, i = topk_candidates(x, k)
            assert torch.equal(v, torch.topk(x, k).values)
            for r in range(B):
                tau = v[r, -1]
                above = torch.nonzero(x[r] > tau).flatten()
                tied = torch.nonzero(x[r] == tau).flatten()[: k - above.numel()]
                assert sorted(i[r].tolist()) == sorted(above.tolist() + tied.tolist())
                assert torch.equal(x[r, i[r]], v[r])
                same = v[r, 1:] == v[r, :-1]
                assert bool((i[r, 1:][same] > i[r, :-1][same]).all())  # ties by token id
            out = torch.full((B, k + 1), -1, dtype=torch.long)  # the selection writes columns [0, k) only
            _select(x, k, out)
            assert bool((out[:, k] == -1).all()) and torch.equal(out[:, :k].sort(-1).values, i.sort(-1).values)
        # the sampler on 3,000 distinct moderate bf16 values (magnitudes 2^-7 to 2^4: no overflow at temperature 0.7)
        moderate = torch.cat([torch.arange(0x3C00, 0x4200), torch.arange(0x3C00, 0x4200) - 0x8000])  # sign bit set
        logits = torch.stack([moderate[torch.randperm(moderate.numel())[:3000]].to(torch.int16).view(torch.bfloat16)
                              for _ in range(B)])
        assert all(r.float().unique().numel() == 3000 for r in logits)
        seeds, step = torch.tensor([3, 4, 5]), torch.tensor(7)
        for kw in ({"top_k": 200, "top_p": 0.9}, {"top_k": 50, "temperature": 0.7}, {"top_k": 20, "do_sample": False}):
            s = SamplingConfig(**kw)
            a = sample_tokens(logits, seeds, step, s)
            b = sample_tokens(logits, seeds, step, s, kernel=True, topk_kernel=True)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), kw
        print("ok")
    """)
    _run_under_triton_interpreter(script)


def test_static_engine_sampler_names_are_checked():
    import importlib.util

    with pytest.raises(ValueError, match="sampler 'gpu' is not one of auto, torch, triton"):
        StaticEngine(sampler="gpu")
    # auto: the Triton pass on CUDA only, so a CPU rollout draws with torch operations (Triton installed or not)
    assert StaticEngine()._sample_kernel(torch.device("cpu")) is False
    assert StaticEngine(sampler="torch")._sample_kernel(torch.device("cuda")) is False
    if importlib.util.find_spec("triton") is None:
        with pytest.raises(ValueError, match="needs Triton, which is not installed"):
            StaticEngine(sampler="triton")
    else:
        assert StaticEngine(sampler="triton").sampler == "triton"


def test_triton_kernels_on_a_cpu_without_the_interpreter_are_refused(lm, monkeypatch):
    """A Triton kernel named for a model on the CPU is a clear error at generate (not a failed kernel launch)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, tok = lm
    with pytest.raises(ValueError, match=r"attention 'varlen-triton' run Triton kernels, which need a CUDA device "
                                         r"\(the model is on cpu\)"):
        StaticEngine(attention="varlen-triton").generate(model, tok, _prompts(tok), SETTINGS["plain"])


def test_triton_decode_kernel_equals_the_reference_product(tiny_model_dir):
    """rlhf's Triton decode-attention kernel, run by Triton's interpreter on the CPU (in a child process: Triton reads
    TRITON_INTERPRET when it is first imported): on raw tensors, and in the engine against the masked layout.
    float32 throughout; the online softmax sums in another order than SDPA's (~1e-7 relative), so 1e-5 on outputs
    and log-probs of O(1). Skips where Triton is not installed (CPU installs of torch do not bring it)."""
    import importlib.util
    import textwrap

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from rlhf.rollout import SamplingConfig
        from rlhf.rollout.static import StaticEngine, _varlen_decode

        torch.manual_seed(0)
        b, L, kv, G, d = 3, 70, 2, 3, 16  # 70 slots: blocks of 32 keys, the last cut at 1 and 6; one row uses 1 slot
        q, k, v = torch.randn(b * G, kv, d), torch.randn(b * L, kv, d), torch.randn(b * L, kv, d)
        used = torch.tensor([1, 65, 70], dtype=torch.int32)
        ref = _varlen_decode(q, k, v, used, G, L, 0.25, impl="reference")
        out = _varlen_decode(q, k, v, used, G, L, 0.25, impl="triton")
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        d = 128  # larger heads take 64 keys a block and 4 warps
        q, k, v = torch.randn(b * G, kv, d), torch.randn(b * L, kv, d), torch.randn(b * L, kv, d)
        ref = _varlen_decode(q, k, v, used, G, L, 0.1, impl="reference")
        out = _varlen_decode(q, k, v, used, G, L, 0.1, impl="triton")
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()

        tok = AutoTokenizer.from_pretrained({tiny_model_dir!r})
        model = AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}, dtype=torch.float32).eval()
        prompts = [tok.encode(t) for t in ("Name a fruit", "Hi", "Tell me about the sea and the sky", "Why")]
        s = SamplingConfig(max_new_tokens=10, temperature=0.9)
        masked = StaticEngine(attention="masked").generate(model, tok, prompts, s, seeds=[1, 2, 3, 4])
        tri = StaticEngine(attention="varlen-triton").generate(model, tok, prompts, s, seeds=[1, 2, 3, 4])
        assert torch.equal(tri.response_ids, masked.response_ids)
        assert torch.allclose(tri.logprobs, masked.logprobs, atol=1e-5), (tri.logprobs - masked.logprobs).abs().max()
        print("ok")
    """)
    _run_under_triton_interpreter(script)


def test_triton_decode_kernel_with_rotary_embedding_equals_the_unfused_step(tiny_model_dir):
    """decode_attention_rope, run by Triton's interpreter on the CPU: from a step's projections (rows strided as the
    views of one stacked product are), its rotary embedding, cache writes and attention against the unfused path:
    the model's apply_rotary_pos_emb, index_copy_ into the cache, and the reference product over the row's slots.
    float32: the rotation in float32 either way (1 rounding vs 3, ~1e-7 relative), the online softmax in another
    order than SDPA's, so 1e-5; the caches outside the written slots stay bit-identical. Then the engine with
    attention varlen-triton-rope against varlen-reference: the same tokens, log-probs within 1e-5."""
    import importlib.util
    import textwrap

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
        from rlhf.rollout import SamplingConfig
        from rlhf.rollout.static import StaticEngine, _varlen_decode
        from rlhf.rollout.triton_decode import decode_attention_rope

        torch.manual_seed(0)
        for d, used_list in ((16, [1, 40, 70]), (128, [2, 65, 70])):
            b, L, kv, G = 3, 70, 2, 3
            used = torch.tensor(used_list, dtype=torch.int32)
            pos = used.long() - 1
            qkv = torch.randn(b, (kv * G + 2 * kv) * d)  # one stacked product's output, split into views
            q, k, v = qkv.split([kv * G * d, kv * d, kv * d], dim=-1)
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
            ang = pos[:, None].float() * inv[None, :]
            emb = torch.cat([ang, ang], dim=-1)
            cos, sin = emb.cos(), emb.sin()
            kc, vc = torch.randn(b * L, kv, d), torch.randn(b * L, kv, d)
            kc2, vc2 = kc.clone(), vc.clone()
            out = decode_attention_rope(q, k, v, cos, sin, kc, vc, used, G, L, 0.3)
            # the unfused step: rotate, write the slot, attend
            qr, kr = apply_rotary_pos_emb(q.view(b, 1, kv * G, d).transpose(1, 2), k.view(b, 1, kv, d).transpose(1, 2),
                                          cos[:, None], sin[:, None])
            slots = torch.arange(b) * L + pos
            kc2.index_copy_(0, slots, kr.transpose(1, 2).reshape(b, kv, d))
            vc2.index_copy_(0, slots, v.reshape(b, kv, d))
            qg = qr.reshape(b, kv, G, d).transpose(1, 2).reshape(b * G, kv, d)
            ref = _varlen_decode(qg, kc2, vc2, used, G, L, 0.3, impl="reference")
            ref = ref.view(b, G, kv, d).transpose(1, 2).reshape(b, -1)
            assert torch.allclose(out, ref, atol=1e-5), (d, (out - ref).abs().max())
            assert torch.allclose(kc, kc2, atol=1e-6) and torch.equal(vc, vc2)
            rest = torch.ones(b * L, dtype=torch.bool)
            rest[slots] = False
            assert torch.equal(kc[rest], kc2[rest])

        tok = AutoTokenizer.from_pretrained({tiny_model_dir!r})
        model = AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}, dtype=torch.float32).eval()
        prompts = [tok.encode(t) for t in ("Name a fruit", "Hi", "Tell me about the sea and the sky", "Why")]
        s = SamplingConfig(max_new_tokens=10, temperature=0.9)
        ref = StaticEngine(attention="varlen-reference").generate(model, tok, prompts, s, seeds=[1, 2, 3, 4])
        for stack in (False, True):  # the projections as modules, and as views of one stacked product
            fused = StaticEngine(attention="varlen-triton-rope", stack_projections=stack).generate(
                model, tok, prompts, s, seeds=[1, 2, 3, 4])
            assert torch.equal(fused.response_ids, ref.response_ids)
            assert torch.allclose(fused.logprobs, ref.logprobs, atol=1e-5), (fused.logprobs - ref.logprobs).abs().max()
        print("ok")
    """)
    _run_under_triton_interpreter(script)


def test_stacked_projections_equal_the_modules_own(lm):
    """q/k/v and gate/up as one product over stacked weights: each output element is the same dot product (with its
    own bias), so only the matrix kernel's blocking may change the float32 summation order (~1e-6 relative)."""
    from rlhf.models.tiny import build_tiny_model
    from rlhf.rollout.static import _Decoder

    _, tok = lm
    model = build_tiny_model(tok, arch="qwen2", hidden_size=64, layers=2, heads=4, kv_heads=2,
                             intermediate_size=128).eval()  # q/k/v with biases
    with torch.no_grad():
        for layer in model.model.layers:  # biases of O(1) rather than zeros, so that a dropped one shows
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.bias.normal_()
    dec = _Decoder(model, 4, 8, stack=True)
    assert dec.qkv is not None and dec.gate_up is not None and dec.qkv[0].bias is not None
    s = SamplingConfig(max_new_tokens=16, temperature=0.9)
    prompts, seeds = _prompts(tok), [5, 6, 7, 8]
    plain = StaticEngine().generate(model, tok, prompts, s, seeds=seeds)
    stacked = StaticEngine(stack_projections=True).generate(model, tok, prompts, s, seeds=seeds)
    assert torch.equal(stacked.response_ids, plain.response_ids)
    assert torch.allclose(stacked.logprobs, plain.logprobs, atol=1e-5)


def test_cache_takes_the_autocast_dtype(lm):
    """float32 weights under bf16 autocast: the projections run in bf16, and the rotary tables (float32, from the
    float32 embeddings) must not promote the cached keys back to float32, which would double the cache and keep
    the bf16-only flash kernel from reading it. Both layouts then cache bf16 and agree to bf16 rounding of their
    summation order (logits of O(1) on this 2-layer model: 1e-2 on a log-prob)."""
    from rlhf.rollout.static import _Decoder

    model, tok = lm
    s = SamplingConfig(max_new_tokens=8, temperature=0.9)
    prompts, seeds = _prompts(tok), [1, 2, 3, 4]
    seen = []
    init = _Decoder._cache

    def spy(self, i, like):
        seen.append(like.dtype)
        return init(self, i, like)

    out = {}
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Decoder, "_cache", spy)
        assert StaticEngine()._attention(model, torch.device("cpu")) == "masked"
        for attention in ("masked", "varlen-reference"):
            out[attention] = StaticEngine(attention=attention).generate(model, tok, prompts, s, seeds=seeds)
    assert set(seen) == {torch.bfloat16}
    same = (out["masked"].response_ids == out["varlen-reference"].response_ids).all(1)
    assert bool(same.any())
    assert torch.allclose(out["masked"].logprobs[same], out["varlen-reference"].logprobs[same], atol=1e-2)


def test_auto_attention_is_masked_without_flash_attention(lm):
    from rlhf.rollout.static import flash_varlen_available

    model, _ = lm
    assert StaticEngine()._attention(model, torch.device("cpu")) == "masked"
    assert StaticEngine()._stack(model, torch.device("cpu")) is False
    assert not flash_varlen_available(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="attention 'flash' is not one of auto, masked, varlen"):
        StaticEngine(attention="flash")


def test_lora_adapters_act_unmerged(lm):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    torch.manual_seed(0)
    peft_model = get_peft_model(_copy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    s = SETTINGS["filtered"]
    r = generate(peft_model, tok, prompt_ids=_prompts(tok), sampling=s, engine="static", seeds=[1, 2, 3, 4])
    assert torch.allclose(r.logprobs, _scored(peft_model, r, s), atol=1e-5)
    assert not torch.allclose(r.logprobs, _scored(model, r, s), atol=1e-3)  # the adapters changed the model


def test_grouped_lora_projections_equal_the_modules_own(lm):
    """All-linear LoRA (r=4, adapters drawn non-zero): the engine's grouped adapters (q, k, v in one pair of products;
    gate and up in one; o and down alone) give the tokens and log-probs of the modules' own forwards, and of a full
    forward of the peft model. float32 on the CPU: the two differ only in the summation order of the adapter products
    (rank <= 12 terms of ~1e-2), far inside 1e-5 on a log-prob."""
    from peft import LoraConfig, get_peft_model

    from rlhf.rollout.static import _Decoder

    model, tok = lm
    torch.manual_seed(0)
    peft_model = get_peft_model(_copy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False))
    dec = _Decoder(peft_model, 2, 8)
    assert dec.qkv and dec.gate_up and all(g.lora == [0, 1, 2] for g in dec.qkv)
    s = SETTINGS["filtered"]
    seeds = [1, 2, 3, 4]
    grouped = StaticEngine(group_lora=True).generate(peft_model, tok, _prompts(tok), s, seeds=seeds)
    own = StaticEngine(group_lora=False).generate(peft_model, tok, _prompts(tok), s, seeds=seeds)
    assert torch.equal(grouped.response_ids, own.response_ids)
    assert torch.allclose(grouped.logprobs, own.logprobs, atol=1e-5)
    assert torch.allclose(grouped.logprobs, _scored(peft_model, grouped, s), atol=1e-5)
    with peft_model.disable_adapter():  # adapters off: the modules' own forwards, nothing grouped
        assert _Decoder(peft_model, 2, 8).qkv is None


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_auto_picks_hf_on_cpu_and_unsupported_models_are_named(lm):
    model, _ = lm
    assert resolve_engine("auto", model) == "hf"
    assert unsupported(model) is None
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "gpt2" in unsupported(gpt2)
    assert resolve_engine("auto", gpt2) == "hf"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager_decoding(lm):
    model, tok = lm
    model = _copy(model).cuda()
    s = SETTINGS["filtered"]
    prompts = _prompts(tok) * 8
    seeds = list(range(len(prompts)))
    eager = StaticEngine(use_graph=False, compile=False).generate(model, tok, prompts, s, seeds=seeds)
    for compile, block in ((False, 0), (True, 0), (True, 8)):  # eager / compiled step; one graph / one per block
        graph = StaticEngine(use_graph=True, compile=compile, kv_block=block).generate(model, tok, prompts, s,
                                                                                        seeds=seeds)
        # float32 throughout; fused kernels round in another order (~1e-6 relative on logits of O(1))
        assert torch.equal(graph.response_ids, eager.response_ids)
        assert torch.allclose(graph.logprobs, eager.logprobs, atol=1e-4)
        assert torch.allclose(graph.logprobs, _scored(model, graph, s), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_lora_in_a_compiled_graph_equals_eager_peft_forwards(lm):
    """The grouped adapters compiled and captured in the CUDA graph, against the modules' own peft forwards run
    eagerly: float32, so only fused kernels' summation order differs (as in the replay test above)."""
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    torch.manual_seed(0)
    peft_model = get_peft_model(_copy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False)).cuda()
    s = SETTINGS["filtered"]
    prompts = _prompts(tok) * 8
    seeds = list(range(len(prompts)))
    eager = StaticEngine(use_graph=False, compile=False, group_lora=False).generate(peft_model, tok, prompts, s,
                                                                                   seeds=seeds)
    graph = StaticEngine(use_graph=True, compile=True).generate(peft_model, tok, prompts, s, seeds=seeds)
    assert torch.equal(graph.response_ids, eager.response_ids)
    assert torch.allclose(graph.logprobs, eager.logprobs, atol=1e-4)
    assert torch.allclose(graph.logprobs, _scored(peft_model, graph, s), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_engine_logprobs_near_a_training_forward(lm):
    """bf16 weights: the engine and the full forward round activations to bf16 (relative 2^-8) at different points
    (cached keys and values, another attention kernel). Logits of O(1) on this 2-layer model then differ by a few
    1e-3 per rounding and position; 0.05 nats per token, averaged over a response, bounds that with room."""
    model, tok = lm
    model = _copy(model).to("cuda", torch.bfloat16)
    s = SETTINGS["filtered"]
    r = generate(model, tok, prompt_ids=_prompts(tok) * 4, sampling=s, engine="static", seeds=list(range(16)))
    gap = (r.logprobs - _scored(model, r, s)).abs().sum(1) / r.lengths.clamp(min=1)
    assert float(gap.max()) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_flash_varlen_decoding_near_the_masked_product(lm):
    """Flash attention's varlen kernel (auto's pick for a bf16 model on an Ampere-or-newer GPU without Triton);
    compiled and in a graph, its log-probs stay within the bf16 bound of the test above of a training forward, and
    its first-step log-probs (no cached token sampled yet) equal the reference product's within bf16 rounding of O(1) logits."""
    from rlhf.rollout.static import flash_varlen_available

    model, tok = lm
    model = _copy(model).to("cuda", torch.bfloat16)
    if not flash_varlen_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("flash attention's varlen kernel with per-sequence key lengths is not available")
    from rlhf.rollout.triton_decode import available

    assert StaticEngine()._attention(model, torch.device("cuda")) == ("varlen-triton" if available() else "varlen")
    s = SETTINGS["filtered"]
    prompts, seeds = _prompts(tok) * 8, list(range(32))
    flash = StaticEngine(attention="varlen").generate(model, tok, prompts, s, seeds=seeds)
    ref = StaticEngine(attention="varlen-reference", compile=False, use_graph=False).generate(model, tok, prompts,
                                                                                           s, seeds=seeds)
    gap = (flash.logprobs - _scored(model, flash, s)).abs().sum(1) / flash.lengths.clamp(min=1)
    assert float(gap.max()) < 0.05
    # decode steps 1-2 read the cache through each kernel; the sampled tokens agree where the noise is far from a tie
    same = (flash.response_ids[:, :3] == ref.response_ids[:, :3]).all(1)
    assert float(same.float().mean()) > 0.9
    assert torch.allclose(flash.logprobs[same, :3], ref.logprobs[same, :3], atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_triton_decode_kernel_near_flash_attention(lm):
    """rlhf's Triton decode kernel compiled for the GPU, in the engine's compiled step and graph: bf16, so within the
    bound of the bf16 tests above of a training forward; on raw tensors at a real head size (64) and group (7 query
    heads a KV head), it equals the float32 reference product to bf16 rounding of outputs of O(1) (2^-8 relative,
    summed over a few hundred keys in float32: 2e-2 absolute with room)."""
    from rlhf.rollout.static import _varlen_decode

    torch.manual_seed(0)
    b, L, kv, G, d = 64, 300, 2, 7, 64
    q = torch.randn(b * G, kv, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b * L, kv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b * L, kv, d, device="cuda", dtype=torch.bfloat16)
    used = torch.randint(1, L + 1, (b,), device="cuda", dtype=torch.int32)
    ref = _varlen_decode(q.float(), k.float(), v.float(), used, G, L, 0.125, impl="reference")
    out = _varlen_decode(q, k, v, used, G, L, 0.125, impl="triton")
    assert torch.allclose(out.float(), ref, atol=2e-2)
    model, tok = lm
    model = _copy(model).to("cuda", torch.bfloat16)
    # the kernel runs inside the compiled step, not in an eager fallback
    _near_training_in_bf16(model, tok, StaticEngine(attention="varlen-triton"), SETTINGS["filtered"],
                           _prompts(tok) * 8)
    assert StaticEngine()._attention(model, torch.device("cuda")) == "varlen-triton"  # auto picks it on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [{"attention": "varlen-triton-rope"}, {"compile_prefill": True}])
def test_bf16_fused_rope_kernel_and_compiled_prefill_near_a_training_forward(lm, kw):
    """varlen-triton-rope (the kernel that writes the cache, inside the compiled step and its graph: torch.compile
    takes the mutating operator) and compile_prefill (torch.compile for real, dynamic shapes) on the GPU: the decode
    step compiles (compile_error None), and the bf16 log-probs stay within the bound the bf16 tests above hold
    against a training forward, for two prompt batches of other shapes."""
    model, tok = lm
    model = _copy(model).to("cuda", torch.bfloat16)
    engine = StaticEngine(**kw)
    for prompts in (_prompts(tok) * 8, _prompts(tok)[:3]):
        _near_training_in_bf16(model, tok, engine, SETTINGS["filtered"], prompts)


def test_hf_generate_runs_compiled_layers_eager(lm):
    """model.compile_layers on a policy whose rollouts take transformers' generate: the layers run eager there (a
    cache that changes every step would compile them again at each step until torch's recompile limit), so nothing
    compiles and the tokens are the uncompiled model's."""
    import copy

    from torch._dynamo.utils import counters

    from rlhf.models.loading import compile_layers

    model, tok = lm
    compiled = copy.deepcopy(model)
    assert compile_layers(compiled) == compiled.config.num_hidden_layers
    s, prompts = SETTINGS["greedy"], _prompts(tok)
    graphs = counters["stats"]["unique_graphs"]
    ours = generate(compiled, tok, prompt_ids=prompts, sampling=s, engine="hf")
    assert counters["stats"]["unique_graphs"] == graphs
    ref = generate(model, tok, prompt_ids=prompts, sampling=s, engine="hf")
    assert torch.equal(ours.response_ids, ref.response_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_sampler_on_a_gpu_at_a_real_vocabulary(lm):
    """The Triton sampler compiled for the GPU, at 512 rows of a 151,936-token vocabulary in bf16: the tokens are the
    compiled torch sampler's except where the two logarithms' last bits decide a near-tie (Triton's and inductor's
    logf may differ by an ulp: at most a couple of the 2,048 draws), and the log-probs agree to float32 rounding of
    a 151,936-term log-sum-exp summed in other orders (1e-4 absolute); greedy picks exactly the same tokens. In the
    engine's compiled step and graph (no eager fallback), its log-probs stay within the bf16 bound of a training
    forward (the other bf16 tests)."""
    torch.manual_seed(0)
    logits = (torch.randn(512, 151936, device="cuda") * 3).to(torch.bfloat16)
    seeds = torch.randint(0, 2**62, (512,), device="cuda")
    compiled = torch.compile(sample_tokens)
    same, draws = 0, 0
    for step in range(4):
        for s in (SamplingConfig(), SamplingConfig(temperature=0.7), SamplingConfig(do_sample=False)):
            tok, lp = sample_tokens(logits, seeds, torch.tensor(step, device="cuda"), s, kernel=True)
            ref_tok, ref_lp = compiled(logits, seeds, torch.tensor(step, device="cuda"), s)
            if not s.do_sample:
                assert torch.equal(tok, ref_tok)
            if s.temperature == 1.0 and s.do_sample:
                same, draws = same + int((tok == ref_tok).sum()), draws + tok.numel()
            both = tok == ref_tok
            assert torch.allclose(lp[both], ref_lp[both], atol=1e-4)
    assert draws - same <= 2
    model, tok = lm
    model = _copy(model).to("cuda", torch.bfloat16)
    _near_training_in_bf16(model, tok, StaticEngine(sampler="triton"), SETTINGS["plain"], _prompts(tok) * 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_topk_on_a_gpu_at_a_real_vocabulary(lm):
    """The radix-select top-k compiled for the GPU at 512 rows of 151,936 bf16 logits (ties everywhere, as bf16
    logits have): the values are torch.topk's, each id holds its value, ids above the k-th value are all there, and
    ties are in token-id order. In the engine's compiled step and graph with filters (temperature 0.7, top-k 40,
    top-p 0.9), the log-probs stay within the bf16 bound of a training forward."""
    from rlhf.rollout.triton_topk import topk_candidates

    torch.manual_seed(0)
    logits = (torch.randn(512, 151936, device="cuda") * 3).to(torch.bfloat16)
    for k in (216, 1000):
        v, i = topk_candidates(logits, k)
        tv = torch.topk(logits, k).values
        assert torch.equal(v, tv) and torch.equal(logits.gather(-1, i), v)
        assert bool((i.sort(-1).values[:, 1:] != i.sort(-1).values[:, :-1]).all())  # no id twice
        above = (logits > v[:, -1:]).sum(-1)
        assert torch.equal(above, (v > v[:, -1:]).sum(-1))
        same = v[:, 1:] == v[:, :-1]
        assert bool((i[:, 1:][same] > i[:, :-1][same]).all())
    model, tok = lm
    model = _copy(model).to("cuda", torch.bfloat16)
    _near_training_in_bf16(model, tok, StaticEngine(sampler="triton"), SETTINGS["filtered"], _prompts(tok) * 8)
