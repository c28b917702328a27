# ruff: noqa: F811  (the fixtures imported from test_ppo are parameters of every test)
"""The GRPO stage (trl's GRPOTrainer) through its real entry point on a tiny Llama with rule rewards: the reward
rises, LoRA, resume, two processes, the silent-failure metrics, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_jsonl
from test_distributed import launch
from test_ppo import rule_reward_path, tiny_policy  # noqa: F401  (module fixtures reused)

GRPO_YAML = str(REPO / "configs/tiny/grpo.yaml")
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    topics = ["the cat", "the dog", "the town", "the river", "a heron", "the fox", "Mossbay", "Zarel"]
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about {t} ({i})."}], "answer": "e"}
            for i in range(12) for t in topics]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("grpo_data") / "prompts.jsonl", rows)


def grpo_args(out: Path, policy: Path, data: Path, *extra: str) -> list[str]:
    """8 prompts x 4 answers of 4 tokens a step (none drawn beyond, no guidance), the letter-e rule as the reward."""
    return [
        "grpo", "--config", GRPO_YAML, f"output_dir={out}", f"init_from={policy}", f"data.path={data}",
        "eval_data=null", "rewards=[ppo_rewards:contains_letter_e]", "num_generations=4", "max_new_tokens=4",
        "train.micro_batch_size=32", "train.lr=1e-2", "train.save_steps=100", "oversample=1", "guide=false", *extra,
    ]  # fmt: skip


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def completions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


def test_rule_reward_rises_and_the_signal_is_logged(tmp_path, tiny_policy, prompts, rule_reward_path):
    out = tmp_path / "grpo"
    result = run_cli(*grpo_args(out, tiny_policy, prompts, "train.max_steps=20"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    rows = [r for r in history(out) if "reward" in r]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert metrics["reward_end"] > metrics["reward_start"] + 0.25, (metrics["reward_start"], metrics["reward_end"])
    logged = ("frac_reward_zero_std", "completions/clipped_ratio", "rewards/ppo_rewards:contains_letter_e/mean",
              "rewards/ppo_rewards:contains_letter_e/std", "entropy", "completions/mean_length")  # fmt: skip
    assert set(logged) <= rows[-1].keys(), set(logged) - rows[-1].keys()
    assert 0 <= metrics["zero_signal_share_mean"] <= 1 and metrics["truncated_share_mean"] is not None
    seen = completions(out)
    assert len(seen) == 20 * 32 and {"prompt", "completion", "rewards"} <= seen[0].keys()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.mark.parametrize(
    "variant",
    [
        ["importance_sampling_level=sequence", "loss_type=grpo"],  # GSPO
        ["importance_sampling_level=sequence", "loss_type=luspo"],
        ["loss_type=vespo"],
    ],
)
def test_sequence_level_losses_learn_the_rule_too(tmp_path, tiny_policy, prompts, rule_reward_path, variant):
    """GSPO (one length-normalised ratio per answer), LUSPO and VESPO reach trl as set and move the reward as the
    token-level default does."""
    out = tmp_path / "grpo"
    result = run_cli(*grpo_args(out, tiny_policy, prompts, "train.max_steps=20", *variant))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["reward_end"] > metrics["reward_start"] + 0.2, (
        variant,
        metrics["reward_start"],
        metrics["reward_end"],
    )
    saved = (out / "config.yaml").read_text()
    assert all(f"{v.split('=')[0]}: {v.split('=')[1]}" in saved for v in variant), saved


def test_resume_continues_the_same_run(tmp_path, tiny_policy, prompts, rule_reward_path):
    """Stopped after step 4 (its checkpoint) and rerun with max_steps=6: the run has 6 steps, steps 5-6 sample the
    prompts the unbroken run samples, and no prompt comes twice within the epoch (12 steps of 8 prompts)."""
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    short = ["train.save_steps=2"]
    assert run_cli(*grpo_args(unbroken, tiny_policy, prompts, *short, "train.max_steps=6")).returncode == 0
    first = run_cli(*grpo_args(resumed, tiny_policy, prompts, *short, "train.max_steps=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*grpo_args(resumed, tiny_policy, prompts, *short, "train.max_steps=6"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((resumed / "manifest.json").read_text())["metrics"]["resumed_from"].endswith("checkpoint-4")
    a, b = completions(unbroken), completions(resumed)
    assert [r["step"] for r in b] == [s for s in range(1, 7) for _ in range(32)]
    by_step = [json.dumps(r["prompt"]) for r in b[::4]]  # each prompt's 4 answers are adjacent
    assert len(by_step) == len(set(by_step)) == 48, "a resumed run must not repeat prompts within the epoch"
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert [r["completion"] for r in a] == [r["completion"] for r in b], "the resumed steps sample as unbroken"
    assert [r["step"] for r in history(resumed) if "reward" in r] == [1, 2, 3, 4, 5, 6]


def test_lora_with_a_kl_to_the_adapters_off_reference(tmp_path, tiny_policy, prompts, rule_reward_path):
    """LoRA trains the adapters only, the reference is the policy with them off (KL 0 at step 1, then > 0), and
    the saved model has them merged. (A random 2-layer model's logits are too flat for LoRA alone to move this
    reward within a test; the full-weight test shows the learning.)"""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    result = run_cli(*grpo_args(out, tiny_policy, prompts, "train.max_steps=6", "lora.enabled=true", "lora.r=8",
                                "lora.dropout=0", "train.lr=3e-2", "beta=0.05"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    rows = [r for r in history(out) if "reward" in r]
    assert rows[0]["kl"] == 0, rows[0]  # policy == reference at step 1
    assert all(r["kl"] > 0 for r in rows[1:]) and metrics["lora"], rows
    merged = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in name for name in merged)
    base = load_file(tiny_policy / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("proj" in k for k in changed), changed  # adapted linear layers only: not norms, embeddings


def test_two_cpu_processes_split_the_groups_and_stay_equal(tmp_path, tiny_policy, prompts, rule_reward_path):
    questions = write_jsonl(tmp_path / "heldout.jsonl", [{"question": f"Tell me about the owl ({i}).", "answer": "e"}
                                                         for i in range(7)])  # fmt: skip
    out = tmp_path / "two"
    args = (
        "train.max_steps=2",
        "train.micro_batch_size=16",
        f"eval_data.path={questions}",
        "eval_max_new_tokens=4",
        "oversample=2",
    )  # each process keeps its own groups with signal; the gathers stay in step
    result = launch("cpu_2proc.yaml", grpo_args(out, tiny_policy, prompts, *args))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("done:") == 1, "only rank 0 reports"
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and metrics["distributed_type"] == "MULTI_CPU"
    assert metrics["heldout_before"]["processes"] == 2 and metrics["heldout_after"]["processes"] == 2
    assert metrics["param_checksum_by_rank"][0] == metrics["param_checksum_by_rank"][1]
    assert len(completions(out)) == 2 * 32, "rank 0 records the 32 answers it draws a step (16 kept)"
    rows = [r for r in history(out) if "trained_signal_share" in r]
    assert len(rows) == 2 and all(r["trained_signal_share"] >= r["signal_share"] for r in rows)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.micro_batch_size=6"], "not a multiple of num_generations 4"),
        (["rewards=[ppo_rewards:no_such_rule]"], "rewards[0]: cannot import 'ppo_rewards:no_such_rule'"),
        (["loss_type=grpoo"], "loss_type: got 'grpoo'"),
        (["importance_sampling_level=seq"], "importance_sampling_level: got 'seq', expected one of token, sequence"),
        (["loss_type=luspo"], "loss_type luspo scales a sequence-level ratio: set importance_sampling_level"),
        (["oversample=13"], "96 prompts, fewer than the 104 a step draws"),
        (["rewards=[exact_match, ppo_rewards:contains_letter_e]", "reward_weights=[1.0]"], "2 rewards"),
        (["rewards=[exact_matc]"], "'exact_matc' is not exact_match, math_verify, a task YAML"),  # not a hub call
        (["rewards=[POLICY]"], "holds a LlamaForCausalLM, not a reward model"),  # no random score head
        (["data.path=GSM8K", "rewards=[exact_match]"], "8 of 8 reference answers are worked solutions"),
        (["data.path=NOREF", "guide=true"], "noref.jsonl have no reference answer to guide with"),
        (["guide=true", "train.micro_batch_size=6"], "guide completes whole groups on each process"),
    ],
)
def test_bad_input_is_refused_before_training(tmp_path, tiny_policy, prompts, rule_reward_path, extra, message):
    out = tmp_path / "bad"
    gsm8k = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(8)]
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k)  # exact_match would never match its references
    noref = write_jsonl(tmp_path / "noref.jsonl", [{"prompt": f"Say {i}."} for i in range(8)])
    extra = [e.replace("POLICY", str(tiny_policy)).replace("GSM8K", str(gsm8k)).replace("NOREF", str(noref))
             for e in extra]  # fmt: skip
    result = run_cli(*grpo_args(out, tiny_policy, prompts, *extra))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (out / "manifest.json").exists() and not (out / "model").exists()


def letter_task(folder: Path, questions: list[str], doc_to_text: str = "{{question}}") -> Path:
    """A generate_until task whose filter keeps the first 'e' of an answer: exact match with the target 'e' is the
    letter-e rule, so the task's metric (not plain string equality) must be what scores."""
    write_jsonl(folder / "docs.jsonl", [{"question": q, "answer": "e"} for q in questions])
    (folder / "letter.yaml").write_text(
        "task: letter\noutput_type: generate_until\ndata_files:\n  test: docs.jsonl\ntest_split: test\n"
        f"doc_to_text: {json.dumps(doc_to_text)}\ndoc_to_target: answer\ngeneration_kwargs:\n  max_gen_toks: 4\n"
        "answer_filter:\n  regex: '(e)'\n"
    )
    return folder / "letter.yaml"


def test_a_task_file_is_the_reward_and_the_heldout_eval(tmp_path, tiny_policy, prompts, rule_reward_path):
    task = letter_task(tmp_path, [f"Tell me about the owl ({i})." for i in range(9)])
    out = tmp_path / "grpo"
    result = run_cli(*grpo_args(out, tiny_policy, prompts, "train.max_steps=20", f"rewards=[{task}]",
                                f"eval_task={task}", "eval_max_new_tokens=4"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    # the task's filter scores: 'e' anywhere in the answer (exact string equality would score ~0)
    assert metrics["reward_end"] > metrics["reward_start"] + 0.25, (metrics["reward_start"], metrics["reward_end"])
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    assert {"task_metric", "reward", "exact_match"} <= before.keys() and before["task_metric"] == before["reward"]
    assert after["task_metric"] > before["task_metric"], (before, after)


@pytest.mark.parametrize("doc_to_text", ["{{question}}", "Question: {{question}}\nAnswer:"])  # the 2nd: gsm8k's
def test_heldout_questions_that_are_training_prompts_are_refused(
    tmp_path, tiny_policy, prompts, rule_reward_path, doc_to_text
):
    questions = ["Tell me about the owl (1).", "Tell me about  THE CAT (3).", "Tell me about Zarel (11)."]
    task = letter_task(tmp_path, questions, doc_to_text)
    out = tmp_path / "grpo"
    result = run_cli(*grpo_args(out, tiny_policy, prompts, f"rewards=[{task}]", f"eval_task={task}"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "eval_task" in result.stderr and "2 of its 3 held-out questions are training prompts" in result.stderr
    assert not (out / "config.yaml").exists()


def test_a_reward_model_scores_as_its_trainer_rendered(tmp_path, tiny_policy, prompts, rule_reward_path):
    """A reward-model folder as one reward beside a rule, weighted: each logged score is score_pairs' on that
    prompt and answer (chat template, as trl's RewardTrainer tokenized the pairs), not trl's own rendering."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.rewards import score_pairs

    torch.manual_seed(0)
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_policy, num_labels=1)
    scorer.save_pretrained(tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    tokenizer.save_pretrained(tmp_path / "rm")
    out = tmp_path / "grpo"
    result = run_cli(*grpo_args(out, tiny_policy, prompts, "train.max_steps=2",
                                f"rewards=[ppo_rewards:contains_letter_e, {tmp_path / 'rm'}]",
                                "reward_weights=[1.0, 0.5]"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = completions(out)
    assert set(rows[0]["rewards"]) == {"ppo_rewards:contains_letter_e", "reward_model_1"}
    sample = rows[:6]
    expected = score_pairs(scorer.eval(), tokenizer, [r["prompt"] for r in sample],
                           [[{"role": "assistant", "content": r["completion"]}] for r in sample])  # fmt: skip
    got = [r["rewards"]["reward_model_1"] for r in sample]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4, (got, expected)
    assert len({round(g, 6) for g in got}) > 1


def test_the_models_own_generation_settings_do_not_change_the_sampling(
    tmp_path, tiny_policy, prompts, rule_reward_path
):
    """A model whose generation_config suppresses every token with an 'e' (as a hub model's suppress_tokens,
    repetition_penalty or top_k would change the distribution): the rollouts still sample them."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy, policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    with_e = [i for token, i in tokenizer.get_vocab().items() if "e" in tokenizer.convert_tokens_to_string([token])]
    GenerationConfig(do_sample=True, suppress_tokens=with_e, repetition_penalty=5.0, top_k=3).save_pretrained(policy)
    out = tmp_path / "grpo"
    result = run_cli(*grpo_args(out, policy, prompts, "train.max_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    first = next(r for r in history(out) if "reward" in r)
    assert first["reward"] > 0.2, first  # ~0.4 for this random model; 0 if the suppression applied


def test_dynamic_sampling_trains_on_the_groups_with_signal(tmp_path, tiny_policy, prompts, rule_reward_path):
    """oversample 3: 24 prompts x 4 answers are drawn a step, in trl's prompt order (no prompt twice within an
    epoch of 96), and the 8 groups trained on are those whose rewards differ, as many as there are: the trained
    share of groups with signal is min(1, 3 x the drawn share) at every step. Resumed, it samples as unbroken."""
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    extra = ["oversample=3", "train.save_steps=2"]
    result = run_cli(*grpo_args(unbroken, tiny_policy, prompts, *extra, "train.max_steps=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in history(unbroken) if "reward" in r]
    assert len(rows) == 5
    for row in rows:
        assert row["trained_signal_share"] == pytest.approx(min(1.0, 3 * row["signal_share"])), row
    assert any(0 < r["signal_share"] < 1 for r in rows), "the toy reward must leave some groups without signal"
    metrics = json.loads((unbroken / "manifest.json").read_text())["metrics"]
    assert metrics["trained_signal_share_mean"] > 1 - metrics["zero_signal_share_mean"]
    seen = completions(unbroken)
    assert [r["step"] for r in seen] == [s for s in range(1, 6) for _ in range(96)]
    drawn = [json.dumps(r["prompt"]) for r in seen[: 4 * 96 : 4]]
    assert len(drawn) == len(set(drawn)) == 96, "the oversampled draws follow trl's epoch order"
    assert run_cli(*grpo_args(resumed, tiny_policy, prompts, *extra, "train.max_steps=4")).returncode == 0
    second = run_cli(*grpo_args(resumed, tiny_policy, prompts, *extra, "train.max_steps=5"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["completion"] for r in completions(resumed)] == [r["completion"] for r in seen]


def test_guidance_teaches_an_answer_the_policy_never_samples(tmp_path, tiny_policy, prompts, rule_reward_path):
    """Every prompt's reference is the answer "e" (the letter and the end-of-turn token), which the random policy
    never samples: under exact match every reward is 0 and no group has signal. With guide, the reference stands in
    for the last answer of each group that misses it: the policy learns to say it, and needs guidance less."""
    out = tmp_path / "guided"
    result = run_cli(
        *grpo_args(out, tiny_policy, prompts, "rewards=[exact_match]", "guide=true", "train.max_steps=40")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in history(out) if "guided_share" in r]
    assert rows[0]["guided_share"] == 1.0 and rows[0]["reward"] == pytest.approx(1 / 4), rows[0]
    assert rows[-1]["guided_share"] < 0.5 and rows[-1]["reward"] > 0.5, rows[-1]
    first = completions(out)[:32]
    assert [r["completion"] == "e" for r in first] == [i % 4 == 3 for i in range(32)], "the last of each group"
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert 0 < metrics["guided_share_mean"] < 1
