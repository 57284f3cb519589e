"""Test helpers: echo models, model repositories built on the fly, server fixtures."""
