"""Curriculum: task banks (what can be asked) and, later, a curator (what to ask next)."""

from broker.curriculum.banks import SymbolsBank, TaskBank
from broker.curriculum.factory import make_bank

__all__ = ["SymbolsBank", "TaskBank", "make_bank"]
