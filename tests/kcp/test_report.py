"""The run report for a tiny run of every family, and the page in headless Chromium."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from kcp.core.config_load import load_config
from kcp.reporting import build_report, per_class_scores
from tests.conftest import fresh_run
from trainer.models import families_for
from trainer.train import train

IMAGE_FAMILIES = families_for("image")  # gpt: tests/trainer/test_language_model.py

TINY = {"cnn": ["model.filters=[8, 16]"], "resnet": ["model.depth=8", "model.width=8"],
        "rnn": ["model.units=16", "model.layers=1"],
        "transformer": ["model.dim=16", "model.heads=2", "model.mlp_dim=32", "model.layers=1", "model.patch_size=2"]}
EXPECTED = {
    "cnn": {"curves.png", "confusion_matrix.png", "mistakes.png", "samples.png", "filters.png", "filter_activations.png"},
    "resnet": {"curves.png", "confusion_matrix.png", "mistakes.png", "samples.png", "filters.png",
               "filter_activations.png"},
    "rnn": {"curves.png", "confusion_matrix.png", "mistakes.png", "samples.png"},
    "transformer": {"curves.png", "confusion_matrix.png", "mistakes.png", "samples.png", "filters.png",
                    "filter_activations.png", "attention.png"},
}


def assert_real_png(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n", path
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 5, f"{path} is (nearly) a single colour"


@pytest.fixture(scope="module")
def reports(digits_data, tmp_path_factory):
    built = {}
    for family in IMAGE_FAMILIES:
        run_dir = fresh_run(digits_data, tmp_path_factory.mktemp(family))
        config = load_config([], [f"model.name={family}", "train.epochs=1", *TINY[family]])
        with open(os.path.join(run_dir, "config.yaml"), "w") as handle:
            handle.write(config.to_yaml())
        train(config, run_dir)
        built[family] = build_report(run_dir)
    return built


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_report_has_every_expected_figure(reports, family):
    page_path = reports[family]
    report_dir = os.path.dirname(page_path)
    with open(page_path) as handle:
        page = handle.read()
    pngs = {name for name in os.listdir(report_dir) if name.endswith(".png")}
    assert pngs == EXPECTED[family]
    referenced = set(re.findall(r'<img src="([^"]+)"', page))
    assert referenced == pngs
    for name in pngs:
        assert_real_png(os.path.join(report_dir, name))
    for heading in ("Learning curves", "Confusion matrix (test)", "Most confidently wrong", "Augmentation", "Config",
                    "Metrics"):
        assert f"<h2>{heading}</h2>" in page


def test_per_class_scores_match_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    predictions[:5] = 3  # an uneven class
    matrix = confusion_matrix(labels, predictions)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, zero_division=0)
    scores = per_class_scores(matrix)
    np.testing.assert_allclose([s["precision"] for s in scores], precision)
    np.testing.assert_allclose([s["recall"] for s in scores], recall)
    np.testing.assert_allclose([s["f1"] for s in scores], f1)
    assert [s["support"] for s in scores] == list(support)


def test_tuning_results_appear_when_present(reports):
    run_dir = os.path.dirname(os.path.dirname(reports["cnn"]))
    os.makedirs(os.path.join(run_dir, "tuning"), exist_ok=True)
    with open(os.path.join(run_dir, "tuning", "trials.csv"), "w") as handle:
        handle.write("trial_id,train.learning_rate,val_accuracy,status,seconds\n0,0.001,0.91,COMPLETED,12.5\n")
    page = open(build_report(run_dir)).read()
    assert "<h2>Tuning</h2>" in page and "<td>0.91</td>" in page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed here; .ci/run installs it for CI")
def test_page_loads_in_headless_chromium_with_no_missing_image(reports, tmp_path):
    page = reports["transformer"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium(), *flags, "--dump-dom", f"file://{page}"], capture_output=True, text=True,
                         timeout=120)
    images = len(re.findall(r"<img ", open(page).read()))
    assert f'data-images="ok:{images}"' in dom.stdout, dom.stdout[:500] + dom.stderr[-1500:]
    artifacts = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "test-artifacts")
    os.makedirs(artifacts, exist_ok=True)
    screenshot = os.path.join(artifacts, "report.png")
    subprocess.run([chromium(), *flags, "--window-size=1200,3000", f"--screenshot={screenshot}", f"file://{page}"],
                   capture_output=True, timeout=120)
    assert_real_png(screenshot)


def test_a_mistyped_run_directory_is_not_created(tmp_path):
    from kcp.core.errors import UserError

    with pytest.raises(UserError, match="metadata.json"):
        build_report(str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()
