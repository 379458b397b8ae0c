"""preftune.data"""
