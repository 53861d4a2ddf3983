"""Builds, signs and stamps remote-support agent installers (MSI, EXE, pkg, dmg) on Linux."""

__version__ = "0.1.0"
