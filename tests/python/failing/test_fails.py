# A test that fails after the board printed something: its report must carry the console.
from jmp_testing import JmpTest


class TestFails(JmpTest):
    exporter_selector = "vendor=acme,model=widget-v2"

    def test_waits_for_what_never_comes(self):
        self.client.power.cycle(wait=0.2)
        self.client.serial.read_until("boot complete", timeout=30)
        # A login: the password is typed at a prompt that does not echo it, and must not
        # appear in the recording of this failed test.
        self.client.serial.read_until("login: ", timeout=30)
        self.client.serial.sendline("root")
        self.client.serial.read_until("Password: ", timeout=30)
        self.client.serial.sendline("pw-s3cret-8841")
        self.client.serial.read_until(":~# ", timeout=30)
        self.client.serial.sendline("echo-marker-4711")
        self.client.serial.read_until("kernel panic", timeout=1)
