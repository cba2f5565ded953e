# Run: .venv/bin/python -m pytest -q tests/test_compiled_layers.py
"""model.compile_layers: each decoder layer compiled in place (rlhf.models.loading.compile_layers) gives the eager
model's log-probs and gradients, keeps the parameter names, and a frozen copy of a compiled model (a reference)
runs its own weights, not the original's. One tiny Qwen2 model on the CPU (inductor's C++ backend: one compile of
~15 s per input shape and mode, so the tests keep to one shape).

Tolerance: inductor fuses the norms, rotations and activations and may sum RMSNorm's 32 squares, the attention
rows and the backward's reductions in another order than eager float32 PyTorch. A reordered float32 sum of n terms
moves by at most n * eps32 * sum|terms| (n <= 64 here, the intermediate size), ~8e-6 of the terms' scale; through
two layers and the head a few such steps add up. 1e-5 relative on the summed log-prob (~3e2) and 1e-4 of each
gradient's largest magnitude cover that; a layer running another layer's weights, or a missing term, is off at
order 1."""

import copy
import json
import types

import pytest
import torch

from rlhf.config import ConfigError, ModelConfig, config_from_dict
from rlhf.models.loading import compile_layers, compiles_layers, decoder_layers
from rlhf.models.reference import frozen_copy

VOCAB = 300


def tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).float().train()


def summed_logprob(model, ids):
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum()


@pytest.fixture(scope="module")
def compiled_pair():
    """(eager, compiled) copies of one model, and one batch; the compiled one has run forward and backward once."""
    eager = tiny()
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    return eager, compiled, ids


def test_compiled_layers_give_the_eager_logprobs_and_gradients(compiled_pair):
    eager, compiled, ids = compiled_pair
    want, got = summed_logprob(eager, ids), summed_logprob(compiled, ids)
    want.backward()
    got.backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    for (name, a), (name_c, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert name == name_c  # nn.Module.compile keeps names (no _orig_mod): checkpoints load either way
        scale = a.grad.abs().max()
        assert (a.grad - b.grad).abs().max() <= 1e-4 * scale, name
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(compiled))


def test_new_lengths_and_batch_sizes_reuse_the_compiled_layers(compiled_pair):
    """dynamic=True: symbolic shapes from the first compile, so rows of another length and batch size (variable-length
    data, the last short micro-batch) compile nothing new; a compile per new shape would add ~15 s each here."""
    from torch._dynamo.utils import counters

    eager, compiled, ids = compiled_pair
    summed_logprob(compiled, ids).backward()  # compiled for training mode (again a no-op when already done)
    graphs = counters["stats"]["unique_graphs"]
    other = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    got, want = summed_logprob(compiled, other), summed_logprob(eager, other)
    got.backward()
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.allclose(got, want, rtol=1e-5, atol=0)


def test_a_frozen_copy_of_a_compiled_model_runs_its_own_weights(compiled_pair):
    _, compiled, ids = compiled_pair
    ref = frozen_copy(compiled)
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(ref))
    with torch.no_grad():
        before = summed_logprob(compiled, ids)
        assert torch.allclose(summed_logprob(ref, ids), before, rtol=1e-5, atol=0)
        for p in ref.model.layers[1].mlp.parameters():  # move the copy's last layer only
            p.mul_(3.0)
        moved = summed_logprob(ref, ids)
        assert torch.equal(summed_logprob(compiled, ids), before)  # the original is untouched
        assert (moved - before).abs() > 1e-3 * before.abs()  # 100x the tolerance: the copy moved
        eager_ref = copy.deepcopy(ref)  # a copy drops the compiled calls: the eager forward of the moved weights
        assert decoder_layers(eager_ref)[0]._compiled_call_impl is None
        assert torch.allclose(moved, summed_logprob(eager_ref, ids), rtol=1e-5, atol=0)


def test_compiled_layers_under_activation_checkpointing():
    """model.gradient_checkpointing with compiled layers (a 7B run's combination): transformers' checkpointing wraps
    each layer's call, backward reruns the compiled forward; gradients equal the eager checkpointed model's."""
    eager = tiny()
    eager.gradient_checkpointing_enable()
    eager.config.use_cache = False
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    got, want = summed_logprob(compiled, ids), summed_logprob(eager, ids)
    got.backward()
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-4 * a.grad.abs().max()


def test_compiled_layers_with_fused_lora_adapters():
    """A LoRA policy with rlhf's fused LoRA and SwiGLU forwards (custom autograd Functions inside the compiled layers):
    dynamo traces them without a graph break, and the adapters' gradients equal the eager model's."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters

    from rlhf.models.fused_layers import apply_fused_layers

    torch.manual_seed(1)
    eager = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                              init_lora_weights=False)).train()
    assert apply_fused_layers(eager) == 16  # 7 LoRA projections and the MLP tail, per layer
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2
    breaks = sum(counters["graph_break"].values())
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    got, want = summed_logprob(compiled, ids), summed_logprob(eager, ids)
    got.backward()
    want.backward()
    assert sum(counters["graph_break"].values()) == breaks
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    trained = [(a, b) for a, b in zip(eager.parameters(), compiled.parameters()) if a.requires_grad]
    assert len(trained) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for a, b in trained:
        assert (a.grad - b.grad).abs().max() <= 1e-4 * a.grad.abs().max()


def test_compile_layers_setting():
    base = {"algorithm": "sft", "model": {"name_or_path": "m"}, "data": {"train": "d.jsonl"}}
    for value in ("auto", True, False):
        assert config_from_dict({**base, "model": {**base["model"], "compile_layers": value}}).model.compile_layers == value
    with pytest.raises(ConfigError, match="compile_layers"):
        config_from_dict({**base, "model": {**base["model"], "compile_layers": "yes"}})
    assert ModelConfig().compile_layers is False
    assert compiles_layers(True) and not compiles_layers(False)
    assert compiles_layers("auto") == torch.cuda.is_available()


def test_compile_layers_true_under_zero3_says_so(monkeypatch):
    import rlhf.models.loading as loading

    monkeypatch.setattr(loading, "_sharded_run", lambda: "ZeRO-3")
    with pytest.raises(ConfigError, match="compile_layers=true: not under ZeRO-3"):
        compiles_layers(True)
    assert not compiles_layers("auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_bf16_compiled_layers_match_eager_on_gpu(mode):
    """Two layers of Qwen2.5-0.5B's shape in bf16 on the GPU, right-padded rows, inductor's Triton kernels.

    Eager PyTorch rounds every op's output to bf16 (norm, rotation, activation, each residual add); the compiled
    layer keeps fused intermediates in float32, so the two differ by rounding, not by arithmetic: each of the ~8
    roundings per layer moves a value by <= eps/2 relative (eps_bf16 = 2^-7), independent ones add as a random walk:
    sqrt(16) * eps/2 = 2 eps over two layers. Logits and gradients are compared by relative norm within 4 eps; a
    layer running wrong weights or a dropped mask is off at order 1. reduce-overhead: three steps, the CUDA graphs
    warmed up, recorded, then replayed, each step's values as eager's."""
    from rlhf.models.loading import mark_step

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=4096, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    eager = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).train()
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled, mode) == 2
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (4, 256), generator=g).cuda()
    mask = (torch.arange(256)[None] < torch.tensor([256, 200, 131, 64])[:, None]).long().cuda()

    def run(model):
        model.zero_grad(set_to_none=True)
        mark_step(model)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        (logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0] * mask).sum().backward()
        return logits.detach() * mask[..., None], model.model.layers[0].mlp.down_proj.weight.grad.float()

    eps = 2.0 ** -7
    z0, gd0 = run(eager)
    for _ in range(3 if mode == "reduce-overhead" else 1):
        z, gd = run(compiled)
        assert ((z - z0).norm() / z0.norm()).item() <= 4 * eps
        assert ((gd - gd0).norm() / gd0.norm()).item() <= 4 * eps


# --------------------------------------------------------------------------------------------------------------------
# PPO with compiled layers: the policy, the critic, the EMA reference copy, and the shared base's adapters
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shared_base", [False, True])
def test_ppo_with_compiled_layers_equals_eager(tiny_model_dir, sft_file, tmp_path, shared_base):
    """Two PPO iterations with model.compile_layers: true log the eager run's metrics: separate policy, critic and
    EMA reference copy; or one base with actor, critic and reference adapters (the active adapter switches inside the
    compiled layers). float32 on the CPU: inductor may sum in another order (~1e-7 relative per reduction over 64
    hidden units), and four AdamW steps of lr 1e-3 carry that into metrics of order 1 far below 1e-4."""
    from tests.test_ppo import ppo_config, run
    from tests.test_shared_base import assert_same_metrics

    over = dict(ppo__ref_ema=0.1)
    if shared_base:
        over.update(model__lora_r=4, model__lora_alpha=8, ppo__shared_base=True)
    eager = run(ppo_config(tiny_model_dir, sft_file, str(tmp_path / "eager"), **over))
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs cached by earlier tests (symbolic shapes fit any size) would compile nothing new
    counters.clear()
    compiled = run(ppo_config(tiny_model_dir, sft_file, str(tmp_path / "compiled"), model__compile_layers=True, **over))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the layers did compile: training and no-grad forwards at least
    assert len(eager) == 4  # 2 iterations x 2 minibatch steps
    assert_same_metrics(compiled, eager, tol=1e-4)


def test_liger_kernels_under_compiled_layers():
    """Compiled layers run without Liger's kernels (auto), and both asked for is refused at start-up: dynamo cannot
    trace Liger's autograd functions inside a compiled layer."""
    from rlhf.models.loading import liger_setting

    assert liger_setting(ModelConfig(liger_kernels="auto", compile_layers=True), compiled=True) is False
    assert liger_setting(ModelConfig(liger_kernels="auto", compile_layers=True), compiled=False) == "auto"
    assert liger_setting(ModelConfig(liger_kernels=True), compiled=False) is True
    with pytest.raises(ConfigError, match="model.liger_kernels=true with model.compile_layers=True"):
        liger_setting(ModelConfig(liger_kernels=True, compile_layers=True), compiled=True)


def test_reduce_overhead_mode_gives_the_eager_values_and_marks_steps(monkeypatch):
    """model.compile_mode reduce-overhead: the same values as eager (on the CPU inductor skips the CUDA graphs, so this
    checks the compile and the marks; the GPU test above checks the graphs' replays), and mark_step tells CUDA graphs
    a new step begins for that mode only."""
    from rlhf.models.loading import mark_step

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    eager = tiny()
    graphs, plain = copy.deepcopy(eager), copy.deepcopy(eager)
    assert compile_layers(graphs, "reduce-overhead") == 2 and compile_layers(plain) == 2
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        mark_step(graphs)
        mark_step(plain)
        torch.testing.assert_close(summed_logprob(graphs, ids), summed_logprob(eager, ids), rtol=1e-5, atol=0)
    assert len(marks) == 2
    mark_step(types.SimpleNamespace(module=graphs))
    assert len(marks) == 3  # through a distributed wrapper's .module


def test_compile_mode_setting():
    base = {"model": {"name_or_path": "org/model"}, "data": {"train": "org/data"}}
    cfg = config_from_dict({"algorithm": "dpo", **base, "model": {"name_or_path": "org/model",
                                                                 "compile_mode": "reduce-overhead"}})
    assert cfg.model.compile_mode == "reduce-overhead" and ModelConfig().compile_mode == "default"
    with pytest.raises(ConfigError, match="model.compile_mode=reduce-overhead: not for PPO"):
        config_from_dict({"algorithm": "ppo", "ppo": {"reward_fns": ["m:f"]}, **base,
                          "model": {"name_or_path": "org/model", "compile_mode": "reduce-overhead"}})
    with pytest.raises(ConfigError, match="compile_mode"):
        config_from_dict({"algorithm": "sft", **base, "model": {"name_or_path": "org/model", "compile_mode": "max"}})


@pytest.mark.slow
def test_dpo_in_reduce_overhead_mode_marks_every_forward_batch(tiny_model_dir, prefs_file, tmp_path, monkeypatch):
    """A DPO run with model.compile_mode reduce-overhead marks a new CUDA-graph step before each forward batch of the
    reference precompute, of training and of evaluation, and logs the default mode's losses (on the CPU the same
    compiled code runs in both modes)."""
    from rlhf import Trainer
    from tests.test_dpo import dpo_config

    def losses(out, **over):
        cfg = dpo_config(tiny_model_dir, prefs_file, str(tmp_path / out), data__eval=prefs_file,
                         model__compile_layers=True, **over)
        trainer = Trainer(cfg)
        trainer.train()
        records = [json.loads(line) for line in open(tmp_path / out / "run" / "metrics.jsonl")]
        return trainer, [r["train/loss"] for r in records if "train/loss" in r]

    _, plain = losses("default")
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer, graphs = losses("graphs", model__compile_mode="reduce-overhead")
    assert graphs == plain and len(plain) == trainer.cfg.optim.max_steps
    algo, mb = trainer.algorithm, trainer.cfg.optim.micro_batch_size
    n_pairs, n_eval = len(algo.train_pairs) + len(algo.eval_pairs), len(algo.eval_pairs)
    precompute = -(-n_pairs // (4 * mb))
    evals = sum(1 for r in open(tmp_path / "graphs" / "run" / "metrics.jsonl") if '"eval/loss"' in r)
    assert len(marks) == precompute + len(graphs) * trainer.grad_accum + evals * -(-n_eval // mb)
