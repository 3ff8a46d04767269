"""Build: the pure-Python package always installs; nothing is compiled at install time."""

from setuptools import setup

setup()
