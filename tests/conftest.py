"""Shared pytest setup: the local Hub fixture (`hub`) is available to every test module."""
pytest_plugins = ["tests.hub_fixture", "tests.model_fixtures"]
