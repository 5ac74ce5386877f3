"""The figures the command handlers print that take more than a line to compose: a language
model's validation verdict and its document-cache figures, and a line of `kcp versions`."""

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


def version_line(row: dict) -> str:
    """One export version of `kcp versions`: its verdict, its test figure, what kcp serve does with it."""
    state = "blessed" if row["blessed"] else "NOT blessed" if row["validated"] else "not validated"
    texts = f" on {row['examples']} test texts" if "examples" in row else ""
    figure = (f", test accuracy {row['export_accuracy']:.4f}" if "export_accuracy" in row else
              f", {row['export_bits_per_byte']:.4f} bits per byte{texts}" if "export_bits_per_byte" in row else "")
    why = f": {'; '.join(row['reasons'])}" if row["reasons"] and not row["blessed"] else ""
    return f"{row['model']} version {row['version']}: {state}{figure}{' <- kcp serve' if row['served'] else ''}{why}"
