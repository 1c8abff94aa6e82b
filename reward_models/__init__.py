"""The reward side of rlft: training reward models on preference pairs, building preference data, scoring."""
