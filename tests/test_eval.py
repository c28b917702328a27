"""The eval stage against lm-evaluation-harness on a tiny random Llama: same prompts, shots, log-likelihoods,
generations and metrics (0 and 5 shots, multiple choice and generation); task files; 2 processes == 1."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli, save_tiny_model

from pipeline.config import UserError
from pipeline.evaluation.lmeval import lmeval_task_config
from pipeline.evaluation.tasks import (
    build_prompt,
    find_tasks,
    load_task_file,
    resolve,
    sample_shots,
    task_index,
)

N_DOCS = 24  # per task: ~2 s of tiny-model compute each; enough for acc to differ from chance in both tools
# Generation variants score digits only (letters removed from answer and target), so a random model's babble
# matches the attribute questions' digit-free answers and misses the arithmetic ones: exact match is strictly
# between 0 and 1 and tests the exact-match options too.
VARIANTS = {
    "t_mc_0": ("demo_mc.yaml", 0, {}),
    "t_mc_5": ("demo_mc.yaml", 5, {}),
    "t_qa_0": ("demo_qa.yaml", 0, {"exact_match": {"regexes_to_ignore": ["[^0-9]"]}}),
    "t_qa_5": ("demo_qa.yaml", 5, {"exact_match": {"regexes_to_ignore": ["[^0-9]"]},
                                   "other_filters": {"last-number": {"regex": "([0-9]+)", "group_select": -1}}}),
}  # fmt: skip


def lmeval_name(metric: str, stat: str = "") -> str:
    """lm-eval's results key of our metric: `exact_match` is its first filter pipeline's ("none" when we write the
    YAML), `exact_match,<name>` another pipeline's."""
    name, _, pipeline = metric.partition(",")
    return f"{name}{stat},{pipeline or 'none'}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, trained_tokenizer) -> Path:
    """A random 2-layer Llama (h64) with the trained tokenizer, saved as an HF model folder."""
    from transformers import LlamaConfig

    return save_tiny_model(
        tmp_path_factory.mktemp("eval_model") / "model", trained_tokenizer, LlamaConfig, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
    )  # fmt: skip


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The demo tasks at 0 and 5 shots, each a small YAML that includes the shipped one."""
    folder = tmp_path_factory.mktemp("tasks")
    for name, (base, shots, extra) in VARIANTS.items():
        spec = {"task": name, "include": str(REPO / "data/tasks" / base), "num_fewshot": shots, **extra}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def eval_args(model: Path, task_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--config", str(REPO / "configs/tiny/eval.yaml"), f"model={model}", f"output_dir={out}",
            f"task_dirs=[{task_dir}]", f"tasks=[{','.join(VARIANTS)}]", f"limit={N_DOCS}", "log_samples=true",
            "batch_tokens=2048", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def ours(tmp_path_factory, tiny_model, task_dir) -> Path:
    out = tmp_path_factory.mktemp("eval_out") / "one"
    result = run_cli(*eval_args(tiny_model, task_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def lmeval_dir(tmp_path_factory, task_dir) -> Path:
    """Each task as lm-evaluation-harness's own YAML (dataset_kwargs, metric_list, filter_list, fewshot_config)."""
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    for spec, _ in find_tasks(list(VARIANTS), [str(task_dir)]):
        (folder / f"{spec.task}.yaml").write_text(yaml.safe_dump(lmeval_task_config(spec)))
    return folder


@pytest.fixture(scope="module")
def theirs(tiny_model, lmeval_dir) -> dict:
    """lm-evaluation-harness on the same model and documents, each task written by lmeval_task_config."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = lmeval_dir
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_model},dtype=float32", device="cpu", tasks=list(VARIANTS),
        task_manager=TaskManager(include_path=str(folder), include_defaults=False), limit=N_DOCS, batch_size=16,
        log_samples=True,
    )  # fmt: skip


def samples(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]


# --- equal numbers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(VARIANTS))
def test_same_prompts_scores_and_metrics_as_lm_eval(task, ours, theirs):
    mine = json.loads((ours / "results.json").read_text())["tasks"][task]
    their_metrics = theirs["results"][task]
    their_docs = sorted((s for s in theirs["samples"][task] if s["filter"] == "none"), key=lambda s: s["doc_id"])
    my_docs = samples(ours, task)
    assert len(my_docs) == len(their_docs) == N_DOCS
    for me, them in zip(my_docs, their_docs, strict=True):
        assert me["prompt"] == them["arguments"][0][0], f"doc {me['doc_id']}: different prompt (shots)"
        if "loglikelihoods" in me:
            their_lls = [resp[0][0] for resp in them["resps"]]
            assert me["loglikelihoods"] == pytest.approx(their_lls, abs=1e-4), f"doc {me['doc_id']}"
        else:
            assert me["generated"] == them["resps"][0][0], f"doc {me['doc_id']}: different greedy answer"
    for metric, value in mine["metrics"].items():
        assert value["value"] == pytest.approx(their_metrics[lmeval_name(metric)], abs=1e-9), metric
        assert value["stderr"] == pytest.approx(their_metrics[lmeval_name(metric, "_stderr")], abs=1e-9), metric
    if task == "t_qa_5":  # gsm8k's layout: a second filter pipeline, scored apart
        assert set(mine["metrics"]) == {"exact_match", "exact_match,last-number"}
    if task.startswith("t_qa"):
        assert 0 < mine["metrics"]["exact_match"]["value"] < 1
    assert mine["num_fewshot"] == VARIANTS[task][1]
    assert mine["first_prompt"].count("Question:") == VARIANTS[task][1] + 1


def test_lm_eval_task_files_as_they_are(tmp_path, tiny_model, task_dir, lmeval_dir, theirs):
    """The very YAML files lm-eval ran (its keys: dataset_path json + dataset_kwargs, metric_list with exact-match
    options, filter_list, fewshot_config, generation_kwargs) give llmpipe eval lm-eval's numbers, MC and
    generation, 0 and 5 shots; and they read back as the task they were written from."""
    out = tmp_path / "from_lmeval_yaml"
    result = run_cli(*eval_args(tiny_model, lmeval_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    tasks = json.loads((out / "results.json").read_text())["tasks"]
    for task in VARIANTS:
        for metric, value in tasks[task]["metrics"].items():
            expected = theirs["results"][task][lmeval_name(metric)]
            assert value["value"] == pytest.approx(expected, abs=1e-9), (task, metric)
    # chat_doc_to_text has no lm-eval key (its chat mode asks doc_to_text): the export drops it
    shipped = find_tasks(list(VARIANTS), [str(task_dir)])
    written = [dataclasses.replace(spec, chat_doc_to_text=None) for spec, _ in shipped]
    assert [spec for spec, _ in find_tasks(list(VARIANTS), [str(lmeval_dir)])] == written


def test_lm_eval_keys_llmpipe_cannot_reproduce_are_named(tmp_path):
    base = lmeval_task_config(load_task_file(REPO / "data/tasks/demo_qa.yaml"))
    cases = {
        "metric_list": [{"metric": "bleu"}],
        "filter_list": [{"name": "x", "filter": [{"function": "majority_vote"}]}],
        "repeats": 4,
        "generation_kwargs": {"until": ["\n"], "top_p": 0.9},
        "fewshot_config": {"sampler": "first_n", "samples": [{"q": 1}]},
    }
    for key, value in cases.items():
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({**base, key: value}))
        with pytest.raises(UserError, match=rf"{path.name}: {key}: "):
            load_task_file(path)
    twins = tmp_path / "twins.yaml"
    pipeline = {"name": "x", "filter": [{"function": "take_first"}]}
    twins.write_text(yaml.safe_dump({**base, "filter_list": [pipeline, pipeline, pipeline]}))
    with pytest.raises(UserError, match=r"pipelines after the first need distinct names \(got \['x', 'x'\]\)"):
        load_task_file(twins)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({**base, "metric_lst": []}))
    with pytest.raises(UserError, match="did you mean"):
        load_task_file(typo)


def test_results_files(ours):
    results = json.loads((ours / "results.json").read_text())
    manifest = json.loads((ours / "manifest.json").read_text())
    assert manifest["stage"] == "eval" and set(manifest["outputs"]) >= {"results.json", "results.md"}
    assert manifest["metrics"]["t_mc_5/acc"] == results["tasks"]["t_mc_5"]["metrics"]["acc"]["value"]
    table = (ours / "results.md").read_text()
    assert "| t_mc_5 | 5 | acc_norm |" in table and "| t_qa_0 | 0 | exact_match |" in table
    assert results["tasks"]["t_mc_0"]["first_continuations"][0].startswith(" ")


def test_shots_are_lm_evals_and_never_the_document():
    from lm_eval.api.samplers import ContextSampler

    docs = [{"id": i, "question": f"q{i}"} for i in range(12)]
    ours = sample_shots(docs, docs, n=5, seed=1234, pool_is_eval_split=True)
    sampler = ContextSampler(docs, rnd=1234)
    theirs = [sampler.sample(5, eval_doc=doc) for doc in docs]
    assert ours == theirs
    assert all(doc not in shots and len(shots) == 5 for doc, shots in zip(docs, ours, strict=True))
    assert sample_shots(docs, docs, 5, 1234, True) == ours, "same seed, same shots"
    assert sample_shots(docs, docs, 5, 7, True) != ours
    with pytest.raises(UserError, match="pool of at least 6"):
        sample_shots(docs, docs[:5], 5, 0, True)


def test_context_continuation_split_is_lm_evals(tiny_model):
    """Trailing spaces move to the continuation; continuation tokens are cut from the joint encoding."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluation.scoring import Scorer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu")
    scorer = Scorer(model, tokenizer, add_bos=None, max_length=None, batch_tokens=None)
    pairs = [("Question: 2 + 3?\nAnswer:", " 5"), ("Answer: ", "12"), ("the do", "g"), ("Muböz", "e lives"),
             ("x  ", "  y"), ("Tillford is nea", "r the river")]  # fmt: skip
    groups = scorer.pair_groups([c for c, _ in pairs], [[cont] for _, cont in pairs])
    for (context, continuation), (ctx_ids, (cont_ids,)) in zip(pairs, groups, strict=True):
        assert (ctx_ids, cont_ids) == tuple(lm._encode_pair(context, continuation)), (context, continuation)
        joint = scorer.encode([context.rstrip() + context[len(context.rstrip()) :] + continuation])[0]
        assert joint[len(ctx_ids) :] == cont_ids
    assert scorer.add_bos and groups[0][0][0] == tokenizer.bos_token_id
    # Scores with the shared-context row equal one row per choice (what lm-eval computes).
    ctx, conts = scorer.pair_groups(["Question: What is 7 + 1?\nAnswer:"], [[" 8", " 9", " 10", " seventeen"]])[0]
    shared = scorer.loglikelihoods([(ctx, conts)])[0]
    alone = [scorer.loglikelihoods([(ctx, [c])])[0][0] for c in conts]
    assert [s[0] for s in shared] == pytest.approx([a[0] for a in alone], abs=1e-4)


def test_text_loglikelihood_is_the_models_loss(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluation.scoring import Scorer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    text = "Zarel lives in Mossbay. 12 + 7 = 19. " * 12  # ~190 tokens: two windows of 128
    scorer = Scorer(model, tokenizer, add_bos=None, max_length=128, batch_tokens=None)
    (windows,) = scorer.rolling_groups([text])
    assert len(windows) == 2
    total = sum(s[0][0] for s in scorer.loglikelihoods(windows))
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the first window directly: its tokens' log-probs given the prefix token
        first = model(torch.tensor([ids[:128]])).logits.log_softmax(-1)[0]
    first_ll = sum(first[i, ids[i + 1]].item() for i in range(128))
    assert scorer.loglikelihoods([windows[0]])[0][0][0] == pytest.approx(first_ll, abs=1e-3)
    assert total < first_ll < 0


# --- tasks as files ---------------------------------------------------------------------------------------------


def test_unknown_task_says_did_you_mean(tmp_path, tiny_model):
    result = run_cli("eval", "--config", str(REPO / "configs/tiny/eval.yaml"), f"model={tiny_model}",
                     f"output_dir={tmp_path / 'out'}", "tasks=[demo_mcq]")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "unknown task 'demo_mcq' (did you mean 'demo_mc'?)" in result.stderr


def test_bad_task_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: bad\ninclude: " + str(REPO / "data/tasks/demo_mc.yaml") + "\ndoc_to_txt: x\n")
    with pytest.raises(UserError) as err:
        find_tasks(["bad"], [str(tmp_path)])
    assert f"{bad}: unknown key 'doc_to_txt' (did you mean 'doc_to_text'?)" in str(err.value)
    bad.write_text("task: bad\noutput_type: multiple_choice\ndata_files: {test: x.jsonl}\ntest_split: test\n"
                   "doc_to_text: '{{question'\n")  # fmt: skip
    with pytest.raises(UserError) as err:
        load_task_file(bad)
    assert "doc_to_text: not a valid Jinja template" in str(err.value) and "doc_to_choice: required" in str(err.value)


# Rows shaped like each hub dataset's, to render the shipped public tasks without a download.
HUB_ROWS = {
    "allenai/ai2_arc": {"question": "Which is a metal?", "choices": {"text": ["wood", "iron"], "label": ["A", "B"]},
                        "answerKey": "B"},
    "Rowan/hellaswag": {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she",
                        "ctx": "She mixes flour. then she", "endings": ["bakes it.", "sings."], "label": "0"},
    "baber/piqa": {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
    "aps/super_glue": {"passage": "Iron is a metal.", "question": "is iron a metal", "label": 1},
    "EleutherAI/lambada_openai": {"text": "He opened the door and saw his friend"},
    "EleutherAI/wikitext_document_level": {"page": "Iron is a metal .\n"},
    "openai/gsm8k": {"question": "Tom has 3 apples and buys 4. How many has he?", "answer": "3 + 4 = 7\n#### 7"},
}  # fmt: skip


def test_lm_evals_own_gsm8k_file_scores_both_its_filter_pipelines(tmp_path):
    """lm-eval's installed gsm8k.yaml as it is (tag, repeats, two filter pipelines): exact_match is its
    strict-match (the number after ####), exact_match,flexible-extract the last number; the reward is strict."""
    import lm_eval

    from pipeline.evaluation.task_rewards import answer_matches, filter_answer, task_answer_score

    spec = load_task_file(Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml")
    target = HUB_ROWS["openai/gsm8k"]["answer"]
    answers = {" 3 + 4 = 7 apples.\n#### 7": (1.0, True), " He has 7.": (0.0, True), " He has 17.": (0.0, False),
               " 7 apples\n\nQuestion: next": (0.0, True), " #### 1,007": (0.0, False)}  # fmt: skip
    for text, (strict, flexible) in answers.items():
        assert task_answer_score(spec, text, target) == strict, text
        cut = text.split("Question:")[0]
        assert answer_matches(spec, filter_answer(spec, cut, "flexible-extract"), target) is flexible, text
    written = tmp_path / "gsm8k.yaml"
    written.write_text(yaml.safe_dump(lmeval_task_config(spec)))
    assert load_task_file(written) == spec
    assert load_task_file(REPO / "data/tasks/gsm8k.yaml").other_filters == spec.other_filters


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "data/tasks").glob("*.yaml")))
def test_shipped_task_files_load_and_render(path):
    spec = load_task_file(REPO / path)
    if spec.data_files:
        assert all(Path(f).is_file() for files in spec.data_files.values() for f in files)
        doc = json.loads(Path(spec.data_files[spec.eval_split][0]).read_text().splitlines()[0])
    else:
        doc = HUB_ROWS[spec.dataset_path]
    text = build_prompt(spec, doc, [doc] * spec.num_fewshot)
    assert (text or spec.output_type == "loglikelihood_rolling") and "{{" not in text
    assert lmeval_task_config(spec)["task"] == spec.task
    if spec.doc_to_choice is not None:
        from pipeline.evaluation.tasks import doc_choices, gold_indices

        assert gold_indices(spec, doc, doc_choices(spec, doc))[0] >= 0
    elif spec.doc_to_target is not None:
        assert str(resolve(doc, spec.doc_to_target))


def test_task_index_and_demo_pool_regenerates():
    from tools.demo_tasks import build_pool

    index = task_index([str(REPO / "data/tasks")])
    assert {"demo_mc", "demo_qa", "demo_mc_train", "arc_easy", "hellaswag"} <= set(index)
    rows = [json.loads(line) for line in (REPO / "data/tasks/demo/train.jsonl").read_text().splitlines()]
    assert rows == build_pool(0), "data/tasks/demo/train.jsonl is `python -m tools.demo_tasks --seed 0`"
    held_out = {json.loads(line)["question"] for line in (REPO / "data/demo/eval.jsonl").read_text().splitlines()}
    assert not held_out & {r["question"] for r in rows}, "a shot must not be an eval question"


def test_chat_prompt_puts_shots_in_turns(trained_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer / "tokenizer")
    spec = load_task_file(REPO / "data/tasks/demo_qa.yaml")
    docs = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    prompt = build_prompt(spec, docs[2], docs[:2], tokenizer)
    assert prompt.count("<|user|>") == 3 and prompt.count("<|assistant|>") == 3
    assert prompt.index("What is 0 + 1?") < prompt.index("1") < prompt.index("What is 2 + 1?")
    assert prompt.endswith(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                         add_generation_prompt=True).split("x", 1)[1])  # fmt: skip


def test_chat_models_are_asked_in_the_tasks_chat_form(trained_tokenizer):
    """chat_doc_to_text is the user turn of a chat model (shots too); the base model keeps doc_to_text, and a
    task without chat_doc_to_text asks a chat model doc_to_text, as lm-eval's --apply_chat_template does."""
    import dataclasses

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer / "tokenizer")
    spec = load_task_file(REPO / "data/tasks/demo_qa.yaml")
    assert spec.chat_doc_to_text == "{{question}}", "the demo tasks ask chat models as the sft data do"
    docs = [{"question": f"Name Zobas{i}'s job.", "answer": "potter"} for i in range(2)]
    chat = build_prompt(spec, docs[1], docs[:1], tokenizer)
    user_turn = tokenizer.apply_chat_template([{"role": "user", "content": "Name Zobas1's job."}], tokenize=False,
                                              add_generation_prompt=True)  # fmt: skip
    assert chat.endswith(user_turn.split("<|user|>", 1)[1]) and "Question:" not in chat, chat
    assert build_prompt(spec, docs[1], [], None) == "Question: Name Zobas1's job.\nAnswer:"
    lmeval_like = dataclasses.replace(spec, chat_doc_to_text=None)
    assert "Question: Name Zobas1's job.\nAnswer:" in build_prompt(lmeval_like, docs[1], [], tokenizer)


def test_chat_continuations_start_as_the_template_writes_a_reply(trained_tokenizer):
    """A multiple-choice option scored after a generation prompt starts with what the chat template writes before a
    reply: llmpipe's and Llama 2's space (byte-level BPE joins it to the answer's first word), nothing after
    ChatML's newline, and never a template's non-whitespace (an empty think block)."""
    from transformers import AutoTokenizer

    from pipeline.chat import reply_prefix

    tokenizer = AutoTokenizer.from_pretrained(trained_tokenizer / "tokenizer")
    assert reply_prefix(tokenizer) == " "
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # fmt: skip
    llama2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
              "{% else %}{{ ' ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}")  # fmt: skip
    think = chatml.replace("'\\n' + m['content']", "'\\n' + ('<think></think>' if m['role'] == 'assistant' else '') "
                           "+ m['content']")  # fmt: skip
    for template, prefix in ((chatml, ""), (llama2, " "), (think, "")):
        tokenizer.chat_template = template
        assert reply_prefix(tokenizer) == prefix, template


# --- distributed ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~50 s: two processes start and load torch
def test_two_processes_give_the_same_scores(tmp_path, tiny_model, task_dir, ours):
    out = tmp_path / "two"
    args = eval_args(tiny_model, task_dir, out)[3:]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        ["bash", "launch/run.sh", "eval", str(REPO / "configs/tiny/eval.yaml"), "launch/accelerate/cpu_2proc.yaml",
         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    two, one = json.loads((out / "results.json").read_text()), json.loads((ours / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for task in VARIANTS:
        for metric, value in one["tasks"][task]["metrics"].items():
            assert two["tasks"][task]["metrics"][metric]["value"] == value["value"], (task, metric)
        for a, b in zip(samples(out, task), samples(ours, task), strict=True):
            assert a["prompt"] == b["prompt"]
            if "loglikelihoods" in a:
                assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
            else:
                assert a["generated"] == b["generated"]
    assert math.isfinite(two["tasks"]["t_mc_5"]["metrics"]["acc"]["stderr"])
