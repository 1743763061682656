"""Data: examples, readers for user files, built-in corpora, tokenisation and partitioning."""

from fedguard.data.schema import DataError, Example

__all__ = ["DataError", "Example"]
