# A unittest test that fails after the board printed something: its failure must carry the
# console.
from jmp_testing import JmpTestCase


class TestFails(JmpTestCase):
    exporter_selector = "vendor=acme,model=widget-v2"

    def test_waits_for_what_never_comes(self):
        self.client.power.cycle(wait=0.2)
        self.client.serial.read_until("boot complete", timeout=30)
        self.client.serial.sendline("echo-marker-4711")
        self.client.serial.read_until("kernel panic", timeout=1)
