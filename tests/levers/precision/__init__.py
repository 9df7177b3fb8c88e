"""tests/levers/precision"""
