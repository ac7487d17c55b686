"""Maintenance scripts of the project: run each as a module from the project root.

For example `python -m scripts.make_sample`.
"""
