"""preftune.model"""
