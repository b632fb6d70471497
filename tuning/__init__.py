"""gatetune.tuning"""
