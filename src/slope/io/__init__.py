"""Files users keep: the format rules, training checkpoints, exports and loading."""
