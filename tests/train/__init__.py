"""Tests of wbsr_train."""
