"""The data layer: formats, column mapping, streaming, and errors that name the file, line or columns."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from pipeline.config import DataConfig, UserError
from pipeline.data import encode_and_pack, iter_texts, load_examples


def texts(ds) -> list[str]:
    return [t for batch in iter_texts(ds) for t in batch]


def test_jsonl_json_parquet_and_globs_load_the_same_rows(tmp_path):
    rows = [{"text": f"document {i}", "n": i} for i in range(10)]
    write_jsonl(tmp_path / "a" / "part1.jsonl", rows[:5])
    write_jsonl(tmp_path / "a" / "part2.jsonl", rows[5:])
    (tmp_path / "all.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all.parquet")
    expected = [r["text"] for r in rows]
    assert texts(load_examples(DataConfig(path=str(tmp_path / "a" / "*.jsonl")), ["text"])) == expected
    assert texts(load_examples(DataConfig(path=str(tmp_path / "all.json")), ["text"])) == expected
    assert texts(load_examples(DataConfig(path=str(tmp_path / "all.parquet")), ["text"])) == expected
    assert texts(load_examples(DataConfig(path=str(tmp_path / "a")), ["text"])) == expected


def test_a_mixture_takes_a_fraction_or_a_count_of_each_source_the_same_every_run(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}", "n": i} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    cfg = DataConfig(path=[str(a), str(b)], mix=[0.5, 10])
    got = texts(load_examples(cfg, ["text"]))
    from_a, from_b = [t for t in got if t[0] == "a"], [t for t in got if t[0] == "b"]
    assert len(from_a) == len(set(from_a)) == 5, "a fraction is a sample without repeats"
    assert len(from_b) == 10 and all(from_b.count(f"b{i}") in (2, 3) for i in range(4)), "b twice, then 2 more"
    assert texts(load_examples(cfg, ["text"])) == got
    reseeded = texts(load_examples(DataConfig(path=[str(a), str(b)], mix=[0.5, 10], mix_seed=1), ["text"]))
    assert reseeded != got and len(reseeded) == 15


def test_text_files_by_document_and_by_line(tmp_path):
    (tmp_path / "one.txt").write_text("first line\nsecond line\n\nnew paragraph\n")
    (tmp_path / "two.txt").write_text("another file\n")
    by_doc = texts(load_examples(DataConfig(path=str(tmp_path / "*.txt")), ["text"]))
    assert by_doc == ["first line\nsecond line\n\nnew paragraph\n", "another file\n"]
    by_line = texts(load_examples(DataConfig(path=str(tmp_path / "*.txt"), text_sample_by="line"), ["text"]))
    assert by_line == ["first line", "second line", "new paragraph", "another file"]


def test_column_mapping_and_missing_column_lists_columns_present(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "hello", "meta": 1}])
    ds = load_examples(DataConfig(path=str(path), columns={"text": "content"}), ["text"])
    assert texts(ds) == ["hello"]
    with pytest.raises(UserError) as info:
        load_examples(DataConfig(path=str(path)), ["text"])
    message = str(info.value)
    assert "no column 'text'" in message and "['content', 'meta']" in message and "data.columns.text=" in message
    with pytest.raises(UserError, match="column 'body' is not in"):
        load_examples(DataConfig(path=str(path), columns={"text": "body"}), ["text"])


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n{"text": "x"}\n')
    with pytest.raises(UserError) as info:
        load_examples(DataConfig(path=str(path)), ["text"])
    assert f"{path}:3: malformed JSON line" in str(info.value)


def test_empty_and_missing_data_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no examples|could not load"):
        load_examples(DataConfig(path=str(tmp_path / "empty.jsonl")), ["text"])
    with pytest.raises(UserError, match="file not found: .*nope.jsonl"):
        load_examples(DataConfig(path=str(tmp_path / "nope.jsonl")), ["text"])
    with pytest.raises(UserError, match="matches no file"):
        load_examples(DataConfig(path=str(tmp_path / "*.parquet")), ["text"])


def test_streaming_gives_the_same_texts_and_max_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": f"doc {i}"} for i in range(25)])
    cfg = DataConfig(path=str(path), columns={"text": "body"}, streaming=True, max_examples=20)
    assert texts(load_examples(cfg, ["text"])) == [f"doc {i}" for i in range(20)]


def test_non_text_value_names_its_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": "ok"}, {"text": None}, {"text": "ok"}])
    with pytest.raises(UserError, match="row 2"):
        texts(load_examples(DataConfig(path=str(path)), ["text"]))


def test_encode_and_pack_puts_eos_between_documents(trained_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_tokenizer / "tokenizer")
    docs = ["the cat lives in town", "12 + 34 = 46", "日本語 🎉", "a dog"] * 20
    blocks = encode_and_pack(tok, docs, block_size=16, eos_id=tok.eos_token_id)
    expected = [i for d in docs for i in [*tok.encode(d, add_special_tokens=False), tok.eos_token_id]]
    assert blocks.shape == (len(expected) // 16, 16)
    assert blocks.flatten().tolist() == expected[: blocks.size]


def test_reference_answers_from_question_rows_or_preference_pairs(tmp_path):
    from pipeline.formats import load_reference_answers

    qa = str(
        write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q1", "answer": "a1"}, {"question": "Q2", "answer": "a2"}])
    )
    assert load_reference_answers(DataConfig(path=qa), 10) == [
        {"question": "Q1", "answer": "a1"}, {"question": "Q2", "answer": "a2"}]  # fmt: skip
    assert len(load_reference_answers(DataConfig(path=qa), 1)) == 1
    user = [{"role": "user", "content": "Which is larger, 3 or 7?"}]
    pairs = [{"prompt": user, "chosen": [{"role": "assistant", "content": "7"}],
              "rejected": [{"role": "assistant", "content": wrong}]} for wrong in ("3", "9")]  # fmt: skip
    rows = load_reference_answers(DataConfig(path=str(write_jsonl(tmp_path / "pref.jsonl", pairs))), 10)
    assert rows == [{"question": user, "answer": "7"}]  # the chosen reply; one row per prompt
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "plain?", "chosen": "yes", "rejected": "no"}])
    assert load_reference_answers(DataConfig(path=str(plain)), 10) == [{"question": "plain?", "answer": "yes"}]
    bad = str(write_jsonl(tmp_path / "bad.jsonl", [{"text": "no answers here"}]))
    with pytest.raises(UserError, match=r"bad\.jsonl needs `question` and `answer`.*\['text'\]"):
        load_reference_answers(DataConfig(path=bad), 10)


def test_rl_prompts_from_gsm8k_math_and_chat_layouts(tmp_path):
    from pipeline.formats import load_prompt_rows

    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 3 apples...", "answer": "3 + 4 = 7\n#### 7"}])
    assert load_prompt_rows(DataConfig(path=str(gsm8k)), rewards=["math_verify"]) == [
        {"prompt": "Tom has 3 apples...", "reference": "3 + 4 = 7\n#### 7", "source": 0}]  # fmt: skip
    math = write_jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "solution": "\\boxed{2}", "level": "1"}])
    assert load_prompt_rows(DataConfig(path=str(math))) == [{"prompt": "1+1?", "reference": "\\boxed{2}", "source": 0}]
    # a chat model is asked the bare question as its user turn (a `prompt` string stays the text it continues)
    asked = [r["prompt"] for p in (gsm8k, math) for r in load_prompt_rows(DataConfig(path=str(p)), chat=True)]
    assert asked == [[{"role": "user", "content": "Tom has 3 apples..."}], [{"role": "user", "content": "1+1?"}]]
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": turns}])
    assert load_prompt_rows(DataConfig(path=str(chats))) == [
        {"prompt": [{"role": "user", "content": "hi"}], "reference": "hello", "source": 0}]  # fmt: skip
    rlvr = [{"messages": [{"role": "user", "content": "2+2?"}], "ground_truth": "4", "dataset": "gsm8k"}]
    rlvr = write_jsonl(tmp_path / "rlvr.jsonl", rlvr)  # open-instruct's RLVR layout: the user turn alone
    assert load_prompt_rows(DataConfig(path=str(rlvr)), rewards=["exact_match"]) == [
        {"prompt": [{"role": "user", "content": "2+2?"}], "reference": "4", "source": 0}]  # fmt: skip
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    mapped = DataConfig(path=str(alpaca), columns={"prompt": "instruction", "answer": "output"})
    assert load_prompt_rows(mapped) == [{"prompt": "Say hi.", "reference": "hi", "source": 0}]
    assert load_prompt_rows(mapped, chat=True) == [{"prompt": "Say hi.", "reference": "hi", "source": 0}]
    # unmapped, an Alpaca row is a chat: its instruction the user turn, its output the reference
    assert load_prompt_rows(DataConfig(path=str(alpaca))) == [
        {"prompt": [{"role": "user", "content": "Say hi."}], "reference": "hi", "source": 0}]  # fmt: skip
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"query": "Say hi.", "response": "hi"}])
    with pytest.raises(UserError, match=r"odd\.jsonl has no `prompt`.*\['query', 'response'\].*data\.columns"):
        load_prompt_rows(DataConfig(path=str(odd)))


def test_rl_prompts_mix_sources_of_different_layouts(tmp_path):
    from pipeline.formats import load_prompt_rows

    user = [{"role": "user", "content": "Name Tuga's job."}]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [*user, {"role": "assistant", "content": "miller"}]}])

    def turn(role, text):
        return [{"role": role, "content": text}]

    pairs = [{"prompt": turn("user", f"Add {i} and 1."), "chosen": turn("assistant", str(i + 1)),
              "rejected": turn("assistant", str(i + 3))} for i in range(4)]  # fmt: skip
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "2+2?", "answer": "#### 4"}])
    # each file in its own layout: the chat's last turn, the pair's chosen reply, the GSM8K answer are the references
    rows = load_prompt_rows(DataConfig(path=[str(chats), str(pairs), str(gsm8k)]), chat=True)
    assert [r["reference"] for r in rows] == ["miller", "1", "2", "3", "4", "#### 4"]
    assert [r["source"] for r in rows] == [0, 1, 1, 1, 1, 2]  # which data.path entry: ppo's reward_by_source
    assert rows[0]["prompt"] == user and rows[-1]["prompt"] == [{"role": "user", "content": "2+2?"}]
    # max_examples counts the rows of all the files in order; a mixture cuts each source to its weight
    assert len(load_prompt_rows(DataConfig(path=[str(chats), str(pairs)], max_examples=3))) == 3
    mixed = load_prompt_rows(DataConfig(path=[str(chats), str(pairs)], mix=[1.0, 2]))
    assert [r["reference"] for r in mixed][0] == "miller" and len(mixed) == 3
    # a source without references is named when the reward needs them
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "Say hi."}])
    with pytest.raises(UserError, match=r"bare\.jsonl has no reference answers"):
        load_prompt_rows(DataConfig(path=[str(chats), str(bare)]), rewards=["exact_match"])
    # rewards per source: one the reward model alone scores needs no reference
    routed = load_prompt_rows(DataConfig(path=[str(chats), str(bare)]), source_rewards=[["exact_match"], []])
    assert [(r["reference"], r["source"]) for r in routed] == [("miller", 0), (None, 1)]
    with pytest.raises(UserError, match=r"bare\.jsonl has no reference answers"):
        load_prompt_rows(DataConfig(path=[str(chats), str(bare)]), source_rewards=[[], ["exact_match"]])


def _h4_row(i: int, answer: str = "Blue.", prompt: str | None = None) -> dict:
    """A row in the layout of HuggingFaceH4/ultrafeedback_binarized: the prompt as a string, and chosen/rejected as
    whole conversations that repeat it, with the set's extra columns."""
    user = {"role": "user", "content": f"Which colour is sky {i}?"}
    return {
        "prompt": prompt if prompt is not None else user["content"], "prompt_id": f"id{i}",
        "chosen": [user, {"role": "assistant", "content": answer}],
        "rejected": [user, {"role": "assistant", "content": "Seven."}],
        "messages": [user, {"role": "assistant", "content": answer}], "score_chosen": 9.0, "score_rejected": 2.0,
    }  # fmt: skip


def test_public_preference_layouts_load_as_trl_pairs(tmp_path):
    from pipeline.formats import load_preference_pairs

    h4 = write_jsonl(tmp_path / "h4.jsonl", [_h4_row(i) for i in range(3)])
    ds, conversational = load_preference_pairs(DataConfig(path=str(h4)))
    assert conversational and ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[0] == {"prompt": [{"role": "user", "content": "Which colour is sky 0?"}],
                     "chosen": [{"role": "assistant", "content": "Blue."}],
                     "rejected": [{"role": "assistant", "content": "Seven."}]}  # fmt: skip
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.",
                                               "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}])  # fmt: skip
    ds, conversational = load_preference_pairs(DataConfig(path=str(hh)))
    assert not conversational and ds.column_names == ["chosen", "rejected"]  # implicit prompt, as trl reads it
    replies = write_jsonl(tmp_path / "replies.jsonl", [{"prompt": [{"role": "user", "content": "Hi?"}],
                                                         "chosen": "Hello.", "rejected": "Go away."}])  # fmt: skip
    ds, conversational = load_preference_pairs(DataConfig(path=str(replies)))
    assert conversational and ds[0]["chosen"] == [{"role": "assistant", "content": "Hello."}]
    disagree = write_jsonl(tmp_path / "disagree.jsonl", [_h4_row(0), _h4_row(1, prompt="Something else?")])
    with pytest.raises(UserError, match=r"disagree\.jsonl: row 1: 'prompt' is not the text of the conversations"):
        load_preference_pairs(DataConfig(path=str(disagree)))


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": text} for role, text in pairs]


def _sharegpt(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": speaker, "value": text} for speaker, text in pairs]


def test_sharegpt_and_alpaca_layouts_read_as_chats_in_every_loader(tmp_path):
    """The two public layouts trl does not read (ShareGPT's {from, value} turns, Alpaca's instruction / input /
    output) arrive as trl's `messages` or preference form wherever data is read: sft rows, a mixture with a
    `messages` file, preference pairs, RL prompts with their reference. Another speaker is named, with its row."""
    from pipeline.formats import load_preference_pairs, load_prompt_rows

    talk = _sharegpt(("human", "2+2?"), ("gpt", "4"), ("human", "And 3+3?"), ("gpt", "6"))
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"system": "Be brief.", "conversations": talk},
        {"system": "", "conversations": _sharegpt(("user", "Hi"), ("assistant", "Hello"))},
    ])  # fmt: skip
    ds = load_examples(DataConfig(path=str(sharegpt)), required=["messages"])
    asked = _turns(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"))
    assert ds.column_names == ["messages"] and ds[0]["messages"] == [*asked, *_turns(("assistant", "6"))]
    assert ds[1]["messages"] == _turns(("user", "Hi"), ("assistant", "Hello"))
    # the same turns under `messages`, and role/content turns under `conversations`
    as_messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": _sharegpt(("human", "Hi"))}])
    assert load_examples(DataConfig(path=str(as_messages)), ["messages"])[0]["messages"] == _turns(("user", "Hi"))
    renamed = write_jsonl(tmp_path / "c.jsonl", [{"conversations": _turns(("user", "Hi"), ("assistant", "Yo"))}])
    assert load_examples(DataConfig(path=str(renamed)), ["messages"])[0]["messages"][1]["content"] == "Yo"

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "", "history": [],
         "text": "Below is an instruction..."},  # tatsu-lab/alpaca's own rendering: the chat template's instead
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind.", "history": [["Who?", "Me."]],
         "text": "Below is an instruction..."},
    ])  # fmt: skip
    ds = load_examples(DataConfig(path=str(alpaca)), required=["messages"])
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"] == _turns(("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5"))
    assert ds[1]["messages"] == _turns(("system", "Be kind."), ("user", "Who?"), ("assistant", "Me."),
                                       ("user", "Say hi."), ("assistant", "hi"))  # fmt: skip
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": _turns(("user", "Yo"), ("assistant", "Hey"))}])
    mixed = load_examples(DataConfig(path=[str(sharegpt), str(alpaca), str(chats)], mix=[1.0, 1.0, 3]), ["messages"])
    assert len(mixed) == 7 and mixed[6]["messages"] == _turns(("user", "Yo"), ("assistant", "Hey"))

    (chosen,), (rejected,) = _sharegpt(("gpt", "4")), _sharegpt(("gpt", "5"))
    pairs = [{"conversations": _sharegpt(("human", "2+2?")), "chosen": chosen, "rejected": rejected}]
    pairs = write_jsonl(tmp_path / "sharegpt_pairs.jsonl", pairs)
    alpaca_pairs = write_jsonl(tmp_path / "alpaca_pairs.jsonl",
                               [{"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"}])  # fmt: skip
    for path in (pairs, alpaca_pairs):
        ds, conversational = load_preference_pairs(DataConfig(path=str(path)))
        assert conversational and ds[0] == {"prompt": _turns(("user", "2+2?")), "chosen": _turns(("assistant", "4")),
                                            "rejected": _turns(("assistant", "5"))}, path  # fmt: skip

    rows = load_prompt_rows(DataConfig(path=str(sharegpt)), rewards=["exact_match"])
    assert rows[0] == {"prompt": asked, "reference": "6", "source": 0} and rows[1]["reference"] == "Hello"

    tool = [{"conversations": _sharegpt(("human", "Hi"), ("gpt", "Hello"))},
            {"conversations": _sharegpt(("human", "Weather?"), ("function_call", "{}"))}]  # fmt: skip
    tool = write_jsonl(tmp_path / "tool.jsonl", tool)
    with pytest.raises(UserError, match=r"tool\.jsonl: row 1: 'conversations': turn 1 is from 'function_call'"):
        load_examples(DataConfig(path=str(tool)), required=["messages"])
