"""The tokenizer stage end to end: a Hugging Face tokenizer that round-trips any text and renders chats."""

from __future__ import annotations

import json
import random

from conftest import MIXED_SAMPLES, REPO, run_cli
from transformers import AutoTokenizer


def load(artifact):
    return AutoTokenizer.from_pretrained(artifact / "tokenizer")


def random_unicode(rng: random.Random, length: int) -> str:
    """Random text drawn from many Unicode blocks, including combining marks, emoji, and whitespace runs."""
    ranges = [
        (0x20, 0x7E),
        (0x300, 0x36F),
        (0x400, 0x4FF),
        (0x590, 0x6FF),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F300, 0x1F64F),
        (0x1F900, 0x1F9FF),
        (0x200B, 0x200D),
    ]
    chars = []
    for _ in range(length):
        if rng.random() < 0.1:
            chars.append(rng.choice([" " * rng.randint(2, 6), "\n" * rng.randint(1, 4), "\t", "\r\n"]))
        else:
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_round_trips_any_unicode_exactly(trained_tokenizer):
    tok = load(trained_tokenizer)
    rng = random.Random(0)
    samples = MIXED_SAMPLES + [random_unicode(rng, rng.randint(1, 200)) for _ in range(300)]
    for text in samples:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id  # BOS added in front, as configured
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.unk_token_id is None  # byte-level: nothing is ever unknown


def test_chat_template_renders_turns_and_masks_exactly_the_assistant_text(trained_tokenizer):
    tok = load(trained_tokenizer)
    chat = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where does Bramo live?"},
        {"role": "assistant", "content": "Tillford"},
        {"role": "user", "content": "And 12 + 7?"},
        {"role": "assistant", "content": "19"},
    ]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == (
        "<|bos|><|system|> Answer briefly.<|end|>\n<|user|> Where does Bramo live?<|end|>\n"
        "<|assistant|> Tillford<|end|>\n<|user|> And 12 + 7?<|end|>\n<|assistant|> 19<|end|>\n"
    )
    prompt = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|> Where does Bramo live?<|end|>\n<|assistant|>")
    # a decoded reply (" Tillford", the space the model wrote) fed back renders the same turn
    again = [*chat[:2], {"role": "assistant", "content": " Tillford "}]
    assert tok.apply_chat_template(again, tokenize=False) == tok.apply_chat_template(chat[:3], tokenize=False)
    encoded = tok.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    assert encoded["input_ids"].count(tok.bos_token_id) == 1
    trained = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    end = tok.convert_tokens_to_ids("<|end|>")
    # the reply's words are the tokens running text has (" Tillford"), not those of a word at a line start
    assert trained == [
        *tok.encode(" Tillford", add_special_tokens=False),
        end,
        *tok.encode(" 19", add_special_tokens=False),
        end,
    ]


def test_special_tokens_are_atomic_and_digits_split(trained_tokenizer):
    tok = load(trained_tokenizer)
    for token in ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]:
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3  # pad != eos
    assert tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False)) == list("12345")


def test_manifest_records_inputs_metrics_and_finishes_last(trained_tokenizer, small_corpus):
    manifest = json.loads((trained_tokenizer / "manifest.json").read_text())
    assert manifest["stage"] == "tokenizer"
    assert list(manifest["inputs"]["data"]) == [str(small_corpus)]
    metrics = manifest["metrics"]
    assert 1.5 < metrics["heldout_bytes_per_token"] < 8, metrics
    assert metrics["vocab_size"] <= 512 and metrics["heldout_documents"] > 0
    assert manifest["versions"]["tokenizers"] and manifest["wall_time_s"] > 0
    assert (trained_tokenizer / "config.yaml").read_text().count("vocab_size: 512") == 1
    written = [(trained_tokenizer / name).stat().st_mtime_ns for name in ("config.yaml", "tokenizer")]
    assert (trained_tokenizer / "manifest.json").stat().st_mtime_ns >= max(written)


def test_same_data_and_config_give_the_same_tokenizer(tmp_path, small_corpus, trained_tokenizer):
    result = run_cli(
        "tokenizer",
        "--config",
        str(REPO / "configs/tiny/tokenizer.yaml"),
        f"output_dir={tmp_path}",
        f"data.path={small_corpus}",
        "vocab_size=512",
    )
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "manifest.json").read_text())["outputs"]["tokenizer"]
    first = json.loads((trained_tokenizer / "manifest.json").read_text())["outputs"]["tokenizer"]
    assert again == first
