"""studio.world"""
