"""The run report: RUN/report/index.html and the PNGs beside it (matplotlib, Agg).

    kcp report --run-dir runs/digits

Shows what the run has: learning curves with the best epoch, the test confusion matrix
with per-class precision/recall/F1, the most confidently wrong test examples, the
pipeline's augmentation grid, the first convolution's filters and the test inputs that
excite a few of them most, the attention maps of a Transformer block, the tuning trials,
and the config and metrics. The page needs no network; the images lie beside it.

A language run (gpt) shows instead: the loss and bits per byte per epoch, the samples the
trainer wrote after each epoch, the decoder blocks' causal attention maps on a test sequence,
and the model's greedy completion of the course's few-shot prompt (FEW_SHOT_PROMPT).
"""

from __future__ import annotations

import csv
import html
import io
import json

import keras
import numpy as np

import trainer.models.layers  # noqa: F401  registers the zoo's custom layers for loading model.keras
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core import plots
from kcp.core import storage
from kcp.core.layout import RunLayout
from kcp.reporting.figures import (best_epoch, per_class_scores, plot_attention, plot_confusion, plot_curves,
                                plot_filters, plot_language_attention, plot_mistakes, predict_test, token_label)

# Brown et al. 2020's few-shot example (a made-up word used in a sentence), completed by the model
FEW_SHOT_PROMPT = ('A "whatpu" is a small, furry animal native to Tanzania. An example of a sentence that uses the '
                   'word whatpu is: We were traveling in Africa and we saw these very cute whatpus. To do a '
                   '"farduddle" means to jump up and down really fast. An example of a sentence that uses the word '
                   'farduddle is:')
FEW_SHOT_TOKENS = 64  # at most; fewer when the context is short (the prompt keeps the rest of it)
ATTENTION_TOKENS = 32  # of the first test block, so that each token can label the axes

def _read_json(path: str):
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kcp report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1150px; color: #222; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }}
img {{ max-width: 100%; border: 1px solid #eee; }} table {{ border-collapse: collapse; font-size: .85rem; }}
td, th {{ border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; }} th {{ background: #f5f5f5; }}
pre {{ background: #f7f7f7; padding: .8rem; font-size: .8rem; overflow-x: auto; }} .note {{ color: #666; font-size: .85rem; }}
</style></head>
<body data-images="pending">
<h1>kcp report: {title}</h1>
{sections}
<script>
// Self-check used by the tests and visible to readers: every image must have loaded.
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) {{ return !(img.complete && img.naturalWidth > 0); }});
  document.body.dataset.images = broken.length ? "missing:" + broken.map(function (i) {{ return i.getAttribute("src"); }}).join(",") : "ok:" + images.length;
}});
</script>
</body></html>
"""


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def _image(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def build_report(run_dir: str) -> str:
    """Writes RUN/report/index.html and its figures; returns the page's path."""
    with plots.users_text():
        return _build_report(run_dir)


def _build_report(run_dir: str) -> str:
    layout = RunLayout(run_dir)
    report_dir = layout.report
    contract = contract_lib.read_contract(run_dir)  # first: a mistyped run directory is not created
    contract_lib.check_trained_on_contract(layout, run_dir, "reporting")  # its figures would mix two data sets
    storage.makedirs(report_dir)
    metrics = _read_json(layout.metrics) or {}
    history = _read_json(layout.history)
    confusion = _read_json(layout.confusion_matrix)
    sections = []

    summary = [["source", contract.source], ["modality", contract.modality],
               ["examples", ", ".join(f"{s} {i.count}" for s, i in contract.splits.items())],
               ["bad inputs", contract.bad_examples]]
    language = contract.modality == "language"
    if metrics and language:
        cache = metrics.get("document_cache") or {}
        summary += [["model", f"{metrics.get('model')} ({metrics.get('params', 0):,} parameters)"],
                    ["test bits per byte", f"{metrics.get('test', {}).get('bits_per_byte', float('nan')):.4f}"],
                    *([["test documents, bits per byte with the document cache (network alone)",
                        f"{cache['test']['bits_per_byte']:.4f} ({cache['test']['network_bits_per_byte']:.4f}), "
                        f"weights {', '.join(f'{w:g}' for w in cache['weights'])}"]]
                      if "test" in cache else []),
                    ["test perplexity (per token)", f"{metrics.get('test', {}).get('perplexity', float('nan')):.2f}"],
                    ["epochs", metrics.get("epochs")],
                    ["train tokens/s", f"{metrics.get('tokens_per_second', 0):,.0f}"]]
    elif metrics:
        summary += [["model", f"{metrics.get('model')} ({metrics.get('params', 0):,} parameters)"],
                    ["test accuracy", f"{metrics.get('test', {}).get('accuracy', float('nan')):.4f}"],
                    ["epochs", metrics.get("epochs")],
                    ["train examples/s", f"{metrics.get('examples_per_second', 0):,.0f}"]]
    sections.append(_section("Run", _table(["", ""], summary)))
    if language:
        sections += language_sections(run_dir, contract, history, report_dir)
        return _finish(run_dir, layout, report_dir, sections, metrics)

    if history and history.get("loss"):
        best = best_epoch(history)
        note = f'<p class="note">best epoch {best + 1}' + (
            f", validation accuracy {history['val_accuracy'][best]:.4f}" if history.get("val_accuracy") else "") + "</p>"
        sections.append(_section("Learning curves", _image(plot_curves(history, report_dir), "learning curves") + note))

    if confusion:
        matrix = np.asarray(confusion["matrix"])
        names = confusion["class_names"]
        scores = per_class_scores(matrix)
        rows = [[name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", s["support"]]
                for name, s in zip(names, scores)]
        sections.append(_section("Confusion matrix (test)", _image(plot_confusion(matrix, names, report_dir),
                                                                   "confusion matrix")
                                 + _table(["class", "precision", "recall", "F1", "support"], rows)))

    model_path = layout.model
    if storage.exists(model_path) and contract.splits.get("test") and contract.splits["test"].count:
        model = keras.saving.load_model(model_path)
        test = predict_test(run_dir, contract, model)
        name, wrong = plot_mistakes(test, list(contract.class_names), contract.modality, report_dir)
        body = _image(name, "most confidently wrong examples") if name else ""
        body += f'<p class="note">{wrong} of {len(test["labels"])} test examples are wrong.</p>'
        sections.append(_section("Most confidently wrong", body))
        for figure in plot_filters(model, test, test["model_inputs"], contract.modality, report_dir):
            title = "Learned filters" if figure == "filters.png" else "What excites the filters"
            sections.append(_section(title, _image(figure, title)))
        attention = plot_attention(model, test, test["model_inputs"], report_dir)
        if attention:
            sections.append(_section("Attention maps", _image(attention, "attention maps")))

    samples = layout.samples
    if storage.exists(samples):
        storage.write_bytes_atomic(storage.join(report_dir, "samples.png"), storage.read_bytes(samples))
        copies = contract.augmentation.get("copies", 0)
        sections.append(_section("Augmentation", _image("samples.png", "augmentation samples")
                                 + f'<p class="note">{copies} augmented copies per train example.</p>'))

    trials_png = storage.join(layout.tuning, "trials.png")
    trials_csv = storage.join(layout.tuning, "trials.csv")
    if storage.exists(trials_png) or storage.exists(trials_csv):
        body = ""
        if storage.exists(trials_png):
            storage.write_bytes_atomic(storage.join(report_dir, "trials.png"), storage.read_bytes(trials_png))
            body += _image("trials.png", "tuning trials")
        if storage.exists(trials_csv):
            rows = list(csv.reader(io.StringIO(storage.read_text(trials_csv))))
            body += _table(rows[0], rows[1:]) if rows else ""
        sections.append(_section("Tuning", body))

    return _finish(run_dir, layout, report_dir, sections, metrics)


def _finish(run_dir: str, layout: RunLayout, report_dir: str, sections: list, metrics: dict) -> str:
    """The config and metrics sections, then the page written; returns its path."""
    config_path = layout.config
    if storage.exists(config_path):
        sections.append(_section("Config", f"<pre>{html.escape(storage.read_text(config_path))}</pre>"))
    if metrics:
        sections.append(_section("Metrics", f"<pre>{html.escape(json.dumps(metrics, indent=2))}</pre>"))

    page = PAGE.format(title=html.escape(str(run_dir)), sections="\n".join(sections))
    path = storage.join(report_dir, "index.html")
    storage.write_text_atomic(path, page)
    return path


def language_sections(run_dir: str, contract, history: dict | None, report_dir: str) -> list[str]:
    """A language run's sections: curves in bits per byte, per-epoch samples, attention maps, few-shot."""
    from deploy.language import complete_prompt
    from trainer.generate import attention_scores, generate_tokens  # registers the gpt layers too

    layout, sections = RunLayout(run_dir), []
    if history and history.get("loss"):
        best = best_epoch(history)
        note = f'<p class="note">best epoch {best + 1}' + (
            f", validation {history['val_bits_per_byte'][best]:.4f} bits per byte"
            if history.get("val_bits_per_byte") else "") + "</p>"
        curves = plot_curves(history, report_dir, ("loss", "bits_per_byte"))
        sections.append(_section("Learning curves", _image(curves, "loss and bits per byte") + note))
    samples_path = storage.join(layout.train, "samples.jsonl")
    if storage.exists(samples_path):
        samples = [json.loads(line) for line in storage.read_text(samples_path).splitlines() if line.strip()]
        if samples:
            body = f'<p class="note">greedy completions of {html.escape(repr(samples[0]["prompt"]))} after each ' \
                   'epoch</p>'
            sections.append(_section("Samples per epoch", body + _table(
                ["epoch", "completion"], [[sample["epoch"], repr(sample["completion"])] for sample in samples])))
    if not storage.exists(layout.model):
        return sections
    model = keras.saving.load_model(layout.model, compile=False)
    tokenizer = contract_lib.language_tokenizer(contract)
    vocabulary = contract_lib.language_vocabulary(run_dir, contract)
    split = next((name for name in ("test", "validation", "train")
                  if contract.splits.get(name) and contract.splits[name].count), None)
    if split:
        blocks, _, _ = next(iter(example_lib.read_split(contract, contract_lib.data_dir(run_dir), split, 1)))
        tokens = np.asarray(blocks)[:, :ATTENTION_TOKENS]
        labels = [token_label(int(token), tokenizer, vocabulary) for token in tokens[0]]
        figure = plot_language_attention(attention_scores(model, tokens), labels, report_dir)
        sections.append(_section("Attention maps", _image(figure, "causal attention maps")))
    context = int(contract.statistics["context_length"])
    count = min(FEW_SHOT_TOKENS, context // 2)
    completion = complete_prompt(model, contract, run_dir, FEW_SHOT_PROMPT, generate_tokens, max_new_tokens=count,
                                 temperature=0.0, top_k=0, top_p=1.0, seed=0)
    kept = "" if len(contract_lib.encode_language(FEW_SHOT_PROMPT, tokenizer, vocabulary)) + 1 <= context - count \
        else f" (the model sees its last {context - count - 1} tokens: its context is {context})"
    sections.append(_section("Few-shot prompt", f'<p class="note">the greedy completion (temperature 0) of the '
                             f'prompt{html.escape(kept)}</p><pre>{html.escape(FEW_SHOT_PROMPT)}'
                             f'<b>{html.escape(completion)}</b></pre>'))
    return sections
