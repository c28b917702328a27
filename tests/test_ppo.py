"""The PPO stage: its arithmetic row by row against ../shared/RLHF_NOTES.md (cheap tensor tests), the policy ==
reference sanity test, and the stage through its real entry point on a tiny Llama with a rule reward (learning,
resume, two processes, bad input)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, save_tiny_model, write_jsonl
from test_distributed import launch

from pipeline.rl import core as ppo_core  # the PPO arithmetic
from pipeline.rl.core import position_ids_from_mask

PPO_YAML = str(REPO / "configs/tiny/ppo.yaml")
TESTS = Path(__file__).resolve().parent


# --- arithmetic (RLHF_NOTES rows) ------------------------------------------------------------------------------


def test_truncation_keeps_the_first_stop_token_and_pads_after_it():  # A2, A3
    eos, pad = 1, 2
    responses = torch.tensor([[5, eos, 7, 8], [5, 6, 7, 8], [eos, 9, 9, 9]])
    kept, mask, has_stop, last = ppo_core.truncate_after_stop(responses, [eos, 6], pad)
    assert kept.tolist() == [[5, eos, pad, pad], [5, 6, pad, pad], [eos, pad, pad, pad]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert has_stop.tolist() == [True, True, True] and last.tolist() == [1, 1, 0]
    kept, mask, has_stop, last = ppo_core.truncate_after_stop(torch.tensor([[5, 7, 8]]), [eos], pad)
    assert mask.tolist() == [[1, 1, 1]] and not has_stop[0] and last.tolist() == [2]


def test_missing_stop_penalty_changes_only_that_score():  # A4
    scores, has_stop = torch.tensor([0.5, 0.2, -0.1]), torch.tensor([True, False, True])
    assert ppo_core.penalise_missing_stop(scores, has_stop, 1.0).tolist() == pytest.approx([0.5, -0.8, -0.1])
    assert torch.equal(ppo_core.penalise_missing_stop(scores, has_stop, None), scores)


def test_leave_one_out_baseline_removes_each_prompts_mean():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two prompts, four samples each
    centred = ppo_core.leave_one_out(scores, 4)
    assert centred[0].item() == pytest.approx(1 - (2 + 3 + 6) / 3)
    assert centred[:4].sum().item() == pytest.approx(0) and centred[4:].tolist() == [0, 0, 0, 0]
    assert centred.tolist() == pytest.approx(
        (4 / 3 * (scores.view(2, 4) - scores.view(2, 4).mean(1, True))).view(-1).tolist()
    )


def test_dynamic_sampling_picks_groups_with_signal_first_in_draw_order():
    scores = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1])
    signal = ppo_core.groups_with_signal(scores, 4)
    assert signal.tolist() == [False, True, False, True]
    assert ppo_core.pick_groups(signal, 2) == [1, 3]
    assert ppo_core.pick_groups(signal, 3) == [0, 1, 3]  # topped up with the first group without signal
    assert ppo_core.pick_groups(signal, 4) == [0, 1, 2, 3]


def test_kl_estimators():  # B2
    logprobs = torch.tensor([-1.0, -2.0])
    assert torch.equal(ppo_core.kl_estimate(logprobs, logprobs, "k1"), torch.zeros(2))
    assert torch.equal(ppo_core.kl_estimate(logprobs, logprobs, "k3"), torch.zeros(2))
    delta = 0.1  # log pi - log pi_ref
    k3 = ppo_core.kl_estimate(torch.tensor([delta]), torch.tensor([0.0]), "k3").item()
    assert math.isclose(k3, (math.exp(-delta) - 1) + delta, rel_tol=1e-6) and k3 > 0
    assert ppo_core.kl_estimate(torch.tensor([-delta]), torch.tensor([0.0]), "k1").item() < 0


def test_score_lands_on_the_last_real_token_and_kl_on_every_token():  # B3, B4
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    kl = torch.full((2, 4), 0.5) * mask
    rewards = ppo_core.token_rewards(torch.tensor([2.0, 3.0]), kl, 0.1, torch.tensor([2, 1]), mask)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.05, 1.95, 0], [-0.05, 2.95, 0, 0]]))
    # score 0, gamma = lambda = 1, V = 0: the return is minus beta times the KL still to come
    rewards = ppo_core.token_rewards(torch.zeros(2), kl, 0.1, torch.tensor([2, 1]), mask)
    _, returns = ppo_core.gae(rewards, torch.zeros(2, 4), mask, 1.0, 1.0)
    assert torch.allclose(returns[0, :3], torch.tensor([-0.15, -0.10, -0.05]))


def _gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    advantages, next_advantage = [], 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        next_advantage = rewards[t] + gamma * next_value - values[t] + gamma * lam * next_advantage
        advantages.insert(0, next_advantage)
    return advantages


def test_gae_matches_an_unpadded_loop_and_its_limits():  # C1
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).float()
    advantages, returns = ppo_core.gae(rewards * mask, values, mask, 0.9, 0.8)
    for row, n in enumerate([5, 3, 1]):
        expected = _gae_loop(rewards[row, :n].tolist(), values[row, :n].tolist(), 0.9, 0.8)
        assert torch.allclose(advantages[row, :n], torch.tensor(expected), atol=1e-6)
        assert torch.all(advantages[row, n:] == 0) and torch.all(returns[row, n:] == 0)
    assert torch.allclose(returns, (advantages + values) * mask)
    reward_to_go, _ = ppo_core.gae(rewards * mask, torch.zeros(3, 5), mask, 1.0, 1.0)
    assert torch.allclose(reward_to_go[0], (rewards[0].flip(0).cumsum(0)).flip(0), atol=1e-6)
    one_step, _ = ppo_core.gae(rewards * mask, values, mask, 1.0, 0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(3, 1)], 1)
    assert torch.allclose(one_step, (rewards + next_values - values) * mask, atol=1e-6)


def test_whitening_is_masked_and_ignores_extra_padding():  # C2, B5
    torch.manual_seed(0)
    values, mask = torch.randn(4, 6) * 3 + 2, (torch.rand(4, 6) > 0.3).float()
    whitened = ppo_core.masked_whiten(values, mask)
    assert abs(ppo_core.masked_mean(whitened, mask).item()) < 1e-5
    assert abs(ppo_core.masked_var(whitened, mask).item() - 1) < 1e-4 and torch.all(whitened[mask == 0] == 0)
    padded = ppo_core.masked_whiten(torch.cat([values, torch.randn(4, 3)], 1), torch.cat([mask, torch.zeros(4, 3)], 1))
    assert torch.allclose(padded[:, :6], whitened, atol=1e-6)
    kept_mean = ppo_core.masked_whiten(values, mask, shift_mean=False)
    assert torch.allclose(ppo_core.masked_mean(kept_mean, mask), ppo_core.masked_mean(values, mask), atol=1e-5)


def test_clipped_losses():  # C3, C4, C5
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    loss, stats = ppo_core.policy_loss(old.clone(), old, torch.tensor([[1.0, -2.0, 0.5]]), mask, 0.2)
    assert stats["ratio"] == 1 and stats["clipfrac"] == 0 and stats["approx_kl"] == 0
    assert torch.isclose(loss, torch.tensor(-(1.0 - 2.0 + 0.5) / 3))  # ratio 1: minus the mean advantage
    # A > 0 and ratio > 1 + eps: clipped, so no gradient
    logprobs = torch.full((1, 3), 0.5, requires_grad=True)
    loss, stats = ppo_core.policy_loss(logprobs, old, torch.ones(1, 3), mask, 0.2)
    loss.backward()
    assert torch.all(logprobs.grad == 0) and stats["clipfrac"] == 1
    returns, values = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 2.5, 3.0]])
    loss, stats = ppo_core.value_loss(values, values, returns, mask, 0.2)
    assert torch.isclose(loss, 0.5 * ((values - returns) ** 2).mean()) and stats["vf_clipfrac"] == 0


def test_entropy_of_uniform_logits_is_log_vocab():  # C5
    assert torch.allclose(ppo_core.entropy_from_logits(torch.zeros(2, 3, 50)), torch.full((2, 3), math.log(50)))


def test_adaptive_kl_controller():  # C8
    controller = ppo_core.KLController(0.1, target=6.0, horizon=10000)
    controller.update(6.0, 64)
    assert controller.coef == 0.1
    controller.update(60.0, 64)
    assert math.isclose(controller.coef, 0.1 * (1 + 0.2 * 64 / 10000))
    fixed = ppo_core.KLController(0.1, target=None, horizon=10000)
    fixed.update(60.0, 64)
    assert fixed.coef == 0.1


# --- forward passes on a tiny GPT-2 (absolute positions show padding bugs that RoPE hides) -----------------------


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_positions=64, pad_token_id=2, eos_token_id=1)
    return GPT2LMHeadModel(config).eval()


def test_left_padded_logprobs_equal_unpadded_and_align_with_the_next_token():  # A1, A7
    from pipeline.rl.policy import policy_forward

    model = _gpt2()
    prompt, response = [5, 6, 7], [8, 9, 10, 11]
    ids = torch.tensor([[2, 2, *prompt, *response]])
    batch = {"ids": ids, "attention_mask": (ids != 2).long(), "context_length": 5}
    with torch.no_grad():
        padded = ppo_core.token_logprobs(policy_forward(model, batch, [0], 0.7), ids[:, 5:])
        plain_ids = torch.tensor([prompt + response])
        plain = {"ids": plain_ids, "attention_mask": torch.ones_like(plain_ids), "context_length": 3}
        unpadded = ppo_core.token_logprobs(policy_forward(model, plain, [0], 0.7), plain_ids[:, 3:])
        assert torch.allclose(padded, unpadded, atol=1e-5)
        for t, token in enumerate(response):  # one token at a time, as generation sees it
            logits = model(torch.tensor([prompt + response[:t]])).logits[0, -1] / 0.7
            assert torch.isclose(torch.log_softmax(logits, -1)[token], unpadded[0, t], atol=1e-5)
    assert position_ids_from_mask(torch.tensor([[0, 0, 1, 1]])).tolist() == [[1, 1, 0, 1]]


def test_policy_equal_to_reference_gives_zero_kl_and_ratio_one():  # C10
    """Rollout with generate, then the scoring pass and a training-mode pass: KL 0, ratio 1, nothing clipped."""
    from pipeline.generation import rollout
    from pipeline.rl.policy import disable_dropout, policy_forward

    policy, reference = _gpt2(), _gpt2()
    disable_dropout(policy)
    torch.manual_seed(1)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
    batch = rollout(policy, _Tok(), prompts, max_new_tokens=8, temperature=0.7)
    mask = batch["mask"].float()
    with torch.no_grad():
        old = ppo_core.token_logprobs(policy_forward(policy, batch, slice(None), 0.7), batch["responses"])
        ref = ppo_core.token_logprobs(policy_forward(reference, batch, slice(None), 0.7), batch["responses"])
    for estimator in ("k1", "k3"):
        assert torch.all(ppo_core.kl_estimate(old, ref, estimator) * mask == 0)
    policy.train()
    new = ppo_core.token_logprobs(policy_forward(policy, batch, slice(None), 0.7), batch["responses"])
    _, stats = ppo_core.policy_loss(new, old, torch.randn_like(new), mask, 0.2)
    assert torch.isclose(stats["ratio"], torch.tensor(1.0), atol=1e-5)
    assert stats["approx_kl"] < 1e-10 and stats["clipfrac"] == 0


def test_lm_head_on_the_response_positions_only_gives_the_same_logits():
    """With `logits_to_keep` (any transformers causal LM, under PEFT too) the response logits equal those of the
    full forward pass; a model without it falls back to the full pass."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.rl.policy import keeps_logits, policy_forward

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, pad_token_id=2, eos_token_id=1)  # fmt: skip
    llama = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[2, 2, 5, 6, 7, 8, 9, 1], [3, 4, 5, 6, 7, 10, 1, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]])
    batch = {"ids": ids, "attention_mask": mask, "context_length": 5}
    lora = get_peft_model(llama, LoraConfig(r=4, target_modules="all-linear"))
    assert keeps_logits(llama) and keeps_logits(lora)
    with torch.no_grad():
        full = llama(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        expected = ppo_core.response_logits(full, 5, 0.7)
        assert torch.allclose(policy_forward(llama, batch, slice(None), 0.7), expected, atol=1e-5)
        assert torch.allclose(policy_forward(lora, batch, slice(None), 0.7), expected, atol=1e-5)

    class NoKeep(torch.nn.Module):  # a remote-code model whose forward has no logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = llama

        def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    assert not keeps_logits(NoKeep())
    with torch.no_grad():
        assert torch.allclose(policy_forward(NoKeep(), batch, slice(None), 0.7), expected, atol=1e-5)


def test_kl_placement_and_estimator_go_together():  # issue 19, item 4
    """k3 in the loss pulls the policy toward the reference; k3 as a reward and k1 in the loss are refused."""
    from pipeline.rl.ppo import KLSection

    assert KLSection().check() == [] and KLSection(placement="loss", estimator="k3").check() == []
    [in_reward] = KLSection(placement="reward", estimator="k3").check()
    assert "k3 does not have the KL's gradient" in in_reward and "use estimator k1" in in_reward
    [in_loss] = KLSection(placement="loss", estimator="k1").check()
    assert "expected gradient is zero" in in_loss
    assert "expected reward or loss" in KLSection(placement="advantage").check()[0]

    torch.manual_seed(0)
    reference = torch.log_softmax(torch.randn(16), -1)
    logits = torch.randn(16, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)

    def kl() -> float:
        policy = torch.log_softmax(logits.detach(), -1)
        return float((policy.exp() * (policy - reference)).sum())

    start = kl()
    for _ in range(50):  # on-policy samples, the k3 estimate as a loss (GRPO's form)
        logprobs = torch.log_softmax(logits, -1)
        tokens = torch.multinomial(logprobs.exp().detach(), 64, replacement=True)
        loss = ppo_core.kl_estimate(logprobs[tokens], reference[tokens], "k3").mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert kl() < 0.2 * start, (start, kl())


def _one_update(tmp_path, micro: int, on_policy: bool = False, kl_coef: float = 0.0):
    """One optimizer step (SGD, lr 1) of a seeded 2-layer Llama on 4 responses of 1 to 6 tokens with fixed
    advantages: (weights after, the scored dict). on_policy: no rollout log-probs given (ppo_update takes its own)."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.rl.ppo import Models, PPOTrainConfig, ppo_update

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, pad_token_id=2, eos_token_id=1)  # fmt: skip
    lengths = [1, 2, 5, 6]
    responses = torch.tensor([[9 + i] * n + [2] * (6 - n) for i, n in enumerate(lengths)])
    mask = (responses != 2).long()
    prompt = torch.tensor([[5, 6, 7]] * 4)
    batch = {"ids": torch.cat([prompt, responses], 1), "attention_mask": torch.cat([torch.ones_like(prompt), mask], 1),
             "context_length": 3, "responses": responses}  # fmt: skip
    advantages = torch.tensor([[1.0] * 6, [-2.0] * 6, [0.5] * 6, [-0.25] * 6]) * mask
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    models = Models(accelerator, model, None, "none")
    with torch.no_grad():
        old = ppo_core.token_logprobs(models.forward(batch, slice(None), 1.0, unwrapped=True)[0], responses)
    reference = old - 0.1 * torch.arange(6.0)  # some KL to pull against
    scored = {"mask": mask.float(), "old_logprobs": None if on_policy else old, "advantages": advantages,
              "ref_logprobs": reference, "kl": torch.zeros(4, 6)}  # fmt: skip
    train = PPOTrainConfig(ppo_epochs=1, num_minibatches=1, micro_batch_size=micro, grad_clip=0)
    ppo_update(models, optimizer, batch, scored, 1.0, train, 0, tmp_path, kl_coef)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), scored, old


def test_the_update_does_not_depend_on_how_the_minibatch_is_split(tmp_path):  # issue 19, item 5
    """Responses of 1 to 6 tokens: one optimizer step over the same minibatch gives the same weights with
    micro-batches of 1, 2 or 4 (losses are summed over tokens and divided by the minibatch's token count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, pad_token_id=2, eos_token_id=1)  # fmt: skip
    start = torch.cat([p.flatten() for p in (torch.manual_seed(0), LlamaForCausalLM(config))[1].parameters()])
    whole = _one_update(tmp_path, 4)[0]
    assert not torch.allclose(whole, start)
    for micro in (1, 2):
        assert torch.allclose(_one_update(tmp_path, micro)[0], whole, atol=1e-6), micro


def test_on_policy_update_without_the_scoring_pass_is_the_same_update(tmp_path):
    """One optimizer step per rollout and no critic: ppo_update takes the rollout's log-probs from its own pass
    (the scoring pass skips the policy) and gives the same weights, KL term included, and the rollout's KL."""
    for kl_coef in (0.0, 0.5):
        given, _, _ = _one_update(tmp_path, 2, kl_coef=kl_coef)
        own, scored, old = _one_update(tmp_path, 2, on_policy=True, kl_coef=kl_coef)
        assert torch.allclose(own, given, atol=1e-6), kl_coef
    expected = ppo_core.kl_estimate(old, scored["ref_logprobs"], "k3") * scored["mask"]
    assert torch.allclose(scored["kl"], expected, atol=1e-6) and scored["kl"].sum() > 0


class _Tok:  # what rollout() reads from a tokenizer; pad 2, eos 1 as in _gpt2(), or pad == eos
    eos_token_id, bos_token_id = 1, 0

    def __init__(self, pad: int = 2):
        self.pad_token_id = pad

    def convert_tokens_to_ids(self, token):
        return None

    def get_vocab(self):
        return {}


def test_rollout_samples_only_what_it_is_told():  # A5, A6
    """A model whose generation_config suppresses the greedy token and sets top_k 1, repetition_penalty and
    min_new_tokens: none of it may reach rollout(), or log-probs and KL would describe another distribution."""
    from pipeline.generation import rollout

    model, prompt = _gpt2(), [5, 6, 7]
    expected = list(prompt)  # greedy by hand: argmax of the logits, stop at EOS
    with torch.no_grad():
        for _ in range(6):
            expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
            if expected[-1] == 1:
                break
    config = model.generation_config
    config.suppress_tokens, config.top_k, config.repetition_penalty = [expected[3]], 1, 50.0
    config.min_new_tokens, config.no_repeat_ngram_size = 6, 1
    greedy = rollout(model, _Tok(), [prompt], max_new_tokens=6, greedy=True)
    assert greedy["responses"][0][greedy["mask"][0].bool()].tolist() == expected[3:]
    torch.manual_seed(0)
    sampled = rollout(model, _Tok(), [prompt] * 32, max_new_tokens=6, temperature=1.0)
    assert len({tuple(r) for r in sampled["responses"].tolist()}) > 8, "top_k 1 of the model's config leaked in"
    assert model.generation_config.top_k == 1, "the model's own generation_config is restored"


def test_rows_taken_from_a_rollout_keep_their_tokens_and_log_probs():
    """Dynamic sampling trains on some rows of a draw: take_rows trims the padding no kept row needs, and each
    kept row's response log-probs equal those it had in the whole batch."""
    from pipeline.generation import rollout, take_rows
    from pipeline.rl.policy import policy_forward

    model = _gpt2()
    torch.manual_seed(0)
    batch = rollout(model, _Tok(), [[5, 6, 7, 8, 9, 10], [5, 6], [7, 8, 9], [11]], max_new_tokens=5)
    kept = take_rows(batch, [1, 3])
    assert batch["context_length"] == 6 and kept["context_length"] == 2, kept["ids"]
    assert kept["responses"].tolist() == batch["responses"][[1, 3]].tolist()
    with torch.no_grad():
        whole = ppo_core.token_logprobs(policy_forward(model, batch, [1, 3], 0.7), batch["responses"][[1, 3]])
        alone = ppo_core.token_logprobs(policy_forward(model, kept, [0, 1], 0.7), kept["responses"])
    assert torch.allclose(whole * kept["mask"], alone * kept["mask"], atol=1e-5)
    assert take_rows(batch, [0, 2])["ids"].tolist() == batch["ids"][[0, 2]].tolist()  # the longest prompt: no trim


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_samples_of_one_prompt_share_its_encoding_and_sample_the_same(family, monkeypatch):
    """rollout(group=n) encodes each prompt once for its n samples and repeats the KV cache: with left padding
    (prompts of 1 to 6 tokens), greedy answers and seeded samples are those of the plain batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import generation
    from pipeline.generation import rollout

    encoded = []
    plain = generation.prompt_cache
    counted = lambda model, p, m, g: encoded.append(len(p)) or plain(model, p, m, g)  # noqa: E731
    monkeypatch.setattr(generation, "prompt_cache", counted)
    if family == "gpt2":
        model = _gpt2()
    else:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, pad_token_id=2, eos_token_id=1)  # fmt: skip
        model = LlamaForCausalLM(config).eval()
    prompts = [p for p in ([5, 6, 7, 8, 9, 10], [5], [7, 8, 9]) for _ in range(4)]
    for greedy in (True, False):
        runs = []
        for group in (1, 4):
            torch.manual_seed(3)
            runs.append(rollout(model, _Tok(), prompts, max_new_tokens=6, temperature=1.0, greedy=greedy, group=group))
        assert runs[0]["responses"].tolist() == runs[1]["responses"].tolist(), (family, greedy)
        assert runs[0]["mask"].tolist() == runs[1]["mask"].tolist()
    assert len({tuple(r) for r in runs[1]["responses"][:4].tolist()}) > 1, "the samples of one prompt differ"
    assert encoded == [12, 12], "group=4: the prompt cache was built (once per call, 3 prompts repeated in it)"


def test_pad_equal_to_eos_keeps_the_stop_token_in_the_mask():  # A2
    """With pad == EOS (Llama 3, SmolLM): the first EOS is kept and trained on, the padding after it is not."""
    kept, mask, has_stop, last = ppo_core.truncate_after_stop(torch.tensor([[5, 1, 1, 1], [5, 6, 7, 8]]), [1], 1)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and has_stop.tolist() == [True, False]
    assert last.tolist() == [1, 3] and kept.tolist() == [[5, 1, 1, 1], [5, 6, 7, 8]]
    from pipeline.generation import rollout

    torch.manual_seed(0)
    batch = rollout(_gpt2(), _Tok(pad=1), [[5, 6, 7], [9]], max_new_tokens=6, temperature=1.0)
    assert batch["attention_mask"][1, :2].tolist() == [0, 0], "left padding is masked by position"
    assert batch["generated_tokens"] == int(batch["mask"].sum())


def test_critic_from_the_reward_model_starts_at_its_score():  # C9
    """The critic is a copy of the reward model read at every token: at the last token it gives the RM's score."""
    import copy

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.rl.policy import make_critic

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_labels=1, pad_token_id=2)  # fmt: skip
    reward_model = LlamaForSequenceClassification(config).eval()
    critic = make_critic(copy.deepcopy(reward_model))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values = critic(ids, mask, position_ids_from_mask(mask))
        assert torch.allclose(values[0, -1], reward_model(ids, attention_mask=mask).logits[0, 0], atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(critic.inner.state_dict().values(),
                                                 reward_model.state_dict().values(), strict=True))  # fmt: skip


# --- the stage through its entry point ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, trained_tokenizer) -> Path:
    """A random 2-layer Llama (hidden 32) with our chat tokenizer."""
    from transformers import LlamaConfig

    return save_tiny_model(
        tmp_path_factory.mktemp("ppo_policy") / "model", trained_tokenizer, LlamaConfig, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    topics = ["the cat", "the dog", "the town", "the river", "a heron", "the fox", "Mossbay", "Zarel"]
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about {t} ({i})."}]} for i in range(24) for t in topics]
    return write_jsonl(tmp_path_factory.mktemp("ppo_data") / "prompts.jsonl", rows)


def ppo_args(out: Path, policy: Path, data: Path, *extra: str) -> list[str]:
    """32 prompts x 4 new tokens per step (~0.3 s a step), rule reward, critic on the policy's body."""
    return [
        "ppo", "--config", PPO_YAML, f"output_dir={out}", f"init_from={policy}", "reward_model=null",
        "reward_function=ppo_rewards:contains_letter_e", "value_model=policy", f"data.path={data}", "eval_data=null",
        "rollout.max_new_tokens=4", "rollout.temperature=0.7", "rollout.missing_eos_penalty=null",
        "train.rollout_batch_size=32",
        "train.micro_batch_size=16", "train.num_minibatches=2", "train.ppo_epochs=4", "train.policy_lr=1e-2",
        "train.value_lr=3e-3", "kl.coef=0.05", "kl.max=10", "sample_every=5", *extra,
    ]  # fmt: skip


@pytest.fixture
def rule_reward_path(monkeypatch):
    """The stage imports the rule reward from tests/; one thread each, as a second busy process costs 2-thread
    torch 10-50x here (STACK.md)."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rule_reward_rises_while_kl_stays_bounded(tmp_path, tiny_policy, prompts, rule_reward_path):
    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(out, tiny_policy, prompts, "train.steps=20", "checkpoint_every=20"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    rows = history(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[0]["kl"] == 0 and abs(rows[0]["ratio"] - 1) < 0.05, rows[0]  # policy == reference at step 1
    # measured: 0.46 -> 0.84 (first and last 4 steps), KL at most ~4.1 nats per sequence
    assert metrics["reward_end"] > metrics["reward_start"] + 0.25, (metrics["reward_start"], metrics["reward_end"])
    assert max(r["kl"] for r in rows) < 10
    logged = ("entropy", "clipfrac", "approx_kl", "vf_loss", "explained_variance", "response_length", "no_eos_share",
              "rollout_seconds", "update_seconds", "rollout_tokens_per_second", "reward_with_kl")  # fmt: skip
    assert set(logged) <= rows[-1].keys(), set(logged) - rows[-1].keys()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 6, 11, 16, 20} and {"prompt", "response", "score"} <= samples[0].keys()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


def test_resume_continues_the_same_run(tmp_path, tiny_policy, prompts, rule_reward_path):
    """Stopped after step 4 (checkpoint) and rerun with steps=6: steps 5-6 equal those of an unbroken run."""
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    short = ["checkpoint_every=2", "train.ppo_epochs=1", "train.rollout_batch_size=16", "train.micro_batch_size=8"]
    assert run_cli(*ppo_args(unbroken, tiny_policy, prompts, *short, "train.steps=6")).returncode == 0
    first = run_cli(*ppo_args(resumed, tiny_policy, prompts, *short, "train.steps=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*ppo_args(resumed, tiny_policy, prompts, *short, "train.steps=6"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step_0000004" in second.stderr
    a, b = history(unbroken), history(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    seen = [i for r in b for i in r["prompt_indices"]]
    assert len(seen) == len(set(seen)) == 96, "a resumed run must not repeat prompts within the epoch"
    for x, y in zip(a, b, strict=True):
        assert x["prompt_indices"] == y["prompt_indices"]
        assert math.isclose(x["reward"], y["reward"], abs_tol=1e-6) and math.isclose(x["kl"], y["kl"], abs_tol=1e-6)
    assert json.loads((resumed / "manifest.json").read_text())["metrics"]["resumed_from_step"] == 4


def test_resume_refuses_another_config_and_never_starts_clean(tmp_path, tiny_policy, prompts, rule_reward_path):
    """auto-resume of checkpoints another config wrote is refused before compute; resume=never over an older,
    longer run leaves none of its checkpoints behind for a later auto-resume to pick up."""
    out = tmp_path / "ppo"
    short = ["checkpoint_every=2", "train.ppo_epochs=1", "train.rollout_batch_size=16", "train.micro_batch_size=8"]
    assert run_cli(*ppo_args(out, tiny_policy, prompts, *short, "train.steps=4")).returncode == 0
    other = run_cli(*ppo_args(out, tiny_policy, prompts, *short, "train.steps=6", "train.policy_lr=5e-3"))
    assert other.returncode == 2 and "holds checkpoints of a run with another config" in other.stderr, other.stderr
    assert "policy_lr" in other.stderr and (out / "manifest.json").is_file()  # the finished run is untouched
    fresh = run_cli(*ppo_args(out, tiny_policy, prompts, *short, "train.steps=2", "resume=never"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert [r["step"] for r in history(out)] == [1, 2]


def test_two_cpu_processes(tmp_path, tiny_policy, prompts, rule_reward_path):
    """Two processes sample different prompts and stay equal; both answer their half of the held-out questions
    (issue 19, item 6: rank 0 used to evaluate alone while rank 1 waited at a collective), with the numbers of
    one process."""
    questions = write_jsonl(tmp_path / "heldout.jsonl", [{"question": f"Tell me about the owl ({i}).", "answer": "e"}
                                                         for i in range(7)])  # fmt: skip
    out, alone = tmp_path / "two", tmp_path / "one"
    args = ("train.steps=2", "train.ppo_epochs=1", f"eval_data.path={questions}", "eval_max_new_tokens=4")
    result = launch("cpu_2proc.yaml", ppo_args(out, tiny_policy, prompts, *args))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("done:") == 1, "only rank 0 reports"
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["heldout_before"]["processes"] == 2 and metrics["heldout_after"]["processes"] == 2
    assert run_cli(*ppo_args(alone, tiny_policy, prompts, *args, "train.steps=1")).returncode == 0
    single = json.loads((alone / "manifest.json").read_text())["metrics"]["heldout_before"]
    assert {**single, "processes": 2} == metrics["heldout_before"], (single, metrics["heldout_before"])
    assert metrics["world_size"] == 2 and metrics["distributed_type"] == "MULTI_CPU"
    first = metrics["first_step_prompts_by_rank"]
    assert len(first) == 32 and not set(first[:16]) & set(first[16:]), "ranks must sample different prompts"
    assert metrics["param_checksum_by_rank"][0] == metrics["param_checksum_by_rank"][1]


@pytest.mark.slow  # ~50 s: two processes start and load torch
def test_two_processes_with_ptx_and_dynamic_sampling(tmp_path, tiny_policy, prompts, rule_reward_path):
    """The ptx pass through a DDP-wrapped policy with a value head, and each process keeping its own groups with
    signal: the two processes end with equal weights."""
    text = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"The cat {i} sat on the mat."} for i in range(40)])
    out = tmp_path / "two"
    args = ("train.steps=2", "train.ppo_epochs=1", "value_model=head", "ptx.coef=1.0", f"ptx.data.path={text}",
            "ptx.block_size=16", "ptx.batch_size=2", "rollout.samples_per_prompt=4", "rollout.oversample=2",
            "train.score_baseline=loo", "reward_function=ppo_rewards:letter_e_about_animals")  # fmt: skip
    result = launch("cpu_2proc.yaml", ppo_args(out, tiny_policy, prompts, *args))
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and metrics["param_checksum_by_rank"][0] == metrics["param_checksum_by_rank"][1]
    assert all(math.isfinite(r["ptx_loss"]) and "trained_signal_share" in r for r in history(out))


DEEPSPEED_CASES = {  # (launch config, LoRA): ZeRO-3 with full weights and with LoRA, ZeRO-2 with full weights
    "zero3": ("cpu_2proc_zero3.yaml", False),
    "zero3_lora": ("cpu_2proc_zero3.yaml", True),
    "zero2": ("cpu_2proc_zero2.yaml", False),
}


@pytest.mark.slow  # ~2 min: two launches
@pytest.mark.parametrize("case", list(DEEPSPEED_CASES))
def test_deepspeed_trains_like_ddp(case, tmp_path, tiny_policy, prompts, rule_reward_path):  # issue 19, item 1
    """The default critic (a separate model) under DeepSpeed: DeepSpeed refuses two models under one Accelerator,
    so the policy and its critic are one module, one engine. The same two-process layout under plain DDP samples
    the same prompts and answers from the same seeds: the DeepSpeed run must score the same first step, evaluate
    on both ranks with the same numbers, save whole weights that reload, and end near the DDP weights (gradient
    clipping off: DeepSpeed clips policy and critic together, DDP each apart). Measured: at most 6e-7 apart."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    launch_config, lora = DEEPSPEED_CASES[case]
    questions = write_jsonl(tmp_path / "heldout.jsonl", [{"question": f"Tell me about the owl ({i}).", "answer": "e"}
                                                         for i in range(6)])  # fmt: skip
    args = ["train.steps=2", "train.ppo_epochs=2", "train.grad_clip=0", "checkpoint_every=1", f"lora.enabled={lora}",
            "lora.dropout=0", f"eval_data.path={questions}", "eval_max_new_tokens=4"]  # fmt: skip
    runs = {}
    for name, layout in (("ddp", "cpu_2proc.yaml"), ("deepspeed", launch_config)):
        out = tmp_path / name
        result = launch(layout, ppo_args(out, tiny_policy, prompts, *args), 900)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = (json.loads((out / "manifest.json").read_text())["metrics"], history(out), out)
    (ddp, ddp_rows, ddp_out), (deep, deep_rows, deep_out) = runs["ddp"], runs["deepspeed"]
    assert deep["distributed_type"] == "DEEPSPEED" and deep["zero_stage"] == (3 if "zero3" in case else 2)
    assert deep["first_step_prompts_by_rank"] == ddp["first_step_prompts_by_rank"]
    assert math.isclose(deep_rows[0]["reward"], ddp_rows[0]["reward"], abs_tol=1e-6), "same first samples"
    assert deep["heldout_before"] == ddp["heldout_before"] and deep["heldout_before"]["processes"] == 2
    w_deep, w_ddp = load_file(deep_out / "model/model.safetensors"), load_file(ddp_out / "model/model.safetensors")
    w0 = load_file(tiny_policy / "model.safetensors")
    assert {k: v.shape for k, v in w_deep.items()} == {k: v.shape for k, v in w_ddp.items()}, "saved weights not whole"
    apart = sum(((w_deep[k] - w_ddp[k]) ** 2).sum() for k in w0) ** 0.5
    moved = sum(((w_ddp[k] - w0[k]) ** 2).sum() for k in w0) ** 0.5
    assert moved > 0 and apart / moved < 0.01, f"DeepSpeed weights differ by {apart / moved:.2f} of the update"
    assert sorted(p.name for p in (deep_out / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    AutoModelForCausalLM.from_pretrained(deep_out / "model")


@pytest.mark.parametrize("value_model, lora", [("policy", False), ("head", False), ("none", False), ("head", True),
                                              ("policy", True)])  # fmt: skip
def test_policy_equal_to_reference_gives_zero_kl_under_bf16_autocast(
    tmp_path, tiny_policy, prompts, rule_reward_path, value_model, lora
):  # issue 19, item 3
    """precision bf16 on CPU (Accelerate's autocast, as on a GPU): the reference, the policy with its value head
    and generation all run under the same autocast, so KL is exactly 0 at step 1 in every critic mode."""
    out = tmp_path / "bf16"
    extra = ["precision=bf16", f"value_model={value_model}", f"lora.enabled={str(lora).lower()}", "train.steps=1",
             "train.ppo_epochs=1", "train.num_minibatches=1", "train.micro_batch_size=32"]  # fmt: skip
    result = run_cli(*ppo_args(out, tiny_policy, prompts, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    first = history(out)[0]
    assert first["kl"] == 0 and abs(first["ratio"] - 1) < 1e-6, first
    assert json.loads((out / "manifest.json").read_text())["metrics"]["mixed_precision"] == "bf16"


def test_a_tokenizer_whose_pad_is_eos_trains(tmp_path, tiny_policy, prompts, rule_reward_path):  # A2
    """The policy's tokenizer pads with EOS, as Llama 3 and SmolLM ship: ppo runs, and stopped responses (the EOS
    inside the mask) get their score."""
    import shutil

    from transformers import AutoTokenizer

    policy = shutil.copytree(tiny_policy, tmp_path / "pad_is_eos")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(policy)
    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(out, policy, prompts, "train.steps=3", "train.ppo_epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in history(out)] == [1, 2, 3]
    assert AutoTokenizer.from_pretrained(out / "model").pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "value_model, whiten, kl_placement",
    [("policy", True, "reward"), ("none", True, "reward"), ("none", False, "reward"), ("none", False, "loss")],
)
def test_several_samples_per_prompt_with_the_leave_one_out_baseline(
    tmp_path, tiny_policy, prompts, rule_reward_path, value_model, whiten, kl_placement
):
    """8 prompts x 4 samples a step, each prompt's samples together, with a critic or none (RLOO-style, advantages
    whitened or at RLOO's own scale; GRPO-style with the KL in the loss); the rule reward still rises. The prompt
    file lists every prompt twice, as a preference file does: each is used once."""
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text(prompts.read_text() * 2)
    out = tmp_path / "loo"
    # kl.max=100: unwhitened at lr 1e-2 the toy's KL passes the 10-nat guardrail on some CPUs (seen in CI)
    extra = ["rollout.samples_per_prompt=4", "train.score_baseline=loo", "train.steps=20", "checkpoint_every=20",
             f"value_model={value_model}", f"train.whiten_advantages={str(whiten).lower()}",
             f"kl.placement={kl_placement}", f"kl.estimator={'k3' if kl_placement == 'loss' else 'k1'}",
             "kl.max=100"]  # fmt: skip
    result = run_cli(*ppo_args(out, tiny_policy, doubled, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = history(out)
    for row in rows:
        groups = [row["prompt_indices"][i : i + 4] for i in range(0, 32, 4)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 8, row["prompt_indices"]
    assert ("explained_variance" in rows[-1]) == (value_model != "none"), rows[-1].keys()
    assert ("kl_loss" in rows[-1]) == (kl_placement == "loss") and rows[0]["kl"] == 0, rows[-1].keys()
    if kl_placement == "loss":
        assert rows[-1]["kl_loss"] > 0, rows[-1]  # the policy moved away from the reference, and the loss knows
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["prompts"] == 192 and max(i for r in rows for i in r["prompt_indices"]) < 192
    assert metrics["reward_end"] > metrics["reward_start"] + 0.25, (metrics["reward_start"], metrics["reward_end"])


def test_dynamic_sampling_keeps_the_groups_with_signal(tmp_path, tiny_policy, prompts, rule_reward_path):
    """rollout.oversample 3: 24 prompts x 4 samples are drawn a step and the 8 prompts whose samples disagree are
    trained on. Half the prompts (not about an animal) always score 0: about a third of the drawn groups have
    signal, the trained ones hold all of those, and the prompts trained on are the animal ones. Without samples
    to compare, oversample is refused before any compute."""
    out = tmp_path / "dapo"
    extra = ["reward_function=ppo_rewards:letter_e_about_animals", "rollout.samples_per_prompt=4",
             "rollout.oversample=3", "train.score_baseline=loo", "value_model=none", "train.steps=8",
             "checkpoint_every=8"]  # fmt: skip
    result = run_cli(*ppo_args(out, tiny_policy, prompts, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = history(out)
    for r in rows:  # of 24 groups drawn, the trained 8 hold every one with signal (up to 8)
        assert r["trained_signal_share"] == pytest.approx(min(8, round(24 * r["signal_share"])) / 8), r
    drawn = sum(r["signal_share"] for r in rows) / len(rows)
    trained = sum(r["trained_signal_share"] for r in rows) / len(rows)
    assert 0.2 < drawn < 0.6 and trained > drawn + 0.3, (drawn, trained)  # measured 0.35 and 0.84
    animals = {0, 1, 4, 5}  # topic = prompt index % 8; only animal prompts can have signal
    for r in rows:
        trained_animals = sum(i % 8 in animals for i in r["prompt_indices"]) / 4
        assert len(r["prompt_indices"]) == 32 and trained_animals >= 8 * r["trained_signal_share"], r
    assert all(0 <= r["reward"] <= 1 and math.isfinite(r["pg_loss"]) for r in rows), rows[-1]
    refused = run_cli(*ppo_args(tmp_path / "one", tiny_policy, prompts, "rollout.oversample=2"))
    assert refused.returncode == 2 and "rollout.samples_per_prompt >= 2" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize("source", ["text", "chats"])
def test_ptx_adds_a_pretraining_loss_that_the_updates_lower(source, tmp_path, tiny_policy, prompts, rule_reward_path):
    """PPO-ptx: with ptx.coef 1 and a small text (or chats, rendered by the chat template as sft shows them), every
    step logs ptx_loss and the updates lower it while the reward still counts (value head on the policy: the ptx
    pass goes through the same module). coef > 0 without data is refused before any compute, naming the key."""
    guardrail = []
    if source == "text":
        rows = [{"text": f"The cat {i} sat on the mat by the river."} for i in range(40)]
    else:
        reply = {"role": "assistant", "content": "On the mat by the river."}
        rows = [{"messages": [{"role": "user", "content": f"Where did cat {i} sit?"}, reply]} for i in range(40)]
        guardrail = ["kl.max=100"]  # the replies pull this lr-1e-2 policy's answers far from the reference (KL ~10)
    text = write_jsonl(tmp_path / "corpus.jsonl", rows)
    out = tmp_path / "ptx"
    extra = ["ptx.coef=1.0", f"ptx.data.path={text}", "ptx.block_size=16", "ptx.batch_size=4", "value_model=head",
             "train.steps=10", "checkpoint_every=10", *guardrail]  # fmt: skip
    result = run_cli(*ppo_args(out, tiny_policy, prompts, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = history(out)
    assert all(math.isfinite(r["ptx_loss"]) for r in rows) and "ptx loss" in result.stderr
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    # measured: 4.2 -> 0.35 over 10 steps (the text repeats one sentence), while the reward rose 0.34 -> 0.94
    assert metrics["ptx_loss_end"] < metrics["ptx_loss_start"] - 1.0, metrics
    assert "ptx.data" in json.loads((out / "manifest.json").read_text())["inputs"]
    refused = run_cli(*ppo_args(tmp_path / "no", tiny_policy, prompts, "ptx.coef=0.5"))
    assert refused.returncode == 2 and "ptx" in refused.stderr and "needs data" in refused.stderr, refused.stderr


def test_lora_policy_reference_and_value_head_share_one_base(tmp_path, tiny_policy, prompts, rule_reward_path):
    """LoRA + value head on the policy: one frozen base; the reference is it with the adapters off (KL 0 at step 1),
    and the saved model is the merged causal LM without the head."""
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    extra = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.0", "value_model=head", "train.steps=3",
             "train.ppo_epochs=2"]  # fmt: skip
    result = run_cli(*ppo_args(out, tiny_policy, prompts, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = history(out)
    assert rows[0]["kl"] == 0 and abs(rows[0]["ratio"] - 1) < 0.05 and rows[-1]["kl"] != 0, rows
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["lora"] and metrics["value_model"] == "head"
    saved = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in name or "value_head" in name for name in saved)


def test_rule_rewards_get_each_prompts_reference(tmp_path, tiny_policy, rule_reward_path):
    # the final assistant turn of `messages` is the reference a rule scores against, aligned with every sample
    rows = [{"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                          {"role": "assistant", "content": "x" * (1 + i % 5)}]} for i in range(40)]  # fmt: skip
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "refs"
    result = run_cli(*ppo_args(out, tiny_policy, data, "reward_function=ppo_rewards:reference_length", "train.steps=1",
                               "rollout.samples_per_prompt=4", "sample_every=1", "samples_per_log=32"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and len({s["prompt"][0]["content"] for s in samples}) == 8
    for sample in samples:
        index = int(sample["prompt"][0]["content"].split()[-1].rstrip("."))
        assert sample["score"] == 1 + index % 5, sample
    # exact_match needs a reference on every prompt: refused before any compute, naming the file
    prompts_only = write_jsonl(tmp_path / "no_refs.jsonl", [{"prompt": r["messages"][:1]} for r in rows])
    refused = run_cli(*ppo_args(tmp_path / "none", tiny_policy, prompts_only, "reward_function=exact_match"))
    assert refused.returncode == 2 and "no reference answers" in refused.stderr, refused.stderr[-2000:]


def test_a_reward_model_and_a_rule_score_the_prompts_routed_to_each(tmp_path, tiny_policy, rule_reward_path):
    """reward_by_source [sum, model]: the first file's answers get the reward model's score plus the weighted rule
    (its reference length), the second's the reward model's alone, and the second needs no reference."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.rewards import score_pairs

    torch.manual_seed(0)
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_policy, num_labels=1)
    reward_model.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_policy).pad_token_id
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    tokenizer.save_pretrained(tmp_path / "rm")
    rows = [[{"role": "user", "content": f"Spell item {i}."}, {"role": "assistant", "content": "x" * (1 + i % 3)}]
            for i in range(16)]  # fmt: skip
    checked = write_jsonl(tmp_path / "checked.jsonl", [{"messages": turns} for turns in rows])
    open_ended = write_jsonl(tmp_path / "open.jsonl", [{"prompt": [{"role": "user", "content": f"Tell me about {i}."}]}
                                                      for i in range(16)])  # fmt: skip
    out = tmp_path / "routed"
    result = run_cli(*ppo_args(out, tiny_policy, checked, f"data.path=[{checked}, {open_ended}]",
                               f"reward_model={tmp_path / 'rm'}", "reward_function=ppo_rewards:reference_length",
                               "reward_by_source=[sum, model]", "reward_function_weight=2", "value_model=reward",
                               "train.steps=1", "sample_every=1", "samples_per_log=32"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32
    expected = score_pairs(reward_model.eval(), tokenizer, [s["prompt"] for s in samples],
                           [[{"role": "assistant", "content": s["response"]}] for s in samples])  # fmt: skip
    kinds = set()
    for sample, model_score in zip(samples, expected, strict=True):
        words = sample["prompt"][0]["content"].split()
        rule = 2 * (1 + int(words[-1].rstrip(".")) % 3) if words[0] == "Spell" else 0
        kinds.add(words[0])
        assert abs(sample["score"] - (model_score + rule)) < 1e-4, (sample, model_score, rule)
    assert kinds == {"Spell", "Tell"}
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["prompts_by_reward"] == {"model": 16, "sum": 16}
    assert 1 <= metrics["function_score_end"] <= 3  # the unweighted rule's mean over the rows it scored


def test_kl_guardrail_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_policy, prompts, rule_reward_path):
    out = tmp_path / "guard"
    result = run_cli(*ppo_args(out, tiny_policy, prompts, "kl.max=0.01", "checkpoint_every=1", "train.steps=4"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "KL to the reference" in result.stderr and "step_0000001, is intact" in result.stderr, result.stderr[-2000:]
    assert (out / "checkpoints" / "step_0000001" / "trainer_state.json").is_file()
    assert not (out / "manifest.json").exists()


def test_bad_config_and_data_are_refused_before_compute(tmp_path, tiny_policy, prompts):
    out = tmp_path / "bad"
    neither = run_cli(*ppo_args(out, tiny_policy, prompts, "reward_function=null", "kl.estimator=k2"))
    assert neither.returncode == 2 and "set reward_model, reward_function or both" in neither.stderr
    assert "expected k1 or k3" in neither.stderr
    routes = run_cli(*ppo_args(out, tiny_policy, prompts, "reward_model=x", "reward_by_source=[model, rule]"))
    assert routes.returncode == 2
    assert "reward_by_source: 'rule' is not one of model, function, sum" in routes.stderr, routes.stderr[-2000:]
    assert "reward_by_source: 2 value(s) for 1 data.path entries" in routes.stderr
    alone = run_cli(*ppo_args(out, tiny_policy, prompts, "reward_by_source=[function]"))
    assert alone.returncode == 2 and "set both reward_model and reward_function" in alone.stderr
    missing = run_cli(*ppo_args(out, tiny_policy, prompts, "reward_function=nowhere:nothing"))
    assert missing.returncode == 2 and "cannot import 'nowhere:nothing'" in missing.stderr
    loo = run_cli(*ppo_args(out, tiny_policy, prompts, "train.score_baseline=loo"))
    assert loo.returncode == 2 and "needs rollout.samples_per_prompt >= 2" in loo.stderr
    uneven = run_cli(*ppo_args(out, tiny_policy, prompts, "rollout.samples_per_prompt=3", "reward_function=math:fsum"))
    assert uneven.returncode == 2 and "not a multiple of rollout.samples_per_prompt 3" in uneven.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "hi"}])
    no_prompt = run_cli(*ppo_args(out, tiny_policy, bad, "reward_function=math:fsum"))
    assert no_prompt.returncode == 2 and "no `prompt`, `messages`, `question` or `problem`" in no_prompt.stderr
    assert "data.columns, e.g. {prompt: query}" in no_prompt.stderr
    assert not out.exists()


def test_heldout_questions_that_are_training_prompts_are_refused(tmp_path, tiny_policy, prompts, rule_reward_path):
    """An eval_data question asked in training (case and spacing aside) stops the run before any compute."""
    rows = [{"question": "Tell me about the owl (1).", "answer": "e"}, {"question": "tell me about the  cat (3).",
                                                                       "answer": "e"}]  # fmt: skip
    questions = write_jsonl(tmp_path / "heldout.jsonl", rows)
    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(out, tiny_policy, prompts, f"eval_data.path={questions}"))
    assert result.returncode == 2 and "1 of its 2 held-out questions are training prompts" in result.stderr
    assert not (out / "config.yaml").exists()
