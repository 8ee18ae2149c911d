"""The intent: the user's declarative file, loaded, checked and frozen."""

from kdsr.intent.load import load_intent, parse_intent
from kdsr.intent.model import Intent

__all__ = ["Intent", "load_intent", "parse_intent"]
