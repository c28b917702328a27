"""The models and batches of a PPO run, built from the ppo stage's config: policy, frozen reference, critic and
reward scorers prepared by Accelerate (or DeepSpeed), and PPO-ptx's packed pretraining blocks."""

from __future__ import annotations

from pipeline.batches import BlockSampler
from pipeline.config import UserError
from pipeline.data import pack_dataset
from pipeline.modeling import load_pretrained, peft_config, resolve_model_path, whole_weights
from pipeline.rewards import reward_scorer
from pipeline.rl.policy import critic_source, disable_dropout, make_critic, with_critic, with_value_head
from pipeline.rl.ppo import Models, PtxSection


def build_models(cfg, tokenizer, policy_path: str, accelerator):
    """A PPO run's models from the ppo stage's config (lora, reward_model, reward_function, value_model,
    trust_remote_code, train; policy_path from init_from): the policy (+ LoRA), frozen reference, scorers and
    critic; the policy and its critic joined as one module (rl.policy.with_critic, with_value_head) and prepared
    with one AdamW of two learning rates. Every model is built whole on each process (modeling.whole_weights: new
    heads and adapters start as one process's do); DeepSpeed then partitions what it prepares, and the frozen
    reference and reward model stay whole copies. Returns (models, optimizer, the reward model's scorer or None
    without one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    train, device = cfg.train, accelerator.device
    torch.manual_seed(train.seed)
    with whole_weights():
        policy = load_pretrained(AutoModelForCausalLM, policy_path, cfg.trust_remote_code, "init_from")
        reference = None
        if cfg.lora.enabled:  # the reference is the same weights with the adapters switched off: one frozen base
            from peft import get_peft_model

            policy = get_peft_model(policy, peft_config(cfg.lora))
        else:
            reference = load_pretrained(AutoModelForCausalLM, policy_path, cfg.trust_remote_code, "init_from")
            disable_dropout(reference)
            reference.to(device).eval().requires_grad_(False)
        disable_dropout(policy)
        scorer = reward_scorer(cfg.reward_model, cfg.trust_remote_code, device) if cfg.reward_model else None
        source = critic_source(cfg.value_model, cfg.reward_model)
        if source == "head":  # one module: DDP must see the trunk once
            policy = with_value_head(policy)
        elif source != "none":
            value_path = {"reward": cfg.reward_model and resolve_model_path(cfg.reward_model), "policy": policy_path}
            value_model = load_pretrained(AutoModelForSequenceClassification,
                                          resolve_model_path(value_path.get(source, source)),
                                          cfg.trust_remote_code, "value_model", num_labels=1)  # fmt: skip
            value_model.config.pad_token_id = tokenizer.pad_token_id
            disable_dropout(value_model)
            policy = with_critic(policy, make_critic(value_model))
    critic = set(map(id, policy.critic_parameters())) if source != "none" else set()
    groups = [[p for p in policy.parameters() if p.requires_grad and id(p) not in critic],
              [p for p in policy.parameters() if id(p) in critic]]  # fmt: skip
    lrs = [{"params": groups[0], "lr": train.policy_lr}, {"params": groups[1], "lr": train.value_lr}]
    optimizer = torch.optim.AdamW([g for g in lrs if g["params"]], weight_decay=0.0, eps=1e-5)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # what DeepSpeed cannot read from a loop without a DataLoader
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
        plugin.deepspeed_config["gradient_clipping"] = train.grad_clip or 0.0
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy.train()  # dropout is off, so train mode changes nothing but what peft/DDP expect
    return Models(accelerator, policy, reference, source), optimizer, scorer


def ptx_batches(ptx: PtxSection, seed: int, docs, tokenizer, world: int, rank: int, device):
    """update index -> this process's `ptx.batch_size` blocks of packed text (the pretrain stage's packing), in a
    seeded order that a resumed run repeats."""
    import hashlib

    import numpy as np
    import torch

    backend = getattr(tokenizer, "backend_tokenizer", None)
    fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else tokenizer.name_or_path
    packed = pack_dataset(docs, tokenizer, ptx.block_size, fingerprint).with_format("numpy")
    if not len(packed):
        raise UserError(f"ptx.data: {ptx.data.path} holds fewer tokens than one block of ptx.block_size "
                        f"{ptx.block_size}")  # fmt: skip
    blocks = np.asarray(packed["input_ids"])
    sampler = BlockSampler(len(blocks), seed, ptx.batch_size, world, 1)
    return lambda update: torch.as_tensor(blocks[sampler.indices(update, 0, rank)], device=device).long()
