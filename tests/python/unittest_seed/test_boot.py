# The README's pytest example as a unittest.TestCase: `python -m unittest` (or pytest) runs it;
# the board comes from `jmp shell`, `jmp local start` or a lease by the class's selector.
import unittest

from jmp_testing import JmpTestCase


class TestMyDevice(JmpTestCase):
    exporter_selector = "vendor=acme,model=widget-v2"

    def test_power_cycle(self):
        self.client.power.on()
        self.assertIsNotNone(self.client.serial.read_until("boot complete"))
        self.client.power.off()

    def test_off_is_quiet_and_on_boots_again(self):
        self.client.power.off()
        # An unpowered board prints nothing, and does not echo what is typed.
        self.assertTrue(self.client.serial.quiet_for(1.0, timeout=10))
        self.client.serial.discard()  # what the board printed before it went off
        self.client.serial.sendline("root")
        self.assertEqual(self.client.serial.read(timeout=1.0), "")
        self.client.power.on()
        booted = self.client.serial.read_until("boot complete", timeout=30)
        self.assertIn("U-Boot SPL", booted)
        self.assertNotIn("root", booted)
        self.client.serial.read_until("login: ")
        self.client.serial.sendline("root")
        self.client.serial.read_until("root")
        self.client.power.off()  # as the board was found


if __name__ == "__main__":
    unittest.main()
