"""Measuring models: perplexity and KL divergence (ppl.py), lm-evaluation-harness tasks
(harness.py, tasks.py), a local LLM judge (judge.py), and the kept results (results.py).

Every measurement runs on what is served: the GGUF file through the C runtime, a Hugging Face
folder, or an adapter on its base, opened by `homellm.load`.
"""
