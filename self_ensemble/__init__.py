"""the self-ensemble library"""
