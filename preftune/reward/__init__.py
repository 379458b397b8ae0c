"""preftune.reward"""
