# Holds the board until interrupted: the harness sends SIGTERM once the line below is printed,
# and checks that the lease and the attachment are gone afterwards.
from jmp_testing import JmpTestCase


class TestHang(JmpTestCase):
    exporter_selector = "vendor=acme,model=widget-v2"

    def test_holds_the_board(self):
        print(f"JMP-HOLDING {self.client.exporter} {self.client.lease}", flush=True)
        self.client.serial.read_until("a line the board never prints", timeout=600)
