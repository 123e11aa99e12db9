"""`JumpstarterTest`: an alias of `jmp_testing.JmpTest` (the `selector` or `exporter_selector`
class attribute; the board as `self.client` or a `client` argument)."""

from jmp_testing.pytest_plugin import JmpTest


class JumpstarterTest(JmpTest):
    """Jumpstarter's base class name for `jmp_testing.JmpTest`."""

    selector = None


__all__ = ["JumpstarterTest"]
