"""Rule rewards for the PPO tests (imported by the stage through `reward_function: ppo_rewards:<name>`)."""


def contains_letter_e(prompts: list, responses: list[str]) -> list[float]:
    """+1 when the response contains the letter 'e' (in ~12% of a 512-token BPE vocabulary: a random policy hits
    it in ~40% of 4-token responses, so the signal is dense enough for a test of a few seconds)."""
    return [1.0 if "e" in response else 0.0 for response in responses]


def reference_length(prompts: list, responses: list[str], references: list[str]) -> list[float]:
    """The length of each prompt's reference answer: shows which reference reached which response."""
    return [float(len(reference)) for reference in references]
