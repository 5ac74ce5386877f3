"""`kcp predict` on a language model: a one-line error that points to `kcp generate`."""

from kcp import cli
from tests.trainer.test_language_model import language_run  # noqa: F401  the session's gpt run


def test_predict_on_a_language_model_says_to_generate(language_run, tmp_path, capsys):  # noqa: F811
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("print('hello')\n")
    code = cli.main(["predict", "--run-dir", language_run, "--input", f"text:{corpus}",
                     "--output", str(tmp_path / "out.jsonl")])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1
    assert "holds a language model, which generates rather than classifies" in error
    assert f"kcp generate --run-dir {language_run}" in error
    assert not list(tmp_path.glob("out*"))
