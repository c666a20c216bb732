"""Helpers for the tests and the accuracy runner: start vLLM servers safely (`launch`)."""
