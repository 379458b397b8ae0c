"""preftune.rank"""
