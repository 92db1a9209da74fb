"""Test-only tasks and utilities (importable as ``tests.helpers``)."""
