"""`ftc eval` and the in-run [eval]: the loss a run logged for its validation data is what
`ftc eval` computes on the same file; generation metrics score completions against references
(exact match, contains, regex, ROUGE-L as rouge-score computes it); `ftc run` with eval.samples
logs sample generations, the same ones `ftc eval` gives on the final checkpoint."""

import json

import method_runs_testlib as mr
import pytest
from click.testing import CliRunner
from data_testlib import chat, write_jsonl

from ftc.backends.jax.generate import metrics
from ftc.backends.jax.train import run_log
from ftc.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_normalised_exact_match_contains_and_regex():
    assert metrics.normalise("  The Great, Gatsby! ") == "great gatsby"
    s = metrics.score("It is The Great Gatsby.", "the great gatsby", metrics.compile_regex(r"is (.+)\."))
    assert (s["exact_match"], s["contains"], s["regex"]) == (0.0, 1.0, 1.0)
    assert metrics.score("The great Gatsby", "Great Gatsby!")["exact_match"] == 1.0
    grouped = metrics.compile_regex(r"answer: (\d+)")
    assert metrics.score("so the answer: 41", "42", grouped)["regex"] == 0.0
    assert metrics.score("so the answer: 42", "42", grouped)["regex"] == 1.0
    assert metrics.score("no number", "42", metrics.compile_regex(r"\d+"))["regex"] == 0.0
    with pytest.raises(ValueError, match=r"--regex 'a\(' is not a valid regular expression"):
        metrics.compile_regex("a(")


def test_a_regex_search_that_backtracks_exponentially_stops_and_leaves_sigalrm_as_it_was():
    import signal

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGALRM, mine)
    try:
        with pytest.raises(metrics.RegexTimeout, match=r"'\(\?:a\|aa\)\+\$' took over 1 s on a text of 41 characters"):
            metrics.score("a" * 40 + "b", "x", metrics.compile_regex(r"(?:a|aa)+$"))
        assert signal.getsignal(signal.SIGALRM) is mine and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert metrics.score("a" * 40, "x", metrics.compile_regex(r"(?:a|aa)+$"))["regex"] == 1.0  # a match is fast
    finally:
        signal.signal(signal.SIGALRM, before)


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of "the cat sat on the mat" and "the cat was on the mat" is 5 of 6 tokens each way.
    assert metrics.score("the cat was on the mat", "the cat sat on the mat")["rouge_l"] == pytest.approx(5 / 6)
    assert metrics.score("", "anything")["rouge_l"] == 0.0


def test_eval_loss_equals_the_runs_own_validation_loss(tmp_path):
    run = mr.trained("lora")
    logged = [r for r in mr.metrics(run.run_dir) if r["split"] == "validation"][-1]
    out = tmp_path / "eval.json"
    result = _run("eval", run.run_dir, "--data", mr.root() / "valid.jsonl", "--max-new-tokens", 4, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["loss"] == pytest.approx(logged["loss"], rel=1e-6)
    assert report["token_accuracy"] == pytest.approx(logged["token_accuracy"], abs=1e-9)
    assert report["generated"] == 8 and len(report["samples"]) == 8
    assert "perplexity" in result.output and "ROUGE-L" in result.output


def test_generation_metrics_score_the_models_completions_against_the_references(tmp_path):
    run = mr.trained("lora")
    rows = [chat("user", f"{i} the quick brown fox?", "assistant", "x") for i in range(4)]
    first = tmp_path / "first.jsonl"
    write_jsonl(first, rows)
    out = tmp_path / "first.json"
    assert _run("eval", run.run_dir, "--data", first, "--max-new-tokens", 5, "--out", out).exit_code == 0
    completions = [s["completion"] for s in json.loads(out.read_text())["samples"]]
    # References: the model's own completion for rows 0 and 1, something else for 2 and 3.
    for i in (0, 1):
        rows[i]["messages"][-1]["content"] = completions[i]
    second = tmp_path / "second.jsonl"
    write_jsonl(second, rows)
    out2 = tmp_path / "second.json"
    result = _run("eval", run.run_dir, "--data", second, "--max-new-tokens", 5, "--out", out2, "--regex", "(.*)")
    assert result.exit_code == 0, result.output
    report = json.loads(out2.read_text())
    assert [s["exact_match"] for s in report["samples"]] == [1.0, 1.0, 0.0, 0.0]
    assert report["generation"]["exact_match"] == 0.5 and report["generation"]["regex"] == 0.5
    assert report["generation"]["rouge_l"] <= 0.5 + 1e-9


@pytest.mark.parametrize(
    "rows, args, message",
    [
        ([{"text": "a"}, "{oops"], ["--format", "chat"], "data.jsonl:1: missing key 'messages'"),
        ([{"input": "a"}], [], "data.jsonl:1: cannot tell the data format from keys ['input']"),
        ([], [], "data.jsonl: no rows (the file is empty)"),
    ],
    ids=["bad-rows", "unknown-keys", "empty"],
)
def test_eval_refuses_bad_data_with_where_and_what(tmp_path, rows, args, message):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "eval.json"
    result = _run("eval", mr.root() / "model", "--data", data, "--out", out, *args)
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()
    assert "on_bad_row" not in result.output  # a spec key: `ftc eval` has no spec to set it in


def test_text_rows_give_the_loss_and_no_generation(tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox jumps"}, {"text": "hello there"}])
    result = _run("eval", mr.root() / "model", "--data", data)
    assert result.exit_code == 0, result.output
    assert "(text, 2 rows)" in result.output and "generation: no rows with a reference" in result.output


def test_a_run_with_eval_samples_logs_the_generations_ftc_eval_gives(tmp_path):
    path = mr.write_spec(
        "lora", "lora-eval", steps=2, export="\n[eval]\nsamples = 3\nmax_new_tokens = 4\nregex = '(.+)'"
    )
    run = mr.run_spec(path, "lora")
    rows = [r for r in mr.metrics(run.run_dir) if r["split"] == "generation"]
    assert [r["step"] for r in rows] == [0, 2]
    assert all(len(r["samples"]) == 3 and 0 <= r["rouge_l"] <= 1 and "regex" in r for r in rows)
    result = _run("eval", run.run_dir, "--data", mr.root() / "valid.jsonl", "--limit", 3, "--max-new-tokens", 4,
                  "--out", tmp_path / "e.json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    ours = report["samples"]
    assert [s["completion"] for s in ours] == [s["completion"] for s in rows[-1]["samples"]]
    assert report["settings"]["regex"] == "(.+)" and "regex" in report["generation"]  # the run's eval.regex by default


def test_eval_samples_without_validation_prompts_is_refused_before_training(tmp_path):
    path = mr.write_spec("full", "full-eval-split", steps=1, export="\n[eval]\nsamples = 2")
    text = path.read_text().replace(f'validation = "{mr.root()}/valid.jsonl"', "validation_split = 0.25")
    path.write_text(text)
    result = _run("run", path)
    assert result.exit_code == 1
    assert "eval.samples: there is no data.validation file" in result.output  # lint's refusal (spec/run_rules.py)


def test_run_logger_writes_text_to_tensorboard(tmp_path):
    logger = run_log.RunLogger(str(tmp_path), tensorboard=True)
    logger.log_text(3, "generation/samples", "| a | b |")
    logger.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"generation/samples" in events[0].read_bytes()
