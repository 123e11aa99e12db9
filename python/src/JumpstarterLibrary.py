"""`Library    JumpstarterLibrary`: Jumpstarter's name for JmpLibrary, with the same keywords."""

from jmp_testing.robot_library import JmpLibrary


class JumpstarterLibrary(JmpLibrary):
    """Jumpstarter's name for ``JmpLibrary``: the same keywords (see JmpLibrary's documentation)."""


__all__ = ["JumpstarterLibrary"]
