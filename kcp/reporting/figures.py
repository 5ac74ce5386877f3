"""The report's figures: each plots what a run wrote and saves a PNG beside index.html.

Learning curves, the confusion matrix with per-class scores, the most confidently wrong test
examples, the first convolution's filters and the inputs that excite them, attention maps.
"""

from __future__ import annotations

import io

import keras
import numpy as np
import tensorflow as tf

from kcp.core import contract as contract_lib

from kcp.core import examples as example_lib
from kcp.core import storage
from trainer.models.transformer import attention_layers, attention_scores

EXAMPLES_SHOWN = 12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_eagerly(model, inputs, batch_size: int = 256) -> np.ndarray:
    """`model` on `inputs` in eager batches. Not `model.predict`: each probe model would trace
    a predict function of its own, and TensorFlow warns about the retracing at the end of a run."""
    batches = [keras.ops.convert_to_numpy(model(inputs[start:start + batch_size], training=False))
               for start in range(0, len(inputs), batch_size)]
    return np.concatenate(batches)


def _save(figure, report_dir: str, name: str) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes_atomic(storage.join(report_dir, name), buffer.getvalue())
    return name


# --- figures ----------------------------------------------------------------------------

def best_epoch(history: dict) -> int:
    """0-based epoch with the best validation accuracy (language models, which have none: the lowest
    validation loss), or the lowest loss without validation."""
    if history.get("val_accuracy"):
        return int(np.argmax(history["val_accuracy"]))
    if history.get("val_loss") and "accuracy" not in history:
        return int(np.argmin(history["val_loss"]))
    return int(np.argmin(history["loss"]))


def plot_curves(history: dict, report_dir: str, metrics=("loss", "accuracy")) -> str:
    """Train and validation curves of `metrics` (language models: loss and bits_per_byte)."""
    plt = _pyplot()
    epochs = np.arange(1, len(history["loss"]) + 1)
    best = best_epoch(history) + 1
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for axis, metric in zip(axes, metrics):
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

    probe = keras.Model(model.input, layer.output)  # model.input: the structure it was built with
    activations = run_eagerly(probe, model_inputs)
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


def token_label(token: int, tokenizer: str, vocabulary) -> str:
    """A token id as a short axis label: its text, with whitespace and separators made visible."""
    text = contract_lib.decode_language([token], tokenizer, vocabulary)
    if token == contract_lib.LANGUAGE_SEPARATOR:
        return "¶"
    return {" ": "␣", "\n": "↵", "\t": "⇥"}.get(text, text if text.isprintable() else "·")


def plot_language_attention(scores: list, labels: list[str], report_dir: str) -> str:
    """Every decoder block's heads on one token sequence: `scores` is attention_scores' list of
    (1, heads, tokens, tokens); causal attention shows as a lower triangle."""
    plt = _pyplot()
    blocks, heads = len(scores), scores[0].shape[1]
    figure, axes = plt.subplots(blocks, heads, figsize=(2.6 * heads, 2.7 * blocks), squeeze=False)
    ticks = range(len(labels))
    for block, maps in enumerate(scores):
        for head in range(heads):
            axis = axes[block][head]
            axis.imshow(maps[0, head], cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
            axis.set_xticks(ticks, labels, fontsize=5, family="monospace")
            axis.set_yticks(ticks, labels, fontsize=5, family="monospace")
            axis.set_title(f"block {block + 1}, head {head + 1}", fontsize=7)
    figure.suptitle("causal attention probabilities on a test sequence (rows: queries, columns: keys)", fontsize=9)
    figure.tight_layout()
    return _save(figure, report_dir, "attention.png")


# --- data -------------------------------------------------------------------------------

def predict_test(run_dir: str, contract, model, limit: int = 2000) -> dict:
    """Raw test inputs, their model inputs, labels and probabilities (the first `limit`)."""
    vectorizer = example_lib.text_vectorizer(contract, run_dir) if contract.modality == "text" else None
    raw, labels = [], []
    for inputs, batch_labels, _ in example_lib.read_split(contract, contract_lib.data_dir(run_dir), "test", 256):
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
    probabilities = run_eagerly(model, model_inputs)
    return {"inputs": raw, "model_inputs": model_inputs, "labels": labels, "probabilities": probabilities,
            "modality": contract.modality}


# --- page -------------------------------------------------------------------------------
