"""Tests of wbsr_export."""
