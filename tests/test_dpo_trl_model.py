# Run: .venv/bin/python -m pytest -q tests/test_dpo_trl_model.py
"""Our DPO against TRL's DPOTrainer on the SAME tiny model, weights and token ids, in float32.

tests/test_trl_crosscheck.py checks the loss formulas on given log-probs; this checks the model-level glue: how
pairs are tokenized, concatenated into one forward, masked to response tokens, summed (or length-averaged for
ipo) and turned into the loss and TRL's logged metrics. TRL gets a real DPOTrainer (explicit reference model, no
precomputation) whose own dataset preparation must yield our token ids; its collator and compute_loss then run on
them. The policy is perturbed away from the reference first, so the rewards are not all zero.
"""

import copy

import pytest
import torch

from rlhf import Trainer
from rlhf.config import config_from_dict

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": "What color is the sky?", "chosen": "The sky is blue.", "rejected": "The sky is woof."},
    {"prompt": "What does a cow say?", "chosen": "A cow says moo.", "rejected": "A cow says roar, loudly."},
    {"prompt": "Which color is the coal?", "chosen": "The coal is black.", "rejected": "The coal is moo."},
    {"prompt": "What sound does a cat make?", "chosen": "A cat says meow.", "rejected": "Red."},
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("trl") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def ours(tiny_model_dir, pairs_file, out, loss_type):
    cfg = config_from_dict({
        "algorithm": "dpo", "model": {"name_or_path": tiny_model_dir},
        "data": {"train": pairs_file, "max_length": 64, "max_prompt_length": 32, "shuffle": False},
        "optim": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1},
        "dpo": {"beta": 0.1, "loss_type": loss_type, "reference": "copy"},
        "logging": {"output_dir": out, "run_name": "run", "progress": False},
    })
    trainer = Trainer(cfg)
    algo = trainer.algorithm
    model = algo.build_model()
    algo.prepared(model)  # the reference: a frozen copy of the initial policy
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return trainer, algo, model


def trl_trainer(model, ref_model, tokenizer, out, loss_type):
    from trl import DPOConfig, DPOTrainer

    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS]
    args = DPOConfig(output_dir=out, beta=0.1, loss_type=[loss_type], report_to="none", use_cpu=True,
                     per_device_train_batch_size=len(ROWS), max_length=None, precompute_ref_log_probs=False,
                     gradient_checkpointing=False, disable_dropout=True, save_strategy="no", bf16=False)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
                      train_dataset=datasets.Dataset.from_list(conversational))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_metrics_match_trl_on_the_same_model(tiny_model_dir, pairs_file, tmp_path, loss_type):
    trainer, algo, model = ours(tiny_model_dir, pairs_file, str(tmp_path / "ours"), loss_type)
    trl = trl_trainer(copy.deepcopy(model), copy.deepcopy(algo.reference.model), copy.deepcopy(trainer.tokenizer),
                      str(tmp_path / "trl"), loss_type)

    # 1. TRL's own tokenization of the same rows gives our token ids
    examples = [{k: trl.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                for i in range(len(ROWS))]
    for ex, pair in zip(examples, algo.train_pairs):
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == \
               (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)

    # 2. the loss on one concatenated batch, and TRL's logged metrics
    loss_sum, stats = algo.loss(model, algo.collate(algo.train_pairs))
    trl_loss = trl.compute_loss(trl.model, trl.data_collator(examples))
    metrics = trl._metrics["train" if trl.model.training else "eval"]
    torch.testing.assert_close(loss_sum / len(ROWS), trl_loss, atol=1e-5, rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(stats[key].item(), metrics[key][-1], atol=1e-5, rtol=1e-5, msg=key)
    assert abs(stats["rewards/margins"].item()) > 1e-3  # the check is not vacuous
