# Uses the board, then waits for the harness's go before ending: the harness holds the release
# that follows (the lab's controller stopped), interrupts pytest during it, and checks that the
# lease and the attachment are gone afterwards all the same.
import sys

from jmp_testing import JmpTest


class TestDone(JmpTest):
    exporter_selector = "vendor=acme,model=widget-v2"

    def test_uses_the_board_then_ends(self):
        print(f"JMP-HOLDING {self.client.exporter} {self.client.lease}", flush=True)
        sys.stdin.readline()
