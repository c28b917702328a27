"""Three extensions of trl's GRPOTrainer, each a subclass factory the grpo stage stacks on trl's class:
`epoch_seeded` (a resumed run draws the prompts of an unbroken one in every epoch), `dynamic_sampling` (DAPO's
filter of groups whose rewards are all equal) and `reference_guidance` (the reference answer stands in for one
sample of a group that never reaches it)."""

from __future__ import annotations

import torch

from pipeline.formats import last_text
from pipeline.rl.core import groups_with_signal, pick_groups

EPOCH_STRIDE = 1_000_003  # epoch e shuffles with seed + e * EPOCH_STRIDE: epoch 0 keeps trl's order


def epoch_seeded(trainer_class):
    """trl's trainer whose prompt sampler shuffles each epoch from (seed, epoch) alone. trl's RepeatSampler draws
    epoch after epoch from one generator, and transformers resumes by calling set_epoch (which it lacks), not by
    replaying the earlier epochs: a run resumed in epoch 2 or later would draw epoch 1's order again, repeating
    prompts and leaving others out."""

    class EpochSeeded(trainer_class):
        def _get_train_sampler(self, dataset=None):
            sampler = super()._get_train_sampler(dataset)
            if getattr(sampler, "shuffle", False):
                sampler.set_epoch = lambda epoch: sampler.generator.manual_seed(sampler.seed + epoch * EPOCH_STRIDE)
            return sampler

    return EpochSeeded


def dynamic_sampling(trainer_class, oversample: int):
    """trl's trainer with DAPO's dynamic sampling (Yu et al. 2025): the dataloader's batches are `oversample` times
    larger (so the prompt order, its epochs and resume stay trl's), and each process keeps 1/oversample of its
    groups, those whose rewards differ first (pipeline.rl.core.pick_groups, as ppo's rollout.oversample). Logs
    signal_share (of every group drawn) and trained_signal_share (of the groups kept)."""

    class DynamicSampling(trainer_class):
        def get_train_dataloader(self):
            size = self._train_batch_size
            self._train_batch_size = size * oversample
            try:
                return super().get_train_dataloader()
            finally:
                self._train_batch_size = size

        def _get_train_sampler(self, dataset=None):
            sampler = super()._get_train_sampler(dataset)
            sampler.batch_size *= oversample
            return sampler

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            self._drawn_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            return self._drawn_rewards  # every process's rows, rank 0's first

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if not self.model.training:
                return out
            n, rows, rank = self.num_generations, out["completion_ids"].size(0), self.accelerator.process_index
            weights = self.reward_weights.to(self._drawn_rewards.device)
            scores = torch.nan_to_num((self._drawn_rewards * weights).nansum(1)[rank * rows : (rank + 1) * rows])
            signal = groups_with_signal(scores, n)
            keep = pick_groups(signal, len(signal) // oversample)
            index = torch.tensor([g * n + j for g in keep for j in range(n)], device=out["completion_ids"].device)
            for key, value in list(out.items()):
                if torch.is_tensor(value) and value.dim() and value.size(0) == rows:
                    out[key] = value[index]
            mask = out["completion_mask"] * out["tool_mask"] if "tool_mask" in out else out["completion_mask"]
            out["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()  # trl's token count, kept rows
            counts = [float(signal.sum()), float(len(signal)), float(signal[keep].sum()), float(len(keep))]
            drawn, groups, trained, kept = self.accelerator.gather(torch.tensor(counts, device=mask.device)).view(
                -1, 4).sum(0).tolist()  # fmt: skip
            self._metrics["train"]["signal_share"].append(drawn / groups)
            self._metrics["train"]["trained_signal_share"].append(trained / kept)
            return out

    return DynamicSampling


def reference_guidance(trainer_class, score, answer_ids):
    """trl's trainer with off-policy guidance from the reference answers (LUFFY, Yan et al. 2025): when no sampled
    answer of a group scores as high as the prompt's reference answer does, the reference replaces the group's last
    sample, so the group has signal and the policy is pushed towards an answer it never samples. On-policy GRPO
    cannot learn what the policy does not sample (Yue et al. 2025); these are the groups where it stays stuck.
    `score(prompts, texts, references)` is the weighted reward; `answer_ids(prompt, reference)` the token ids the
    policy would emit for the reference, end-of-turn included. Logs guided_share (of the groups drawn). Needs
    whole groups on each process (the stage checks)."""

    class ReferenceGuidance(trainer_class):
        def _generate_and_score_completions(self, inputs):
            self._references = [row["reference"] for row in inputs]
            return super()._generate_and_score_completions(inputs)

        def _generate(self, prompts):
            out = super()._generate(prompts)
            if not self.model.training:
                return out
            completion_ids, completions, n = out[1], out[3], self.num_generations
            references = self._references
            sampled = score(prompts, [last_text(c) for c in completions], references)
            best = score(prompts[::n], references[::n], references[::n])
            guided = 0
            for group, reachable in enumerate(best):
                if max(sampled[group * n : (group + 1) * n]) < reachable:
                    i, guided = group * n + n - 1, guided + 1
                    completion_ids[i] = answer_ids(prompts[i], references[i])[: self.max_completion_length]
                    text = references[i]
                    chat = isinstance(completions[i], list)
                    completions[i] = [{"role": "assistant", "content": text}] if chat else text
            counts = torch.tensor([float(guided), float(len(best))], device=self.accelerator.device)
            guided, groups = self.accelerator.gather(counts).view(-1, 2).sum(0).tolist()
            self._metrics["train"]["guided_share"].append(guided / groups)
            return out

    return ReferenceGuidance
