"""Evaluation of students by generation: text metrics (ROUGE-L, Self-BLEU)."""
