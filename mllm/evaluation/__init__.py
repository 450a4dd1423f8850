"""Evaluation: perplexity (two conventions), SST-2 prompting, GSM8K (greedy / majority / verifier best-of-N and
an error taxonomy), attention maps, Hugging Face baselines and Llama export, the results runner and the report.

Modules are imported on use (``from mllm.evaluation.perplexity import token_perplexity``) so that importing
the package stays cheap and ``transformers``/``matplotlib`` load only where needed.
"""
