"""Fault injection through the real CLI: `python -m rlhf train` of a code tree under injected faults, one JSON line
per run (exit code, traceback or not, last stderr line, checkpoints left, share of non-finite weights).

    python tests/probe_faults.py . /tmp/faults > new.jsonl                      # this tree
    FULL_DIR=/mnt/small ONLY=disk python tests/probe_faults.py . /tmp/faults    # a full disk: FULL_DIR is a small
                                                                                # filesystem, e.g. a 2 MiB tmpfs
ONLY=nan,folders,damage,signals,disk picks groups. Figures in RELIABILITY.md (run folders, checkpoints) come from this probe.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import yaml

CODE, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
FIX = os.path.join(CODE, "tests", "fixtures", "data")
sys.path.insert(0, CODE)
os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", PYTHONPATH=CODE)
shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)

from rlhf.models.tiny import init_tiny  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
import torch  # noqa: E402

MODEL = init_tiny(os.path.join(WORK, "model"), [os.path.join(FIX, "sft.jsonl")], arch="llama", vocab_size=512,
                  hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128)
NAN_MODEL = os.path.join(WORK, "nan_model")
shutil.copytree(MODEL, NAN_MODEL)
w = load_file(os.path.join(NAN_MODEL, "model.safetensors"))
w["model.norm.weight"][0] = float("nan")
save_file(w, os.path.join(NAN_MODEL, "model.safetensors"), metadata={"format": "pt"})


def config(algo, out, model=MODEL, name="run", **over):
    optim = {"lr": 3e-3, "batch_size": 8, "micro_batch_size": 4, "max_steps": 6, "warmup_ratio": 0.0}
    if algo in ("reward", "dpo"):
        optim = {"lr": 1e-3, "batch_size": 8, "micro_batch_size": 4, "max_steps": 4}
    v = {"algorithm": algo, "seed": 0, "model": {"name_or_path": model},
         "data": {"train": os.path.join(FIX, "prefs.jsonl" if algo in ("reward", "dpo") else "sft.jsonl"),
                  "max_length": 64, "max_prompt_length": 32},
         "optim": optim, "logging": {"output_dir": out, "run_name": name, "progress": False}}
    if algo == "ppo":
        v["optim"] = {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0}
        v["ppo"] = {"reward_fns": ["tests.test_ppo:e_fraction_reward"], "critic_init": "policy", "critic_lr": 1e-3,
                    "iterations": 3, "rollout_batch_size": 16, "num_minibatches": 2, "micro_batch_size": 8,
                    "rollout_micro_batch_size": 16, "max_new_tokens": 8, "on_truncated": "score"}
    for key, value in over.items():
        section, k = key.split("__")
        v.setdefault(section, {})[k] = value
    path = os.path.join(WORK, f"cfg-{time.time_ns()}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(v, f)
    return path


def train(path, *extra, signal_after_first_step=None):
    cmd = [sys.executable, "-m", "rlhf", "train", path, *extra]
    if signal_after_first_step is None:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=CODE, timeout=900)
        return p.returncode, p.stdout, p.stderr
    cfg = yaml.safe_load(open(path))
    metrics = os.path.join(cfg["logging"]["output_dir"], cfg["logging"]["run_name"], "metrics.jsonl")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CODE)
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0) and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal_after_first_step)
    out, err = p.communicate(timeout=900)
    return p.returncode, out, err


def nonfinite_fraction(folder):
    f = os.path.join(folder, "model.safetensors")
    if not os.path.exists(f):
        return None
    try:
        t = load_file(f)
    except Exception:
        return "unreadable"
    total = sum(v.numel() for v in t.values())
    return round(sum(int((~torch.isfinite(v)).sum()) for v in t.values()) / total, 4)


def report(fault, rc, out, err, run=None, **extra):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    rec = {"fault": fault, "rc": rc, "traceback": "Traceback" in err, "last_stderr": lines[-1][:300] if lines else ""}
    if run:
        ck = os.path.join(run, "checkpoints")
        rec["checkpoints"] = sorted(os.listdir(ck)) if os.path.isdir(ck) else []
        rec["final_nonfinite"] = nonfinite_fraction(os.path.join(run, "final"))
        rec["checkpoint_nonfinite"] = {c: nonfinite_fraction(os.path.join(ck, c)) for c in rec["checkpoints"]}
    notices = [l for l in out.splitlines() if l.startswith("resume:") or "dropping a partial" in l]
    if notices:
        rec["notices"] = notices
    resumed = [l for l in out.splitlines() if l.startswith("resumed from")]
    if resumed:
        rec["resumed"] = resumed[-1]
    rec.update(extra)
    print(json.dumps(rec), flush=True)


only = set(os.environ.get("ONLY", "").split(",")) - {""}


def want(group):
    return not only or group in only


# 1. non-finite: lr 1e3 (AdamW weight decay 0.05 makes the weights grow x49 per step) and a NaN in the weights
if want("nan"):
    for algo in ("sft", "reward", "dpo", "ppo"):
        out = os.path.join(WORK, f"lr-{algo}")
        over = {"optim__lr": 1e3, "optim__weight_decay": 0.05, "logging__save_every": 2}
        if algo != "ppo":
            over["optim__max_steps"] = 30
        rc, o, e = train(config(algo, out, **over))
        report(f"lr 1e3 {algo}", rc, o, e, os.path.join(out, "run"))
    for algo in ("sft", "reward", "dpo"):
        out = os.path.join(WORK, f"nan-{algo}")
        rc, o, e = train(config(algo, out, model=NAN_MODEL, logging__save_every=2))
        report(f"NaN weight {algo}", rc, o, e, os.path.join(out, "run"))

# 2. run folders: a shorter second run; the README tour (lr override, then --resume)
if want("folders"):
    out = os.path.join(WORK, "reuse")
    train(config("sft", out, optim__max_steps=6, logging__save_every=2))
    rc, o, e = train(config("sft", out, optim__max_steps=4, logging__save_every=2))
    report("second shorter run, same folder", rc, o, e, os.path.join(out, "run"))
    out = os.path.join(WORK, "tour")
    train(config("sft", out, optim__max_steps=6, logging__save_every=2))
    rc, o, e = train(config("sft", out, optim__max_steps=6, logging__save_every=2, optim__lr=1e-3))
    report("tour: --optim.lr 1e-3 into the same folder", rc, o, e, os.path.join(out, "run"))
    rc, o, e = train(config("sft", out, optim__max_steps=6, logging__save_every=2), "--resume")
    report("tour: then --resume", rc, o, e, os.path.join(out, "run"))

# 3. damaged checkpoints: a finished run with checkpoints at steps 2 and 4, damaged, then --resume
if want("damage"):
    base = os.path.join(WORK, "damage-base")
    base_cfg = config("sft", base, optim__max_steps=4, logging__save_every=2)
    train(base_cfg)
    dpo_base = os.path.join(WORK, "damage-dpo")
    dpo_cfg = config("dpo", dpo_base, optim__max_steps=4, logging__save_every=2, dpo__reference="precomputed")
    train(dpo_cfg)

    def trunc(p, keep=0.5):
        with open(p, "r+b") as f:
            f.truncate(int(os.path.getsize(p) * keep))

    def metrics_partial(run):
        with open(os.path.join(run, "metrics.jsonl"), "a") as f:
            f.write('{"step": 5, "train/lo')

    C = lambda run: os.path.join(run, "checkpoints", "step_000004")  # noqa: E731
    cases = {
        "truncated model.safetensors": lambda r: trunc(os.path.join(C(r), "state", "model.safetensors")),
        "truncated optimizer.bin": lambda r: trunc(os.path.join(C(r), "state", "optimizer.bin")),
        "truncated scheduler state": lambda r: trunc(os.path.join(C(r), "state", "custom_checkpoint_0.pkl")),
        "truncated random_states_0.pkl": lambda r: trunc(os.path.join(C(r), "state", "random_states_0.pkl")),
        "missing trainer_state.pt": lambda r: os.remove(os.path.join(C(r), "trainer_state.pt")),
        "empty trainer_state.pt": lambda r: trunc(os.path.join(C(r), "trainer_state.pt"), 0),
        "missing model.safetensors": lambda r: os.remove(os.path.join(C(r), "state", "model.safetensors")),
        "stray step_000020.bak (copy of step_000002)": lambda r: shutil.copytree(
            os.path.join(r, "checkpoints", "step_000002"), os.path.join(r, "checkpoints", "step_000020.bak")),
        "partial last line of metrics.jsonl": metrics_partial,
        "both checkpoints truncated": lambda r: [trunc(os.path.join(r, "checkpoints", s, "state", "model.safetensors"))
                                                 for s in ("step_000002", "step_000004")],
    }
    for name, damage in cases.items():
        out = os.path.join(WORK, "dmg-" + name.split()[0] + str(abs(hash(name)) % 1000))
        shutil.copytree(base, out)
        damage(os.path.join(out, "run"))
        cfg = yaml.safe_load(open(base_cfg))
        cfg["logging"]["output_dir"] = out
        if "metrics" in name:
            cfg["optim"]["max_steps"] = 5
        path = os.path.join(WORK, f"cfg-{time.time_ns()}.yaml")
        yaml.safe_dump(cfg, open(path, "w"))
        rc, o, e = train(path, "--resume")
        report(f"damage: {name}", rc, o, e, os.path.join(out, "run"))
    for name, damage in {"truncated ref_logps.pt (DPO)": lambda r: trunc(os.path.join(r, "ref_logps.pt")),
                         "truncated model.safetensors (DPO)": lambda r: trunc(os.path.join(C(r), "state", "model.safetensors"))}.items():
        out = os.path.join(WORK, "dmg-dpo" + str(abs(hash(name)) % 1000))
        shutil.copytree(dpo_base, out)
        damage(os.path.join(out, "run"))
        cfg = yaml.safe_load(open(dpo_cfg))
        cfg["logging"]["output_dir"] = out
        cfg["optim"]["max_steps"] = 4
        path = os.path.join(WORK, f"cfg-{time.time_ns()}.yaml")
        yaml.safe_dump(cfg, open(path, "w"))
        rc, o, e = train(path, "--resume")
        report(f"damage: {name}", rc, o, e, os.path.join(out, "run"))

# 4. signals: SIGTERM / SIGINT after the first logged step; the SIGTERM run resumed and compared
if want("signals"):
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = os.path.join(WORK, f"sig-{sig.name}")
        path = config("sft", out, optim__max_steps=12, optim__warmup_ratio=0.1)
        rc, o, e = train(path, signal_after_first_step=sig)
        run = os.path.join(out, "run")
        report(f"{sig.name} after the first step", rc, o, e, run)
        if sig == signal.SIGTERM:
            rc, o, e = train(path, "--resume")
            straight = os.path.join(WORK, "sig-straight")
            train(config("sft", straight, optim__max_steps=12, optim__warmup_ratio=0.1))
            a = load_file(os.path.join(straight, "run", "final", "model.safetensors"))
            b = load_file(os.path.join(run, "final", "model.safetensors")) if os.path.exists(
                os.path.join(run, "final", "model.safetensors")) else {}
            same = bool(b) and all(torch.equal(a[k], b[k]) for k in a)
            report("SIGTERM run resumed vs uninterrupted", rc, o, e, run, bit_identical=same)

# 5. a full disk: the run folder on a small tmpfs (FULL_DIR), sized so the first checkpoint fits and the second not
if want("disk") and os.environ.get("FULL_DIR"):
    full = os.environ["FULL_DIR"]
    for f in os.listdir(full):
        shutil.rmtree(os.path.join(full, f), ignore_errors=True)
    rc, o, e = train(config("sft", full, optim__max_steps=4, logging__save_every=2, logging__keep_checkpoints=3))
    run = os.path.join(full, "run")
    leftovers = sorted(os.listdir(os.path.join(run, "checkpoints"))) if os.path.isdir(os.path.join(run, "checkpoints")) else []
    report("disk full at the second checkpoint", rc, o, e, run, checkpoint_folders=leftovers)
