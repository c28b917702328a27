"""Tokenizer stage: train a byte-level BPE with special and chat tokens, save it as a Hugging Face tokenizer.

    llmpipe tokenizer --config configs/tiny/tokenizer.yaml [output_dir=runs/tiny/tokenizer] [vocab_size=4096]

Produces `output_dir/tokenizer/` (loads with `AutoTokenizer.from_pretrained`, has a chat template) and
`output_dir/manifest.json` with bytes per token measured on held-out documents. Byte-level BPE with no
normalizer round-trips any Unicode exactly: every byte has a token, and nothing is rewritten before splitting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.artifacts import atomic_dir, begin_stage, write_manifest
from pipeline.config import DataConfig, UserError, config, field
from pipeline.data import describe_data, iter_texts, load_examples
from pipeline.distributed import is_main_process
from pipeline.tracking import log

STAGE = "tokenizer"


@config
class ChatConfig:
    """Chat markup: one special token per role and one that ends a turn (the generation stop token)."""

    system_token: str = field("<|system|>", "Token that opens a system message.")
    user_token: str = field("<|user|>", "Token that opens a user message.")
    assistant_token: str = field("<|assistant|>", "Token that opens an assistant message.")
    end_of_turn_token: str = field("<|end|>", "Token that closes every message; a chat model stops on it.")
    template: str | None = field(None, "A Jinja chat template to use instead of the one built from these tokens.")


@config
class TokenizerConfig:
    output_dir: str = field(help="Folder for this stage's artifact (tokenizer/, config.yaml, manifest.json).")
    data: DataConfig = field(help="Training text: examples with a 'text' column (map another with data.columns).")
    vocab_size: int = field(8192, "Vocabulary size, special tokens and the 256 byte tokens included.", ge=1)
    min_frequency: int = field(2, "A merge must occur at least this often in the training text.", ge=1)
    max_token_length: int | None = field(None, "Longest token, in characters (None: no limit).", ge=1)
    split_digits: bool = field(True, "Split numbers into single digits before BPE (helps arithmetic).")
    heldout_fraction: float = field(
        0.01, "Share of documents kept out of training to measure bytes per token.", ge=0.0, lt=0.5
    )
    bos_token: str = field("<|bos|>", "Beginning-of-sequence token, added in front of encoded text.")
    eos_token: str = field("<|eos|>", "End-of-sequence token; pretraining puts it between documents.")
    pad_token: str = field("<|pad|>", "Padding token (kept distinct from EOS so EOS is never masked out).")
    add_bos_token: bool = field(True, "Encoding text adds the BOS token in front (as Llama tokenizers do).")
    extra_special_tokens: list[str] = field(factory=list, help="More special tokens to reserve (never split).")
    chat: ChatConfig = field(factory=ChatConfig, help="Chat tokens and template.")
    model_max_length: int = field(2048, "Longest sequence models using this tokenizer are meant for.", ge=1)
    batch_size: int = field(1000, "Documents handed to the BPE trainer per batch.", ge=1)

    def special_tokens(self) -> list[str]:
        chat = self.chat
        return [
            self.bos_token, self.eos_token, self.pad_token,
            chat.system_token, chat.user_token, chat.assistant_token, chat.end_of_turn_token,
            *self.extra_special_tokens,
        ]  # fmt: skip

    def check(self) -> list[str]:
        problems = []
        tokens = self.special_tokens()
        if any(not t for t in tokens):
            problems.append("special tokens must not be empty strings")
        duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
        if duplicates:
            problems.append(f"special tokens must differ; used more than once: {duplicates}")
        smallest = 256 + len(set(tokens)) + 1
        if self.vocab_size < smallest:
            problems.append(
                f"vocab_size: got {self.vocab_size}, must be at least {smallest} "
                f"(256 byte tokens + {len(set(tokens))} special tokens + 1 merge)"
            )
        return problems


Config = TokenizerConfig


def chat_template(cfg: TokenizerConfig) -> str:
    """A Jinja chat template: `<|role|> content<|end|>\\n` per message (content trimmed), the generation prompt
    `<|assistant|>`; assistant text (and its end token) sits inside {% generation %} so `return_assistant_tokens_mask`
    / trl's assistant_only_loss can find it.

    The space after the role token belongs to the reply, as in Llama 2's `[/INST] answer`: byte-level BPE joins a
    space to the word after it, so the reply's first word is the token the corpus has (` potter`), not the pieces of
    a word at a line start (`p`, `ot`, `ter`), and a fact learnt in pretraining can be said in a chat turn."""
    if cfg.chat.template:
        return cfg.chat.template
    chat = cfg.chat
    q = json.dumps  # Jinja accepts JSON string literals, so tokens with quotes are safe
    end = q(chat.end_of_turn_token)
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        f"{{{{- {q(chat.assistant_token)} -}}}}"
        "{%- generation -%}"
        f"{{{{- ' ' + message['content'] | trim + {end} -}}}}"
        "{%- endgeneration -%}"
        "{{- '\\n' -}}"
        "{%- elif message['role'] == 'user' or message['role'] == 'system' -%}"
        f"{{{{- {q(chat.user_token)} if message['role'] == 'user' else {q(chat.system_token)} -}}}}"
        f"{{{{- ' ' + message['content'] | trim + {end} + '\\n' -}}}}"
        "{%- else -%}"
        "{{- raise_exception('unknown chat role ' + message['role'] + ': expected system, user or assistant') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {q(chat.assistant_token)} -}}}}{{%- endif -%}}"
    )


def build_trainer_and_model(cfg: TokenizerConfig):
    """The untrained `tokenizers` pipeline and its BPE trainer (shared with bench/tokenizer.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits = [pre_tokenizers.Digits(individual_digits=True)] if cfg.split_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        max_token_length=cfg.max_token_length,
        show_progress=is_main_process(),
    )
    return tok, trainer


def wrap(cfg: TokenizerConfig, tok):
    """Wrap a trained `tokenizers.Tokenizer` as a transformers tokenizer with specials and chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if cfg.add_bos_token:
        bos_id = tok.token_to_id(cfg.bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cfg.bos_token} $A", pair=f"{cfg.bos_token} $A $B:1", special_tokens=[(cfg.bos_token, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=cfg.bos_token,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        extra_special_tokens=[
            cfg.chat.system_token,
            cfg.chat.user_token,
            cfg.chat.assistant_token,
            cfg.chat.end_of_turn_token,
            *cfg.extra_special_tokens,
        ],
        chat_template=chat_template(cfg),
        model_max_length=cfg.model_max_length,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
    )


def run(cfg: TokenizerConfig) -> dict | None:
    # --- set up: the tokenizer is trained by one process; other ranks of a launch have nothing to do
    if not is_main_process():
        return None
    started = time.time()
    log(f"reading {cfg.data.path}", STAGE)
    ds = load_examples(cfg.data, required=["text"])  # bad data fails here, before the folder is touched
    out = begin_stage(cfg.output_dir, cfg)

    # --- train: every k-th document is held out to measure compression on text the tokenizer has not seen
    stride = round(1 / cfg.heldout_fraction) if cfg.heldout_fraction > 0 else 0
    heldout: list[str] = []
    counts = {"documents": 0, "bytes": 0}

    def training_batches():
        index = 0
        for batch in iter_texts(ds, "text", cfg.batch_size):
            keep = []
            for text in batch:
                if stride and index % stride == stride - 1:
                    heldout.append(text)
                else:
                    keep.append(text)
                    counts["bytes"] += len(text.encode("utf-8"))
                index += 1
            counts["documents"] += len(keep)
            yield keep

    n_batches = None if cfg.data.streaming else -(-len(ds) // cfg.batch_size)
    tok, trainer = build_trainer_and_model(cfg)
    log(f"training byte-level BPE, vocab {cfg.vocab_size}", STAGE)
    train_start = time.time()
    tok.train_from_iterator(training_batches(), trainer, length=n_batches)
    train_seconds = time.time() - train_start
    if counts["documents"] == 0:
        raise UserError(f"data: {cfg.data.path} has no non-empty training text (all documents empty or held out)")

    # --- measure and save: bytes per token on held-out text; the folder appears whole or not at all
    hf_tokenizer = wrap(cfg, tok)
    metrics = {
        "vocab_size": len(hf_tokenizer),
        "train_documents": counts["documents"],
        "train_megabytes": round(counts["bytes"] / 1e6, 3),
        "train_seconds": round(train_seconds, 3),
        "train_megabytes_per_second": round(counts["bytes"] / 1e6 / max(train_seconds, 1e-9), 3),
        "heldout_documents": len(heldout),
        **bytes_per_token(hf_tokenizer, heldout),
        "special_token_ids": {t: hf_tokenizer.convert_tokens_to_ids(t) for t in cfg.special_tokens()},
    }
    with atomic_dir(out / "tokenizer") as tmp:
        hf_tokenizer.save_pretrained(tmp)
    inputs = {"data": describe_data(cfg.data)}
    write_manifest(out, STAGE, inputs, ["tokenizer"], metrics, started)
    bpt = metrics["heldout_bytes_per_token"]
    log(f"done: vocab {metrics['vocab_size']}, {bpt} bytes/token on held-out text -> {Path(out) / 'tokenizer'}", STAGE)
    return metrics


def bytes_per_token(tokenizer, texts: list[str]) -> dict:
    """UTF-8 bytes per token (higher = better compression), without BOS/EOS so it compares across settings."""
    if not texts:
        return {"heldout_bytes_per_token": None}
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    total_tokens = sum(len(e.ids) for e in encodings)
    return {"heldout_bytes_per_token": round(total_bytes / max(total_tokens, 1), 4)}
