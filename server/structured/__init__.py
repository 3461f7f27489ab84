"""Structured output and tool calling: grammars (xgrammar), tool-call rendering and parsing."""
