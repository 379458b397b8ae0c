"""preftune.online"""
