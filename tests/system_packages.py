"""Debian packages some tests need (a browser, a font): installed with apt-get when missing and this process may
(CI runs as root)."""

from __future__ import annotations

import os
import subprocess


def apt_install(package: str) -> bool:
    """Install `package` with apt-get; False where this process is not root (it cannot)."""
    if os.geteuid() != 0:
        return False
    subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-q", package], check=True, capture_output=True, timeout=900,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return True
