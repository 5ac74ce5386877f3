"""matplotlib settings for the figures that draw users' text (class names, text examples, tokens)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager


@contextmanager
def users_text():
    """Within it, figures draw a user's text as written: `$` is a character, not the start of
    matplotlib's math (`Show $p \\implies q$` would stop its parser, and `$5 or $10` would turn
    italic), and a character the font lacks (CJK, Arabic in DejaVu Sans) is drawn as a box
    without a warning per glyph on stderr; the report's HTML carries the names as text."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        yield
