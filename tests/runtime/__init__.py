"""Tests of wbsr_runtime."""
