# Run: PYTHONPATH=. .venv/bin/python tests/probe_bad_input.py [--save INPUTS.pkl | --load INPUTS.pkl]
"""Count what becomes of bad input: every kind in tests/bad_input_cases.py, and rows and configs generated with its
strategies (derandomized, so the figures repeat). Prints the tables of RELIABILITY.md ("Bad input").

Outcomes: error (one line naming file:line, or the config key), skip (counted under data.on_bad_row=skip), accepted
(loaded; for a bad kind that means silently), crash (any other exception: a traceback for the user). Only
long-standing entry points are used, so the same probe runs against older code for a before/after comparison."""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rlhf.config import CONFIGS, ConfigError, config_from_dict, load_config  # noqa: E402
from rlhf.data import DataError  # noqa: E402
from tests.bad_input_cases import (CONFIG_CASES, DATA_CASES, JSON_ANY, LOADERS, VALID, case_file,  # noqa: E402
                                   config_dict, config_values, count_rows, jsonl_file, line, run_loader)

ROWS_PER_LOADER, CONFIGS_PER_ALGORITHM, YAML_TEXTS, GARBAGE_MAPPINGS = 25, 150, 100, 60


def probe(**examples):
    return settings(max_examples=examples["n"], deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def crash(e: BaseException) -> str:
    return f"crash ({type(e).__name__})"


def load(loader, kind, path, policy, tok, model_dir):
    try:
        return run_loader(loader, kind, path, policy, tok, model_dir), None
    except DataError as e:
        return None, e
    except Exception as e:  # noqa: BLE001 - what the user would see as a traceback
        return None, e


def data_case(loader, kind, data: bytes, tok, model_dir, bad_line: int = 2) -> tuple[str, str]:
    """(outcome under on_bad_row=error, outcome under skip) of one file."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.jsonl")
        with open(path, "wb") as f:
            f.write(data)
        total = count_rows(data)
        counts, e = load(loader, kind, path, "error", tok, model_dir)
        if e is None:
            on_error = "accepted"
        elif isinstance(e, DataError):
            named = str(e).startswith(f"{path}:{bad_line}:") and len(str(e).splitlines()) == 1
            on_error = "error" if named else "error without file:line"
        else:
            on_error = crash(e)
        counts, e = load(loader, kind, path, "skip", tok, model_dir)
        if e is not None:
            on_skip = "error" if isinstance(e, DataError) else crash(e)
        else:
            loaded, skipped = counts
            on_skip = "skip" if skipped and loaded + skipped == total else "accepted" if loaded == total else "dropped"
        return on_error, on_skip


def explicit_data(tok, model_dir):
    print(f"## Explicit bad rows: {len(DATA_CASES)} kinds\n")
    print("| kind | format | loaders | on_bad_row=error | on_bad_row=skip |\n|---|---|---|---|---|")
    totals = Counter()
    for name, (kind, bad, _) in DATA_CASES.items():
        outcomes = [data_case(loader, kind, case_file(kind, bad), tok, model_dir) for loader in LOADERS[kind]]
        errors, skips = (", ".join(sorted(set(o[i] for o in outcomes))) for i in (0, 1))
        totals[("error", errors)] += 1
        totals[("skip", skips)] += 1
        print(f"| {name} | {kind} | {', '.join(LOADERS[kind])} | {errors} | {skips} |")
    # not a bad row: a UTF-8 byte-order mark at the start of a file is tolerated
    outcomes = [data_case(loader, kind, b"\xef\xbb\xbf" + case_file(kind, line(VALID[kind])), tok, model_dir, 1)
                for kind, loaders in LOADERS.items() for loader in loaders]
    errors, skips = (", ".join(sorted(set(o[i] for o in outcomes))) for i in (0, 1))
    print(f"| (valid rows) BOM at file start | every format | every loader | {errors} | {skips} |")
    print("\nTotals (kinds):", dict(totals), "\n")


INPUTS: dict[str, list] = {}  # drawn examples by name; --save writes them, --load reads them instead of drawing


def drawn(name: str, strategy, n: int) -> list:
    """Up to n examples of `strategy`, all drawn before any is used (or read from --load), so that two versions of the
    code can be probed with the same inputs."""
    if name not in INPUTS:
        out: list = []

        @probe(n=n)
        @given(example=strategy)
        def collect(example):
            out.append(example)
        collect()
        INPUTS[name] = out
    return INPUTS[name]


def generated_data(tok, model_dir):
    print(f"## Generated rows: {ROWS_PER_LOADER} files of 1-6 lines per format and loader\n")
    print("| format | loader | files | rows | loaded | skipped | files stopped at file:line (error) | files without "
          "a bad row | other |")
    print("|---|---|---|---|---|---|---|---|---|")
    grand = Counter()
    for kind, loaders in LOADERS.items():
        files = drawn(f"rows {kind}", jsonl_file(kind), ROWS_PER_LOADER)
        for loader in loaders:
            tally = Counter()
            for data in files:
                tally["files"] += 1
                tally["rows"] += count_rows(data)
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "rows.jsonl")
                    with open(path, "wb") as f:
                        f.write(data)
                    skip_counts, skip_e = load(loader, kind, path, "skip", tok, model_dir)
                    _, error_e = load(loader, kind, path, "error", tok, model_dir)
                crashed = [e for e in (skip_e, error_e) if e is not None and not isinstance(e, DataError)]
                if crashed:
                    tally[crash(crashed[0])] += 1
                elif skip_e is not None:
                    tally["file-level error"] += 1
                else:
                    tally["loaded"] += skip_counts[0]
                    tally["skipped"] += skip_counts[1]
                    tally["clean"] += skip_counts[1] == 0
                    tally["stopped"] += error_e is not None and str(error_e).startswith(path + ":")
            other = {k: v for k, v in tally.items()
                     if k not in ("files", "rows", "loaded", "skipped", "stopped", "clean") and v}
            print(f"| {kind} | {loader} | {tally['files']} | {tally['rows']} | {tally['loaded']} | {tally['skipped']} "
                  f"| {tally['stopped']} | {tally['clean']} | {other or ''} |")
            grand.update(tally)
    print("\nTotals:", dict(grand), "\n")


def explicit_configs():
    print(f"## Explicit bad configs: {len(CONFIG_CASES)} kinds (config_from_dict, as `rlhf train` loads them)\n")
    print("| kind | outcome | message |\n|---|---|---|")
    totals = Counter()
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "m"))
        os.makedirs(os.path.join(d, "runs"))
        cwd = os.getcwd()
        os.chdir(d)  # next to a runs/ folder
        try:
            for name, (extra, expected) in CONFIG_CASES.items():
                try:
                    config_from_dict(config_values(os.path.join(d, "m"), d, extra))
                    outcome, message = "accepted", ""
                except ConfigError as e:
                    message = str(e).replace(d + os.sep, "")
                    outcome = "error" if expected in message else "error (other message)"
                    outcome += "" if len(message.splitlines()) == 1 else " (several lines)"
                except Exception as e:  # noqa: BLE001
                    outcome, message = crash(e), str(e).splitlines()[0] if str(e) else ""
                totals[outcome] += 1
                print(f"| {name} | {outcome} | `{message.replace('|', '/')}` |")
            for name, text, override in [
                ("duplicate YAML key", "algorithm: sft\nmodel:\n  name_or_path: m\noptim:\n  lr: 1\n  lr: 2\n", []),
                ("non-UTF-8 YAML file", b"algorithm: sft\nmodel:\n  name_or_path: caf\xe9\n", []),
                ("control character in YAML", "algorithm: sft\x1f\n", []),
                ("override that is not YAML", "algorithm: sft\nmodel:\n  name_or_path: m\ndata:\n  train: x.jsonl\n",
                 ["--optim.adam_betas", "[0.9"]),
            ]:
                path = os.path.join(d, "c.yaml")
                with open(path, "wb") as f:
                    f.write(text if isinstance(text, bytes) else text.encode())
                try:
                    load_config(path, override)
                    outcome, message = "accepted", ""
                except ConfigError as e:
                    message = str(e).replace(d + os.sep, "")
                    outcome = "error" if len(message.splitlines()) == 1 else "error (several lines)"
                    message = message.replace("\n", " ")
                except Exception as e:  # noqa: BLE001
                    outcome, message = crash(e), ""
                totals[outcome] += 1
                print(f"| {name} | {outcome} | `{message}` |")
        finally:
            os.chdir(cwd)
    print("\nTotals (kinds):", dict(totals), "\n")


def placed(value, paths: dict):
    """`value` with the placeholder strings in `paths` replaced by this run's folders."""
    if isinstance(value, dict):
        return {k: placed(v, paths) for k, v in value.items()}
    return paths.get(value, value) if isinstance(value, str) else value


def generated_configs():
    print("## Generated configs\n")
    print("| generator | examples | accepted | ConfigError | other |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "m"))

        def tallied(tally, fn):
            tally["examples"] += 1
            try:
                fn()
                tally["accepted"] += 1
            except ConfigError:
                tally["ConfigError"] += 1
            except Exception as e:  # noqa: BLE001
                tally[crash(e)] += 1

        def row(name, tally):
            other = {k: v for k, v in tally.items() if k not in ("examples", "accepted", "ConfigError")}
            print(f"| {name} | {tally['examples']} | {tally['accepted']} | {tally['ConfigError']} | {other or ''} |")

        for algorithm in CONFIGS:
            tally = Counter()
            for values in drawn(f"config {algorithm}", config_dict(algorithm, "MODEL", "RUNS"), CONFIGS_PER_ALGORITHM):
                values = placed(values, {"MODEL": os.path.join(d, "m"), "RUNS": os.path.join(d, "runs")})
                tallied(tally, lambda: config_from_dict(values).validate_world(1))
            row(f"{algorithm}: every field default, right type (in or out of range) or wrong type", tally)

        tally = Counter()
        texts = drawn("yaml", st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1"))),
                      YAML_TEXTS)
        for text in texts:
            path = os.path.join(d, "c.yaml")
            with open(path, "wb") as f:
                f.write(text.encode("utf-8", "surrogatepass"))
            tallied(tally, lambda: load_config(path))
        row("YAML files of random text and bytes", tally)

        tally = Counter()
        keys = st.sampled_from(["algorithm", "model", "data", "optim", "ppo", "x"])
        for values in drawn("mappings", st.dictionaries(keys, JSON_ANY, max_size=4), GARBAGE_MAPPINGS):
            tallied(tally, lambda: config_from_dict(values))
        row("mappings of random JSON values", tally)
    print()


def main(argv: list[str]):
    import pickle

    if argv[:1] == ["--load"]:
        with open(argv[1], "rb") as f:
            INPUTS.update(pickle.load(f))
    from rlhf.models import load_tokenizer
    from rlhf.models.tiny import init_tiny

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as d:
        model_dir = init_tiny(os.path.join(d, "llama"), [os.path.join(root, "tests", "fixtures", "data", "sft.jsonl")],
                              arch="llama", vocab_size=512, hidden_size=64, layers=2, heads=4, kv_heads=2,
                              intermediate_size=128)
        tok = load_tokenizer(model_dir)
        explicit_data(tok, model_dir)
        generated_data(tok, model_dir)
    explicit_configs()
    generated_configs()
    if argv[:1] == ["--save"]:
        with open(argv[1], "wb") as f:
            pickle.dump(INPUTS, f)


if __name__ == "__main__":
    main(sys.argv[1:])
