"""studio.io"""
