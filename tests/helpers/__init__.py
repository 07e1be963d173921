"""Test helpers imported by the test modules (conftest.py files keep fixtures and hooks only)."""
