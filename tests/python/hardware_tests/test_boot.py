# The README's example, as a user writes it: the board comes from `jmp shell`, `jmp local
# start`, --jmp-exporter, or a lease by the class's selector.
from jmp_testing import JmpTest


class TestMyDevice(JmpTest):
    exporter_selector = "vendor=acme,model=widget-v2"   # or a marker, or --jmp-selector on the command line

    def test_power_cycle(self):
        self.client.power.on()
        assert self.client.serial.read_until("boot complete") is not None
        self.client.power.off()

    def test_off_is_quiet_and_on_boots_again(self):
        self.client.power.off()
        # An unpowered board prints nothing, and does not echo what is typed.
        assert self.client.serial.quiet_for(1.0, timeout=10)
        self.client.serial.discard()  # what the board printed before it went off
        self.client.serial.sendline("root")
        assert self.client.serial.read(timeout=1.0) == ""
        self.client.power.on()
        booted = self.client.serial.read_until("boot complete", timeout=30)
        assert "U-Boot SPL" in booted and "root" not in booted
        self.client.serial.read_until("login: ")
        self.client.serial.sendline("root")
        self.client.serial.read_until("root")
        self.client.power.off()  # as the board was found
