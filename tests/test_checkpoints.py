"""Checkpoint folders as models and as resume points: LoRA checkpoints hold only what trains and resume to the same
run; every checkpoint loads with from_pretrained, rlhf's loaders and `rlhf eval`; `rlhf export` merges LoRA into one
plain model; the manifest samples large files instead of hashing them whole."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlhf import checkpoints as ckpt
from rlhf.cli import main as cli_main
from rlhf.config import ConfigError, ModelConfig
from rlhf.models import load_causal_lm, load_tokenizer, token_logprobs
from rlhf.tracking import read_metrics
from rlhf.trainer import CheckpointError, Trainer
from tests.conftest import FIXTURES, sft_config

LORA = dict(model__lora_r=4, model__lora_alpha=8, model__lora_dropout=0.1,
            model__lora_target_modules=["q_proj", "v_proj"])
KW = dict(optim__max_steps=6, logging__save_every=3, **LORA)


def lora_config(model_dir, out, **over):
    return sft_config(model_dir, os.path.join(FIXTURES, "sft.jsonl"), str(out), **{**KW, **over})


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> str:
    """A finished LoRA SFT run (dropout in the adapters: resume must restore the RNG too), checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("lora")
    Trainer(lora_config(tiny_model_dir, out)).train()
    return str(out / "run")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_a_lora_checkpoint_holds_only_the_trainable_tensors(lora_run, tiny_model_dir):
    cfg = lora_config(tiny_model_dir, "unused")
    model = load_causal_lm(cfg.model, load_tokenizer(tiny_model_dir))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    base = tensor_bytes(p for p in model.parameters() if not p.requires_grad)
    c = os.path.join(lora_run, "checkpoints", "step_000003")
    state = load_file(os.path.join(c, "state", "model.safetensors"))
    assert set(state) == set(trainable)  # adapters only: no base weight
    assert tensor_bytes(state.values()) == tensor_bytes(trainable.values())
    adam = torch.load(os.path.join(c, "state", "optimizer.bin"), weights_only=False)["state"]
    # AdamW: exp_avg and exp_avg_sq per trainable parameter (same shape and dtype), plus a scalar step
    moments = [v for s in adam.values() for k, v in s.items() if k != "step"]
    assert len(adam) == len(trainable) and tensor_bytes(moments) == 2 * tensor_bytes(trainable.values())
    weight_files = [os.path.join(root, n) for root, _, names in os.walk(c) for n in names
                    if n.endswith((".safetensors", ".bin"))]
    written = sum(os.path.getsize(f) for f in weight_files)
    # trainable: 2 layers x (q: 4x64 + 64x4, v: 4x64 + 32x4) = 1792 floats, 7 KB; the base ~105k floats, 420 KB.
    # Written: the state and the peft adapter (1x each) and Adam (2x), 28 KB, plus headers and the optimizer's pickle
    assert written < base / 5, (written, base)


@pytest.mark.parametrize("layout", ["state/", "flat"])
def test_stopped_and_resumed_lora_run_is_the_uninterrupted_run(layout, lora_run, tiny_model_dir, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(os.path.dirname(lora_run), out)
    run = out / "run"
    shutil.rmtree(run / "checkpoints" / "step_000006")
    shutil.rmtree(run / "final")
    if layout == "flat":  # a checkpoint written before state/ existed: accelerate's files at the top
        c = run / "checkpoints" / "step_000003"
        for name in os.listdir(c / "state"):
            os.replace(c / "state" / name, c / name)
        os.rmdir(c / "state")
        ckpt.write_manifest(str(c), "step_000003", 3, str(run))
    trainer = Trainer(lora_config(tiny_model_dir, out), resume=True)
    assert os.path.basename(trainer.resume_from) == "step_000003"
    trainer.train()
    straight, resumed = (read_metrics(os.path.join(r, "metrics.jsonl")) for r in (lora_run, run))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    # one process, same arithmetic: a resume that restores adapters, Adam, schedule and RNG exactly is bit-identical
    assert [r["train/loss"] for r in straight] == [r["train/loss"] for r in resumed]
    a = load_file(os.path.join(lora_run, "final", "adapter_model.safetensors"))
    b = load_file(run / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_other_lora_settings_is_refused_by_name(lora_run, tiny_model_dir):
    # resume refuses other settings from config.yaml first; this is the check on the tensors themselves
    from rlhf.checkpointing import _load_trainable

    cfg = lora_config(tiny_model_dir, "unused", model__lora_target_modules=["q_proj"])
    model = load_causal_lm(cfg.model, load_tokenizer(tiny_model_dir))
    state = os.path.join(lora_run, "checkpoints", "step_000003", "state")
    with pytest.raises(CheckpointError, match=r"state/model.safetensors: .*not in this model: .*v_proj"):
        _load_trainable([model], state)


# --------------------------------------------------------------------------------------------------------------------
# Every checkpoint folder is a model; rlhf export
# --------------------------------------------------------------------------------------------------------------------


def logprobs(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["The quick brown fox jumps over", "Hello there, how are you"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        lp = token_logprobs(model.eval(), batch["input_ids"], batch["attention_mask"])
    return lp * batch["attention_mask"][:, 1:]


def test_lora_checkpoint_loads_as_its_model_and_exports_merged(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    c = os.path.join(lora_run, "checkpoints", "step_000003")
    tok = load_tokenizer(c)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_lp = logprobs(base, tok)
    lora_lp = logprobs(PeftModel.from_pretrained(base, c), tok)  # the adapter over its base, unmerged
    # rlhf's loader: base + adapter merged; export: that, saved and loaded by plain transformers. Merging computes
    # W + s*B*A once in float32 (one rounding per weight) and reorders each layer's sums (hidden size 64): logits
    # move by ~1e-6, log-probs over 512 tokens likewise; 1e-5 leaves a margin ten times that.
    loaded = load_causal_lm(ModelConfig(name_or_path=c), tok, trainable=False)
    assert assert_close_far_from(logprobs(loaded, tok), lora_lp, base_lp)
    out = tmp_path / "merged"
    assert cli_main(["export", c, str(out)]) == 0
    assert not os.path.exists(out / "adapter_config.json")
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    assert exported.dtype == torch.float32
    assert assert_close_far_from(logprobs(exported, load_tokenizer(str(out))), lora_lp, base_lp)
    assert cli_main(["export", c, str(out), "--dtype", "bfloat16"]) == 2  # OUT is not empty
    assert cli_main(["export", c, str(out), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16


def assert_close_far_from(got, want, other, atol=1e-5) -> bool:
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert (want - other).abs().max() > 100 * atol  # the adapter changed the model: the check can tell
    return True


def test_full_checkpoint_is_a_from_pretrained_model(tiny_model_dir, sft_file, tmp_path):
    from transformers import AutoModelForCausalLM

    Trainer(sft_config(tiny_model_dir, sft_file, str(tmp_path), optim__max_steps=2, logging__save_every=2)).train()
    c = tmp_path / "run" / "checkpoints" / "step_000002"
    model = AutoModelForCausalLM.from_pretrained(str(c))
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")  # written at the same step
    assert all(torch.equal(p, final[n]) for n, p in model.state_dict().items() if n in final) and final
    assert cli_main(["eval", "--model", str(c), "--testbed", "assistant", "--limit", "2", "--max-new-tokens", "4",
                     "--out", str(tmp_path / "eval")]) == 0
    assert os.path.exists(tmp_path / "eval" / "eval.json")


def test_lora_checkpoint_evaluates_with_rlhf_eval(lora_run, tmp_path):
    c = os.path.join(lora_run, "checkpoints", "step_000006")
    assert cli_main(["eval", "--model", c, "--testbed", "assistant", "--limit", "2", "--max-new-tokens", "4",
                     "--out", str(tmp_path)]) == 0
    assert os.path.exists(tmp_path / "eval.json")


def test_export_names_what_is_wrong(lora_run, tmp_path, capsys):
    assert cli_main(["export", lora_run, str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"'{lora_run}' is not a model folder" in err and os.path.join(lora_run, "final") in err
    with pytest.raises(ConfigError, match="is not a folder"):
        from rlhf.export import export_model
        export_model(str(tmp_path / "missing"), str(tmp_path / "y"))
    with pytest.raises(SystemExit) as e:
        cli_main(["export", "--help"])
    assert e.value.code == 0 and "--dtype" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# The manifest: small files hashed whole, large ones sampled
# --------------------------------------------------------------------------------------------------------------------


def test_large_files_are_sampled_and_damage_to_a_sampled_block_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "FULL_HASH_BYTES", 4096)
    monkeypatch.setattr(ckpt, "SAMPLE_BYTES", 256)
    folder = tmp_path / "step_000001"
    folder.mkdir()
    (folder / "small.bin").write_bytes(os.urandom(4096))
    (folder / "large.bin").write_bytes(os.urandom(100_000))
    ckpt.write_manifest(str(folder), "step_000001", 1, str(tmp_path))
    entries = {e["path"]: e for e in ckpt.read_manifest(str(folder))["files"]}
    assert "sha256" in entries["small.bin"] and "sampled_sha256" in entries["large.bin"]
    assert ckpt.verify(str(folder)) is None
    with open(folder / "large.bin", "r+b") as f:  # the last block is always sampled
        f.seek(100_000 - 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert ckpt.verify(str(folder)) == "large.bin has a different sampled sha256 than the manifest (corrupted)"
