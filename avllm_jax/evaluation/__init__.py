"""Evaluation: benchmark annotation layouts, the LLM-judge protocol, caption metrics, reports."""
