"""Conversion of published weights into this project's networks (state-dict key tables, checked both ways)."""
