"""Evaluation: retrieval metrics as pure functions (retrieval.py), zero-shot classification
(zeroshot.py), the evaluator the loop and the command share (evaluator.py), and `acc-clip eval`
(command.py)."""
