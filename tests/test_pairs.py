"""The pairs stage: sampled answers judged by a rule become preference pairs the reward and dpo stages read
(pairing rules, the real entry point on a tiny Llama, a custom judge, two processes, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli, save_tiny_model, write_jsonl
from test_distributed import launch

from pipeline.config import DataConfig
from pipeline.formats import load_preference_pairs
from pipeline.rewards import load_reward_function
from pipeline.stages.pairs import PairsConfig, make_pairs

PAIRS_YAML = str(REPO / "configs/tiny/pairs.yaml")
TESTS = Path(__file__).resolve().parent


def answers(*texts_scores):
    return [{"text": t, "score": s, "finished": True} for t, s in texts_scores]


def test_the_best_answer_is_chosen_and_every_worse_one_rejected_most_frequent_first():
    cfg = PairsConfig(output_dir="x", model="m", data=DataConfig(path="d"))
    row = {"prompt": "q", "reference": "Tom", "reference_score": 1.0}
    made = make_pairs(row, answers(("Bo", 0), ("Tom", 1), ("Al ", 0), ("Al", 0), ("", 0)), cfg)
    assert [(c["text"], r["text"]) for c, r in made] == [("Tom", "Al"), ("Tom", "Bo")]  # Al twice (stripped)
    assert made[0][0].get("reference")  # a sampled "Tom" and the reference are one candidate
    # the model never right: the reference is still chosen; without it nothing can be chosen
    assert [r["text"] for _, r in make_pairs(row, answers(("Bo", 0), ("Al", 0)), cfg)] == ["Al", "Bo"]
    no_ref = PairsConfig(output_dir="x", model="m", data=DataConfig(path="d"), include_reference=False)
    assert make_pairs(row, answers(("Bo", 0), ("Al", 0)), no_ref) == []
    # graded scores: min_margin and max_pairs_per_prompt
    graded = answers(("a", 0.9), ("b", 0.5), ("c", 0.1), ("c", 0.1))
    cfg.include_reference, cfg.min_margin, cfg.max_pairs_per_prompt = False, 0.3, 1
    assert [(c["text"], r["text"]) for c, r in make_pairs({"prompt": "q"}, graded, cfg)] == [("a", "c")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, trained_tokenizer) -> Path:
    from transformers import LlamaConfig

    return save_tiny_model(
        tmp_path_factory.mktemp("pairs_model") / "model", trained_tokenizer, LlamaConfig, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
    )  # fmt: skip


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """12 questions as preference rows (the reference in `chosen`), each twice as a preference file repeats them."""
    rows = [{"prompt": [{"role": "user", "content": f"Who keeps the heron {i}?"}],
             "chosen": [{"role": "assistant", "content": "Tom"}], "rejected": [{"role": "assistant", "content": b}]}
            for i in range(12) for b in ("Bo", "Al")]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("pairs_data") / "pref.jsonl", rows)


def pairs_args(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return ["pairs", "--config", PAIRS_YAML, f"output_dir={out}", f"model={model}", f"data.path={data}",
            "samples_per_prompt=4", "max_new_tokens=4", "temperature=1.0", "batch_size=5", *extra]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_exact_match_pairs_reload_as_reward_data(tmp_path, tiny_model, questions):
    out = tmp_path / "pairs"
    result = run_cli(*pairs_args(out, tiny_model, questions))
    assert result.returncode == 0, result.stderr[-3000:]
    samples, pairs = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "pairs.jsonl")
    assert len(samples) == 12 and all(len(s["answers"]) == 4 for s in samples)  # each prompt once, 4 answers
    assert {s["reference"] for s in samples} == {"Tom"}
    # a random model never says "Tom": every pair is the reference against one of the model's own answers
    sampled = {(json.dumps(s["prompt"]), a["text"].strip()) for s in samples for a in s["answers"]}
    assert pairs and all(p["chosen"] == [{"role": "assistant", "content": "Tom"}] for p in pairs)
    assert all((json.dumps(p["prompt"]), p["rejected"][0]["content"]) in sampled for p in pairs)
    assert all(p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0 for p in pairs)
    ds, conversational = load_preference_pairs(DataConfig(path=str(out / "pairs.jsonl")))  # the reward/dpo loader
    assert conversational and len(ds) == len(pairs)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["pairs"] == len(pairs) and metrics["prompts"] == 12 and metrics["samples"] == 48
    assert metrics["mean_score"] == 0.0 and metrics["prompts_with_pairs"] == 12


def test_a_rule_function_judges_without_references(tmp_path, tiny_model, questions, monkeypatch):
    """ppo's rule rewards (prompts, responses) work as judges: the answers with an 'e' are chosen."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    out = tmp_path / "rule"
    result = run_cli(*pairs_args(out, tiny_model, questions, "judge=ppo_rewards:contains_letter_e",
                                 "include_reference=false", "samples_per_prompt=8", "max_new_tokens=6"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = read_jsonl(out / "pairs.jsonl")
    assert pairs and all("e" in p["chosen"][0]["content"] and "e" not in p["rejected"][0]["content"] for p in pairs)
    assert all(p["chosen"][0]["content"] != "Tom" for p in pairs)  # the reference is not a candidate
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert 0 < metrics["mean_score"] < 1 and metrics["best_of_n_mean_score"] >= metrics["mean_score"]


def test_two_processes_split_the_prompts(tmp_path, tiny_model, questions):
    out = tmp_path / "two"
    result = launch("cpu_2proc.yaml", pairs_args(out, tiny_model, questions))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("done:") == 1, "only rank 0 reports"
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 12 and len({json.dumps(s["prompt"]) for s in samples}) == 12  # each once, in order
    assert [s["prompt"][0]["content"] for s in samples] == [f"Who keeps the heron {i}?" for i in range(12)]
    assert json.loads((out / "manifest.json").read_text())["metrics"]["world_size"] == 2


def run_ranks_apart(args: list[str], world: int = 2, timeout: int = 120) -> list[tuple[int, str]]:
    """Each rank started by itself, as on separate nodes (no launcher kills the others when one fails): the exit
    code and stderr of each, or (-1, 'timeout') for a rank still waiting after `timeout` seconds."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
    results = []
    for proc in procs:
        try:
            results.append((proc.wait(timeout=timeout), proc.stderr.read()))
        except subprocess.TimeoutExpired:
            proc.kill()
            results.append((-1, "timeout"))
    return results


def test_no_pairs_stops_every_process(tmp_path, tiny_model, questions):  # issue 19, item 6
    """A judge that scores a prompt's answers alike leaves no pairs: every rank exits 2 by itself, the reason said
    once. Rank 0 used to raise alone while rank 1 waited at a barrier (a crash with gloo, a hang until the NCCL
    timeout across nodes). Nothing written that looks complete."""
    out = tmp_path / "none"
    args = pairs_args(out, tiny_model, questions, "judge=ppo_rewards:reference_length", "include_reference=false")
    (rank0, err0), (rank1, err1) = run_ranks_apart(args)
    assert (rank0, rank1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert "no pairs: every prompt's answers scored the same" in err0 and "Traceback" not in err0 + err1, err1
    assert "no pairs" not in err1  # rank-0-only printing
    assert not (out / "pairs.jsonl").exists() and not (out / "manifest.json").exists()


def test_bad_input_is_refused_before_sampling(tmp_path, tiny_model):
    out = tmp_path / "bad"
    plain = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi.", "topic": "x"}])
    no_ref = run_cli(*pairs_args(out, tiny_model, plain))
    assert no_ref.returncode == 2 and "has no reference answers" in no_ref.stderr and "'topic'" in no_ref.stderr
    wrong_key = run_cli(*pairs_args(out, tiny_model, plain, "reference_key=answer"))
    assert wrong_key.returncode == 2 and "reference_key: column 'answer' is not in" in wrong_key.stderr
    judge = run_cli(*pairs_args(out, tiny_model, plain, "judge=nowhere:nothing"))
    assert judge.returncode == 2 and "judge: cannot import 'nowhere:nothing'" in judge.stderr
    assert run_cli(*pairs_args(out, tiny_model, plain, "judge=exactmatch")).returncode == 2
    assert not out.exists()


GSM8K_ROWS = [  # the GSM8K layout: the reference is a worked solution ending "#### <answer>"
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in ((3, 4), (12, 30), (7, 1000), (25, 25), (9, 6), (40, 2))
]  # fmt: skip


def test_math_verify_scores_final_values_in_any_form():
    """The math_verify rule compares final values as math-verify parses them: GSM8K's '#### 1,007' against 1007
    written plainly, MATH's \\boxed{} against an equal fraction; a wrong value, no answer or an unparsable
    reference score 0."""
    rule = load_reward_function("math_verify", "judge")
    gsm8k = GSM8K_ROWS[2]["answer"]  # ... #### 1007
    responses = ["#### 1,007", "He has 1007 apples.", "He has 1006 apples.", "I do not know."]
    assert rule([None] * 4, responses, [gsm8k] * 4) == [1.0, 1.0, 0.0, 0.0]
    math = r"Add the fractions: $\frac{1}{6} + \frac{1}{6} = \boxed{\frac{1}{3}}$."
    assert rule([None] * 3, [r"$\boxed{\frac{2}{6}}$", r"$\boxed{\frac{1}{2}}$", "1/3"], [math] * 3) == [1.0, 0.0, 1.0]
    assert rule([None] * 2, ["7", "7"], ["no number here", None]) == [0.0, 0.0]


def test_math_verify_judges_gsm8k_solutions_and_exact_match_is_refused(tmp_path, tiny_model):
    """On GSM8K's own layout, math_verify judges: the worked-solution reference is right, the random model's answers
    are wrong, so every question gives pairs. exact_match on the same file is refused before sampling, naming why."""
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    refused = run_cli(*pairs_args(tmp_path / "em", tiny_model, data))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "6 of 6 reference answers are worked solutions" in refused.stderr and "math_verify" in refused.stderr
    assert not (tmp_path / "em").exists()
    out = tmp_path / "mv"
    result = run_cli(*pairs_args(out, tiny_model, data, "judge=math_verify"))
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = read_jsonl(out / "pairs.jsonl")
    # the model has a chat template: each bare question is asked as its user turn
    assert all(p["prompt"][0]["role"] == "user" for p in pairs)
    assert {p["prompt"][0]["content"] for p in pairs} == {r["question"] for r in GSM8K_ROWS}
    assert all(p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0 for p in pairs)
