"""Robot Framework imports `Library    JmpLibrary` from this module."""

from jmp_testing.robot_library import JmpLibrary

__all__ = ["JmpLibrary"]
