# Run: .venv/bin/python -m pytest -q tests/test_pair_packing.py
"""The flat pair layout (every pair of a micro-batch in one unpadded row; model.pair_packing=flex: a FlexAttention
BlockMask, varlen: variable-length attention documents) against the padded one (a row per pair, a dense 4D mask) and
against plain per-sequence rows.

On the CPU, forwards without gradients run torch's eager flex_attention; flex_attention has no backward on the CPU,
so forwards with gradients hand SDPA the flat layout's mask (the same mask_mod) as a dense [1, 1, N, N] mask. The
varlen layout runs its documents through shared_prefix.varlen_reference there (one SDPA call per document). All
paths compute each query's softmax over exactly the keys of its own row, in float32: per-token log-probs and scores
agree to ~1e-7, well inside 1e-5, while a wrong key, position or index is off by O(0.1). A summed log-prob of ~100
tokens is ~-500, where one float32 ulp is 6e-5 and the layouts add the tokens in another order: sums are compared
within 1e-5 plus a relative 1e-6 (a few ulp).
"""

import math

import pytest
import torch

from tests.conftest import PAIR_OPTIM, train_config
from tests.test_fast_logprobs import assert_same_grads, grads, tiny_qwen2
from rlhf.config import ConfigError
from rlhf.data.preference import PairExample, collate_pairs
from rlhf.models.forward import pair_layout, pair_scores, pair_sequence_logprobs, scalar_scores, sequence_logprobs
from rlhf.models.loading import apply_pair_packing
from rlhf.models.shared_prefix import (FLAT_ABOVE_PADDING, FLEX_BLOCK, SDPA_FLEX, PairVarlen, _varlen_call, flat_pays,
                                       pack_pairs, pair_varlen_attention, varlen_reference)
from rlhf.tracking import read_metrics

ATOL = 1e-5
SUM_RTOL = 1e-6


def tiny_llama(seq_cls: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=1)
    return (LlamaForSequenceClassification if seq_cls else LlamaForCausalLM)(cfg).float()


MODELS = {"qwen2": lambda seq_cls: tiny_qwen2(tied=True, seq_cls=seq_cls), "llama": tiny_llama}


def pairs(lengths, vocab: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()
    return collate_pairs(0)([PairExample(tokens(p), tokens(c), tokens(r), index=i)
                             for i, (p, c, r) in enumerate(lengths)])


# very different lengths, a 1-token and an empty response; 46 + 95 + 110 + 9 = 260 tokens, not a multiple of 128
LENGTHS = [(5, 1, 40), (60, 33, 2), (3, 90, 17), (7, 0, 2)]


def test_flat_layout_and_block_mask_by_hand():
    """Pair 0: prompt 2, chosen 2, rejected 1; pair 1: prompt 1, chosen 1, rejected 2; 9 tokens then 119 pads."""
    b = pairs([(2, 2, 1), (1, 1, 2)])
    packed = pack_pairs(b.input_ids, b.attention_mask, b.response_mask, flat=True)
    N = FLEX_BLOCK
    assert packed.input_ids.shape == (1, N)
    assert packed.position_ids[0, :9].tolist() == [0, 1, 2, 3, 2, 0, 1, 1, 2]  # rejected restarts after its prompt
    assert packed.input_ids[0, 9:].eq(0).all() and packed.document[0, 9:].eq(-1).all()
    expected = torch.tensor([
        # p  p  c  c  r  p  c  r  r     (query rows, key columns)
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0, 0],  # rejected 0: its prompt and itself, not the chosen tokens
        [0, 0, 0, 0, 0, 1, 0, 0, 0],  # pair 1 never sees pair 0
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 0, 1, 1],
    ], dtype=torch.bool)
    want = torch.zeros(N, N, dtype=torch.bool)
    want[:9, :9] = expected
    want[9:, 9:] = torch.ones(N - 9, N - 9, dtype=torch.bool).tril()  # the padding: causal among itself only
    assert torch.equal(packed.mask[0, 0], want)
    # the BlockMask as flex_attention applies it: equal scores, one-hot values -> row q is uniform over q's keys
    from torch.nn.attention.flex_attention import flex_attention

    with torch.no_grad():
        out = flex_attention(torch.zeros(1, 1, N, 8), torch.zeros(1, 1, N, 8), torch.eye(N)[None, None],
                             block_mask=packed.block_mask())
    assert torch.equal(out[0, 0] > 0, want)
    # response tokens in the flat row's flat indices: rejected 1's first token (7) from its last prompt token (5)
    assert packed.source.tolist() == [1, 2, 1, 5, 5, 7] and packed.target.tolist() == [2, 3, 4, 6, 7, 8]
    assert packed.owner.tolist() == [0, 0, 2, 1, 3, 3] and packed.last.tolist() == [3, 6, 4, 8]


def test_varlen_documents_by_hand():
    """Pairs (prompt 2, chosen 2, rejected 1) and (1, 1, 2) in a row of 12: document 0 = positions 0-3 over 0-3,
    document 1 = rejected position 4 over prompt 0-1 and itself, document 2 = 5-6 over 5-6, document 3 = rejected
    7-8 over prompt 5 and 7-8, document 4 = the padding 9-11 over itself."""
    d = PairVarlen.of([(2, 2, 1), (1, 1, 2)], 12)
    assert d.key_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 5, 7, 8, 9, 10, 11]
    assert d.cu_q.tolist() == [0, 4, 5, 7, 9, 12] and d.cu_k.tolist() == [0, 4, 7, 9, 12, 15]
    assert (d.max_q, d.max_k) == (4, 4) and d.cu_q.dtype == d.cu_k.dtype == torch.int32
    b = pairs([(2, 2, 1), (1, 1, 2)])
    packed = pack_pairs(b.input_ids, b.attention_mask, b.response_mask, flat=True, varlen=True)
    assert packed.varlen.key_index.tolist() == d.key_index.tolist()[:12]  # the same pairs, no padding
    assert packed.varlen.cu_q.tolist() == d.cu_q.tolist()[:-1] and packed.input_ids.shape[1] == 9
    assert pack_pairs(b.input_ids, b.attention_mask, b.response_mask, flat=False, varlen=True).varlen is None


def test_varlen_attention_equals_the_dense_pair_mask():
    """The documents attend exactly what the layout's mask rule allows: random queries, keys and values over the
    flat row of LENGTHS, grouped-query heads (4 over 2), against SDPA with the [1, 1, L, L] mask (float32: both
    softmax over the same keys, ~1e-7 apart)."""
    b = pairs(LENGTHS)
    packed = pack_pairs(b.input_ids, b.attention_mask, b.response_mask, flat=True, varlen=True)
    L = packed.input_ids.shape[1]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, L, 8, generator=g) for h in (4, 2, 2))
    d = packed.varlen
    got, _ = pair_varlen_attention(q, k, v, d.key_index, d.cu_q, d.cu_k, d.max_q, d.max_k, scale=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=packed.mask, scale=0.3,
                                                            enable_gqa=True).transpose(1, 2)
    real = packed.document[0] >= 0  # padding queries see other padding in each; not compared
    torch.testing.assert_close(got[:, real], want[:, real], atol=1e-6, rtol=0)


def test_varlen_call_adapts_to_each_form_of_torchs_varlen_attn():
    """torch's varlen_attn has taken three keyword sets: (is_causal), (scale, window_size) and (scale, window_size,
    enable_gqa). Fakes with each signature check what they are handed (causal asked for, equal head counts unless
    enable_gqa, the kernel's own 1/sqrt(D) scale unless scale) and compute as the kernel does; every form must give the
    reference's output for grouped heads (4 over 2) and a scale of 0.3."""
    import inspect as _inspect

    def compute(q, k, v, cu_q, cu_k, causal, scale, gqa):
        assert causal and (gqa or q.shape[1] == k.shape[1])
        return varlen_reference(q, k, v, cu_q, cu_k, q.shape[-1] ** -0.5 if scale is None else scale)

    def first(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
        return compute(query, key, value, cu_seq_q, cu_seq_k, is_causal, None, False)

    def second(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):
        return compute(query, key, value, cu_seq_q, cu_seq_k, tuple(window_size) == (-1, 0), scale, False)

    def third(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False):
        return compute(query, key, value, cu_seq_q, cu_seq_k, tuple(window_size) == (-1, 0), scale, enable_gqa)

    d = PairVarlen.of([(3, 2, 4), (1, 5, 2)], 20)
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(20, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    k, v = k[d.key_index], v[d.key_index]
    want = varlen_reference(q, k, v, d.cu_q, d.cu_k, 0.3)
    for fn in (first, second, third):
        params = frozenset(_inspect.signature(fn).parameters)
        got = _varlen_call(fn, params, q, k, v, d.cu_q, d.cu_k, d.max_q, d.max_k, 0.3)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_pair_packing_setting():
    model = tiny_qwen2(tied=True)
    model.config._attn_implementation = "sdpa"
    assert apply_pair_packing(model, "padded") == "padded" and model.config._attn_implementation == "sdpa"
    if not torch.cuda.is_available():
        assert apply_pair_packing(model, "auto") == "padded" and pair_layout(model) == "padded"
    assert apply_pair_packing(model, "flex") == "flex" and model.config._attn_implementation == SDPA_FLEX
    assert pair_layout(model) == "flex"
    assert apply_pair_packing(model, "varlen") == "varlen" and pair_layout(model) == "varlen"
    eager = tiny_qwen2(tied=True)
    eager.config._attn_implementation = "eager"
    with pytest.raises(ConfigError, match="model.pair_packing=flex: it needs sdpa attention"):
        apply_pair_packing(eager, "flex")
    with pytest.raises(ConfigError, match="model.pair_packing=varlen: it needs sdpa attention"):
        apply_pair_packing(eager, "varlen")


def test_auto_on_cuda_is_varlen_for_16_bit_weights(monkeypatch):
    """pair_packing=auto where CUDA is: varlen for 16-bit weights on Ampere or newer (flash attention's dtypes and
    GPUs), the FlexAttention choice per micro-batch for float32 weights (varlen would fall back to one SDPA call per
    document there) or an older GPU."""
    from rlhf.models.shared_prefix import VARLEN_PARAMS, flex_available

    if VARLEN_PARAMS is None or not flex_available():
        pytest.skip("this torch lacks varlen attention or FlexAttention")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, dtype, want in (((9, 0), torch.bfloat16, "varlen"), ((8, 0), torch.float16, "varlen"),
                                    ((9, 0), torch.float32, "auto"), ((7, 5), torch.float16, "auto")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        model = tiny_qwen2(tied=True).to(dtype)
        model.config._attn_implementation = "sdpa"
        assert apply_pair_packing(model, "auto") == want and pair_layout(model) == want
    eager = tiny_qwen2(tied=True).to(torch.bfloat16)
    eager.config._attn_implementation = "eager"
    assert apply_pair_packing(eager, "auto") == "padded"  # auto never fails: it falls back


def test_auto_layout_flat_only_when_padding_would_pass_the_threshold():
    """pair_packing=auto: 4 pairs of 10 tokens pad nothing (4 x 10 = 1.0x their 40 tokens): padded; 10, 10, 10 and 20
    tokens pad to 4 x 20 = 80 = 1.6x their 50: flat; 10, 10, 10, 11 pad to 44 = 1.07x their 41: padded. The
    auto-chosen layout gives the forced layout's log-probs exactly (same kernels on the same rows)."""
    assert FLAT_ABOVE_PADDING == 1.2
    assert not flat_pays([10, 10, 10, 10]) and flat_pays([10, 10, 10, 20]) and not flat_pays([10, 10, 10, 11])
    assert flat_pays([5, 6]) == (2 * 6 > 1.2 * 11)  # 12 > 13.2: False
    model = tiny_qwen2(tied=True)
    model.config._attn_implementation = "sdpa"
    apply_pair_packing(model, "flex")
    model.pair_packing = "auto"  # what apply_pair_packing(model, "auto") resolves to on CUDA
    for lengths, flat in (([(4, 3, 3)] * 4, False), ([(4, 3, 3)] * 3 + [(4, 8, 8)], True)):
        b = pairs(lengths)
        assert pack_pairs(b.input_ids, b.attention_mask, b.response_mask, flat="auto").flat is flat
        with torch.no_grad():
            auto = pair_sequence_logprobs(model, b.input_ids, b.attention_mask, b.response_mask)[0]
            forced = with_layout(model, "flex" if flat else "padded", lambda: pair_sequence_logprobs(
                model, b.input_ids, b.attention_mask, b.response_mask)[0])
        assert torch.equal(auto, forced)
        model.pair_packing = "auto"


def with_layout(model, layout: str, fn):
    """fn() with pairs in the flat or padded layout (the model's attention is SDPA_FLEX either way)."""
    model.pair_packing = layout
    return fn()


@pytest.mark.parametrize("layout", ["flex", "varlen"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_flat_logprobs_and_gradients_equal_padded_and_plain_rows(arch, layout):
    model = MODELS[arch](False)
    model.config._attn_implementation = "sdpa"
    model.logprob_chunk_size = 7
    b = pairs(LENGTHS)
    plain, counts0 = sequence_logprobs(model, b.input_ids, b.attention_mask, b.response_mask)
    apply_pair_packing(model, layout)

    def run():
        with torch.no_grad():  # the reference's pass: flex_attention itself (flex)
            frozen = pair_sequence_logprobs(model, b.input_ids, b.attention_mask, b.response_mask)
        logps, counts = pair_sequence_logprobs(model, b.input_ids, b.attention_mask, b.response_mask)
        chosen, rejected = logps.chunk(2)
        return frozen, logps.detach(), counts, grads(model, -torch.nn.functional.logsigmoid(chosen - rejected).sum())

    (frozen, logps, counts, g), (frozen0, logps0, _, g0) = with_layout(model, layout, run), with_layout(
        model, "padded", run)
    for got in (frozen[0], logps, frozen0[0], logps0):
        torch.testing.assert_close(got, plain.detach(), atol=ATOL, rtol=SUM_RTOL)
    assert torch.equal(counts, counts0) and torch.equal(frozen[1], counts0) and counts[1].item() == 33
    assert_same_grads(g, g0)


@pytest.mark.parametrize("layout", ["flex", "varlen"])
def test_flat_layouts_reach_the_attention_through_peft(layout):
    """A LoRA policy (peft's wrappers between the caller and the layers, adapters drawn non-zero): the flat layouts'
    keywords and masks still reach every attention call, so log-probs and the adapters' gradients equal padded."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    apply_pair_packing(model.get_base_model(), layout)
    b = pairs(LENGTHS)

    def run():
        logps, _ = pair_sequence_logprobs(model, b.input_ids, b.attention_mask, b.response_mask)
        chosen, rejected = logps.chunk(2)
        return logps.detach(), grads(model, -torch.nn.functional.logsigmoid(chosen - rejected).sum())

    inner = model.get_base_model()
    (logps, g), (logps0, g0) = with_layout(inner, layout, run), with_layout(inner, "padded", run)
    torch.testing.assert_close(logps, logps0, atol=ATOL, rtol=SUM_RTOL)
    assert any("lora_A" in name for name in g) and all("lora" in name for name in g)
    assert_same_grads(g, g0)


@pytest.mark.parametrize("layout", ["flex", "varlen"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_flat_reward_scores_and_gradients_equal_padded_and_plain_rows(arch, layout):
    model = MODELS[arch](True)
    model.config._attn_implementation = "sdpa"
    b = pairs(LENGTHS)
    plain = scalar_scores(model, b.input_ids, b.attention_mask).detach()
    apply_pair_packing(model, layout)

    def run():
        with torch.no_grad():
            frozen = pair_scores(model, b.input_ids, b.attention_mask, b.response_mask)
        scores = pair_scores(model, b.input_ids, b.attention_mask, b.response_mask)
        chosen, rejected = scores.chunk(2)
        return frozen, scores.detach(), grads(model, -torch.nn.functional.logsigmoid(chosen - rejected).sum())

    (frozen, scores, g), (frozen0, scores0, g0) = with_layout(model, layout, run), with_layout(model, "padded", run)
    for got in (frozen, scores, frozen0, scores0):
        torch.testing.assert_close(got, plain, atol=ATOL, rtol=0)
    assert_same_grads(g, g0)


def test_varlen_row_documents_by_hand():
    d = PairVarlen.rows([3, 1, 2])
    assert d.key_index.tolist() == [0, 1, 2, 3, 4, 5]
    assert d.cu_q.tolist() == d.cu_k.tolist() == [0, 3, 4, 6] and (d.max_q, d.max_k) == (3, 3)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_sft_rows_end_to_end_equal_padded_rows(arch, padding):
    """SFT under model.pair_packing=varlen: rows of 1 to 70 tokens laid end to end, one document each, give the
    padded rows' per-token log-probs (to ~1e-7 in float32: the same softmax over the same keys) and gradients; a
    key of another row or a position that does not restart would be off at O(0.1)."""
    from rlhf.models.forward import flat_token_logprobs, token_logprobs

    model = MODELS[arch](False)
    model.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(5)
    lengths = [70, 1, 33, 12]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(0, n) if padding == "right" else slice(T - n, T)
        ids[i, span] = torch.randint(1, 300, (n,), generator=g)
        mask[i, span] = 1
    positions = (mask[:, 1:] * mask[:, :-1]).float()
    positions[0, :5] = 0  # a prompt left out of the loss
    want = token_logprobs(model, ids, mask, positions=positions)
    g0 = grads(model, -want.sum())
    apply_pair_packing(model, "varlen")
    got = flat_token_logprobs(model, ids, mask, positions)
    torch.testing.assert_close(got, want.detach(), atol=ATOL, rtol=0)
    assert got[positions == 0].abs().max() == 0
    assert_same_grads(grads(model, -got.sum()), g0)


def trainer_losses(algorithm: str, model_dir, data, out, layouts) -> dict:
    """{layout: the training losses of two steps with model.pair_packing=layout}."""
    from rlhf import Trainer

    losses = {}
    for layout in layouts:
        cfg = train_config(algorithm, model_dir, data, str(out / layout), PAIR_OPTIM, model__pair_packing=layout)
        trainer = Trainer(cfg)
        trainer.train()
        assert pair_layout(trainer.model) == layout
        losses[layout] = [r["train/loss"] for r in read_metrics(out / layout / "run" / "metrics.jsonl")
                          if "train/loss" in r]
        assert len(losses[layout]) == 2 and all(math.isfinite(x) for x in losses[layout])
    return losses


def test_sft_trainer_varlen_equals_padded(tiny_model_dir, sft_file, tmp_path):
    """Two SFT steps on the tiny Llama, rows of different lengths: one loss with the rows end to end or padded."""
    losses = trainer_losses("sft", tiny_model_dir, sft_file, tmp_path, ("varlen", "padded"))
    torch.testing.assert_close(losses["varlen"], losses["padded"], atol=ATOL, rtol=0)


def test_dpo_trainer_flat_layouts_equal_padded(tiny_model_dir, prefs_file, tmp_path):
    """Two DPO steps on the tiny Llama (precomputed reference: a no-grad pass) give one loss in every layout."""
    losses = trainer_losses("dpo", tiny_model_dir, prefs_file, tmp_path, ("flex", "varlen", "padded"))
    torch.testing.assert_close(losses["flex"], losses["padded"], atol=ATOL, rtol=0)
    torch.testing.assert_close(losses["varlen"], losses["padded"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: bf16 at a real vocabulary size, flex_attention compiled
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["flex", "varlen"])
def test_bf16_flat_equals_padded_on_gpu(layout):
    """Qwen2.5-0.5B's shapes (hidden 896, 14 query and 2 key-value heads, vocab 151,936), two layers, bf16 weights.

    The layouts differ in their attention kernel (FlexAttention or varlen flash attention against SDPA's masked
    kernel) and in the GEMMs' row
    blocking, so every bf16 rounding of an activation can land one ulp apart: a relative 2^-7 (eps_bf16) per hidden
    state, carried through the final norm to the logits, |dz| <= a few eps_bf16 * max|z|. A log-prob z_y - logsumexp(z)
    moves by <= 2 max|dz|; with 4 eps_bf16 per logit that is 8 eps_bf16 * max|z| per token, and a summed log-prob
    moves by the token bound times the token count at worst. Gradients are compared by relative norm within 8 eps.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    from rlhf.models.shared_prefix import VARLEN_PARAMS

    assert apply_pair_packing(model, "auto") == ("varlen" if VARLEN_PARAMS is not None else "auto")
    assert apply_pair_packing(model, layout) == layout
    b = pairs([(150, 250, 240), (40, 1000, 12), (300, 1, 600), (7, 60, 1)], vocab=151936)

    def run():
        logps, counts = pair_sequence_logprobs(model, b.input_ids, b.attention_mask, b.response_mask)
        chosen, rejected = logps.chunk(2)
        g = grads(model, -torch.nn.functional.logsigmoid(chosen - rejected).sum())
        return logps.detach(), counts, g["model.layers.0.self_attn.q_proj.weight"].float()

    (logps, counts, g), (logps0, counts0, g0) = with_layout(model, layout, run), with_layout(model, "padded", run)
    with torch.no_grad():
        max_logit = model(input_ids=b.input_ids[:1].cuda()).logits.float().abs().max().item()
    eps = 2.0 ** -7
    assert torch.equal(counts, counts0)
    assert ((logps - logps0).abs() <= 8 * eps * max_logit * counts.clamp(min=1)).all()
    assert ((g - g0).norm() / g0.norm()).item() <= 8 * eps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_sft_rows_end_to_end_equal_padded_on_gpu():
    """SFT rows of 1,000, 17, 400 and 250 tokens end to end through varlen flash attention against right-padded rows
    through SDPA, at Qwen2.5-0.5B's shapes in bf16 (two layers, vocab 151,936). The bound is the one of the pair test
    above: 8 eps_bf16 * max|z| per token's log-prob, gradients within 8 eps by relative norm."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf.models.forward import flat_token_logprobs, token_logprobs

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    assert apply_pair_packing(model, "varlen") == "varlen"
    lengths = [1000, 17, 400, 250]
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, cfg.vocab_size, (n,), generator=g)
        mask[i, :n] = 1
    positions = (mask[:, 1:] * mask[:, :-1]).float()

    def run(flat):
        model.pair_packing = "varlen" if flat else "padded"
        lp = (flat_token_logprobs(model, ids, mask, positions) if flat
              else token_logprobs(model, ids.cuda(), mask.cuda(), positions=positions.cuda()))
        gr = grads(model, -lp.sum())
        return lp.detach(), gr["model.layers.0.self_attn.q_proj.weight"].float()

    (lp, gq), (lp0, gq0) = run(True), run(False)
    with torch.no_grad():
        max_logit = model(input_ids=ids[:1, :64].cuda()).logits.float().abs().max().item()
    eps = 2.0 ** -7
    assert ((lp - lp0).abs() <= 8 * eps * max_logit).all()
    assert ((gq - gq0).norm() / gq0.norm()).item() <= 8 * eps
