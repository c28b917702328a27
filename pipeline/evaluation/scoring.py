"""Log-likelihoods and greedy generations from any causal LM, batched for speed, numbered as lm-eval numbers them.

Tokenization follows lm-evaluation-harness: trailing whitespace of a context moves to its continuation, and the
continuation's tokens are cut from the tokenization of context + continuation (so a merge across the boundary is
scored as the model would write it), after `len(tokens(context))` tokens.

Speed: all choices of a document share one row: [context | choice 1 | choice 2 | ...] with a 4-D attention mask
in which each choice sees the context and itself, and position ids that restart after the context for every
choice. The context is computed once instead of once per choice (a 5-shot prompt of ~100 tokens with four
1-3 token choices costs ~1/4 of the harness's compute). Rows are sorted by length and packed into batches of at
most `batch_tokens` tokens, halved when memory runs out. A model that ignores 4-D masks (some attention kernels)
is caught by a check on the first batch and scored one row per choice instead.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from pipeline.tracking import log

# A (context tokens, [continuation tokens, ...]) group: one document's requests that share their context.
Group = tuple[list[int], list[list[int]]]


class Scorer:
    def __init__(self, model, tokenizer, add_bos: bool | None, max_length: int | None, batch_tokens: int | None,
                 share_context: bool = True, progress: Callable[[int], None] | None = None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_length = max_length or _context_length(model)
        self.batch_tokens = batch_tokens or 16384  # auto: halved on out-of-memory until a batch fits
        self.share_context = share_context
        self.progress = progress or (lambda n: None)
        # The token a document without context is conditioned on (lm-eval's prefix_token_id): BOS, else EOS.
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.add_bos = tokenizer_adds_bos(tokenizer) if add_bos is None else add_bos
        self._checked = False
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    # --- tokens -------------------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts in one call, BOS in front where the policy says and the text has none."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if not self.add_bos or self.tokenizer.bos_token_id is None:
            return ids
        bos, bos_text = self.tokenizer.bos_token_id, self.tokenizer.bos_token
        return [row if text.startswith(bos_text) else [bos, *row] for row, text in zip(ids, texts, strict=True)]

    def pair_groups(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]]) -> list[Group]:
        """(context tokens, continuation tokens per choice) for every document, split on the joint encoding."""
        moved = []
        for context, conts in zip(contexts, continuations, strict=True):
            n_spaces = len(context) - len(context.rstrip())
            tail = context[len(context) - n_spaces :]
            moved.append((context[: len(context) - n_spaces], [tail + c for c in conts]))
        context_ids = self.encode([c for c, _ in moved])
        wholes = iter(self.encode([c + cont for c, conts in moved for cont in conts]))
        groups = []
        for (context, conts), ctx_ids in zip(moved, context_ids, strict=True):
            if not context:  # nothing to condition on: the prefix token stands for the start of a text
                cont_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
                groups.append(([self.prefix_id], [c if c else [self.prefix_id] for c in cont_ids]))
                for _ in conts:
                    next(wholes)
                continue
            groups.append((ctx_ids, [next(wholes)[len(ctx_ids) :] for _ in conts]))
        return groups

    # --- log-likelihoods ----------------------------------------------------------------------------------------

    def loglikelihoods(self, groups: list[Group]) -> list[list[tuple[float, bool]]]:
        """(sum of log-probs, all tokens greedy) of every continuation given its context."""
        rows: list[tuple[int, int, list[int], list[list[int]]]] = []  # (group, first choice, prefix, choices)
        for g, (ctx, conts) in enumerate(groups):
            for cont in conts:
                if not cont or len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens (model context {self.max_length})")
            fits = len(ctx) + max(len(c) for c in conts) <= self.max_length + 1
            if self.share_context and fits and len(conts) > 1:
                rows.append((g, 0, ctx, conts))
                continue
            for j, cont in enumerate(conts):  # one row each, context cut from the left to fit (as lm-eval does)
                whole = (ctx + cont)[-(self.max_length + 1) :]
                rows.append((g, j, whole[: len(whole) - len(cont)], [cont]))
        results: list[list[tuple[float, bool] | None]] = [[None] * len(conts) for _, conts in groups]
        order = sorted(range(len(rows)), key=lambda r: -_row_length(rows[r][2], rows[r][3]))
        start = 0
        while start < len(order):
            longest = _row_length(rows[order[start]][2], rows[order[start]][3])
            size = max(1, min(len(order) - start, self.batch_tokens // max(longest, 1)))
            batch = [rows[r] for r in order[start : start + size]]
            try:
                scores = self._score_rows([(prefix, conts) for _, _, prefix, conts in batch])
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _out_of_memory(exc) or size == 1:
                    raise
                self.batch_tokens = max(1, self.batch_tokens // 2)
                log(f"out of memory at {size} rows x {longest} tokens: batch_tokens -> {self.batch_tokens}", "eval")
                _empty_cache(self.device)
                continue
            for (g, first, _, _), row_scores in zip(batch, scores, strict=True):
                for j, score in enumerate(row_scores):
                    results[g][first + j] = score
            self.progress(sum(len(conts) for _, _, _, conts in batch))
            start += size
        return results  # type: ignore[return-value]

    def _score_rows(self, rows: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        packed = any(len(conts) > 1 for _, conts in rows)
        scores = self._forward(rows, packed)
        if packed and not self._checked:
            # Some attention kernels drop custom masks: score the first row's choices one by one and compare.
            self._checked = True
            prefix, conts = rows[0]
            alone = [self._forward([(prefix, [c])], packed=False)[0][0] for c in conts]
            worst = max(abs(a[0] - b[0]) for a, b in zip(alone, scores[0], strict=True))
            tolerance = 1e-3 if self.model.dtype == torch.float32 else 5e-2
            if worst > tolerance * max(1.0, abs(alone[0][0])):
                log(f"this model ignores 4-D attention masks (log-prob off by {worst:.3g}): "
                    "scoring one row per choice (slower, same numbers as lm-eval)", "eval")  # fmt: skip
                self.share_context = False
                return [[self._forward([(p, [c])], packed=False)[0][0] for c in cs] for p, cs in rows]
        return scores

    @torch.no_grad()
    def _forward(self, rows: list[tuple[list[int], list[list[int]]]], packed: bool) -> list[list[tuple[float, bool]]]:
        """One forward pass over right-padded rows; returns each choice's (log-prob, greedy)."""
        length = max(_row_length(p, cs) for p, cs in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        segment = torch.full((len(rows), length), -1, dtype=torch.long)  # 0 context, j + 1 choice j, -1 padding
        positions = torch.zeros((len(rows), length), dtype=torch.long)
        predict_at, targets = [], []  # (row, position whose logits predict the token), token
        for r, (prefix, conts) in enumerate(rows):
            tokens = prefix + [t for c in conts for t in c]
            tokens = tokens[:length]
            input_ids[r, : len(tokens)] = torch.tensor(tokens)
            segment[r, : len(prefix)] = 0
            positions[r, : len(prefix)] = torch.arange(len(prefix))
            at = len(prefix)
            for j, cont in enumerate(conts):
                span = min(len(cont), length - at)  # the last choice's last token is never an input
                segment[r, at : at + span] = j + 1
                positions[r, at : at + span] = torch.arange(len(prefix), len(prefix) + span)
                sources = [len(prefix) - 1] + list(range(at, at + len(cont) - 1))
                predict_at.append([(r, s) for s in sources])
                targets.append(cont)
                at += len(cont)
        kwargs = {}
        if packed:
            q, k = segment.unsqueeze(2), segment.unsqueeze(1)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            allowed = causal & ((k == 0) | (k == q)) | torch.eye(length, dtype=torch.bool)
            mask = torch.zeros(allowed.shape, dtype=self.model.dtype).masked_fill(
                ~allowed, torch.finfo(self.model.dtype).min
            )
            kwargs = {"attention_mask": mask.unsqueeze(1).to(self.device), "position_ids": positions.to(self.device)}
        else:
            kwargs = {"attention_mask": (segment >= 0).long().to(self.device)}
        flat = [rs for spans in predict_at for rs in spans]
        # Only the last positions predict anything: the output layer skips the rest (~15% of the compute here).
        first = min(position for _, position in flat)
        if self._keeps_logits:
            kwargs["logits_to_keep"] = length - first
        logits = self.model(input_ids=input_ids.to(self.device), **kwargs).logits
        offset = length - logits.shape[1]
        index = torch.tensor([(r, position - offset) for r, position in flat], device=logits.device)
        picked = torch.log_softmax(logits[index[:, 0], index[:, 1]].float(), dim=-1)
        wanted = torch.tensor([t for cont in targets for t in cont], device=logits.device)
        token_lp = picked.gather(1, wanted.unsqueeze(1)).squeeze(1).tolist()
        greedy = (picked.argmax(dim=-1) == wanted).tolist()
        out, at = [], 0
        for _, conts in rows:
            row = []
            for cont in conts:
                row.append((math.fsum(token_lp[at : at + len(cont)]), all(greedy[at : at + len(cont)])))
                at += len(cont)
            out.append(row)
        return out

    def rolling_groups(self, texts: Sequence[str]) -> list[list[Group]]:
        """Each text as disjoint windows of at most `max_length` predicted tokens, each conditioned on the tokens
        before it (the first on the prefix token): one group per window, to be summed per text."""
        out = []
        for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            full, windows = [self.prefix_id, *ids], []
            for start in range(0, len(ids), self.max_length):
                end = min(start + self.max_length, len(ids))
                windows.append((full[max(0, end - self.max_length) : start + 1], [full[start + 1 : end + 1]]))
            out.append(windows)
        return out

    # --- generation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, contexts: Sequence[str], until: list[str], max_gen_toks: int, do_sample: bool = False,
                 temperature: float = 0.0) -> list[str]:  # fmt: skip
        """Text generated after each context, cut at the first stop string; greedy unless do_sample."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer = self.tokenizer
        keep = self.max_length - max_gen_toks
        if keep <= 0:
            raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room in a context of {self.max_length}")
        encoded = [ids[-keep:] for ids in self.encode(contexts)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id

        class StopStrings(StoppingCriteria):
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids, scores, **kwargs):
                texts = tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
                return torch.tensor([any(s in t for s in until if s) for t in texts], device=input_ids.device)

        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        outputs: list[str | None] = [None] * len(encoded)
        start = 0
        while start < len(order):
            longest = len(encoded[order[start]]) + max_gen_toks
            size = max(1, min(len(order) - start, self.batch_tokens // longest, 256))
            batch = [encoded[i] for i in order[start : start + size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
            sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
            try:
                generated = self.model.generate(
                    input_ids=input_ids, attention_mask=attention, max_new_tokens=max_gen_toks, pad_token_id=pad,
                    eos_token_id=eos, stopping_criteria=StoppingCriteriaList([StopStrings(width)]), **sampling,
                )  # fmt: skip
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _out_of_memory(exc) or size == 1:
                    raise
                self.batch_tokens = max(1, self.batch_tokens // 2)
                _empty_cache(self.device)
                continue
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for i, text in zip(order[start : start + size], texts, strict=True):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                outputs[i] = text
            self.progress(size)
            start += size
        return outputs  # type: ignore[return-value]


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encode puts BOS in front (Llama-style); the harness's default follows it."""
    if tokenizer.bos_token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == tokenizer.bos_token_id


def _row_length(prefix: list[int], conts: list[list[int]]) -> int:
    return len(prefix) + sum(len(c) for c in conts) - 1


def _context_length(model) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    return 2048  # lm-eval's default for models that do not say


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def _empty_cache(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
