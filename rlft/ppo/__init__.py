"""PPO for RLHF: the math in `core`, the loop that calls it alongside."""
