"""Instruction and text data: rendering, TFDS builders, the Grain loader."""
