"""Data shipped with ropekit (the default evaluation text)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_TEXT = DATA_DIR / "pride-and-prejudice.txt"
