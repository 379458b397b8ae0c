"""preftune.train"""
