"""The end-to-end pipeline: tiny model -> SFT -> reward model -> DPO, DPO-Iter, PPO -> eval -> report.

    rlhf pipeline configs/pipeline_demo.yaml            # what `make demo` runs
    rlhf pipeline configs/pipeline_demo.yaml --fresh    # delete the output folder first
    rlhf pipeline configs/pipeline_demo.yaml --seeds 0,1,2 --output-dir runs/headline   # the README's table

With --seeds the whole pipeline runs once per seed (each in <output_dir>/seed<N>/, every stage seeded with N: the
tiny base model, SFT, the reward model, DPO, DPO-Iter, PPO and the evaluation's sampling), and one report over all
of them gives each method's mean ± std over the seeds (<output_dir>/report/). Each seed's own report is in its
folder, so a single-seed run (`make demo`) can be read against the spread.

Each testbed gets its own models (as in the paper, one model per benchmark); the report joins
them into one row per method. Every stage is an ordinary `rlhf train` run folder, so any stage can
be inspected, resumed or re-run by hand. A stage whose `final/` exists is reused.

DPO-Iter (the paper's iterative DPO): each round samples responses from the current policy,
labels the best and worst of each prompt's samples with the testbed's reward (the reward model
on the assistant testbed, test execution on the code testbed), and trains DPO on those pairs with
the reference reset to the current policy. The round's run folder gets the first logging.log_samples labelled
samples in samples.jsonl (score = the label, kl = to the SFT model).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .config import ConfigError, LoggingConfig, _build, _merge, config_from_dict, opt

METHODS = ("sft", "dpo", "dpo_iter", "ppo")
LABELS = {"sft": "SFT", "dpo": "DPO", "dpo_iter": "DPO-Iter", "ppo": "PPO"}


@dataclass
class TinyModelSpec:
    arch: str = opt("llama", "llama, qwen2, mistral or gpt2.")
    vocab_size: int = opt(1024, "BPE vocabulary size.")
    hidden_size: int = opt(128, "Hidden size.")
    layers: int = opt(2, "Transformer blocks.")
    heads: int = opt(4, "Attention heads.")
    kv_heads: int = opt(2, "Key/value heads.")
    intermediate_size: int = opt(384, "MLP width.")


@dataclass
class DPOIterSpec:
    rounds: int = opt(2, "Rounds of sample -> label -> DPO.")
    samples_per_prompt: int = opt(4, "Responses sampled per prompt to pick the best and worst from.")
    max_new_tokens: int = opt(48, "Response length cap when sampling.")
    temperature: float = opt(1.0, "Sampling temperature.")
    prompts: int = opt(0, "Use only the first N training prompts per round (0 = all).")


@dataclass
class EvalSpec:
    max_new_tokens: int = opt(48, "Response length cap.")
    num_samples: int = opt(1, "Samples per prompt (pass@k needs k of them).")
    k: list[int] = opt([1], "pass@k values on the code testbed.")
    temperature: float = opt(0.0, "0 = greedy.")
    limit: int = opt(0, "Evaluate only the first N held-out prompts (0 = all).")
    unsafe_sandbox: bool = opt(False, "Code testbed: where the kernel refuses the namespaces that give each program a "
                                      "private /tmp, run programs without them (warned) instead of stopping.")


@dataclass
class AblationSpec:
    variants: dict = opt({}, "Sweep name -> training YAML whose values become the PPO stage (e.g. configs/ppo_ablation_base.yaml).")
    seeds: list[int] = opt([0, 1, 2], "Seeds of every variant; the report gives mean ± std over them.")


@dataclass
class PipelineConfig:
    output_dir: str = opt("runs/demo", "Folder of all stages and the report.")
    seed: int = opt(0, "Seed of every stage.")
    testbeds: list[str] = opt(["assistant", "code"], "Testbeds to run (data/<name>/).")
    data_root: str = opt("data", "Folder holding the testbeds.")
    methods: list[str] = opt(list(METHODS), "Methods to train and compare.")
    model: TinyModelSpec = field(default_factory=TinyModelSpec, metadata={"help": "The tiny base model."})
    stages: dict = opt({}, "Training config per stage (sft, reward, dpo, dpo_iter, ppo), as in configs/*.yaml.")
    per_testbed: dict = opt({}, "Per-testbed overrides of stages: {testbed: {stage: {...}}}.")
    dpo_iter: DPOIterSpec = field(default_factory=DPOIterSpec, metadata={"help": "DPO-Iter rounds."})
    eval: EvalSpec = field(default_factory=EvalSpec, metadata={"help": "Held-out evaluation."})
    ablation: AblationSpec = field(default_factory=AblationSpec, metadata={"help": "A PPO sweep over configs and seeds."})
    report_title: str = opt("DPO vs PPO on the shipped testbeds", "Report title.")
    wandb_group: str = opt("", "When logging.trackers has wandb: the group shared by this comparison's runs.")


def load_pipeline(path: str) -> PipelineConfig:
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    try:
        cfg = _build(PipelineConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for m in cfg.methods:
        if m not in METHODS:
            raise ConfigError(f"{path}: methods: '{m}': expected one of {', '.join(METHODS)}")
    return cfg


class Pipeline:
    def __init__(self, cfg: PipelineConfig, log=print):
        self.cfg, self.log = cfg, log
        self.base = os.path.join(cfg.output_dir, "base")

    # --- stages ---------------------------------------------------------------------------------
    def stage_config(self, stage: str, testbed: str, run_dir: str, **values) -> Any:
        """The training config of a stage: pipeline defaults < stages.<stage> < per_testbed overrides < values."""
        tree: dict = copy.deepcopy(self.cfg.stages.get(stage, {}))
        tree = _merge(tree, copy.deepcopy(self.cfg.per_testbed.get(testbed, {}).get(stage, {})))
        tree["seed"] = self.cfg.seed
        tree = _merge(tree, values)
        tree.setdefault("logging", {})
        tree["logging"].update(output_dir=os.path.dirname(run_dir), run_name=os.path.basename(run_dir))
        if self.cfg.wandb_group:
            tree["logging"].update(group=self.cfg.wandb_group, tags=[testbed, stage])
        return config_from_dict(tree, source=f"pipeline stage '{stage}' ({testbed})")

    def stage_logging(self, stage: str, testbed: str) -> LoggingConfig:
        """The stage's logging section alone, readable before the stage's data exists (DPO-Iter's pairs)."""
        tree = _merge(self.cfg.stages.get(stage, {}).get("logging", {}),
                      self.cfg.per_testbed.get(testbed, {}).get(stage, {}).get("logging", {}))
        try:
            return _build(LoggingConfig, tree, prefix="logging")
        except ConfigError as e:
            raise ConfigError(f"pipeline stage '{stage}' ({testbed}): {e}") from None

    def train(self, stage: str, testbed: str, run_dir: str, **values) -> str:
        final = os.path.join(run_dir, "final")
        if os.path.isdir(final):
            self.log(f"[{testbed}] {stage}: reusing {final}")
            return final
        from .trainer import Trainer

        cfg = self.stage_config(stage, testbed, run_dir, **values)
        t0 = time.time()
        self.log(f"[{testbed}] {stage}: training -> {run_dir}")
        # a stage without final/ is trained from the start: whatever an interrupted attempt left goes
        Trainer(cfg, overwrite=True).train()
        self.log(f"[{testbed}] {stage}: done in {time.time() - t0:.0f}s")
        return final

    def data(self, testbed: str, split: str) -> str:
        return os.path.join(self.cfg.data_root, testbed, f"{split}.jsonl")

    def reward_values(self, testbed: str, rm: Optional[str]) -> dict:
        """PPO's reward: the trained reward model on dialogue, test execution on code."""
        if testbed == "code":
            return {"ppo": {"reward_fns": ["rlhf.eval.code:execution_reward"], "reward_model": ""}}
        return {"ppo": {"reward_model": rm, "reward_fns": []}}

    def build_base(self) -> None:
        if os.path.isdir(self.base):
            return
        from .models.tiny import init_tiny

        m = self.cfg.model
        corpus = [self.data(t, s) for t in self.cfg.testbeds for s in ("sft", "prefs")]
        init_tiny(self.base, corpus, arch=m.arch, vocab_size=m.vocab_size, seed=self.cfg.seed,
                  hidden_size=m.hidden_size, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads,
                  intermediate_size=m.intermediate_size)
        self.log(f"base model: {self.base}")

    def run_testbed(self, testbed: str) -> dict[str, str]:
        root = os.path.join(self.cfg.output_dir, testbed)
        model = lambda path: {"model": {"name_or_path": path}}  # noqa: E731
        sft = self.train("sft", testbed, os.path.join(root, "sft"), **model(self.base),
                         data={"train": self.data(testbed, "sft")})
        finals = {"sft": sft}
        rm = None
        if testbed != "code" and ({"ppo", "dpo_iter"} & set(self.cfg.methods) or self.cfg.ablation.variants):
            rm = self.train("reward", testbed, os.path.join(root, "rm"), **model(sft),
                            data={"train": self.data(testbed, "prefs")})
        if "dpo" in self.cfg.methods:
            finals["dpo"] = self.train("dpo", testbed, os.path.join(root, "dpo"), **model(sft),
                                       data={"train": self.data(testbed, "prefs")})
        if "dpo_iter" in self.cfg.methods:
            finals["dpo_iter"] = self.dpo_iter(testbed, root, sft, rm)
        if "ppo" in self.cfg.methods:
            finals["ppo"] = self.train("ppo", testbed, os.path.join(root, "ppo"), **model(sft),
                                       data={"train": self.data(testbed, "prompts_train")},
                                       **self.reward_values(testbed, rm))
        finals.update(self.ablation(testbed, root, sft, rm))
        for method, final in finals.items():
            self.evaluate(testbed, method, final, sft, rm)
        return finals

    def ablation(self, testbed: str, root: str, sft: str, rm: Optional[str]) -> dict[str, str]:
        """Each sweep variant (a PPO training YAML) from the SFT model, once per seed: '<variant>-seed<N>'."""
        finals = {}
        for name, path in self.cfg.ablation.variants.items():
            with open(path) as f:
                tree = yaml.safe_load(f)
            tree.pop("logging", None)
            for seed in self.cfg.ablation.seeds:
                label = f"{name}-seed{seed}"
                values = _merge(tree, {"model": {"name_or_path": sft}, "seed": seed,
                                       "data": {"train": self.data(testbed, "prompts_train")},
                                       **self.reward_values(testbed, rm)})
                finals[label] = self.train(label, testbed, os.path.join(root, "ablation", label), **values)
        return finals

    def dpo_iter(self, testbed: str, root: str, sft: str, rm: Optional[str]) -> str:
        policy = sft
        for r in range(self.cfg.dpo_iter.rounds):
            run_dir = os.path.join(root, "dpo_iter", f"round{r + 1}")
            pairs = os.path.join(root, "dpo_iter", f"pairs_round{r + 1}.jsonl")
            shown: list[dict] = []
            if not os.path.isdir(os.path.join(run_dir, "final")):
                log_samples = self.stage_logging("dpo_iter", testbed).log_samples
                n, shown = self.label_pairs(testbed, policy, rm, pairs, seed=self.cfg.seed * 1000 + r,
                                            log_samples=log_samples, sft=sft, iteration=r + 1)
                self.log(f"[{testbed}] dpo_iter round {r + 1}: {n} pairs from {policy}")
                if n == 0:  # every prompt's samples scored alike: nothing to prefer, the policy stays
                    self.log(f"[{testbed}] dpo_iter round {r + 1}: no prompt had two differently scored samples "
                             f"(raise dpo_iter.samples_per_prompt or the temperature); stopping after "
                             f"{r} round(s)")
                    break
            # the reference is the policy this round starts from: reset every round
            policy = self.train("dpo_iter", testbed, run_dir, model={"name_or_path": policy},
                                data={"train": pairs})
            if shown:  # after training: a fresh run clears its folder's samples.jsonl at the start
                from .tracking import SAMPLES_FILE, write_samples

                write_samples(os.path.join(run_dir, SAMPLES_FILE), shown)
        return policy  # the last round's final/: its run folder stands for DPO-Iter in the report

    def label_pairs(self, testbed: str, policy: str, rm: Optional[str], out: str, seed: int, log_samples: int = 0,
                    sft: Optional[str] = None, iteration: int = 0) -> tuple[int, list[dict]]:
        """(pairs written to `out`, the first `log_samples` labelled samples as samples.jsonl records: the round as
        "iteration", prompt, response, score (the label), kl (KL(policy || SFT) of the response, summed over its
        tokens; 0 while the policy is the SFT model) and length)."""
        import torch

        from .config import ModelConfig
        from .data.io import load_rows
        from .models import load_causal_lm, load_tokenizer
        from .rewards import FunctionReward, ModelReward, RewardSources
        from .rollout import SamplingConfig, generate

        spec = self.cfg.dpo_iter
        rows = [r.data for r in load_rows(self.data(testbed, "prompts_train"))]
        rows = rows[: spec.prompts] if spec.prompts else rows
        tok = load_tokenizer(policy)
        model = load_causal_lm(ModelConfig(name_or_path=policy), tok, trainable=False)
        reward = (RewardSources(fns=[FunctionReward("rlhf.eval.code:execution_reward")]) if testbed == "code"
                  else RewardSources(model=ModelReward(rm, tokenizer=tok)))
        n = spec.samples_per_prompt
        prompts = [r["prompt"] for r in rows for _ in range(n)]
        columns = {k: [r.get(k) for r in rows for _ in range(n)] for k in rows[0] if k != "prompt"}
        torch.manual_seed(seed)
        rollout = generate(model, tok, prompts, SamplingConfig(max_new_tokens=spec.max_new_tokens,
                                                               temperature=spec.temperature), batch_size=64)
        scores, _ = reward(rollout.input_ids, rollout.attention_mask, prompts, rollout.texts, columns)
        shown = []
        if log_samples > 0:
            keep = list(range(min(log_samples, len(prompts))))
            kl = self._kl_to_sft(model, sft, rollout, keep, spec.temperature) if sft and sft != policy \
                else [0.0] * len(keep)
            lengths = rollout.response_mask.sum(1)
            shown = [{"iteration": iteration, "prompt": prompts[i], "response": rollout.texts[i],
                      "score": float(scores[i]), "kl": kl[j], "length": int(lengths[i])} for j, i in enumerate(keep)]
        written = 0
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            for i, row in enumerate(rows):
                group = [(float(scores[i * n + j]), rollout.texts[i * n + j]) for j in range(n)]
                best, worst = max(group), min(group)
                # pairs need a real preference and two different, non-empty responses
                if best[0] > worst[0] and best[1] != worst[1] and best[1].strip() and worst[1].strip():
                    f.write(json.dumps({"prompt": row["prompt"], "chosen": best[1], "rejected": worst[1]}) + "\n")
                    written += 1
        return written, shown

    @staticmethod
    def _kl_to_sft(model, sft: str, rollout, rows: list[int], temperature: float) -> list[float]:
        """sum_t log pi(y_t) - log pi_SFT(y_t) over each response's tokens (the k1 estimate of KL(pi || SFT) at the
        sampling temperature), for the given rollout rows."""
        import torch

        from .config import ModelConfig
        from .models import load_causal_lm
        from .models.forward import token_logprobs

        reference = load_causal_lm(ModelConfig(name_or_path=sft), trainable=False)
        ids, mask = rollout.input_ids[rows], rollout.attention_mask[rows]
        P = rollout.prompt_ids.shape[1]
        positions = torch.zeros_like(mask[:, 1:])  # aligned with ids[:, 1:]: 1 where the label is a response token
        positions[:, P - 1:] = rollout.response_mask[rows]
        with torch.no_grad():
            logp, ref_logp = (token_logprobs(m, ids.to(next(m.parameters()).device),
                                             mask.to(next(m.parameters()).device), temperature=temperature,
                                             positions=positions.to(next(m.parameters()).device)).cpu()
                              for m in (model, reference))
        return (logp - ref_logp).sum(1).tolist()

    def evaluate(self, testbed: str, method: str, final: str, sft: str, rm: Optional[str]) -> None:
        from .eval.runner import EvalSettings, evaluate

        run_dir = os.path.dirname(final)
        out = os.path.join(run_dir, "eval", testbed)
        if os.path.exists(os.path.join(out, "eval.json")):
            return
        e = self.cfg.eval
        settings = EvalSettings(testbed=testbed, num_samples=e.num_samples, k=list(e.k),
                                max_new_tokens=e.max_new_tokens, temperature=e.temperature, limit=e.limit,
                                seed=self.cfg.seed, data_root=self.cfg.data_root, unsafe_sandbox=e.unsafe_sandbox)
        t0 = time.time()
        report = evaluate(final, settings, reward_model=rm, reference=sft, out=out)
        shown = {k: round(v, 3) for k, v in report["metrics"].items()
                 if k in ("gold/reward", "code/pass@1", "kl/reference")}
        self.log(f"[{testbed}] eval {method}: {shown} ({time.time() - t0:.0f}s)")

    # --- the whole thing ------------------------------------------------------------------------
    def run(self) -> str:
        """Every testbed's stages, then the comparison report; returns the report's path. self.runs: the (label,
        run folder) pairs of the report."""
        t0 = time.time()
        if "code" in self.cfg.testbeds:
            from .eval.sandbox import UNSAFE_ENV, check_isolation

            if self.cfg.eval.unsafe_sandbox:  # also for the execution rewards, which the configs name as functions
                os.environ[UNSAFE_ENV] = "1"
            check_isolation(self.cfg.eval.unsafe_sandbox)  # before any training, not at the first code reward
        self.build_base()
        runs: list[tuple[str, str]] = []
        for testbed in self.cfg.testbeds:
            finals = self.run_testbed(testbed)
            runs += [(LABELS.get(m, m), os.path.dirname(f)) for m, f in finals.items()]
        self.runs = runs
        from .report import compare_runs

        report = compare_runs([p for _, p in runs], os.path.join(self.cfg.output_dir, "report"),
                              labels=[l for l, _ in runs], title=self.cfg.report_title)
        self.log(f"pipeline finished in {time.time() - t0:.0f}s; report: {report}")
        return report


def run_seeds(cfg: PipelineConfig, seeds: list[int], log=print) -> str:
    """The pipeline once per seed into <output_dir>/seed<N>/, then one report of mean ± std over the seeds."""
    from .report import compare_runs

    runs: list[tuple[str, str]] = []
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.seed, one.output_dir = seed, os.path.join(cfg.output_dir, f"seed{seed}")
        log(f"--- seed {seed}: {one.output_dir}")
        pipeline = Pipeline(one, log=log)
        pipeline.run()  # with the seed's own report
        runs += [(f"{label}-seed{seed}", path) for label, path in pipeline.runs]
    report = compare_runs([p for _, p in runs], os.path.join(cfg.output_dir, "report"), labels=[l for l, _ in runs],
                          title=f"{cfg.report_title} (seeds {', '.join(map(str, seeds))})")
    log(f"report over {len(seeds)} seeds: {report}")
    return report


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhf pipeline", description="SFT -> RM -> DPO/DPO-Iter/PPO -> eval -> report.")
    p.add_argument("config", help="Pipeline YAML (see configs/pipeline_demo.yaml).")
    p.add_argument("--fresh", action="store_true", help="Delete the output folder first.")
    p.add_argument("--output-dir", help="Override output_dir.")
    p.add_argument("--seed", type=int, help="Override seed.")
    p.add_argument("--seeds", type=_seed_list, help="Run once per seed (e.g. 0,1,2), each in <output_dir>/seed<N>, "
                                                    "and report mean ± std over them.")
    p.add_argument("--unsafe-sandbox", action="store_true",
                   help="Set eval.unsafe_sandbox: run generated programs with weaker isolation where the kernel "
                        "refuses namespaces, instead of stopping.")
    a = p.parse_args(argv)
    cfg = load_pipeline(a.config)
    if a.output_dir:
        cfg.output_dir = a.output_dir
    if a.seed is not None:
        cfg.seed = a.seed
    if a.unsafe_sandbox:
        cfg.eval.unsafe_sandbox = True
    if a.fresh and os.path.isdir(cfg.output_dir):
        shutil.rmtree(cfg.output_dir)
    from .eval.sandbox import SandboxUnavailable

    try:
        if a.seeds:
            if a.seed is not None:
                p.error("--seed and --seeds: choose one")
            run_seeds(cfg, a.seeds)
        else:
            Pipeline(cfg).run()
    except SandboxUnavailable as e:
        print(f"error: sandbox: {e}", file=sys.stderr)
        return 2
    return 0
