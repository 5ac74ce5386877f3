"""The run report: RUN/report/index.html and the PNGs beside it (matplotlib, Agg).

    kcp report --run-dir runs/digits

Shows what the run has: learning curves with the best epoch, the test confusion matrix
with per-class precision/recall/F1, the most confidently wrong test examples, the
pipeline's augmentation grid, the first convolution's filters and the test inputs that
excite a few of them most, the attention maps of a Transformer block, the tuning trials,
and the config and metrics. The page needs no network; the images lie beside it.
"""

from __future__ import annotations

import csv
import html
import io
import json

import numpy as np

from kcp.core import storage
from kcp.core import contract as contract_lib
from kcp.core.layout import RunLayout

EXAMPLES_SHOWN = 12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, report_dir: str, name: str) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes_atomic(storage.join(report_dir, name), buffer.getvalue())
    return name


def _read_json(path: str):
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


# --- figures ----------------------------------------------------------------------------

def best_epoch(history: dict) -> int:
    """0-based epoch with the best validation accuracy (or lowest loss without validation)."""
    if history.get("val_accuracy"):
        return int(np.argmax(history["val_accuracy"]))
    return int(np.argmin(history["loss"]))


def plot_curves(history: dict, report_dir: str) -> str:
    plt = _pyplot()
    epochs = np.arange(1, len(history["loss"]) + 1)
    best = best_epoch(history) + 1
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, history[metric], marker="o", markersize=3, label=f"train {metric}")
        if f"val_{metric}" in history:
            axis.plot(epochs, history[f"val_{metric}"], marker="o", markersize=3, label=f"validation {metric}")
        axis.axvline(best, color="gray", linestyle="--", linewidth=1, label=f"best epoch ({best})")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, report_dir, "curves.png")


def per_class_scores(matrix: np.ndarray) -> list[dict]:
    """Precision, recall, F1 and support per class from a (true x predicted) confusion matrix."""
    scores = []
    for index in range(matrix.shape[0]):
        true_positive = matrix[index, index]
        predicted, actual = matrix[:, index].sum(), matrix[index, :].sum()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append({"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(actual)})
    return scores


def plot_confusion(matrix: np.ndarray, class_names: list[str], report_dir: str) -> str:
    plt = _pyplot()
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names, rotation=90 if len(class_names) > 10 else 0, fontsize=8)
    axis.set_yticks(range(len(class_names)), class_names, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(class_names) <= 20:
        for (row, column), value in np.ndenumerate(matrix):
            axis.text(column, row, str(value), ha="center", va="center", fontsize=7,
                      color="white" if value > matrix.max() / 2 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_title("test confusion matrix")
    figure.tight_layout()
    return _save(figure, report_dir, "confusion_matrix.png")


def draw_example(axis, value, modality: str) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    if modality == "image":
        image = np.asarray(value)
        axis.imshow(image[..., 0] if image.shape[-1] == 1 else image.astype(np.uint8),
                    cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
    elif modality == "sequence":
        axis.plot(np.asarray(value), linewidth=0.8)
    else:
        text = str(value)
        axis.text(0.02, 0.5, "\n".join(text[i:i + 30] for i in range(0, min(len(text), 150), 30)), fontsize=6,
                  va="center", family="monospace")


def plot_mistakes(test: dict, class_names: list[str], modality: str, report_dir: str) -> tuple[str | None, int]:
    """The test examples the model got wrong with the highest confidence."""
    plt = _pyplot()
    predicted = test["probabilities"].argmax(axis=1)
    wrong = np.flatnonzero(predicted != test["labels"])
    if not len(wrong):
        return None, 0
    order = wrong[np.argsort(-test["probabilities"][wrong].max(axis=1))][:EXAMPLES_SHOWN]
    columns = min(6, len(order))
    rows = int(np.ceil(len(order) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), order):
        axis.axis("on")
        draw_example(axis, test["inputs"][index], modality)
        confidence = test["probabilities"][index].max()
        axis.set_title(f"true {class_names[test['labels'][index]]}\npredicted {class_names[predicted[index]]} "
                       f"({confidence:.0%})", fontsize=7)
    figure.suptitle("most confidently wrong test examples", fontsize=9)
    figure.tight_layout()
    return _save(figure, report_dir, "mistakes.png"), len(wrong)


def first_conv_layer(model):
    for layer in model.layers:
        if type(layer).__name__ in ("Conv2D", "Conv1D"):
            return layer
    return None


def plot_filters(model, test: dict, model_inputs, modality: str, report_dir: str) -> list[str]:
    """The first convolution's kernels, and for 4 filters the test inputs that excite them most."""
    import keras

    plt = _pyplot()
    layer = first_conv_layer(model)
    if layer is None:
        return []
    kernel = np.asarray(layer.kernel)  # (kh, kw, in, out) or (k, in, out)
    count = min(kernel.shape[-1], 32)
    columns = 8
    rows = int(np.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.4 * rows), squeeze=False)
    for index, axis in enumerate(axes.ravel()):
        axis.set_xticks([])
        axis.set_yticks([])
        if index >= count:
            axis.axis("off")
            continue
        weights = kernel[..., index]
        if kernel.ndim == 4:
            shown = weights.mean(axis=-1) if weights.shape[-1] not in (3,) else weights
            shown = (shown - shown.min()) / (np.ptp(shown) or 1.0)
            axis.imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        else:
            axis.plot(weights)
        axis.set_title(str(index), fontsize=7)
    figure.suptitle(f"learned filters of {layer.name}", fontsize=9)
    figure.tight_layout()
    names = [_save(figure, report_dir, "filters.png")]

    probe = keras.Model(model.inputs, layer.output)
    activations = np.asarray(probe.predict(model_inputs, verbose=0))
    strength = activations.reshape(len(activations), -1, activations.shape[-1]).mean(axis=1)  # (examples, filters)
    chosen = np.argsort(-strength.std(axis=0))[:4]  # the filters that tell examples apart most
    figure, axes = plt.subplots(len(chosen), 6, figsize=(10, 1.9 * len(chosen)), squeeze=False)
    for row, filter_index in enumerate(chosen):
        axes[row][0].axis("off")
        axes[row][0].text(0.5, 0.5, f"filter {filter_index}", ha="center", va="center", fontsize=9)
        for column, example in enumerate(np.argsort(-strength[:, filter_index])[:5], start=1):
            draw_example(axes[row][column], test["inputs"][example], modality)
            axes[row][column].set_title(f"{strength[example, filter_index]:.2f}", fontsize=7)
    figure.suptitle("test inputs that activate each filter most (mean activation)", fontsize=9)
    figure.tight_layout()
    names.append(_save(figure, report_dir, "filter_activations.png"))
    return names


def plot_attention(model, test: dict, model_inputs, report_dir: str) -> str | None:
    from trainer.models.transformer import attention_layers, attention_scores

    plt = _pyplot()
    if not attention_layers(model):
        return None
    scores = attention_scores(model, model_inputs[:3])
    block = len(scores)  # the last block: what the head pools from
    maps = scores[-1]  # (examples, heads, tokens, tokens)
    examples, heads = maps.shape[0], maps.shape[1]
    figure, axes = plt.subplots(examples, heads + 1, figsize=(2.2 * (heads + 1), 2.3 * examples), squeeze=False)
    for row in range(examples):
        draw_example(axes[row][0], test["inputs"][row], test["modality"])
        axes[row][0].set_title(f"test example {row + 1}", fontsize=7)
        for head in range(heads):
            axis = axes[row][head + 1]
            axis.imshow(maps[row, head], cmap="viridis", interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"block {block}, head {head + 1}", fontsize=7)
    figure.suptitle("attention probabilities (rows: queries, columns: keys)", fontsize=9)
    figure.tight_layout()
    return _save(figure, report_dir, "attention.png")


# --- data -------------------------------------------------------------------------------

def predict_test(run_dir: str, contract, model, limit: int = 2000) -> dict:
    """Raw test inputs, their model inputs, labels and probabilities (the first `limit`)."""
    import tensorflow as tf

    vectorizer = contract_lib.text_vectorizer(contract, run_dir) if contract.modality == "text" else None
    raw, labels = [], []
    for inputs, batch_labels, _ in contract_lib.read_split(contract, contract_lib.data_dir(run_dir), "test", 256):
        raw.append(inputs.numpy())
        labels.append(batch_labels.numpy())
        if sum(len(batch) for batch in labels) >= limit:
            break
    raw, labels = np.concatenate(raw)[:limit], np.concatenate(labels)[:limit]
    if vectorizer is not None:
        model_inputs = np.asarray(vectorizer(tf.constant(raw)))
        raw = np.array([value.decode("utf-8") for value in raw], dtype=object)
    else:
        model_inputs = raw.astype(np.float32)
    probabilities = np.asarray(model.predict(model_inputs, verbose=0))
    return {"inputs": raw, "model_inputs": model_inputs, "labels": labels, "probabilities": probabilities,
            "modality": contract.modality}


# --- page -------------------------------------------------------------------------------

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
    import keras

    import trainer.models.layers  # noqa: F401  registers the zoo's custom layers for loading

    layout = RunLayout(run_dir)
    report_dir = layout.report
    storage.makedirs(report_dir)
    contract = contract_lib.read_contract(run_dir)
    metrics = _read_json(layout.metrics) or {}
    history = _read_json(layout.history)
    confusion = _read_json(layout.confusion_matrix)
    sections = []

    summary = [["source", contract.source], ["modality", contract.modality],
               ["examples", ", ".join(f"{s} {i.count}" for s, i in contract.splits.items())],
               ["bad inputs", contract.bad_examples]]
    if metrics:
        summary += [["model", f"{metrics.get('model')} ({metrics.get('params', 0):,} parameters)"],
                    ["test accuracy", f"{metrics.get('test', {}).get('accuracy', float('nan')):.4f}"],
                    ["epochs", metrics.get("epochs")],
                    ["train examples/s", f"{metrics.get('examples_per_second', 0):,.0f}"]]
    sections.append(_section("Run", _table(["", ""], summary)))

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

    config_path = layout.config
    if storage.exists(config_path):
        sections.append(_section("Config", f"<pre>{html.escape(storage.read_text(config_path))}</pre>"))
    if metrics:
        sections.append(_section("Metrics", f"<pre>{html.escape(json.dumps(metrics, indent=2))}</pre>"))

    page = PAGE.format(title=html.escape(str(run_dir)), sections="\n".join(sections))
    path = storage.join(report_dir, "index.html")
    storage.write_text_atomic(path, page)
    return path
