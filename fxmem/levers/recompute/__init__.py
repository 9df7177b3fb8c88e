"""levers/recompute"""
