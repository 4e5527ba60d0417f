"""The layer table: every layer keyword of the language -> its Keyword (op, options, how many
may be given by position, the attribute values the word fixes), derived from the op registry
(cnndsl/ops). The options' kinds and coercion are options.py's."""

from .ops import KEYWORDS
from .options import KERNEL, REQUIRED, WORDS, Option, Symbol, coerce, show

LAYERS = KEYWORDS

__all__ = ["KERNEL", "LAYERS", "REQUIRED", "WORDS", "Option", "Symbol", "coerce", "show"]
