"""studio.train"""
