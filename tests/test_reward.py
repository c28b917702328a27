"""The reward stage through its real entry point: trl formats in, a scoring model out, bad rows named."""

from __future__ import annotations

import json
import random

import pytest
from conftest import REPO, run_cli, write_jsonl
from test_pretrain import tiny_args

REWARD_YAML = str(REPO / "configs/tiny/reward.yaml")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, trained_tokenizer, small_corpus):
    out = tmp_path_factory.mktemp("reward_base") / "pretrain"
    result = run_cli(*tiny_args(out, trained_tokenizer, small_corpus, "train.max_steps=8", "eval_every=8"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def separable_pairs(n: int, seed: int, conversational: bool) -> list[dict]:
    """Pairs a tiny model can tell apart: the chosen answer names a colour, the rejected one a number."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = f"Tell me about {rng.choice(['the cat', 'the dog', 'the town', 'the river'])}."
        chosen = f"It is {rng.choice(['red', 'blue', 'green'])} and calm."
        rejected = f"{rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}"
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": question + " ", "chosen": chosen, "rejected": rejected})
    return rows


def reward_args(out, base, train, held_out, *extra) -> list[str]:
    return [
        "reward",
        "--config",
        REWARD_YAML,
        f"output_dir={out}",
        f"init_from={base}",
        f"data.path={train}",
        f"eval_data.path={held_out}",
        "train.max_steps=30",
        "train.micro_batch_size=16",
        "train.lr=3e-3",
        "train.save_steps=15",
        *extra,
    ]


@pytest.mark.parametrize("conversational", [True, False], ids=["conversational", "standard"])
def test_learns_separable_pairs_and_saves_a_scorer(tmp_path, base_model, conversational):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.rewards import score_pairs

    train = write_jsonl(tmp_path / "train.jsonl", separable_pairs(320, 0, conversational))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", separable_pairs(64, 1, conversational))
    out = tmp_path / "reward"
    result = run_cli(*reward_args(out, base_model, train, held_out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["heldout_pair_accuracy"] >= 0.9, metrics
    assert metrics["heldout_mean_margin"] > metrics["heldout_mean_margin_before"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    row = separable_pairs(1, 7, conversational)[0]
    good, bad = score_pairs(model, tokenizer, [row["prompt"]] * 2, [row["chosen"], row["rejected"]])
    assert good > bad


def test_bad_preference_rows_are_named_before_training(tmp_path, base_model):
    good = separable_pairs(20, 0, True)
    cases = {
        "missing rejected": [*good[:5], {"prompt": good[5]["prompt"], "chosen": good[5]["chosen"]}],
        "bad role": [*good[:3], {**good[3], "chosen": [{"role": "tool", "content": "x"}]}],
        "empty": [*good[:2], {**good[2], "rejected": []}],
    }
    expected = {
        "missing rejected": "row 5: 'rejected' is missing",
        "bad role": "row 3: 'chosen' message 0 has role 'tool'",
        "empty": "row 2: 'rejected' is missing or empty",
    }
    for name, rows in cases.items():
        path = write_jsonl(tmp_path / f"{name.replace(' ', '_')}.jsonl", rows)
        out = tmp_path / name.replace(" ", "_")
        result = run_cli(*reward_args(out, base_model, path, path))
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert expected[name] in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
        assert not out.exists()


@pytest.mark.parametrize("conversational", [True, False], ids=["conversational", "standard"])
def test_scoring_sees_the_token_ids_trl_trained_on(tmp_path, base_model, conversational):
    """score_pairs (held-out accuracy, ppo's rewards) renders each pair exactly as trl's RewardTrainer did: the
    same ids for chats and for strings (BOS and EOS included)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from pipeline.modeling import model_and_tokenizer
    from pipeline.rewards import reward_inputs

    path, tokenizer = model_and_tokenizer(str(base_model), None, False, pad_with_eos=True)
    rows = separable_pairs(6, 3, conversational)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    prompts = [r["prompt"] for r in rows]
    for side in ("chosen", "rejected"):
        ours = reward_inputs(tokenizer, prompts, [r[side] for r in rows])
        assert ours == trainer.train_dataset[f"{side}_ids"], side
    if not conversational:
        assert ours[0][0] == tokenizer.bos_token_id and ours[0][-1] == tokenizer.eos_token_id
