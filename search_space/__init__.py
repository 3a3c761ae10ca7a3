"""Search: the multi-level µGraph enumerator with abstract-expression pruning (see search.py)."""

from superopt.search_space.api import Candidate, SearchResult, SearchStats, search
from superopt.search_space.presets import PRESETS, Preset

__all__ = ["PRESETS", "Candidate", "Preset", "SearchResult", "SearchStats", "search"]
