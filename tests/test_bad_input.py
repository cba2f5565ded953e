# Run: .venv/bin/python -m pytest -q tests/test_bad_input.py        (figures: .venv/bin/python tests/probe_bad_input.py)
"""Bad data and bad configs: every row is loaded, fails in one line naming file:line (data.on_bad_row=error) or is
counted as skipped (skip); every config loads or fails with a one-line ConfigError. Nothing else escapes, nothing
is dropped silently.

The explicit cases (DATA_CASES, CONFIG_CASES) are the known kinds of bad input; the hypothesis tests generate rows of
every format, broken in every way we know of, and configs with values of right and wrong types and ranges."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.cli import main
from rlhf.config import CONFIGS, RANGES, ConfigError, check_output_dir, config_from_dict, load_config, looks_local
from rlhf.data import BadRows, DataError
from rlhf.data.io import load_rows
from rlhf.data.preference import FORMATS, PairOptions, load_pairs
from rlhf.models import load_tokenizer
from tests.bad_input_cases import (CONFIG_CASES, DATA_CASES, JSON_ANY, LOADERS, VALID, case_file, config_dict,
                                   config_values, count_rows, jsonl_file, line, run_loader, without)


def fast(examples: int) -> settings:
    """Few examples, no per-example deadline: the tokenizer and temporary files make some examples slow. Derandomized:
    CI draws the same examples on every run (a new draw finding a new kind of row is a finding for a developer's
    run with HYPOTHESIS_SEED or more examples, not a reason for one CI run to fail and the next to pass)."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def check_file(loader, kind, data: bytes, tokenizer, model_dir) -> tuple[str, int, int]:
    """Load `data` under both policies and check the contract; returns (outcome, loaded, skipped) of the skip run.

    skip:  loaded + skipped == every row, or a one-line DataError naming the file (no row of a preference file
           matches any format). error: no error if nothing was skipped, else a DataError naming the first skipped
           row's file:line."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.jsonl")
        with open(path, "wb") as f:
            f.write(data)
        total = count_rows(data)
        first: list[int] = []
        try:
            loaded, skipped = run_loader(loader, kind, path, "skip", tokenizer, model_dir, first)
        except DataError as e:  # a file-level problem: then the error policy must say the same
            assert str(e).startswith(path) and "match no preference format" in str(e), e
            with pytest.raises(DataError) as again:
                run_loader(loader, kind, path, "error", tokenizer, model_dir)
            assert str(again.value) == str(e)
            return "error", 0, 0
        assert loaded + skipped == total, (loaded, skipped, total, data)
        if not skipped:
            assert run_loader(loader, kind, path, "error", tokenizer, model_dir) == (loaded, 0)
            return "accepted", loaded, 0
        with pytest.raises(DataError) as e:
            run_loader(loader, kind, path, "error", tokenizer, model_dir)
        message = str(e.value)
        assert message.startswith(f"{path}:{first[0]}: "), (message, first)  # the first row the skip run counted
        assert len(message.splitlines()) == 1, message
        return "skip", loaded, skipped


# ------------------------------------------------------------------------------------------------
# Explicit bad rows: each kind, its loader, the line(s) after the valid first row, and what the error says
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_each_bad_row_kind_fails_naming_file_line_and_field_or_is_skipped(case, tok, tiny_model_dir, tmp_path):
    kind, bad, expected = DATA_CASES[case]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(case_file(kind, bad))
    for loader in LOADERS[kind]:
        with pytest.raises(DataError, match=rf"^{path}{expected}"):
            run_loader(loader, kind, str(path), "error", tok, tiny_model_dir)
        assert run_loader(loader, kind, str(path), "skip", tok, tiny_model_dir) == (2, 1)


def test_bom_at_file_start_is_tolerated(tok, tiny_model_dir, tmp_path):
    for kind, loaders in LOADERS.items():
        path = tmp_path / f"{kind}.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + line(VALID[kind]) + b"\n" + line(VALID[kind]) + b"\n")
        for loader in loaders:
            assert run_loader(loader, kind, str(path), "error", tok, tiny_model_dir) == (2, 0), (kind, loader)


def test_unreadable_first_row_is_skipped_and_the_format_still_detected(tok, tiny_model_dir, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"not json\n" + b"\xff\n" + line(VALID["hh-rlhf"]) + b"\n")
    assert run_loader("dpo", "hh-rlhf", str(path), "skip", tok, tiny_model_dir) == (1, 2)


def test_skip_summary_names_file_and_counts_each_reason(tok, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([line(VALID["preference"]), b"{", b"[1]", b"[2]", without("preference", "chosen")]))
    bad = BadRows("skip")
    assert len(load_pairs(str(path), tok, PairOptions(format="preference"), bad)) == 1
    assert bad.summary() == (f"skipped 4 rows of {path} (data.on_bad_row=skip): 2 x expected a JSON object, "
                             f"1 x invalid JSON, 1 x field 'chosen': missing; first: {path}:2: invalid JSON: "
                             "Expecting property name enclosed in double quotes (column 2)")


def test_json_file_rows_that_are_not_objects_are_rows_with_errors(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([VALID["prompt"], 3]))
    rows = load_rows(str(path))
    assert rows[0].get("prompt") == VALID["prompt"]["prompt"]
    with pytest.raises(DataError, match=r"rows.json row:2: expected a JSON object, got number"):
        rows[1].get("prompt")


@pytest.mark.parametrize("spec", ["./no/such.jsonl", "/no/such/file.jsonl", "~/no-such-rlhf-data.jsonl", "a/b/c.jsonl"])
def test_missing_local_data_path_fails_before_any_hub_lookup(spec, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_rows(spec)


# ------------------------------------------------------------------------------------------------
# Generated rows: valid and broken, for every format and loader
# ------------------------------------------------------------------------------------------------

CASES_BY_LOADER = [(kind, loader) for kind, loaders in LOADERS.items() for loader in loaders]
GENERATED_FILES = 25  # per (format, loader): 25 files of 1-6 lines each


@pytest.mark.parametrize("kind,loader", CASES_BY_LOADER, ids=[f"{k}-{l}" for k, l in CASES_BY_LOADER])
def test_generated_rows_are_loaded_raised_or_counted(kind, loader, tok, tiny_model_dir):
    @fast(GENERATED_FILES)
    @given(data=jsonl_file(kind))
    def check(data):
        check_file(loader, kind, data, tok, tiny_model_dir)
    check()


# ------------------------------------------------------------------------------------------------
# Explicit bad configs: each one line, naming the key, the value and what was expected
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_each_bad_config_kind_is_one_config_error(case, tmp_path, monkeypatch):
    extra, expected = CONFIG_CASES[case]
    monkeypatch.chdir(tmp_path)  # next to a runs/ folder, as after a first run
    os.makedirs(tmp_path / "m")
    os.makedirs(tmp_path / "runs")
    with pytest.raises(ConfigError) as e:
        config_from_dict(config_values(str(tmp_path / "m"), str(tmp_path), extra))
    message = str(e.value).replace(str(tmp_path) + os.sep, "")
    assert expected in message and len(message.splitlines()) == 1, message


def test_duplicate_yaml_key_names_key_and_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"algorithm: sft\nmodel:\n  name_or_path: {tmp_path}\noptim:\n  lr: 1e-3\n  lr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"c.yaml:6: invalid YAML: duplicate key 'lr' \(lines 5 and 6\)"):
        load_config(str(path))


def test_non_utf8_config_file_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"algorithm: sft\nmodel:\n  name_or_path: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: not valid UTF-8 \(byte 0xe9\)"):
        load_config(str(path))


def test_bad_override_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"algorithm: sft\nmodel:\n  name_or_path: {tmp_path}\ndata:\n  train: x.jsonl\n")
    with pytest.raises(ConfigError, match=r"override --optim.adam_betas '\[0.9': invalid YAML value"):
        load_config(str(path), ["--optim.adam_betas", "[0.9"])


def test_looks_local():
    assert not looks_local("gpt2") and not looks_local("Qwen/Qwen2-0.5B")
    assert looks_local("./m") and looks_local("/m") and looks_local("~/m") and looks_local("a/b/c")
    with tempfile.TemporaryDirectory() as d:
        cwd = os.getcwd()
        os.chdir(d)
        try:
            os.mkdir("runs")
            assert looks_local("runs/nope")  # an existing parent folder makes it a path
        finally:
            os.chdir(cwd)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(ConfigError, match="is not writable"):
        check_output_dir(str(ro / "runs"))


def test_unwritable_output_dir_as_the_access_check_reports_it(tmp_path, monkeypatch):
    # root writes anywhere, so the read-only folder is simulated where the check asks the OS
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=rf"logging.output_dir: '{tmp_path}/runs' \('{tmp_path}'\) is not writable"):
        check_output_dir(str(tmp_path / "runs"))


def test_every_numeric_field_has_a_range():
    import dataclasses
    import typing

    def numeric(tp) -> bool:
        args = typing.get_args(tp)
        return tp in (int, float) or any(numeric(a) for a in args)

    missing = []
    for cls in CONFIGS.values():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            section = [(f"{f.name}.{g.name}", typing.get_type_hints(tp)[g.name]) for g in dataclasses.fields(tp)] \
                if dataclasses.is_dataclass(tp) else [(f.name, tp)]
            missing += [key for key, t in section if numeric(t) and key not in RANGES]
    assert not missing, f"numeric fields without a RANGES entry: {sorted(set(missing))}"


def test_data_formats_cover_every_preference_format():
    from rlhf.config import DATA_FORMATS

    assert set(FORMATS) <= set(DATA_FORMATS)


# ------------------------------------------------------------------------------------------------
# Generated configs: values of right and wrong types and ranges for every field
# ------------------------------------------------------------------------------------------------

GENERATED_CONFIGS = 150  # per algorithm


@pytest.mark.parametrize("algorithm", list(CONFIGS))
def test_generated_configs_load_or_raise_config_error(algorithm, tmp_path):
    os.makedirs(tmp_path / "m")

    @fast(GENERATED_CONFIGS)
    @given(values=config_dict(algorithm, str(tmp_path / "m"), str(tmp_path / "runs")))
    def check(values):
        try:
            cfg = config_from_dict(values)
            for world in (1, 2, 3):
                try:
                    cfg.validate_world(world)
                except ConfigError:
                    pass
        except ConfigError as e:
            assert len(str(e).splitlines()) == 1, e
    check()


@fast(100)
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1"))),
       raw=st.booleans())
def test_generated_yaml_files_load_or_raise_config_error(text, raw):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.yaml")
        with open(path, "wb") as f:
            f.write(text.encode("latin-1", "replace") if raw else text.encode("utf-8", "surrogatepass"))
        try:
            load_config(path)
        except ConfigError as e:
            assert len(str(e).splitlines()) == 1


@fast(60)
@given(values=st.dictionaries(st.sampled_from(["algorithm", "model", "data", "optim", "ppo", "x"]), JSON_ANY, max_size=4))
def test_generated_garbage_mappings_raise_config_error(values):
    try:
        config_from_dict(values)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# Through `rlhf train`: exit 2 and one line on stderr; under skip, the run trains and says what it skipped
# ------------------------------------------------------------------------------------------------

CLI_DATA_CASES = ["non-UTF-8 bytes", "number as message content", "prompt list of non-dicts (SFT)", "empty prompt",
                  "invalid JSON"]
CLI_CONFIG_CASES = ["log_every 0", "adam_betas of 1", "weight_decay negative", "max_steps -5", "output_dir a file",
                    "model path a mistyped runs/ folder"]


def write_config(tmp_path, model_dir, train, extra_yaml=""):
    path = tmp_path / "c.yaml"
    path.write_text(f"algorithm: sft\nmodel:\n  name_or_path: {model_dir}\ndata:\n  train: {train}\n"
                    f"  max_length: 64\n  max_prompt_length: 32\n{extra_yaml}"
                    f"optim:\n  batch_size: 4\n  micro_batch_size: 4\n  max_steps: 1\n"
                    f"logging:\n  output_dir: {tmp_path}/runs\n  run_name: run\n  progress: false\n")
    return str(path)


@pytest.mark.parametrize("case", CLI_DATA_CASES)
def test_cli_bad_row_exits_2_with_file_line(case, tmp_path, capsys, tiny_model_dir):
    kind, bad, expected = DATA_CASES[case]
    data = tmp_path / "rows.jsonl"
    data.write_bytes(case_file(kind, bad))
    code = main(["train", write_config(tmp_path, tiny_model_dir, data)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: data: {data}:2: ")


@pytest.mark.parametrize("case", CLI_CONFIG_CASES)
def test_cli_bad_config_exits_2_with_key_value_expected(case, tmp_path, capsys, tiny_model_dir, sft_file, monkeypatch):
    extra, expected = CONFIG_CASES[case]
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs")
    values = config_values(tiny_model_dir, str(tmp_path), extra)
    values["data"]["train"] = sft_file
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip().replace(str(tmp_path) + os.sep, "")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: config: c.yaml: ") and expected in err, err


def test_cli_skip_trains_and_reports_every_bad_kind(tmp_path, capsys, tiny_model_dir, sft_file):
    good = open(sft_file, "rb").read().splitlines()[:8]
    bad = [DATA_CASES[c][1] for c in DATA_CASES if DATA_CASES[c][0] == "prompt_response"]
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"\n".join(good[:4] + bad + good[4:]) + b"\n")
    code = main(["train", write_config(tmp_path, tiny_model_dir, data, "  on_bad_row: skip\n")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"train: skipped {len(bad)} rows of {data} (data.on_bad_row=skip): " in out


@pytest.mark.parametrize("loader", ["tokenizer", "causal_lm", "scalar"])
def test_missing_local_model_path_fails_before_any_hub_lookup(loader, tmp_path, monkeypatch):
    import transformers

    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm, load_scalar_model

    for auto in ("AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained",
                            lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs")  # 'runs/nope' is then a mistyped local path, not a hub id
    load = {"tokenizer": lambda: load_tokenizer("runs/nope"),
            "causal_lm": lambda: load_causal_lm(ModelConfig(name_or_path="runs/nope")),
            "scalar": lambda: load_scalar_model("runs/nope", field="ppo.reward_model")}[loader]
    with pytest.raises(ConfigError, match=r"'runs/nope' does not exist; expected a local model folder"):
        load()


def test_a_conversation_of_only_the_assistant_reply_is_a_row_error(tmp_path, tiny_model_dir):
    """Found by the generated-row test: {"messages": [assistant]} has an empty prompt, which a chat template cannot
    render; it is a row error naming the file, line and field (a counted skip under on_bad_row: skip)."""
    import json

    from transformers import AutoTokenizer

    from rlhf.algorithms.sft import encode_sft
    from rlhf.data import DataError, load_rows

    data = tmp_path / "one_turn.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "assistant", "content": "hello"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    first, second = load_rows(str(data))
    assert encode_sft(first, tok, 64, 32)["input_ids"]
    with pytest.raises(DataError, match=r"one_turn.jsonl:2.*messages.*no message before the assistant"):
        encode_sft(second, tok, 64, 32)
