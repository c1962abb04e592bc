"""studio.teachers"""
