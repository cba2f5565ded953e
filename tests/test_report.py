import json
import os

from rlhf.cli import main
from rlhf.report.compare import compare_runs, load_run, table


def make_run(root, name, algorithm, evals, curve):
    path = root / name
    path.mkdir()
    (path / "config.yaml").write_text(f"algorithm: {algorithm}\n")
    with open(path / "metrics.jsonl", "w") as f:
        for step, (kl, score) in enumerate(curve, start=1):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / step, "objective/kl": kl, "objective/scores": score}) + "\n")
    (path / "eval.json").write_text(json.dumps(evals))
    return str(path)


def test_seeds_are_aggregated_as_mean_and_std(tmp_path):
    a = make_run(tmp_path, "ppo-seed0", "ppo", {"assistant": {"gold": 0.5, "kl": 1.0}}, [(0.0, 0.1), (0.5, 0.3)])
    b = make_run(tmp_path, "ppo-seed1", "ppo", {"assistant": {"gold": 0.7, "kl": 3.0}}, [(0.0, 0.2), (0.4, 0.4)])
    c = make_run(tmp_path, "dpo", "dpo", {"assistant": {"gold": 0.6}}, [])
    header, rows = table([load_run(p) for p in (a, b, c)])
    assert header == ["run", "n", "assistant/gold", "assistant/kl"]
    # gold: mean (0.5 + 0.7) / 2 = 0.6; sample std sqrt(((-.1)^2 + .1^2) / 1) = 0.1414
    # kl: mean 2.0; std sqrt((1 + 1) / 1) = 1.414
    assert rows[0] == ["ppo", "2", "0.600 ± 0.141", "2.000 ± 1.414"]
    assert rows[1] == ["dpo", "1", "0.600", "–"]


def test_compare_writes_markdown_html_and_pngs(tmp_path):
    a = make_run(tmp_path, "sft", "sft", {"testbed": "assistant", "metrics": {"gold/reward": 0.4, "kl/reference": 0.0}}, [])
    b = make_run(tmp_path, "ppo", "ppo", {"testbed": "assistant", "metrics": {"gold/reward": 0.8, "kl/reference": 2.0}}, [(0.0, 0.1), (1.0, 0.5), (2.0, 0.7)])
    out = tmp_path / "report"
    assert main(["compare", a, b, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| sft | 1 | 0.400 | 0.000 |" in report and "| ppo | 1 | 0.800 | 2.000 |" in report
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert "reward_vs_kl_assistant.png" in pngs and "curves_ppo.png" in pngs
    for p in pngs:
        with open(out / p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.html").exists()


def test_missing_run_folder_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="not a run folder"):
        compare_runs([str(tmp_path / "nope")], str(tmp_path / "out"))


def test_one_method_over_two_testbeds_is_one_row(tmp_path):
    (tmp_path / "assistant").mkdir()
    (tmp_path / "code").mkdir()
    a = make_run(tmp_path / "assistant", "ppo", "ppo", {"testbed": "assistant", "metrics": {"gold/reward": 0.7}}, [])
    c = make_run(tmp_path / "code", "ppo", "ppo", {"testbed": "code", "metrics": {"code/pass@1": 0.25}}, [])
    out = tmp_path / "report"
    compare_runs([a, c], str(out))
    assert "| ppo | 1 | 0.700 | 0.250 |" in (out / "report.md").read_text()


def test_the_tour_eval_then_compare_gives_a_table_with_metrics(tiny_model_dir, tmp_path):
    """`rlhf eval --model RUN/final ...` writes RUN/final/eval/eval.json; `rlhf compare RUN ...` (run folders, or
    the evaluated model folders themselves) then reads it: the table has the testbed's metrics, not just run | n."""
    import shutil

    runs = []
    for name, algorithm in (("sft-tiny", "sft"), ("dpo-tiny", "dpo")):
        run = tmp_path / name
        shutil.copytree(tiny_model_dir, run / "final")
        (run / "config.yaml").write_text(f"algorithm: {algorithm}\n")
        with open(run / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 1, "train/loss": 0.7}) + "\n")  # one logged point
        assert main(["eval", "--model", str(run / "final"), "--testbed", "assistant", "--limit", "4",
                     "--max-new-tokens", "8"]) == 0
        assert (run / "final" / "eval" / "eval.json").exists()
        runs.append(str(run))
    for i, paths in enumerate((runs, [os.path.join(r, "final") for r in runs])):
        out = tmp_path / f"report{i}"
        assert main(["compare", *paths, "--out", str(out)]) == 0
        report = (out / "report.md").read_text()
        header = next(line for line in report.splitlines() if line.startswith("| run"))
        assert "assistant/gold/reward" in header and "assistant/length/tokens" in header
        rows = [line for line in report.splitlines() if line.startswith(("| sft-tiny |", "| dpo-tiny |"))]
        assert len(rows) == 2 and all("–" not in r.split("|")[3] for r in rows)


def test_compare_without_any_eval_says_what_to_run(tmp_path, capsys):
    run = tmp_path / "sft-tiny"
    run.mkdir()
    (run / "config.yaml").write_text("algorithm: sft\n")
    assert main(["compare", str(run), "--out", str(tmp_path / "r")]) == 2
    assert "rlhf eval --model" in capsys.readouterr().out


def test_single_point_series_are_drawn_as_markers_and_curves_can_be_smoothed(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    from rlhf.report.compare import plot_curves, smooth

    # trailing means over a window of 2: [1, (1+3)/2, (3+5)/2, (5+7)/2]
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 3.0], 1) == [1.0, 3.0]
    calls = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: calls.append((list(a[0]), list(a[1]), k)) or original(self, *a, **k))
    one = make_run(tmp_path, "one", "ppo", {}, [(0.5, 0.2)])
    many = make_run(tmp_path, "many", "ppo", {}, [(0.1 * i, 0.1 * i) for i in range(12)])
    plot_curves([load_run(one), load_run(many)], str(tmp_path), smoothing=4)
    single = [c for c in calls if len(c[0]) == 1]
    assert single and all(c[2].get("marker") == "o" for c in single)
    long_lines = [c for c in calls if len(c[0]) == 12]
    raw = [c for c in long_lines if c[2].get("alpha") == 0.3]
    smoothed = [c for c in long_lines if c[2].get("label") == "many"]
    assert raw and smoothed
    assert smoothed[0][1] == smooth(raw[0][1], 4)
