import torch

from rlhf.data import encode_prompt
from rlhf.models import (last_token_index, load_causal_lm, load_scalar_model, load_tokenizer, scalar_scores,
                         token_logprobs, token_values)
from rlhf.config import ModelConfig
from rlhf.models.tiny import init_tiny
from rlhf.rollout import SamplingConfig, generate, response_mask_from_ids


def test_tiny_models_roundtrip_through_from_pretrained(tmp_path, sft_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arch, cls in (("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")):
        out = init_tiny(str(tmp_path / arch), [sft_file], arch=arch, vocab_size=400, hidden_size=32, layers=1,
                        heads=2, kv_heads=1, intermediate_size=64)
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
        assert type(model).__name__ == cls
        assert tok.pad_token_id != tok.eos_token_id
        assert tok.chat_template and len(tok) == model.config.vocab_size
        text = "What color is the sky?"
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_token_logprobs_match_manual_softmax(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok, trainable=False)
    ids = torch.tensor([encode_prompt(tok, "What color is the sky?")])
    mask = torch.ones_like(ids)
    logits = model(ids).logits[0, :-1]
    manual = torch.log_softmax(logits / 0.7, -1).gather(1, ids[0, 1:, None]).squeeze(1)
    assert torch.allclose(token_logprobs(model, ids, mask, temperature=0.7)[0], manual, atol=1e-5)


def test_left_padding_does_not_change_logprobs_or_scores(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok, trainable=False)
    ids = torch.tensor([encode_prompt(tok, "What sound does a cow make?")])
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], 1)
    pmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    a = token_logprobs(model, ids, torch.ones_like(ids))
    b = token_logprobs(model, padded, pmask)[:, 3:]
    assert torch.allclose(a, b, atol=1e-5)
    rm = load_scalar_model(tiny_model_dir, tokenizer=tok)
    s1 = scalar_scores(rm, ids, torch.ones_like(ids))
    s2 = scalar_scores(rm, padded, pmask)
    assert torch.allclose(s1, s2, atol=1e-5)
    # the score is the head's value at the last real token
    assert torch.allclose(s1, token_values(rm, ids, torch.ones_like(ids))[:, -1])


def test_fresh_score_head_is_drawn_on_the_cpu_whatever_transformers_drew(tiny_model_dir, tmp_path, monkeypatch):
    """A causal LM loaded as a scalar model gets a head N(0, initializer_range) drawn from the CPU generator as seeded,
    also when transformers' own draw came from elsewhere (under ZeRO-3 on GPUs: the GPU's generator)."""
    from transformers import LlamaForSequenceClassification

    def hand_drawn(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.empty(1, 64).normal_(0.0, 0.02, generator=g), g.get_state()

    expected, after = hand_drawn(7)
    torch.manual_seed(7)
    head = load_scalar_model(tiny_model_dir).score.weight.detach()
    assert head.shape == (1, 64)
    assert torch.equal(head, expected)
    assert torch.equal(torch.random.get_rng_state(), after)  # later draws as on one process
    # a trained head (a reward model's) is loaded, not drawn
    rm = load_scalar_model(tiny_model_dir)
    rm.score.weight.data.fill_(0.25)
    rm.save_pretrained(tmp_path / "rm")
    assert torch.all(load_scalar_model(str(tmp_path / "rm")).score.weight == 0.25)

    def drawn_elsewhere(self, module):  # transformers' init touching neither the values we expect nor the generator
        if isinstance(module, torch.nn.Linear):
            module.weight.data.fill_(0.5)

    monkeypatch.setattr(LlamaForSequenceClassification, "_init_weights", drawn_elsewhere)
    torch.manual_seed(7)
    assert torch.equal(load_scalar_model(tiny_model_dir).score.weight.detach(), expected)
    assert torch.equal(torch.random.get_rng_state(), after)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3]


def test_response_mask_includes_first_eos_only():
    eos = 9
    ids = torch.tensor([[5, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]])
    mask, ended = response_mask_from_ids(ids, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_generate_rollout_shapes_and_masks(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir), tok, trainable=False)
    torch.manual_seed(0)
    r = generate(model, tok, ["What color is the sky?", "Hi"], SamplingConfig(max_new_tokens=6, top_k=20), batch_size=1)
    assert r.prompt_ids.shape[0] == r.response_ids.shape[0] == 2
    assert r.response_ids.shape[1] <= 6
    # prompts are left-padded: the last prompt column is always a real token
    assert r.prompt_mask[:, -1].all()
    # padding after the response is the pad token, never EOS
    assert (r.response_ids[r.response_mask == 0] == tok.pad_token_id).all()
    for i in range(2):
        n = int(r.response_mask[i].sum())
        assert bool(r.eos[i]) == (r.response_ids[i, n - 1].item() == tok.eos_token_id)
        assert r.texts[i] == tok.decode(r.response_ids[i, :n], skip_special_tokens=True)


def test_gradient_checkpointing_recomputes_the_layers_of_a_trainable_model(tiny_model_dir, monkeypatch):
    """model.gradient_checkpointing: each decoder layer's body runs again in backward (its MLP twice per step, not
    once; counted in the MLP's forward itself: module hooks do not fire in the recomputation), and the gradients
    equal the run without it (float32; the recomputation is the same arithmetic)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    runs, calls = {}, []
    for ckpt in (False, True):
        # fused_layers off: the class's MLP forward counts the calls, and the fused one (bound on the instance) would
        # bypass it; tests/test_fused_layers.py runs the fused layers under checkpointing
        model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, gradient_checkpointing=ckpt,
                                           fused_layers=False))
        assert model.training
        if not ckpt:  # one class for both models: patched once
            mlp = type(model.model.layers[0].mlp)
            monkeypatch.setattr(mlp, "forward", lambda self, x, _f=mlp.forward: calls.append(1) or _f(self, x))
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        runs[ckpt] = (len(calls), {n: p.grad.clone() for n, p in model.named_parameters()})
    layers = len(model.model.layers)
    assert runs[False][0] == layers and runs[True][0] == 2 * layers
    for name, grad in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], grad, rtol=0, atol=1e-6, msg=name)
