"""Local `evaluate` modules rlft loads by path (the hub's are unreachable offline)."""
