"""Evaluation helpers: pass@k estimators, eval.jsonl rows and tables."""
