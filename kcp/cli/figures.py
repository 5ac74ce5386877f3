"""The figures the command handlers print that take more than a line to compose: a language
model's validation verdict and its document-cache figures."""

from __future__ import annotations


def document_cache_figures(metrics: dict) -> str:
    """"B bits per byte with the document cache (network alone N; weights W)" for a language run's
    whole test documents (metrics.json "document_cache"), or "" when there are none."""
    cache = metrics.get("document_cache") or {}
    if "test" not in cache:
        return ""
    test = cache["test"]
    return (f"{test['bits_per_byte']:.4f} bits per byte with the document cache (network alone "
            f"{test['network_bits_per_byte']:.4f}; weights {', '.join(f'{w:g}' for w in cache['weights'])}"
            f" fitted on {cache['fitted_on'] or 'nothing: no held-out validation split'})")


def language_verdict(validation: dict) -> str:
    figures = (f"export {validation['export_bits_per_byte']:.4f} bits per byte on {validation['examples']} test texts "
               f"(trainer {validation['trainer_bits_per_byte']:.4f}, log-probabilities within "
               f"{validation['max_log_probability_difference']:.1e} nats)")
    return figures + (" -> blessed" if validation["blessed"] else " -> NOT blessed: " + "; ".join(validation["reasons"]))
