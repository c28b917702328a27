"""Reinforcement learning from rewards, the parts a command assembles: core.py (tensor arithmetic of PPO: KL, GAE,
losses), policy.py (scoring passes of the policy and the critic) and grpo.py (extensions of trl's GRPOTrainer)."""
