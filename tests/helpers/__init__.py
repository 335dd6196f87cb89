"""Helpers the tests import (`from helpers.tiny import ...`); fixtures live in conftest.py."""
