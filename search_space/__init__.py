"""Search: the multi-level µGraph enumerator with abstract-expression pruning (api.py: `search`)."""

from superopt.search_space.api import SearchResult, SearchStats, program_candidate, search
from superopt.search_space.presets import PRESETS, Preset

__all__ = ["PRESETS", "Preset", "SearchResult", "SearchStats", "program_candidate", "search"]
