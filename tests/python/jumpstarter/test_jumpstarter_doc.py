# Jumpstarter's spellings, verbatim: its import, its class attribute names (exporter_selector,
# and the `selector` of its testing guide) and both ways of reaching the client.
from jumpstarter_testing.pytest import JumpstarterTest


class TestMyDevice(JumpstarterTest):
    exporter_selector = "vendor=acme,model=widget-v2"

    def test_power_cycle(self):
        self.client.power.on()
        assert self.client.serial.read_until("boot complete") is not None
        self.client.power.off()


class TestPowerCycle(JumpstarterTest):
    selector = "vendor=acme,model=widget-v2"

    def test_power_on(self, client):
        client.power.on()
        assert client.power.read() == "on"

    def test_power_off(self, client):
        client.power.off()
        assert client.power.read() == "off"
