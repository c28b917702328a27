"""Rule rewards for the PPO tests (imported by the stage through `reward_function: ppo_rewards:<name>`)."""


def contains_letter_e(prompts: list, responses: list[str]) -> list[float]:
    """+1 when the response contains the letter 'e' (in ~12% of a 512-token BPE vocabulary: a random policy hits
    it in ~40% of 4-token responses, so the signal is dense enough for a test of a few seconds)."""
    return [1.0 if "e" in response else 0.0 for response in responses]


def reference_length(prompts: list, responses: list[str], references: list[str]) -> list[float]:
    """The length of each prompt's reference answer: shows which reference reached which response."""
    return [float(len(reference)) for reference in references]


def letter_e_about_animals(prompts: list, responses: list[str]) -> list[float]:
    """contains_letter_e on prompts about the cat, the dog, the heron or the fox; 0 on the others: half the
    prompts can never teach anything, as the hard questions of a verifiable-reward task."""
    animals = ("the cat", "the dog", "a heron", "the fox")
    return [1.0 if "e" in response and any(a in str(prompt) for a in animals) else 0.0
            for prompt, response in zip(prompts, responses, strict=True)]  # fmt: skip
