"""Data shipped with ropekit: the default evaluation text (see ``ropekit.defaults``)."""

from ropekit.defaults import default_text_path

DEFAULT_TEXT = default_text_path()
