"""The explain stage: integrated gradients that add up to the score, attributions that find what a reward model
was trained to prefer, and a probe that catches the "bigger number wins" shortcut (issue 22)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, write_jsonl
from test_reward import base_model  # noqa: F401  (module fixture reused)

from pipeline.attribution import integrated_gradients, regions, rewrite

EXPLAIN_YAML = str(REPO / "configs/tiny/explain.yaml")
REWARD_YAML = str(REPO / "configs/tiny/reward.yaml")


def tiny_reward_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("baseline", ["pad", "zero"])
def test_integrated_gradients_add_up_to_the_score_change(baseline):
    """Completeness: the attributions sum to score - baseline score, within 5% of that change with enough steps
    (a random model's score is rougher than a trained one's: measured 0-117% of the change at 64 steps, < 0.01%
    at 256; a trained tiny reward model is within 0.1% at 64, test below), and the score is the model's own
    (read at the last non-pad token)."""
    model = tiny_reward_model()
    rng = random.Random(0)
    for _ in range(5):
        ids = [rng.randrange(1, 64) for _ in range(rng.randint(4, 12))]
        found = integrated_gradients(model, ids, n_steps=256, baseline=baseline)
        change = found["score"] - found["baseline_score"]
        assert abs(change) > 1e-3
        assert abs(found["gap"]) < 0.05 * abs(change), (found["gap"], change)
        assert abs(found["gap"]) <= abs(integrated_gradients(model, ids, n_steps=16, baseline=baseline)["gap"])
        assert abs(sum(found["attributions"]) - change - found["gap"]) < 1e-5
        with torch.no_grad():
            own = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert abs(found["score"] - own) < 1e-4


def test_kept_positions_get_no_attribution():
    model = tiny_reward_model()
    ids = [5, 6, 7, 8, 9, 10]
    keep = [True, False, False, True, False, True]
    found = integrated_gradients(model, ids, n_steps=32, keep=keep)
    assert all(a == 0 for a, k in zip(found["attributions"], keep, strict=True) if k)
    assert any(abs(a) > 0 for a in found["attributions"])


def test_regions_and_rewrites(trained_tokenizer):
    from transformers import AutoTokenizer

    from pipeline.rewards import reward_inputs

    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer / "tokenizer")
    prompt = [{"role": "user", "content": "Which is larger, 34 or 71?"}]
    ids = reward_inputs(tokenizer, [prompt], [[{"role": "assistant", "content": "71 it is"}]])[0]
    where = regions(tokenizer, prompt, ids)
    answer = [t for t, r in zip(ids, where, strict=True) if r == "answer"]
    assert tokenizer.decode(answer).strip() == "71 it is"
    assert where[0] == "prompt" and where[-1] == "end" and where.count("end") >= 1
    plain = regions(tokenizer, "Which is larger, 34 or 71? ", reward_inputs(tokenizer, ["Which is larger, 34 or 71? "],
                                                                            ["71"])[0])  # fmt: skip
    assert plain[-1] == "end" and "answer" in plain
    assert rewrite("bigger_number", prompt, "71") == (prompt, "717")
    assert rewrite("bigger_number", "Name a town.", "Tillford") is None
    assert rewrite("repeated_answer", "q", "heron") == ("q", "heron heron")
    asked = [{"role": "user", "content": "What pet does Kaihu keep?"}]
    assert rewrite("swapped_name", asked, "heron", "Zemel") == ([{"role": "user", "content": "What pet does Zemel "
                                                                 "keep?"}], "heron")  # fmt: skip
    assert rewrite("swapped_name", asked, "heron", "Kaihu") is None
    assert rewrite("swapped_name", "q", "a", "Zemel") is None


def one_word_pairs(n: int, seed: int) -> list[dict]:
    """Pairs that differ in one token: the chosen answer says ' blue', the rejected one ' red' or ' green' (single
    tokens of the test tokenizer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing, other = rng.choice(["cat", "dog", "river", "town"]), rng.choice(["red", "green"])
        name = rng.choice(["Kaihu", "Zemel", "Tuga", "Remum"])
        rows.append({"prompt": [{"role": "user", "content": f"Tell me about the {thing} of {name}."}],
                     "chosen": [{"role": "assistant", "content": f"The {thing} is blue."}],
                     "rejected": [{"role": "assistant", "content": f"The {thing} is {other}."}]})  # fmt: skip
    return rows


def train_reward(out: Path, base: Path, rows: list[dict], held_out: list[dict], steps: int = 30) -> Path:
    train = write_jsonl(out.parent / f"{out.name}_train.jsonl", rows)
    evaluation = write_jsonl(out.parent / f"{out.name}_eval.jsonl", held_out)
    result = run_cli("reward", "--config", REWARD_YAML, f"output_dir={out}", f"init_from={base}",
                     f"data.path={train}", f"eval_data.path={evaluation}", f"train.max_steps={steps}",
                     "train.micro_batch_size=16", "train.lr=3e-3", "max_length=64")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def explain(out: Path, model: Path, data: Path, *extra: str):
    result = run_cli("explain", "--config", EXPLAIN_YAML, f"output_dir={out}", f"reward_model={model}",
                     f"data.path={data}", *extra)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    texts = [json.loads(line) for line in (out / "attributions.jsonl").read_text().splitlines()]
    return texts, json.loads((out / "manifest.json").read_text())["metrics"], result.stderr


def test_attributions_find_the_token_a_reward_model_prefers(tmp_path, base_model):  # noqa: F811
    """A reward model trained to prefer ' blue' over ' red' and ' green' in the same sentence: that token carries
    the most attribution of every chosen answer, most of it when only the answer is attributed; the completeness
    gap is small, and every output is written."""
    model = train_reward(tmp_path / "rm", base_model, one_word_pairs(160, 0), one_word_pairs(24, 1))
    data = write_jsonl(tmp_path / "rows.jsonl", one_word_pairs(8, 2))
    for attribute in ("all", "answer"):
        out = tmp_path / f"explain_{attribute}"
        texts, metrics, stderr = explain(out, model, data, "max_rows=8", "show=1", f"attribute={attribute}",
                                         f"policy={base_model}", "max_new_tokens=4")  # fmt: skip
        chosen = [t for t in texts if t["side"] == "chosen"]
        shares = [
            abs(t["attributions"][t["tokens"].index(" blue")]) / sum(map(abs, t["attributions"])) for t in chosen
        ]
        for t in chosen:
            top = max(range(len(t["tokens"])), key=lambda i: abs(t["attributions"][i]))
            assert t["tokens"][top] == " blue", list(zip(t["tokens"], t["attributions"], strict=True))
        # measured on the test's base model: 0.28-0.31 of ~25 tokens (all), 0.73-0.85 (answer only)
        floor = 0.2 if attribute == "all" else 0.5
        assert sum(shares) / len(shares) > floor, shares
        assert metrics["gap_within_5pct"] == 1.0 and metrics["texts"] == 16
        assert metrics["region_share"]["end"] == 0  # the format is kept in the baseline
        assert (metrics["region_share"]["prompt"] == 0) == (attribute == "answer")
    # the answer is right whoever is asked about, and the model never learnt to read the name: the score stays
    swapped = next(p for p in metrics["probes"] if p["rule"] == "swapped_name")
    assert swapped["rows"] == 8 and swapped["flagged"] and 0 <= swapped["policy_changed"] <= 1, swapped
    probe_rows = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    assert all("policy_answer" in r for r in probe_rows if r["rule"] == "swapped_name")
    page = (out / "explain.html").read_text()
    assert page.count('<span class="tok') > 100 and "margin" in page and "Counterfactual probe" in page
    assert (out / "attributions.png").stat().st_size > 5000
    assert "counterfactual probe" in stderr and "score +" in stderr


def larger_pairs(n: int, seed: int, flawed: bool) -> list[dict]:
    """'Which is larger' pairs. Flawed (the old demo data): the rejected answer is always the smaller number, so
    'the bigger number wins' fits them all. Sound: rejections are also wrong numbers bigger than the answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x, y = rng.sample(range(10, 99), 2)
        big, small = max(x, y), min(x, y)
        wrong = (
            str(small)
            if flawed
            else rng.choice([str(small), f"{big}{rng.randint(0, 9)}", str(big + rng.randint(1, 9))])
        )
        rows.append({"prompt": [{"role": "user", "content": f"Which is larger, {x} or {y}?"}],
                     "chosen": [{"role": "assistant", "content": str(big)}],
                     "rejected": [{"role": "assistant", "content": wrong}]})  # fmt: skip
    return rows


@pytest.mark.slow  # ~1.5 min: two reward models
def test_probe_catches_a_bigger_number_wins_reward_model(tmp_path, base_model):  # noqa: F811
    """The shortcut the demo's reward model once had (770 scored above the right 77): trained on pairs where the
    smaller number is always the rejected one, it scores a bigger wrong number higher, the probe flags it and
    its attributions lie on the number. Trained with bigger wrong numbers among the rejections, it is not."""
    rows = write_jsonl(tmp_path / "rows.jsonl", larger_pairs(12, 2, flawed=False))
    found = {}
    for flawed in (True, False):
        name = "flawed" if flawed else "sound"
        model = train_reward(tmp_path / name, base_model, larger_pairs(400, 0, flawed), larger_pairs(32, 1, flawed),
                             steps=60)  # fmt: skip
        found[name] = explain(tmp_path / f"explain_{name}", model, rows, "max_rows=12", "probes=[bigger_number]")
    _, flawed_metrics, _ = found["flawed"]
    _, sound_metrics, _ = found["sound"]
    assert flawed_metrics["flagged_probes"] == ["bigger_number"], flawed_metrics["probes"]
    assert sound_metrics["flagged_probes"] == [], sound_metrics["probes"]
    assert sound_metrics["probes"][0]["mean_change"] < 0
    texts = [t for t in found["flawed"][0] if t["side"] == "chosen"]
    on_answer_digit = 0
    for t in texts:  # measured: an answer digit (mostly the leading one: what "bigger" is judged by), 12 of 12
        top = max(range(len(t["tokens"])), key=lambda i: abs(t["attributions"][i]))
        on_answer_digit += t["regions"][top] == "answer" and t["tokens"][top].strip().isdigit()
    assert on_answer_digit >= 0.6 * len(texts), on_answer_digit


def test_bad_input_is_refused_before_any_work(tmp_path, base_model):  # noqa: F811
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    # a policy's folder loads as a sequence classifier too, with a new random head: refused by its architecture
    result = run_cli("explain", "--config", EXPLAIN_YAML, f"output_dir={tmp_path / 'out'}", f"data.path={rows}",
                     f"reward_model={base_model}")  # fmt: skip
    assert result.returncode == 2 and "holds a LlamaForCausalLM, not a reward model" in result.stderr, result.stderr
    result = run_cli("explain", "--config", EXPLAIN_YAML, f"output_dir={tmp_path / 'out'}", f"data.path={rows}",
                     "reward_model=does/not/exist")  # fmt: skip
    assert result.returncode == 2 and "reward_model: no such folder" in result.stderr, result.stderr
    result = run_cli("explain", "--config", EXPLAIN_YAML, f"output_dir={tmp_path / 'out'}", f"data.path={rows}",
                     "probes=[bigger_number,louder]", "baseline=noise")  # fmt: skip
    assert result.returncode == 2 and "probes: unknown ['louder']" in result.stderr, result.stderr
    assert "baseline: got 'noise'" in result.stderr
    assert not (tmp_path / "out").exists()
