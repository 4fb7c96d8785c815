"""Evaluation: perplexity against length, passkey retrieval, resumable sweeps, reports and plots."""

from ropekit.eval.passkey import evaluate_passkey, passkey_prompt, passkey_text
from ropekit.eval.perplexity import evaluate_perplexity, plan_windows, window_nll
from ropekit.eval.results import ResultStore
from ropekit.eval.sweep import Sweeper, trained_length
from ropekit.eval.text import default_text_path, load_text, load_tokens

__all__ = [
    "ResultStore", "Sweeper", "default_text_path", "evaluate_passkey", "evaluate_perplexity", "load_text",
    "load_tokens", "passkey_prompt", "passkey_text", "plan_windows", "trained_length", "window_nll",
]
