"""The pretraining fast path (issue 21): the fused LM head + loss matches the unfused one in value and gradients, it
refuses models and launches it cannot serve, and the stage with every switch on trains as the plain stage does,
saves weights that reload under their own names, and reports warm-up apart from steady-state tokens/s."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_pretrain import tiny_args

from pipeline.config import UserError
from pipeline.fastpath import StepClock, fuse_lm_loss, linear_cross_entropy


def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(50, (300,))
    targets[::7] = -100
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    (3 * reference).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    fused = linear_cross_entropy(hidden, weight, targets, chunk=64)  # 300 rows: five chunks, the last one short
    (3 * fused).backward()
    assert torch.allclose(fused, reference, rtol=1e-5)
    assert torch.allclose(hidden.grad, expected[0], atol=1e-6) and torch.allclose(weight.grad, expected[1], atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the matmul in bf16, the softmax in fp32, as unfused
        low = linear_cross_entropy(hidden, weight, targets, chunk=64)
        unfused = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)
    assert low.dtype == torch.float32 and abs(low.item() - unfused.item()) < 1e-3 * unfused.item()


def _tiny_llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, tie_word_embeddings=True, **extra)  # fmt: skip
    return LlamaForCausalLM(config)


def test_fused_model_loss_and_gradients_match_and_generation_is_unchanged():
    model = _tiny_llama()
    ids = torch.randint(64, (3, 20))
    labels = ids.clone()
    labels[0, :5] = -100
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    fuse_lm_loss(model, chunk=16)
    output = model(input_ids=ids, labels=labels)
    output.loss.backward()
    assert output.logits is None and torch.allclose(output.loss, reference, rtol=1e-5)
    for name, p in model.named_parameters():  # the tied embedding gets both its gradients
        assert torch.allclose(p.grad, expected[name], atol=1e-6), name
    assert model(input_ids=ids).logits.shape == (3, 20, 64)  # without labels: the model's own forward


@pytest.mark.parametrize(
    ("extra", "zero_stage", "words"),
    [({}, 3, "ZeRO-3"), ({"logits_scaling": 2.0}, None, "scales or caps its logits")],
)
def test_fused_loss_refuses_what_it_cannot_serve(extra, zero_stage, words):
    model = _tiny_llama()
    for key, value in extra.items():
        setattr(model.config, key, value)
    with pytest.raises(UserError, match=words) as error:
        fuse_lm_loss(model, chunk=16, zero_stage=zero_stage)
    assert "train.fused_loss=false" in str(error.value)


def test_step_clock_leaves_warm_up_out_and_carries_over_a_resume(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("pipeline.fastpath.time.perf_counter", lambda: now[0])
    clock = StepClock(warmup=2)
    for seconds in (5.0, 3.0, 1.0, 1.0):  # compile, warm-up, then two steady steps
        clock.start()
        now[0] += seconds
        assert clock.stop() == seconds
    assert clock.tokens_per_second(100, 4) == 100.0 and clock.warmup_seconds == 8.0 and clock.seconds == 10.0
    resumed = StepClock.resumed(1, clock.state())
    for seconds in (7.0, 1.0):  # the resumed process warms up again: left out too
        resumed.start()
        now[0] += seconds
        resumed.stop()
    assert resumed.steady_steps == 3 and resumed.tokens_per_second(100, 6) == 100.0
    short = StepClock(warmup=5)  # a run shorter than its warm-up: every step counts
    short.start()
    now[0] += 4.0
    short.stop()
    assert short.tokens_per_second(100, 1) == 25.0


def test_stage_with_every_switch_on_trains_like_the_plain_stage(tmp_path, trained_tokenizer, small_corpus):
    """compile (in place, on a CPU too), fused AdamW and the fused loss: the same losses as the plain stage within
    float tolerance, weights saved under their own names (torch.compile's wrapper would prefix `_orig_mod.`), and
    the warm-up steps timed apart."""
    runs = {}
    fast_path = ["train.compile=true", "train.fused_adamw=true", "train.fused_loss=true", "train.fused_loss_chunk=40"]
    for name, switches in (("plain", []), ("fast", fast_path)):
        out = tmp_path / name
        result = run_cli(*tiny_args(out, trained_tokenizer, small_corpus, "model.dropout=0.0", *switches))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out
    plain, fast = (json.loads((runs[n] / "manifest.json").read_text())["metrics"] for n in ("plain", "fast"))
    assert (fast["compile"], fast["fused_adamw"], fast["fused_loss"]) == (True, True, True)
    assert (plain["compile"], plain["fused_adamw"], plain["fused_loss"]) == (False, False, False)  # CPU defaults
    assert abs(fast["val_loss"] - plain["val_loss"]) < 1e-3 * plain["val_loss"], (fast, plain)
    assert fast["timed_steps"] == 24 - 3 and fast["warmup_seconds"] > 0
    assert fast["warmup_seconds"] / 3 > (fast["train_seconds"] - fast["warmup_seconds"]) / 21  # compile is slow
    reference, saved = (load_file(runs[n] / "model/model.safetensors") for n in ("plain", "fast"))
    assert saved.keys() == reference.keys()
    assert max((saved[k] - reference[k]).abs().max().item() for k in saved) < 1e-3
