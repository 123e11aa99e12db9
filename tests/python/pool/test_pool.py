# A suite spread over a pool of identical boards: `pytest -n 4` with the selector matching two
# boards; every worker leases one of its own (two wait in the queue until two are given back).
import pytest

from jmp_testing import JmpTest


class TestPool(JmpTest):
    exporter_selector = "vendor=acme,model=widget-v2"

    @pytest.mark.parametrize("n", range(8))
    def test_boots(self, n):
        self.client.power.cycle(wait=0.2)
        self.client.serial.read_until("boot complete", timeout=30)
        self.client.serial.read_until("login: ", timeout=10)
        self.client.serial.sendline(f"pool-{n}")
        self.client.serial.read_until(f"pool-{n}", timeout=10)
