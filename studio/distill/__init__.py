"""studio.distill"""
