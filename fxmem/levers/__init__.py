"""levers"""
