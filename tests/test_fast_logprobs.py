# Run: .venv/bin/python -m pytest -q tests/test_fast_logprobs.py
"""Log-probs from hidden states in LM-head chunks (rlhf.models.forward) against the plain full-logits path.

The two paths run the same float32 arithmetic except for the head's matmul, which is blocked differently (a chunk of
rows against the whole [B, T] batch) and so may sum its H products in another order. With H = 32, |h| ~ 1 after the
final norm and weights ~ N(0, 0.02^2) a logit is ~0.1 and its rounding error <= H * eps32 * sum|h_i w_i| ~ 32 *
1.2e-7 * 0.1 ~ 4e-7; a log-prob z_y - logsumexp(z) moves by at most twice that, and a sum over the <= 24 response
tokens of a row by 24 times that, ~2e-5 in the worst case, ~1e-6 typically. atol 1e-5 per token and 1e-4 for row
sums cover the bound with room; a wrong chunk, label or position is off by O(1).
"""

import math

import pytest
import torch

from rlhf.algorithms.sft import IGNORE, SFTBatch, sft_token_loss
from rlhf.models.forward import (_lm_parts, logprobs_from_hidden, scalar_scores, sequence_logprobs, token_logprobs,
                                 token_values)
from rlhf.ops import logprobs_from_logits

TOKEN_ATOL = 1e-5
SUM_ATOL = 1e-4
SAMPLING = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 20, 1.0), (0.8, 0, 0.9), (0.6, 50, 0.8)]


def tiny_qwen2(tied: bool, vocab: int = 300, seq_cls: bool = False, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0,
                      num_labels=1)
    model = (Qwen2ForSequenceClassification if seq_cls else Qwen2ForCausalLM)(cfg).float()
    return model


def batch(B: int = 4, T: int = 24, vocab: int = 300, seed: int = 1):
    """Right-padded rows of lengths T, T-3, ...; a prompt of 5 tokens, the rest response."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.tensor([T - 3 * i for i in range(B)])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * mask
    response = mask[:, 1:].clone()
    response[:, :4] = 0  # targets 1..4 are prompt tokens
    return ids, mask, response


def both_paths(model, fn):
    """fn(model) with the chunked path (chunk of 7 tokens: chunks straddle rows) and with the full-logits path."""
    model.logprob_chunk_size = 7
    fast = fn(model)
    model.logprob_chunk_size = 0
    plain = fn(model)
    return fast, plain


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(fast: dict, plain: dict):
    assert fast.keys() == plain.keys()
    for name in fast:
        # a gradient is a sum of per-token terms each within the per-token bound: compare relative to its scale
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(fast[name], plain[name], atol=TOKEN_ATOL * max(scale, 1.0), rtol=1e-4, msg=name)


def test_the_fast_path_is_taken_and_never_builds_full_logits(monkeypatch):
    """SFT/DPO's plain log-probs (no temperature or filter) go through _PlainHeadLogprob: the head's matmul runs once
    per chunk of response positions in forward and once more per chunk in backward (last first), never over the
    batch; the model's own head call sees one position per row (logits_to_keep=1)."""
    import rlhf.models.forward as fwd

    model = tiny_qwen2(tied=True)
    ids, mask, response = batch()
    assert _lm_parts(model) is not None
    own, chunks = [], []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: own.append(out.shape[:-1].numel()))

    class Recording:  # torch.nn.functional as rlhf.models.forward sees it, counting the head chunks' rows
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def linear(x, w, b=None):
            chunks.append(x.shape[0])
            return torch.nn.functional.linear(x, w, b)
    monkeypatch.setattr(fwd, "F", Recording())
    model.logprob_chunk_size = 7
    logps = sequence_logprobs(model, ids, mask, response)[0]
    assert own == [ids.shape[0]] and max(chunks) == 7 and sum(chunks) == int(response.sum())
    forward_calls = len(chunks)
    logps.sum().backward()
    handle.remove()
    assert own == [ids.shape[0]] and chunks[forward_calls:] == chunks[:forward_calls][::-1]


def test_filtered_chunks_are_checkpointed():
    """With a temperature or filter (PPO's scoring) each chunk is checkpointed: backward calls the head once more per
    chunk, last first, instead of keeping [chunk, V] logits."""
    model = tiny_qwen2(tied=True)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (30,), generator=g)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: rows.append(out.shape[:-1].numel()))
    logp = logprobs_from_hidden(model.lm_head, hidden, labels, temperature=0.7, top_k=20, chunk_size=7)
    assert rows == [7, 7, 7, 7, 2]
    logp.sum().backward()
    handle.remove()
    assert rows[5:] == [2, 7, 7, 7, 7]


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING)
def test_ppo_scoring_logprobs_without_entropy_equal_full_logits(temperature, top_k, top_p):
    """Without the entropy the chunk takes its own arithmetic when no filter applies (temperature still does)."""
    model = tiny_qwen2(tied=True)
    ids, mask, response = batch()

    def run(m):
        logp = token_logprobs(m, ids, mask, temperature, top_k, top_p)
        return logp.detach(), grads(m, (logp * mask[:, 1:]).sum())

    (logp, g), (logp0, g0) = both_paths(model, run)
    torch.testing.assert_close(logp, logp0, atol=TOKEN_ATOL, rtol=0)
    assert_same_grads(g, g0)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING)
def test_ppo_scoring_logprobs_and_entropy_equal_full_logits(tied, temperature, top_k, top_p):
    model = tiny_qwen2(tied)
    ids, mask, response = batch()

    def run(m):
        logp, ent = token_logprobs(m, ids, mask, temperature, top_k, top_p, return_entropy=True)
        weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # a loss that weighs every position differently
        return logp.detach(), ent.detach(), grads(m, (logp * weights * mask[:, 1:]).sum() + ent.mean())

    (logp, ent, g), (logp0, ent0, g0) = both_paths(model, run)
    torch.testing.assert_close(logp, logp0, atol=TOKEN_ATOL, rtol=0)
    torch.testing.assert_close(ent, ent0, atol=TOKEN_ATOL, rtol=0)
    assert_same_grads(g, g0)


def test_positions_compute_only_there_and_zero_elsewhere():
    model = tiny_qwen2(tied=True)
    ids, mask, response = batch()
    model.logprob_chunk_size = 5
    only = token_logprobs(model, ids, mask, 0.9, 10, 0.95, positions=response)
    every = token_logprobs(model, ids, mask, 0.9, 10, 0.95)
    keep = response.bool()
    torch.testing.assert_close(only[keep], every[keep], atol=TOKEN_ATOL, rtol=0)
    assert (only[~keep] == 0).all()


@pytest.mark.parametrize("tied", [True, False])
def test_dpo_sequence_logprobs_and_gradients_equal_full_logits(tied):
    model = tiny_qwen2(tied)
    ids, mask, response = batch(B=6)

    def run(m):
        logps, counts = sequence_logprobs(m, ids, mask, response)
        chosen, rejected = logps.chunk(2)
        loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).sum()
        return logps.detach(), counts, grads(m, loss)

    (logps, counts, g), (logps0, counts0, g0) = both_paths(model, run)
    torch.testing.assert_close(logps, logps0, atol=SUM_ATOL, rtol=0)
    assert torch.equal(counts, counts0)
    assert_same_grads(g, g0)


def test_plain_head_chunk_gradient_by_hand():
    """hidden [1, 0], W rows e0, e1, 0 (V = 3), label 0: z = [1, 0, 0], log p = 1 - log(e + 2); the gradient of log p
    wrt z is onehot - softmax = [2 / (e + 2), -1 / (e + 2), -1 / (e + 2)], so d/dh = that @ W and d/dW = that^T h."""
    import math

    from rlhf.models.forward import _PlainHeadLogprob

    h = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    logp = _PlainHeadLogprob.apply(h, w, b, torch.tensor([0]), torch.float64)
    e = math.e
    assert logp.item() == pytest.approx(1 - math.log(e + 2), abs=1e-15)
    (2.0 * logp).sum().backward()  # an upstream gradient other than 1
    dz = [2 * 2 / (e + 2), 2 * -1 / (e + 2), 2 * -1 / (e + 2)]
    torch.testing.assert_close(h.grad, torch.tensor([[dz[0], dz[1]]], dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(w.grad, torch.tensor([[dz[0], 0.0], [dz[1], 0.0], [dz[2], 0.0]], dtype=torch.float64),
                               atol=1e-15, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor(dz, dtype=torch.float64), atol=1e-15, rtol=0)
    # and finite differences on random float64 inputs, with a bias and repeated labels
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(5, 4, dtype=torch.float64, generator=g).requires_grad_(),
            torch.randn(7, 4, dtype=torch.float64, generator=g).requires_grad_(),
            torch.randn(7, dtype=torch.float64, generator=g).requires_grad_(), torch.tensor([0, 6, 3, 3, 1]))
    assert torch.autograd.gradcheck(lambda h, w, b, y: _PlainHeadLogprob.apply(h, w, b, y, torch.float64), args)


def test_compiled_logit_passes_equal_eager():
    """The LM-head chunk's passes over the logits as CUDA compiles them (here inductor's CPU code: the same graph),
    against eager: bf16 logits of O(1) over V = 300; the float32 log-sum-exp may sum in another order (~1e-7
    relative), and the gradient, rounded once to bf16 either way, may then differ by one bf16 ulp (<= 2^-7 relative).
    By hand on one row: z = [0, ln 3] (softmax [1/4, 3/4]), label 1, g = 2: gradient 2 x ([0, 1] - softmax)."""
    from rlhf.models.forward import _logit_grad, _pick_and_lse

    z = torch.tensor([[0.0, math.log(3.0)]])
    picked, lse = _pick_and_lse(z, torch.tensor([1]))
    assert picked.item() == pytest.approx(math.log(3.0)) and lse.item() == pytest.approx(math.log(4.0))
    grad = _logit_grad(z, lse, torch.tensor([2.0]), torch.tensor([1]), torch.float32)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.5]]), atol=1e-6, rtol=0)

    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, 300, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 300, (37,), generator=g)
    up = torch.rand(37, generator=g)
    picked, lse = _pick_and_lse(z, labels)
    picked_c, lse_c = torch.compile(_pick_and_lse, dynamic=True)(z, labels)
    assert lse.dtype == lse_c.dtype == torch.float32
    torch.testing.assert_close(picked_c, picked, atol=0, rtol=0)  # a gather and a cast: exact
    torch.testing.assert_close(lse_c, lse, atol=1e-5, rtol=0)
    grad = _logit_grad(z, lse, up, labels, torch.bfloat16)
    grad_c = torch.compile(_logit_grad, dynamic=True)(z, lse, up, labels, torch.bfloat16)
    assert grad_c.dtype == torch.bfloat16
    torch.testing.assert_close(grad_c.float(), grad.float(), atol=0, rtol=2.0 ** -7)


def test_plain_head_chunk_under_bf16_autocast_equals_the_checkpointed_chunk():
    """Under bf16 autocast both run the same bf16 matmuls and the same float32 softmax: log-probs are equal to the bit;
    the gradients pass through one bf16 rounding of d(log p)/dz either way, so they agree to within one bf16 ulp
    (relative 2^-8) of their norm, whatever order the matmul sums in."""
    from rlhf.models.forward import _head_logprobs

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 300, (40,), generator=g)
    weights = torch.rand(40, generator=g)
    out = {}
    for name in ("plain", "checkpointed"):
        h = hidden.clone().requires_grad_()
        head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "plain":
                logp = logprobs_from_hidden(head, h, labels, chunk_size=16)
            else:
                logp = torch.cat([_head_logprobs(head, h[i:i + 16], labels[i:i + 16], 1.0, 0, 1.0, False)
                                  for i in range(0, 40, 16)])
        (logp * weights).sum().backward()
        out[name] = (logp.detach(), h.grad, head.weight.grad.clone())
    assert out["plain"][0].dtype == torch.float32 and torch.equal(out["plain"][0], out["checkpointed"][0])
    for fast, ref in zip(out["plain"][1:], out["checkpointed"][1:]):
        assert ((fast.float() - ref.float()).norm() / ref.float().norm()).item() <= 2.0 ** -8


def test_sft_loss_and_gradients_equal_full_logits():
    model = tiny_qwen2(tied=True)
    ids, mask, response = batch()
    labels = torch.where(torch.cat([torch.zeros_like(response[:, :1]), response], 1).bool(), ids, IGNORE)
    sft = SFTBatch(ids, mask, labels)

    def run(m):
        nll, target = sft_token_loss(m, sft)
        return nll.detach(), target, grads(m, nll)

    (nll, target, g), (nll0, target0, g0) = both_paths(model, run)
    torch.testing.assert_close(nll, nll0, atol=SUM_ATOL * ids.shape[0], rtol=0)  # one sum over all rows
    assert torch.equal(target, target0)
    assert_same_grads(g, g0)


def test_lora_policy_takes_the_fast_path_with_the_same_numbers():
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen2(tied=True)
    model.logprob_chunk_size = 7
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    for n, p in model.named_parameters():  # LoRA's B starts at 0: move it so the adapters change the numbers
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    ids, mask, response = batch()
    assert _lm_parts(model) is not None

    def run(m):
        logps, _ = sequence_logprobs(m, ids, mask, response)
        return logps.detach(), grads(m, logps.sum())

    fast, g = run(model)
    model.base_model.model.logprob_chunk_size = 0
    plain, g0 = run(model)
    torch.testing.assert_close(fast, plain, atol=SUM_ATOL, rtol=0)
    assert_same_grads(g, g0)


def test_reward_model_values_and_scores_equal_the_models_own_head():
    """The RM path never touches an LM head: values are the score head on the final hidden states, and the score at
    the last real token equals what the transformers model pools itself."""
    model = tiny_qwen2(tied=True, seq_cls=True)
    ids, mask, _ = batch()
    values = token_values(model, ids, mask)
    hidden = model.model(input_ids=ids, attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    torch.testing.assert_close(values, model.score(hidden).squeeze(-1), atol=TOKEN_ATOL, rtol=0)
    scores = scalar_scores(model, ids, mask)
    own = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(scores, own.squeeze(-1), atol=TOKEN_ATOL, rtol=0)
    scores.sum().backward()
    assert model.score.weight.grad is not None and model.model.embed_tokens.weight.grad is not None


def test_no_grad_scoring_equals_grad_scoring():
    """The reference pass (no_grad, no checkpointing) and the policy pass (checkpointed chunks) give one number."""
    model = tiny_qwen2(tied=True)
    model.logprob_chunk_size = 7
    ids, mask, response = batch()
    with torch.no_grad():
        ref = sequence_logprobs(model, ids, mask, response)[0]
    pol = sequence_logprobs(model, ids, mask, response)[0]
    assert torch.equal(ref, pol.detach())


def pair_batch(seed: int = 0):
    """4 pairs with prompt/chosen/rejected lengths that differ, an empty chosen response among them."""
    from rlhf.data.preference import PairExample, collate_pairs

    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(1, 300, (n,), generator=g).tolist()
    lengths = [(5, 7, 3), (9, 2, 11), (3, 10, 10), (6, 0, 4)]
    return collate_pairs(0)([PairExample(tokens(p), tokens(c), tokens(r), index=i)
                             for i, (p, c, r) in enumerate(lengths)])


def test_shared_prefix_layout_masks_and_positions():
    from rlhf.models.shared_prefix import pack_pairs

    b = pair_batch()
    packed = pack_pairs(b.input_ids, b.attention_mask, b.response_mask)
    # pair 0: prompt 5, chosen 7, rejected 3 -> one row of 15; positions restart at 5 for the rejected tokens
    assert packed.position_ids[0, :15].tolist() == list(range(12)) + [5, 6, 7]
    m = packed.mask[0, 0]
    assert m[12, :5].all() and not m[12, 5:12].any() and m[12, 12]  # rejected sees the prompt, not the chosen
    assert not m[11, 12:].any()  # causal
    # every response token is predicted once: 7 + 2 + 10 + 0 chosen, 3 + 11 + 10 + 4 rejected
    assert torch.bincount(packed.owner, minlength=8).tolist() == [7, 2, 10, 0, 3, 11, 10, 4]
    L = packed.input_ids.shape[1]
    assert packed.source[7].item() == 4 and packed.target[7].item() == 12  # rejected 0 from the last prompt token
    assert packed.last[3].item() == 3 * L + 5  # an empty chosen response: the last prompt token


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_prefix_dpo_logprobs_and_gradients_equal_separate_rows(impl):
    from rlhf.models.forward import pair_sequence_logprobs

    model = tiny_qwen2(tied=True)
    model.config._attn_implementation = impl
    model.logprob_chunk_size = 7
    b = pair_batch()

    def run(shared):
        model.shared_prefix = shared
        logps, counts = pair_sequence_logprobs(model, b.input_ids, b.attention_mask, b.response_mask)
        chosen, rejected = logps.chunk(2)
        return logps.detach(), counts, grads(model, -torch.nn.functional.logsigmoid(chosen - rejected).sum())

    (logps, counts, g), (logps0, counts0, g0) = run(True), run(False)
    torch.testing.assert_close(logps, logps0, atol=SUM_ATOL, rtol=0)
    assert torch.equal(counts, counts0)
    assert_same_grads(g, g0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_prefix_reward_scores_and_gradients_equal_separate_rows(impl):
    from rlhf.models.forward import pair_scores

    model = tiny_qwen2(tied=True, seq_cls=True)
    model.config._attn_implementation = impl
    b = pair_batch()

    def run(shared):
        model.shared_prefix = shared
        scores = pair_scores(model, b.input_ids, b.attention_mask, b.response_mask)
        chosen, rejected = scores.chunk(2)
        return scores.detach(), grads(model, -torch.nn.functional.logsigmoid(chosen - rejected).sum())

    (scores, g), (scores0, g0) = run(True), run(False)
    torch.testing.assert_close(scores, scores0, atol=TOKEN_ATOL, rtol=0)
    assert_same_grads(g, g0)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: bf16 at a real vocabulary size
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 0.9)])
def test_bf16_real_vocabulary_matches_full_logits_on_gpu(temperature, top_k, top_p):
    """Qwen2.5-0.5B's head shape (hidden 896, vocab 151,936), one layer, bf16 weights.

    Both paths round each fp32-accumulated logit to bf16 once; the GEMMs may accumulate in another order, so a logit
    can differ by one bf16 ulp: |dz| <= 2^-7 |z| (eps_bf16 = 2^-7, one ulp at |z|). A log-prob z_y - logsumexp(z)
    moves by <= |dz_y| + max|dz| <= 2 * 2^-7 * max|z|. Gradients are compared by relative norm, within 4 eps_bf16.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=1,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    ids, mask, response = batch(B=4, T=512, vocab=151936)
    ids, mask, response = ids.cuda(), mask.cuda(), response.cuda()

    def run(chunk):
        model.logprob_chunk_size = chunk
        logp = token_logprobs(model, ids, mask, temperature, top_k, top_p, positions=response)
        model.zero_grad(set_to_none=True)
        (logp * response).sum().backward()
        return logp.detach(), model.lm_head.weight.grad.float(), model.model.layers[0].mlp.down_proj.weight.grad.float()

    logp, gw, gd = run(1024)
    logp0, gw0, gd0 = run(0)
    with torch.no_grad():
        max_logit = model(input_ids=ids, attention_mask=mask).logits.float().abs().max().item()
    eps = 2.0 ** -7
    keep = response.bool()
    assert (logp[keep] - logp0[keep]).abs().max().item() <= 2 * eps * max_logit
    for fast, plain in ((gw, gw0), (gd, gd0)):
        assert ((fast - plain).norm() / plain.norm()).item() <= 4 * eps


def ppo_batch(B: int = 4, P: int = 6, R: int = 10, vocab: int = 300, seed: int = 2):
    """PPO's layout: left-padded prompts of width P (lengths P, P-1, ...), right-padded responses of width R."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, P + R), generator=g)
    prompt = torch.arange(P)[None] >= torch.arange(B)[:, None]  # row i: i pad tokens on the left
    response = torch.arange(R)[None] < (R - 2 * torch.arange(B))[:, None]
    mask = torch.cat([prompt, response], 1).long()
    return ids * mask, mask, P


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING)
def test_ppo_response_and_reference_logprobs_equal_full_logits(temperature, top_k, top_p):
    """PPO's scoring and training log-probs (response_logprobs) and the reference's log-probs on the policy's
    sampling support (reference_logprobs) equal support_logprobs / logprobs_from_logits of the full float32 logits,
    with a reference that differs from the policy; gradients of the training log-probs too."""
    from rlhf.algorithms.ppo import reference_logprobs, response_logits, response_logprobs, support_logprobs

    policy, reference = tiny_qwen2(tied=True, seed=0), tiny_qwen2(tied=True, seed=5)
    ids, mask, P = ppo_batch()
    labels, rmask = ids[:, P:], mask[:, P:]
    pol_logits = response_logits(policy, ids, mask, P)
    want = logprobs_from_logits(pol_logits, labels, temperature, top_k, top_p) * rmask
    want_ref = support_logprobs(response_logits(reference, ids, mask, P).detach(), pol_logits.detach(), labels,
                                temperature, top_k, top_p) * rmask
    g0 = grads(policy, (want * torch.linspace(-1, 1, want.numel()).view_as(want)).sum())
    for chunk in (7, 0):  # chunks straddle rows; 0 = the full-logits path
        policy.logprob_chunk_size = reference.logprob_chunk_size = chunk
        got = response_logprobs(policy, ids, mask, P, temperature, top_k, top_p)
        torch.testing.assert_close(got, want, atol=TOKEN_ATOL, rtol=0)
        assert_same_grads(grads(policy, (got * torch.linspace(-1, 1, got.numel()).view_as(got)).sum()), g0)
        ref = reference_logprobs(policy, reference, ids, mask, P, temperature, top_k, top_p)
        torch.testing.assert_close(ref, want_ref, atol=TOKEN_ATOL, rtol=0)
        assert torch.isfinite(ref).all() and (ref[rmask == 0] == 0).all()
