"""fxcache"""
