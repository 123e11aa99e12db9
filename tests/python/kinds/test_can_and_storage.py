# The simulated board's other kinds through the plugin: its CAN ECU with python-can on the
# local CAN front, its SD card flashed with `jmp storage` and read back through the mount.
import os
import time

import can
import pytest

from jmp_testing import JmpTest


class TestKinds(JmpTest):
    exporter_selector = "vendor=acme,model=widget-v2"

    def test_the_ecu_answers_a_uds_request(self):
        self.client.power.on()
        try:
            bus = self.client.can
            bus.send(can.Message(arbitration_id=0x7E0, data=[0x02, 0x10, 0x03], is_extended_id=False))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                msg = bus.recv(timeout=1)
                if msg is not None and msg.arbitration_id == 0x7E8:
                    assert list(msg.data[:3]) == [0x02, 0x50, 0x03]
                    return
            pytest.fail("no answer on 0x7e8 within 10 s")
        finally:
            # As the board was found: the suites after this one (Robot's boot tests) expect
            # `Power On` to boot it, which a board left on does not do again.
            self.client.power.off()

    def test_flash_then_read_back_through_the_mount(self, tmp_path):
        mount = self.client.storage.mount
        assert mount is not None, self.client.storage.endpoints
        disk = os.path.join(mount, "disk")
        # The simulated card is kept across runs: put its first MiB back afterwards.
        with open(disk, "rb") as f:
            original = f.read(1 << 20)
        saved = tmp_path / "original.raw"
        saved.write_bytes(original)
        image = tmp_path / "image.raw"
        data = os.urandom(1 << 20)
        image.write_bytes(data)
        try:
            self.client.storage.flash(str(image))
            with open(disk, "rb") as f:
                assert f.read(len(data)) == data
        finally:
            self.client.storage.flash(str(saved))
        with open(disk, "rb") as f:
            assert f.read(len(original)) == original
