"""studio.students"""
