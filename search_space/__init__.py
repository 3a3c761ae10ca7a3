"""Search: the multi-level µGraph enumerator with abstract-expression pruning."""
