"""Deprecated: evaluation moved to :mod:`peg_rag.retrieval.evaluate` (peg-rag 0.2).

This alias is removed in peg-rag 0.3.
"""

from peg_rag.core.deprecation import warn_renamed
from peg_rag.retrieval.evaluate import *  # noqa: F403

warn_renamed("peg_rag.trainer.evaluate", "peg_rag.retrieval.evaluate", stacklevel=2)
