"""preftune.tasks"""
